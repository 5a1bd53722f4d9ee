"""A fake istiod (ADS + CA on one TLS port) on a background thread, for tests that drive a
daemon *process*: the test's own thread may block while the fake keeps serving."""

from __future__ import annotations

from ztunnel_py.testing.background import BackgroundLoop
from ztunnel_py.testing.ca import FakeCa
from ztunnel_py.testing.istiod import FakeIstiod
from ztunnel_py.testing.pki import CertificateAuthority


class BackgroundIstiod:
    def __init__(self, *, config_yaml: str, token: str | None = None) -> None:
        self.authority = CertificateAuthority.create(common_name="fake istiod mesh root")
        self.ca = FakeCa(self.authority, required_token=token)
        self._config_yaml = config_yaml
        self._token = token
        self.loop: BackgroundLoop | None = None
        self.istiod: FakeIstiod | None = None

    def __enter__(self) -> BackgroundIstiod:
        self.loop = BackgroundLoop("fake-istiod")

        async def start() -> FakeIstiod:
            istiod = FakeIstiod(
                config_yaml=self._config_yaml,
                token=self._token,
                authority=self.authority,
                extra_servicers=[self.ca.add_to_server],
            )
            await istiod.start()
            return istiod

        self.istiod = self.loop.run(start())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None
        if self.istiod is not None:
            self.loop.run(self.istiod.stop())
        self.loop.close()

    @property
    def address(self) -> str:
        assert self.istiod is not None
        return self.istiod.address

    @property
    def root_pem(self) -> bytes:
        return self.authority.root_pem
