"""Fixtures for the real-kernel BPF tests (``ztunnel_py.testing.bpf`` builds the scenario)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztunnel_py.testing.bpf import PodEnv, pod_environment, pods_cgroup
from ztunnel_py.testing.privileged import require

ROOT = Path(__file__).resolve().parents[2]
BPF_DIR = ROOT / "bpf"
PODCLIENT = Path(__file__).with_name("podclient.py")


@pytest.fixture(scope="session")
def bpf_objects() -> Path:
    """``make -C bpf``: the same build the install step runs."""
    require(shutil.which("clang") is not None, "clang is not installed (Debian package clang)")
    require(shutil.which("make") is not None, "make is not installed")
    proc = subprocess.run(["make", "-C", str(BPF_DIR)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"building the BPF objects failed:\n{proc.stdout}\n{proc.stderr}"
    return BPF_DIR / "out"


@pytest.fixture
def cgroup_parent() -> Iterator[Path]:
    with pods_cgroup() as parent:
        yield parent


@pytest.fixture
def pod_env(bpf_objects: Path) -> Iterator[PodEnv]:
    with pod_environment(bpf_objects, PODCLIENT) as env:
        yield env
    assert not env.pin_path.exists(), f"pins left behind at {env.pin_path}"
