"""CrlManager's file handling (proxy/revocation.py): missing, bad, fixed, removed, watched."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ztunnel_py.proxy.revocation import CrlManager, CrlMetrics
from ztunnel_py.testing.pki import CertificateAuthority
from ztunnel_py.testing.poll import wait_until_async


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def manager(path: Path) -> CrlManager:
    return CrlManager(path, CrlMetrics(CollectorRegistry()))


def test_missing_file_at_start_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = manager(tmp_path / "crl.pem")
    with caplog.at_level(logging.WARNING):
        m.start()
    assert m.crls is None
    assert f"CRL file {tmp_path / 'crl.pem'} not found (CRL_PATH)" in caplog.text
    assert m.dump()["loaded"] is False


def test_bad_file_at_start_names_the_file_and_serves_without_crl(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(b"not a valid CRL")
    m = manager(path)
    with caplog.at_level(logging.ERROR):
        m.start()  # never raises
    assert m.crls is None
    assert f"CRL file {path}: CRL 1 (DER" in caplog.text
    assert "no CRL is in force" in caplog.text
    assert m.failures == 1


@pytest.mark.asyncio
async def test_watch_picks_up_a_file_that_appears_then_a_fix(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    path = tmp_path / "crl.pem"
    m = manager(path)
    m.start()
    watch = asyncio.create_task(m.watch(interval_s=0.01))
    try:
        path.write_bytes(b"garbage")
        await wait_until_async(lambda: m.failures > 0, "the watch to refuse the file")
        assert m.crls is None
        path.write_bytes(ca.crl([1, 2]))
        await wait_until_async(lambda: m.loads == 1, "the watch to load the fixed file")
        assert m.dump()["crls"] == 1
        assert m.last_error is None
    finally:
        watch.cancel()


@pytest.mark.asyncio
async def test_symlink_swap_is_seen(tmp_path: Path, ca: CertificateAuthority) -> None:
    # Kubernetes volumes update by swapping a ..data symlink; the path's target changes.
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "crl.pem").write_bytes(ca.crl([1]))
    (tmp_path / "v2" / "crl.pem").write_bytes(ca.crl([1, 2, 3]))
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "crl.pem").symlink_to("..data/crl.pem")
    m = manager(tmp_path / "crl.pem")
    m.start()
    assert m.crls is not None and len(list(m.crls.crls[0])) == 1
    watch = asyncio.create_task(m.watch(interval_s=0.01))
    try:
        tmp = tmp_path / "..data_tmp"
        tmp.symlink_to("v2")
        tmp.replace(tmp_path / "..data")
        await wait_until_async(lambda: m.loads >= 2, "the watch to load the swapped file")
        assert len(list(m.crls.crls[0])) == 3
    finally:
        watch.cancel()


@pytest.mark.asyncio
async def test_removed_file_keeps_the_last_good_crls(
    tmp_path: Path, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(ca.crl([7]))
    m = manager(path)
    m.start()
    watch = asyncio.create_task(m.watch(interval_s=0.01))
    try:
        with caplog.at_level(logging.ERROR):
            path.unlink()
            await wait_until_async(lambda: m.failures > 0, "the watch to refuse the file")
        assert f"CRL file {path} was removed; keeping the previous 1 CRL(s)" in caplog.text
        assert m.crls is not None and len(m.crls) == 1
    finally:
        watch.cancel()


@pytest.mark.asyncio
async def test_oversized_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ztunnel_py.proxy.revocation as revocation

    monkeypatch.setattr(revocation, "MAX_CRL_FILE_BYTES", 10)
    path = tmp_path / "crl.pem"
    path.write_bytes(b"x" * 11)
    m = manager(path)
    assert not await m.reload()
    assert m.last_error == f"CRL file {path} is larger than 10 bytes; not a CRL"
