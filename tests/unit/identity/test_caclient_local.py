"""Choosing the CA client from Config, and the in-process CA clients (local dir, FAKE_CA)."""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import random

import pytest

from ztunnel_py.config import Config, RootCert, RootCertKind
from ztunnel_py.identity.caclient import LocalCaClient, build_ca_client
from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.errors import LocalCaError
from ztunnel_py.identity.istiod_ca import IstiodCaClient
from ztunnel_py.identity.localca import CA_KEY_FILE
from ztunnel_py.identity.manager import SecretManager
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.testing.clock import FakeClock

A = Identity("cluster.local", "ns1", "a")
B = Identity("cluster.local", "ns2", "b")


def _config(tmp_path, **kw) -> Config:
    root = RootCert(RootCertKind.FILE, str(tmp_path / "root-cert.pem"))
    defaults = {
        "xds_address": None,
        "ca_address": None,
        "xds_root_cert": root,
        "ca_root_cert": root,
        "local_ca_dir": tmp_path / "state" / "ca",
        "secret_ttl_s": 3600.0,
    }
    return Config(**{**defaults, **kw})


@pytest.mark.asyncio
async def test_local_ca_by_default(tmp_path):
    clock = FakeClock()
    client = build_ca_client(_config(tmp_path), clock)
    assert isinstance(client, LocalCaClient)
    assert (tmp_path / "state" / "ca" / CA_KEY_FILE).exists()
    cert = await client.fetch_certificate(A)
    assert cert.identity == A
    assert cert.not_after - clock.wall() == pytest.approx(3600, abs=1)
    # after a restart the new daemon's certificates still chain to the same root
    again = build_ca_client(_config(tmp_path), clock)
    assert isinstance(again, LocalCaClient)
    other = await again.fetch_certificate(B)
    WorkloadCertificate.build(A, cert.private_key_pem, cert.leaf, [], other.roots)


def test_local_ca_refuses_open_directory(tmp_path):
    state = tmp_path / "state" / "ca"
    state.mkdir(parents=True, mode=0o777)
    state.chmod(0o777)
    with pytest.raises(LocalCaError, match="chmod 700"):
        build_ca_client(_config(tmp_path), FakeClock())


@pytest.mark.asyncio
async def test_fake_ca_is_in_memory_and_shared_by_identities(tmp_path):
    client = build_ca_client(_config(tmp_path, fake_ca=True), FakeClock())
    assert isinstance(client, LocalCaClient)
    assert client.ca.directory is None
    assert not (tmp_path / "state").exists()
    a, b = await client.fetch_certificate(A), await client.fetch_certificate(B)
    assert a.roots == b.roots  # peers of one daemon trust each other


def test_istiod_when_ca_address_is_set(tmp_path):
    client = build_ca_client(
        _config(tmp_path, ca_address="https://istiod.istio-system.svc:15012"), FakeClock()
    )
    assert isinstance(client, IstiodCaClient)


@pytest.mark.asyncio
async def test_secret_manager_with_local_ca(tmp_path):
    clock = FakeClock()
    client = build_ca_client(_config(tmp_path), clock)
    manager = SecretManager(client, clock, random.Random(0))
    try:
        cert = await manager.fetch_certificate(A)
        assert cert.identity == A
        assert manager.dump()[0]["state"] == "Available"
    finally:
        await manager.close()
