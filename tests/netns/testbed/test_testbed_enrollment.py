"""A testbed node enrolled through the fake istio-cni agent; peers on other nodes reach it."""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from pathlib import Path

import pytest

from tools.testbed import Testbed, TestbedOptions, cgroup2_mount, make_plan
from tools.testbed.plan import render_local_config
from ztunnel_py.redirect.workloads import PodState, WorkloadManager
from ztunnel_py.redirect.zds import ZdsClient
from ztunnel_py.state.store import ProxyState
from ztunnel_py.testing.cni_agent import FakeCniAgent
from ztunnel_py.testing.echo_pod import EchoPodProxyFactory
from ztunnel_py.testing.privileged import require
from ztunnel_py.xds.local import parse_local_config

pytestmark = [pytest.mark.root]


@pytest.mark.asyncio
async def test_node_daemon_enrols_its_pods_and_peers_reach_port_15008(tmp_path: Path) -> None:
    require(cgroup2_mount() is not None, "a cgroup v2 mount")
    bed = Testbed(
        make_plan(f"e{secrets.token_hex(3)}", 2, 2), TestbedOptions(app="none"), state_dir=tmp_path
    )
    bed.up()
    sock_dir = Path(tempfile.mkdtemp(prefix="zds-"))
    agent = FakeCniAgent(sock_dir / "ztunnel.sock")
    try:
        state = ProxyState()
        state.apply(parse_local_config(render_local_config(bed.plan)))
        factory = EchoPodProxyFactory(b"node-0:")
        manager = WorkloadManager(state, factory)
        for pod in bed.plan.pods_on("node-0"):
            await agent.add_pod(pod.uid, pod.workload_info, pod.netns_path)
        await agent.start()
        client = ZdsClient(agent.path, manager)
        task = asyncio.get_running_loop().create_task(client.run())
        await agent.wait_snapshots(1)

        local = bed.plan.pods_on("node-0")
        assert all(manager.pod_state(p.uid) is PodState.UP for p in local)
        assert {tuple(map(str, p.ips)) for p in factory.started} == {(p.ip,) for p in local}
        remote = bed.plan.pod("pod-1-0")
        for pod in local:
            reply = await asyncio.to_thread(_hbone_port_greeting, bed, remote.name, pod.ip)
            assert reply == b"node-0:x"

        client.close()
        await task
        await manager.shutdown(0.0)
    finally:
        await agent.stop()
        bed.down()


def _hbone_port_greeting(bed: Testbed, src: str, ip: str) -> bytes:
    with bed.connect(src, ip, 15008) as sock:
        sock.sendall(b"x")
        data = b""
        while len(data) < len(b"node-0:x"):
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
        return data
