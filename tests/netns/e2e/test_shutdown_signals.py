"""Stopping a daemon with live connections: the first signal drains, a second one cuts it short."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.netns.e2e.support import MeshMaker, accepted_on, start_stream
from tools.testbed.mesh import ExtraService
from ztunnel_py.testing.poll import wait_until

pytestmark = pytest.mark.root

REMOTE = ExtraService("sig-n1", "10.96.0.110", ("pod-1-1",))


def test_second_signal_exits_at_once_while_the_first_is_still_draining(
    make_mesh: MeshMaker,
) -> None:
    mesh = make_mesh(
        "sig",
        "iptables",
        services=(REMOTE,),
        env={"CONNECTION_TERMINATION_DEADLINE": "300s"},  # the drain alone would wait minutes
    )
    daemon = mesh.daemons["node-0"]
    stream = start_stream(mesh, "pod-0-0", REMOTE.vip, 9000)
    try:
        wait_until(
            lambda: accepted_on(mesh, "pod-0-0", 15001) == {daemon.proc.pid},
            "the daemon to accept the stream",
        )
        daemon.signal(signal.SIGTERM)
        wait_until(lambda: "received SIGTERM, draining" in daemon.log(), "the first signal")
        with pytest.raises(subprocess.TimeoutExpired):
            daemon.proc.wait(timeout=1)  # draining: the live stream keeps it up
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=30) == 1  # forced: not a clean drain
        assert "again, exiting without waiting for connections" in daemon.log()
    finally:
        if stream.poll() is None:
            stream.kill()
        stream.communicate()  # also closes its pipes
