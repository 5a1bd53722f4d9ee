"""The demo README.md opens with (``python -m tools.demo``) does what it says, and cleans up.

It is one of the two commands a new user runs first, so it runs here in both redirect modes,
end to end: DNS through the pod's proxy, calls over HBONE with both daemons' access logs, the
policy step refusing one caller. Killed mid-run (SIGTERM), it leaves no namespace and no
process behind (a SIGKILL cannot be caught: tests/unit/testbed/test_resolver_death.py checks
that its dnsmasq at least dies with it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ztunnel_py.testing.poll import HANG_GUARD_S, wait_until

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEMO_PREFIX = "zttb-demo"  # the demo's testbed tag is "demo"


def demo(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tools.demo", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def leftovers() -> list[str]:
    netns = (
        [n for n in os.listdir("/run/netns") if n.startswith(DEMO_PREFIX)]
        if os.path.isdir("/run/netns")
        else []
    )
    dnsmasq = subprocess.run(
        ["pgrep", "-f", f"ip netns exec {DEMO_PREFIX}"], capture_output=True, text=True
    ).stdout.split()
    return netns + [f"process {pid}" for pid in dnsmasq]


@pytest.fixture(autouse=True)
def no_demo_running() -> None:
    assert leftovers() == [], "a demo testbed is already up on this machine"


@pytest.mark.parametrize("redirect", ["ebpf", "iptables"])
def test_the_demo_runs_every_step_and_tears_down(redirect: str) -> None:
    proc = demo("--redirect", redirect)
    out, _ = proc.communicate(timeout=4 * HANG_GUARD_S)
    assert proc.returncode == 0, out
    # DNS: the mesh answers the service's FQDN and short name, dnsmasq the other name.
    answers = {m[1]: m[2] for m in re.finditer(r"^   (\S+) +-> (.*)$", out, re.MULTILINE)}
    assert answers["reviews.default.svc.cluster.local"] == (
        "NOERROR 10.96.0.50  (ztunnel-py, from the mesh)"
    )
    assert answers["reviews"] == "NOERROR 10.96.0.50  (ztunnel-py, from the mesh)"
    assert answers["www.example.test"] == "NOERROR 192.0.2.80  (forwarded upstream)"
    # Three calls answered by node-1's pods, logged with identities at both ends.
    assert out.count("   answered by pod-1-") == 3, out
    assert "dst.identity=spiffe://cluster.local/ns/default/sa/app-" in out
    # The policy step: app-0 still served, app-1 refused at both ends.
    assert "pod-0-0 (app-0): answered by pod-1-" in out
    assert "pod-0-1 (app-1): refused" in out
    assert "policy rejection" in out and "401 Unauthorized" in out
    assert f"redirect {redirect}" in out
    assert "== tearing down" in out
    assert leftovers() == []


def test_a_demo_killed_mid_run_still_tears_everything_down() -> None:
    proc = demo()
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:  # up to the first call: mesh, daemons and dnsmasq all running
        lines.append(line)
        if "calls http://" in line:
            break
    assert any("calls http://" in line for line in lines), "".join(lines)
    assert leftovers() != []  # the kill below really has something to clean up
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=4 * HANG_GUARD_S)  # also closes its stdout
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "== tearing down" in rest
    wait_until(lambda: leftovers() == [], "no demo namespace or dnsmasq left")
