"""IstiodCaClient against the fake istiod CA over real gRPC TLS on loopback."""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import dataclasses
import random

import pytest
import pytest_asyncio

from ztunnel_py.config import Config, ProxyMode, RootCert, RootCertKind
from ztunnel_py.identity.clock import SystemClock
from ztunnel_py.identity.errors import CaError
from ztunnel_py.identity.istiod_ca import IstiodCaClient
from ztunnel_py.identity.manager import SecretManager
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.testing.ca import Behaviour, FakeCa, start_tls_server
from ztunnel_py.testing.istiod import FakeIstiod
from ztunnel_py.testing.pki import CertificateAuthority

ID = Identity("cluster.local", "default", "productpage")
ISTIOD_NAME = "istiod.istio-system.svc"


@pytest.fixture(scope="module")
def mesh_root() -> CertificateAuthority:
    return CertificateAuthority.create(common_name="mesh root")


@pytest.fixture(scope="module")
def signer(mesh_root: CertificateAuthority) -> CertificateAuthority:
    return mesh_root.intermediate(common_name="istiod signer")


@pytest_asyncio.fixture
async def istiod(mesh_root, signer):
    fake = FakeCa(signer)
    server_cert = mesh_root.issue_server(dns_names=[ISTIOD_NAME])
    server, port = await start_tls_server([fake], server_cert)
    yield fake, port
    await server.stop(None)


@pytest.fixture
def config_for(tmp_path, mesh_root):
    root_file = tmp_path / "root-cert.pem"
    root_file.write_bytes(mesh_root.root_pem)
    token = tmp_path / "istio-token"
    token.write_text("token-one\n")

    def make(port: int, **overrides) -> Config:
        base = Config(
            xds_address=None,
            ca_address=f"https://127.0.0.1:{port}",
            xds_root_cert=RootCert(RootCertKind.FILE, str(root_file)),
            ca_root_cert=RootCert(RootCertKind.FILE, str(root_file)),
            alt_ca_hostname=ISTIOD_NAME,
            auth_token=str(token),
            cluster_id="cluster-7",
            ca_headers={"x-team": "mesh"},
            secret_ttl_s=7200.0,
            proxy_mode=ProxyMode.SHARED,
        )
        return dataclasses.replace(base, **overrides)

    make.root_file = root_file  # type: ignore[attr-defined]
    make.token = token  # type: ignore[attr-defined]
    return make


@pytest.mark.asyncio
async def test_issue_with_impersonation_and_headers(istiod, config_for, signer, mesh_root):
    fake, port = istiod
    client = IstiodCaClient(config_for(port))
    try:
        cert = await client.fetch_certificate(ID)
    finally:
        await client.close()
    assert cert.identity == ID
    assert cert.intermediates == (signer.cert,)
    assert cert.roots == (mesh_root.cert,)
    assert cert.not_after - cert.not_before == 7200 + 120
    (req,) = fake.requests
    assert req.csr_uris == (str(ID),)
    assert req.validity_duration == 7200
    assert req.metadata == {"ImpersonatedIdentity": str(ID)}
    assert req.impersonated_identity == str(ID)
    assert req.headers["authorization"] == "Bearer token-one"
    assert req.headers["clusterid"] == "cluster-7"
    assert req.headers["x-team"] == "mesh"


@pytest.mark.asyncio
async def test_dedicated_mode_sends_no_impersonation(istiod, config_for):
    fake, port = istiod
    client = IstiodCaClient(config_for(port, proxy_mode=ProxyMode.DEDICATED))
    try:
        await client.fetch_certificate(ID)
    finally:
        await client.close()
    assert fake.requests[0].metadata == {}


@pytest.mark.asyncio
async def test_token_is_reread_for_every_call(istiod, config_for):
    fake, port = istiod
    client = IstiodCaClient(config_for(port))
    try:
        await client.fetch_certificate(ID)
        config_for.token.write_text("token-two")
        await client.fetch_certificate(ID)
    finally:
        await client.close()
    assert [r.headers["authorization"] for r in fake.requests] == [
        "Bearer token-one",
        "Bearer token-two",
    ]


@pytest.mark.asyncio
async def test_static_token_and_required_token(istiod, config_for):
    fake, port = istiod
    fake.required_token = "literal-token"
    client = IstiodCaClient(config_for(port, auth_token="literal-token"))
    try:
        assert (await client.fetch_certificate(ID)).identity == ID
    finally:
        await client.close()
    wrong = IstiodCaClient(config_for(port))
    try:
        with pytest.raises(CaError, match=r"UNAUTHENTICATED.*check AUTH_TOKEN"):
            await wrong.fetch_certificate(ID)
    finally:
        await wrong.close()


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (Behaviour.GARBAGE, r"cert_chain\[0\] \(the leaf\) holds no PEM"),
        (Behaviour.BAD_CHAIN, "does not lead to the trust roots"),
        (Behaviour.NO_ROOT, "no root certificate"),
        (Behaviour.WRONG_IDENTITY, r"ns/intruder/sa/intruder, but .*sa/productpage was requested"),
        (Behaviour.UNAVAILABLE, "UNAVAILABLE: fake CA told to be unavailable"),
        (Behaviour.UNAUTHENTICATED, "CA_TRUSTED_NODE_ACCOUNTS"),
    ],
)
@pytest.mark.asyncio
async def test_bad_answers_are_refused(istiod, config_for, behaviour, message):
    fake, port = istiod
    fake.behaviour = behaviour
    client = IstiodCaClient(config_for(port))
    try:
        with pytest.raises(CaError, match=message):
            await client.fetch_certificate(ID)
    finally:
        await client.close()
    assert len(fake.requests) == 1


@pytest.mark.asyncio
async def test_istiod_must_present_a_certificate_from_ca_root(istiod, config_for, tmp_path):
    fake, port = istiod
    stranger = tmp_path / "other-root.pem"
    stranger.write_bytes(CertificateAuthority.create(common_name="not the mesh").root_pem)
    client = IstiodCaClient(
        config_for(port, ca_root_cert=RootCert(RootCertKind.FILE, str(stranger)))
    )
    try:
        with pytest.raises(CaError, match="UNAVAILABLE"):
            await client.fetch_certificate(ID)
    finally:
        await client.close()
    assert fake.requests == []  # the TLS handshake failed before any request


@pytest.mark.asyncio
async def test_root_file_change_rebuilds_the_channel(istiod, config_for, mesh_root):
    fake, port = istiod
    root_file = config_for.root_file
    good = root_file.read_bytes()
    root_file.write_bytes(CertificateAuthority.create(common_name="stale root").root_pem)
    client = IstiodCaClient(config_for(port))
    try:
        with pytest.raises(CaError):
            await client.fetch_certificate(ID)
        root_file.write_bytes(good)
        assert (await client.fetch_certificate(ID)).identity == ID
    finally:
        await client.close()
    assert len(fake.requests) == 1


@pytest.mark.asyncio
async def test_inline_root_and_missing_root_file(istiod, config_for, mesh_root, tmp_path):
    _, port = istiod
    inline = IstiodCaClient(
        config_for(port, ca_root_cert=RootCert(RootCertKind.INLINE, mesh_root.root_pem.decode()))
    )
    try:
        assert (await inline.fetch_certificate(ID)).identity == ID
    finally:
        await inline.close()
    missing = IstiodCaClient(
        config_for(port, ca_root_cert=RootCert(RootCertKind.FILE, str(tmp_path / "absent.pem")))
    )
    try:
        with pytest.raises(CaError, match=r"cannot read CA_ROOT_CA file .*absent\.pem"):
            await missing.fetch_certificate(ID)
    finally:
        await missing.close()


@pytest.mark.asyncio
async def test_secret_manager_over_istiod(istiod, config_for):
    fake, port = istiod
    client = IstiodCaClient(config_for(port))
    manager = SecretManager(client, SystemClock(), random.Random(3))
    try:
        other = Identity("cluster.local", "default", "reviews")
        manager.prefetch([other])
        cert = await manager.fetch_certificate(ID)
        assert cert.identity == ID
        assert (await manager.fetch_certificate(other)).identity == other
        assert manager.all_available()
        assert sorted(r.impersonated_identity for r in fake.requests) == sorted(
            [str(ID), str(other)]
        )
    finally:
        await manager.close()
        await client.close()


@pytest.mark.asyncio
async def test_fake_ca_shares_the_fake_istiod_server(config_for, signer, mesh_root):
    fake = FakeCa(signer)
    async with FakeIstiod(authority=mesh_root, extra_servicers=[fake.add_to_server]) as istiod:
        config = config_for(
            0,
            ca_address=istiod.address,
            ca_root_cert=RootCert(RootCertKind.INLINE, istiod.root_pem.decode()),
            alt_ca_hostname=None,
        )
        client = IstiodCaClient(config)
        try:
            cert = await client.fetch_certificate(ID)
        finally:
            await client.close()
    assert cert.identity == ID
    assert fake.requests[0].impersonated_identity == str(ID)
