"""The local CA directory on a full disk: the daemon refuses to start with a clear error, leaves
no half-written root behind, and starts normally once there is room (root: mounts a tmpfs)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztunnel_py.identity.errors import LocalCaError
from ztunnel_py.identity.localca import CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, LocalCa
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    require(os.geteuid() == 0, "not root (mounting a tmpfs)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass  # ENOSPC: the disk is full
    finally:
        os.close(fd)
    return filler


def test_full_disk_refuses_with_a_clear_error_and_leaves_no_half_root(tiny_disk: Path) -> None:
    ca_dir = tiny_disk / "ca"
    ca_dir.mkdir(mode=0o700)
    filler = fill(tiny_disk)
    with pytest.raises(LocalCaError, match="No space left on device") as info:
        LocalCa.load_or_create(ca_dir, trust_domain="cluster.local", now=1.7e9)
    assert str(ca_dir) in str(info.value)
    assert not any((ca_dir / n).exists() for n in (CA_CERT_FILE, ROOT_CERT_FILE, CA_KEY_FILE))
    assert [p.name for p in ca_dir.iterdir() if p.name.endswith(".tmp")] == []

    filler.unlink()  # room again: the next start makes the root as on a first start
    ca = LocalCa.load_or_create(ca_dir, trust_domain="cluster.local", now=1.7e9)
    assert ca.created
    again = LocalCa.load_or_create(ca_dir, trust_domain="cluster.local", now=1.7e9)
    assert not again.created and again.ca_cert == ca.ca_cert
