"""Whether privileged tests can run here, and the rule for when they may not.

A skip is allowed only when the machine lacks the privilege or kernel feature *and*
``ZT_REQUIRE_PRIVILEGED`` is not set; CI sets it, so there a missing feature is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def require_privileged_env() -> bool:
    return os.environ.get("ZT_REQUIRE_PRIVILEGED", "") not in {"", "0", "false"}


def missing_privileges(kind: str) -> str | None:
    """Why tests of ``kind`` (``root`` or ``bpf``) cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "needs root"
    if kind == "bpf":
        if not Path("/sys/kernel/btf/vmlinux").exists():
            return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
        if not any(
            line.split()[2] == "cgroup2" for line in Path("/proc/mounts").read_text().splitlines()
        ):
            return "no cgroup v2 mount"
    return None


def require(ok: bool, what: str) -> None:
    """Inside a test: skip when ``what`` is missing, or fail when privileged tests are required."""
    if ok:
        return
    if require_privileged_env():
        pytest.fail(f"ZT_REQUIRE_PRIVILEGED=1 but {what}")
    pytest.skip(f"{what} (set ZT_REQUIRE_PRIVILEGED=1 to fail instead)")
