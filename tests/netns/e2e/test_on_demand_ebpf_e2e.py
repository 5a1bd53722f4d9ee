"""``XDS_ON_DEMAND`` in eBPF mode against real daemons (root, BPF): the daemons take their
configuration from a fake istiod that answers on-demand subscriptions, so a node knows only
what it asked for.

- a pod on node-0 connects to a pod of node-1 that node-0's maps do not know: the kernel
  sends the connection to the pod's :15001 all the same, the daemon asks istiod for the
  address, learns the workload and tunnels it over HBONE to node-1;
- a connection to an address istiod does not know (a pod outside the mesh) is also held while
  the daemon asks, then passed through.

(That loopback is never captured is tests/bpf/test_bpf_datapath.py's business.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.e2e.support import access_records, log_mark, mesh_tag, only_one
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import Mesh, MeshOptions
from ztunnel_py.testing.istiod_thread import BackgroundIstiod
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root, pytest.mark.bpf]

CLIENT, SERVER, OUTSIDE = "pod-0-0", "pod-1-1", "pod-1-0"
ECHO = 9000
ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
TOKEN = "on-demand-token"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, BackgroundIstiod]]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    tag = mesh_tag("odx", "ebpf")
    work_dir = Path(tmp_path_factory.mktemp(tag))
    # The mesh istiod serves: the testbed's own local config, written by a mesh not brought up.
    probe = Mesh(MeshOptions(tag=tag, redirect="ebpf", outside=(OUTSIDE,)), work_dir)
    probe.write_config()
    config_yaml = probe.config_path.read_text()
    token = work_dir / "istio-token"
    token.write_text(TOKEN)
    with BackgroundIstiod(config_yaml=config_yaml, token=TOKEN) as istiod:
        root = istiod.root_pem.decode()
        options = MeshOptions(
            tag=tag,
            redirect="ebpf",
            outside=(OUTSIDE,),
            env={
                "LOG_FORMAT": "json",
                "LOCAL_XDS_PATH": "",  # istiod is the only source
                "XDS_ADDRESS": istiod.address,
                "CA_ADDRESS": istiod.address,
                "XDS_ROOT_CA": root,
                "CA_ROOT_CA": root,
                "AUTH_TOKEN": str(token),
                "XDS_ON_DEMAND": "true",
                "ISTIO_META_DNS_CAPTURE": "false",
            },
        )
        mesh = Mesh(options, work_dir)
        try:
            mesh.up()
            yield mesh, istiod
        finally:
            mesh.down()


def asked(istiod: BackgroundIstiod, name: str) -> bool:
    assert istiod.istiod is not None
    return any(
        name in r.subscribe and r.type_url == ADDRESS_TYPE and not r.is_initial
        for r in list(istiod.istiod.requests)
    )


def workload_names(mesh: Mesh, node: str) -> set[str]:
    return {w["name"] for w in mesh.daemons[node].config_dump()["workloads"]}


def test_unknown_mesh_destination_is_fetched_then_tunnelled(
    bed: tuple[Mesh, BackgroundIstiod],
) -> None:
    mesh, istiod = bed
    src = mesh.daemons["node-0"]
    server = mesh.pod(SERVER)
    assert SERVER not in workload_names(mesh, "node-0")  # node-0 never asked for it yet
    mark = log_mark(src)

    result: dict[str, Any] = mesh.client(CLIENT, "echo", server.ip, ECHO, "--bytes", "65536")

    assert result["result"] == "ok", result
    assert result["received"] == 65536
    assert asked(istiod, f"/{server.ip}")
    assert SERVER in workload_names(mesh, "node-0")
    record = only_one(
        lambda: access_records(src, mark, direction="outbound", dst_workload=SERVER),
        "node-0's access log of the tunnelled connection",
    )
    assert record["dst.identity"] == server.identity  # mTLS to the server's identity: HBONE
    assert record["dst.hbone_addr"] == f"{server.ip}:{ECHO}"
    assert "error" not in record


def test_address_istiod_does_not_know_is_held_then_passed_through(
    bed: tuple[Mesh, BackgroundIstiod],
) -> None:
    mesh, istiod = bed
    src = mesh.daemons["node-0"]
    outside = mesh.pod(OUTSIDE)
    mark = log_mark(src)

    # The fake istiod's answer does not name an address it does not have, so the daemon holds
    # the connection for its whole on-demand wait (5 s) before passing it through: the client
    # waits longer than that (a hang guard, not a performance expectation).
    result: dict[str, Any] = mesh.client(
        CLIENT, "echo", outside.ip, ECHO, "--bytes", "4096", "--timeout", "30"
    )

    assert result["result"] == "ok", result
    assert result["received"] == 4096
    assert asked(istiod, f"/{outside.ip}")  # held while the daemon asked
    assert OUTSIDE not in workload_names(mesh, "node-0")
    record = only_one(
        lambda: [
            r
            for r in access_records(src, mark, direction="outbound")
            if r.get("dst.addr") == f"{outside.ip}:{ECHO}"
        ],
        "node-0's access log of the passed-through connection",
    )
    assert "dst.hbone_addr" not in record and "dst.identity" not in record
