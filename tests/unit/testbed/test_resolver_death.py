"""The testbed's dnsmasq dies with whoever started it, even if that was SIGKILLed mid-run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ztunnel_py.testing.poll import wait_until

REPO = Path(__file__).resolve().parents[3]
CHILD = """
import subprocess, sys, time
from tools.testbed.resolver import die_with_parent
grandchild = subprocess.Popen(die_with_parent(["sleep", "300"]))
print(grandchild.pid, flush=True)
time.sleep(300)
"""


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_process_run_with_die_with_parent_goes_when_its_parent_is_killed() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    ) as parent:
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        try:
            # setpriv sets the death signal and then execs: kill the parent only once the
            # grandchild is ``sleep``, or (on a busy machine) the kill may come before the prctl.
            wait_until(lambda: command(grandchild) == "sleep", "setpriv to exec sleep")
            parent.kill()
            parent.wait()
            wait_until(lambda: not alive(grandchild), "the grandchild to die with its parent")
        finally:
            if alive(grandchild):
                os.kill(grandchild, 9)
