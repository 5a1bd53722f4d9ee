"""The BPF programs on the real kernel: capture, transparency, inbound steering, kernel deny,
fail-closed behaviour and re-adoption of pinned state (root; see conftest.py for the setup)."""

from __future__ import annotations

import ipaddress
import select
import socket
import stat
import struct

import pytest

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf.errors import IncompatiblePinnedState
from ztunnel_py.bpf.loader import BpfLoader
from ztunnel_py.bpf.reconcile import Reconciler
from ztunnel_py.state.model import CidrVip, GatewayAddress, NetworkAddress, Service, frozen_map
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.testing.bpf import (
    OUTSIDER_IP,
    PEER_IP,
    POD_IP,
    POD_IP6,
    VIP,
    VIP6,
    WAIT_S,
    PodEnv,
)
from ztunnel_py.testing.poll import wait_until

pytestmark = [pytest.mark.root, pytest.mark.bpf]
ip = ipaddress.ip_address


def canonical(addr: str) -> str:
    parsed = ip(addr.split("%", 1)[0])
    if parsed.version == 6 and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


# ------------------------------------------------------------------ outbound


def test_outbound_to_service_vip_is_captured_with_its_original_destination(pod_env: PodEnv) -> None:
    loader = pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None
    before = pod_env.counters()

    proc = pod_env.app(VIP, 80)
    served = pod_env.serve_one(pod_env.outbound, b"pong-15001")
    assert served is not None, "the connection to the VIP did not reach the pod's :15001"
    # What the proxy does for an accepted connection: its peer port finds the original.
    dst = loader.original_destinations().original_destination(served.sock)
    served.sock.close()
    result = pod_env.result(proc)

    assert dst == (ip(VIP), 80)
    assert canonical(served.peer[0]) == "127.0.0.1"
    assert result["result"] == "connected"
    assert result["received"] == "pong-15001"
    assert result["peer"] == [VIP, 80], "getpeername must show what the application dialled"
    after = pod_env.counters()
    assert after["out_redirected"] == before["out_redirected"] + 1
    assert after["orig_published"] == before["orig_published"] + 1

    # Both ends closed: sock_ops removes the entry when the application's socket closes.
    orig_map = loader.maps[t.MAP_ORIG_DST]
    wait_until(
        lambda: dict(orig_map.items()) == {},
        "sock_ops to remove the closed connection's entry",
        timeout=WAIT_S,
        interval=0.02,
    )


def test_outbound_ipv6_and_ipv4_mapped_are_captured(pod_env: PodEnv) -> None:
    loader = pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None

    for host, wire, expected_dst in (
        (VIP6, socket.AF_INET6, (ip(VIP6), 80)),
        (f"::ffff:{VIP}", socket.AF_INET, (ip(VIP), 80)),
    ):
        proc = pod_env.app(host, 80, family=6)
        served = pod_env.serve_one(pod_env.outbound, b"pong-15001")
        assert served is not None, f"{host} was not captured"
        peer = ip(served.peer[0])
        assert isinstance(peer, ipaddress.IPv6Address)
        is_v4 = peer.ipv4_mapped is not None
        assert (socket.AF_INET if is_v4 else socket.AF_INET6) == wire
        assert loader.original_destinations().original_destination(served.sock) == expected_dst
        served.sock.close()
        result = pod_env.result(proc)
        assert result["received"] == "pong-15001"
        assert result["peer"] == [host, 80]


def test_outbound_to_non_mesh_address_is_not_captured(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None
    real = pod_env.listen(pod_env.peer, OUTSIDER_IP, 8080)
    before = pod_env.counters()

    proc = pod_env.app(OUTSIDER_IP, 8080)
    served = pod_env.serve_one(real, b"pong-real")
    result = pod_env.result(proc)

    assert served is not None and canonical(served.peer[0]) == POD_IP
    assert result["received"] == "pong-real"
    assert result["peer"] == [OUTSIDER_IP, 8080]
    assert not pod_env.pending(pod_env.outbound), "a non-mesh connection reached :15001"
    assert pod_env.counters()["out_passthrough"] == before["out_passthrough"] + 1
    assert pod_env.counters()["out_redirected"] == before["out_redirected"]


def test_on_demand_captures_unknown_destinations_but_not_loopback(pod_env: PodEnv) -> None:
    """XDS_ON_DEMAND: a destination the maps do not know goes to :15001 with its original
    destination, for the proxy to look up; loopback stays the application's own."""
    loader = pod_env.start_loader(dns_capture=False, capture_unknown=True)
    pod_env.enroll()
    assert pod_env.outbound is not None
    before = pod_env.counters()

    proc = pod_env.app(OUTSIDER_IP, 8080)
    served = pod_env.serve_one(pod_env.outbound, b"pong-15001")
    assert served is not None, "the unknown destination did not reach the pod's :15001"
    dst = loader.original_destinations().original_destination(served.sock)
    served.sock.close()
    result = pod_env.result(proc)
    assert dst == (ip(OUTSIDER_IP), 8080)
    assert result["received"] == "pong-15001"
    assert result["peer"] == [OUTSIDER_IP, 8080], "getpeername must show what was dialled"
    after = pod_env.counters()
    assert after["out_redirected"] == before["out_redirected"] + 1
    assert after["out_passthrough"] == before["out_passthrough"]

    # The pod's own loopback is never captured.
    local = pod_env.listen(pod_env.pod, "127.0.0.1", 8081)
    proc = pod_env.app("127.0.0.1", 8081)
    served = pod_env.serve_one(local, b"pong-local")
    result = pod_env.result(proc)
    assert served is not None and result["received"] == "pong-local"
    assert not pod_env.pending(pod_env.outbound)


def test_outbound_to_a_cidr_vip_is_captured_by_prefix_and_port(pod_env: PodEnv) -> None:
    loader = pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None and pod_env.sync is not None
    waypoint = GatewayAddress(destination=NetworkAddress("", ip(PEER_IP)))

    def cidr_service(name: str, ports: dict[int, int], *prefixes: str) -> Service:
        return Service(
            name=name,
            namespace="default",
            hostname=f"{name}.default.svc.cluster.local",
            ports=frozen_map(ports),
            waypoint=waypoint,
            cidr_vips=tuple(CidrVip("", ipaddress.ip_network(p)) for p in prefixes),
        )

    wide = cidr_service("wide", {80: 8080}, "10.200.0.0/16", "fd00:200::/64")
    narrow = cidr_service("narrow", {}, "10.200.9.0/24")  # no ports: every port
    pod_env.sync.state_changed(pod_env.state.apply(UpdateBatch(services=(wide, narrow))))

    for host, port, family in (
        ("10.200.3.4", 80, 4),
        ("fd00:200::7", 80, 6),
        ("10.200.9.1", 81, 4),  # the narrower prefix, on a port the wider one lacks
    ):
        proc = pod_env.app(host, port, family=family)
        served = pod_env.serve_one(pod_env.outbound, b"pong-15001")
        assert served is not None, f"{host}:{port} was not captured"
        assert loader.original_destinations().original_destination(served.sock) == (ip(host), port)
        served.sock.close()
        assert pod_env.result(proc)["received"] == "pong-15001"

    # Outside every prefix, or a port the only covering prefix does not serve: untouched.
    for host, port in (("10.201.0.1", 80), ("10.200.3.4", 81)):
        before = pod_env.counters()
        pod_env.result(pod_env.app(host, port))
        assert not pod_env.pending(pod_env.outbound), f"{host}:{port} reached :15001"
        assert pod_env.counters()["out_passthrough"] == before["out_passthrough"] + 1

    # Removing the services takes their prefixes out of the trie.
    removal = UpdateBatch(removed_addresses=(wide.key, narrow.key))
    pod_env.sync.state_changed(pod_env.state.apply(removal))
    assert dict(loader.maps[t.MAP_DST_CIDR].items()) == {}


def test_outbound_socket_with_proxy_mark_is_not_redirected(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None
    real = pod_env.listen(pod_env.peer, PEER_IP, 8080)  # a mesh workload address
    before = pod_env.counters()

    proc = pod_env.app(PEER_IP, 8080, mark=0x539)
    served = pod_env.serve_one(real, b"pong-real")
    result = pod_env.result(proc)

    assert served is not None
    assert result["received"] == "pong-real"
    assert not pod_env.pending(pod_env.outbound)
    assert pod_env.counters()["out_proxy_skipped"] == before["out_proxy_skipped"] + 1

    # The same destination without the mark is captured: the mark made the difference.
    proc = pod_env.app(PEER_IP, 8080)
    served = pod_env.serve_one(pod_env.outbound, b"pong-15001")
    assert served is not None
    served.sock.close()
    assert pod_env.result(proc)["received"] == "pong-15001"


def test_outbound_is_refused_when_the_daemon_is_down(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None
    real = pod_env.listen(pod_env.peer, PEER_IP, 8080)
    pod_env.outbound.close()  # the daemon's :15001 is gone (crash, restart)
    pod_env.outbound = None

    for host, port in ((VIP, 80), (PEER_IP, 8080)):
        result = pod_env.result(pod_env.app(host, port))
        assert result["result"] == "refused", f"{host}:{port} gave {result}"
    assert not pod_env.pending(real), "a mesh destination was reached in plaintext"


def test_outbound_to_the_pods_own_address_stays_local(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None and pod_env.inbound is not None
    app = pod_env.listen(pod_env.pod, "0.0.0.0", 8080)
    before = pod_env.counters()

    proc = pod_env.app(POD_IP, 8080)  # a mesh workload address, but the pod's own
    served = pod_env.serve_one(app, b"pong-app")
    result = pod_env.result(proc)

    assert served is not None and result["received"] == "pong-app"
    assert not pod_env.pending(pod_env.outbound)
    assert not pod_env.pending(pod_env.inbound)
    after = pod_env.counters()
    assert after["out_local_skipped"] == before["out_local_skipped"] + 1
    assert after["in_local_skipped"] == before["in_local_skipped"] + 1


def test_unenrolled_pod_is_not_captured(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.sync is not None and pod_env.outbound is not None
    pod_env.sync.unenroll("pod-uid-a")
    real = pod_env.listen(pod_env.peer, PEER_IP, 8080)

    proc = pod_env.app(PEER_IP, 8080)
    served = pod_env.serve_one(real, b"pong-real")
    result = pod_env.result(proc)
    assert served is not None and result["received"] == "pong-real"
    assert not pod_env.pending(pod_env.outbound)


# ------------------------------------------------------------------ inbound


def test_inbound_plaintext_lands_on_15006_with_the_original_destination(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.inbound is not None
    app = pod_env.listen(pod_env.pod, "0.0.0.0", 8080)
    before = pod_env.counters()

    client = pod_env.peer.socket(socket.AF_INET)
    client.settimeout(WAIT_S)
    client.connect((POD_IP, 8080))
    client.sendall(b"hello")
    served = pod_env.serve_one(pod_env.inbound, b"pong-15006")
    assert served is not None
    assert (canonical(served.local[0]), served.local[1]) == (POD_IP, 8080)
    assert canonical(served.peer[0]) == PEER_IP
    assert client.recv(64) == b"pong-15006"
    client.close()
    served.sock.close()
    assert not pod_env.pending(app), "the application saw the connection directly"
    assert pod_env.counters()["in_redirected"] == before["in_redirected"] + 1

    # IPv6 too, through the same dual-stack listener.
    app6 = pod_env.listen(pod_env.pod, "::", 8081)
    client6 = pod_env.peer.socket(socket.AF_INET6)
    client6.settimeout(WAIT_S)
    client6.connect((POD_IP6, 8081))
    client6.sendall(b"hello6")
    served = pod_env.serve_one(pod_env.inbound, b"pong-15006")
    assert served is not None
    assert (canonical(served.local[0]), served.local[1]) == (POD_IP6, 8081)
    assert client6.recv(64) == b"pong-15006"
    client6.close()
    assert not pod_env.pending(app6)

    # From the pod to itself (how the proxy reaches the application) is never steered, neither
    # to its own address (reported on the device holding it, not on lo) nor to 127.0.0.1.
    for host in (POD_IP, "127.0.0.1"):
        local = pod_env.pod.socket(socket.AF_INET)
        local.settimeout(WAIT_S)
        local.connect((host, 8080))
        local.sendall(b"self")
        served = pod_env.serve_one(app, b"app")
        assert served is not None, f"a connection to {host} inside the pod was steered"
        assert local.recv(16) == b"app"
        local.close()
    assert not pod_env.pending(pod_env.inbound)
    assert pod_env.counters()["in_local_skipped"] >= before["in_local_skipped"] + 1


def test_inbound_to_hbone_port_is_not_steered(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.inbound is not None
    hbone = pod_env.listen(pod_env.pod, "::", 15008)

    client = pod_env.peer.socket(socket.AF_INET)
    client.settimeout(WAIT_S)
    client.connect((POD_IP, 15008))
    client.sendall(b"tls")
    served = pod_env.serve_one(hbone, b"hbone")
    client.close()
    assert served is not None
    served.sock.close()
    assert not pod_env.pending(pod_env.inbound)


def test_inbound_ip_block_deny_is_dropped_in_the_kernel(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.inbound is not None
    app = pod_env.listen(pod_env.pod, "0.0.0.0", 8080)
    before = pod_env.counters()

    # SK_DROP leaves TCP without a socket: the kernel resets, the client is refused at once.
    denied = pod_env.peer.socket(socket.AF_INET)
    denied.bind((OUTSIDER_IP, 0))
    denied.settimeout(WAIT_S)
    with pytest.raises(ConnectionRefusedError):
        denied.connect((POD_IP, 8080))
    denied.close()
    assert pod_env.counters()["in_dropped_deny"] == before["in_dropped_deny"] + 1
    assert not pod_env.pending(pod_env.inbound)
    assert not pod_env.pending(app)

    # The rule is specific: the same port from another source is steered as usual.
    allowed = pod_env.peer.socket(socket.AF_INET)
    allowed.settimeout(WAIT_S)
    allowed.connect((POD_IP, 8080))
    allowed.sendall(b"hi")
    served = pod_env.serve_one(pod_env.inbound, b"ok")
    assert served is not None and canonical(served.peer[0]) == PEER_IP
    served.sock.close()
    allowed.close()


def test_inbound_without_listener_is_dropped_never_plaintext(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.inbound is not None
    app = pod_env.listen(pod_env.pod, "0.0.0.0", 8080)
    pod_env.inbound.close()  # the daemon is down: the kernel drops the sockhash entry itself
    pod_env.inbound = None
    before = pod_env.counters()

    client = pod_env.peer.socket(socket.AF_INET)
    client.settimeout(WAIT_S)
    with pytest.raises(ConnectionRefusedError):
        client.connect((POD_IP, 8080))
    client.close()
    after = pod_env.counters()
    assert after["in_dropped_no_listener"] == before["in_dropped_no_listener"] + 1
    assert not pod_env.pending(app), "plaintext reached the application without the proxy"


# ------------------------------------------------------------------ restart


def test_restart_reuses_pinned_maps_and_links(pod_env: PodEnv) -> None:
    first = pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.sync is not None and pod_env.outbound is not None
    applied = {name: dict(entries) for name, entries in pod_env.sync.reconciler.applied.items()}
    links_before = {e["program"]: e["linkId"] for e in first.attach_points()["cgroupLinks"]}
    first.close()  # the daemon exits; pins keep the datapath

    # Still captured while no daemon holds any fd.
    proc = pod_env.app(VIP, 80)
    served = pod_env.serve_one(pod_env.outbound, b"pong-15001")
    assert served is not None
    served.sock.close()
    pod_env.result(proc)

    second = BpfLoader(
        pin_path=pod_env.pin_path,
        cgroup_path=pod_env.cgroup_parent,
        object_dir=pod_env.object_dir,
    )
    second.start()
    pod_env.loader = second
    assert second.adopted
    for directory in (pod_env.pin_path, second.maps_dir, second.pods.links_dir):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    dump = second.dump()
    assert {"address": VIP, "port": 80, "kind": "service"} in dump["maps"][t.MAP_DST]
    assert [p["pod"] for p in dump["attachPoints"]["podLinks"]] == ["pod-uid-a"]
    links_after = {e["program"]: e["linkId"] for e in second.attach_points()["cgroupLinks"]}
    assert links_after == links_before, "re-adoption must keep the same links"
    assert second.pods.pinned() == ["pod-uid-a"]

    reconciler = Reconciler(second.maps)
    reconciler.resync()
    assert {n: dict(e) for n, e in reconciler.applied.items()} == applied
    second.pods.attach("pod-uid-a", pod_env.pod.fd, pod_env.cookie)  # ZDS replay: idempotent

    proc = pod_env.app(VIP, 80)
    served = pod_env.serve_one(pod_env.outbound, b"pong-15001")
    assert served is not None
    assert second.original_destinations().original_destination(served.sock) == (ip(VIP), 80)
    served.sock.close()
    assert pod_env.result(proc)["peer"] == [VIP, 80]


def test_restart_refuses_pinned_maps_of_another_abi(pod_env: PodEnv) -> None:
    loader = pod_env.start_loader()
    zero = struct.pack("=I", 0)
    loader.maps[t.MAP_VERSION].update(zero, bytes(t.ZtVersion(abi_version=t.ZT_ABI_VERSION + 1)))
    loader.close()

    again = BpfLoader(
        pin_path=pod_env.pin_path,
        cgroup_path=pod_env.cgroup_parent,
        object_dir=pod_env.object_dir,
    )
    with pytest.raises(IncompatiblePinnedState, match="ABI version") as info:
        again.start()
    assert str(pod_env.pin_path) in str(info.value)
    assert "remove" in str(info.value)


# ------------------------------------------------------------------ hostile peers


def test_outsider_reusing_a_live_source_port_gets_no_original_destination(pod_env: PodEnv) -> None:
    """A host outside the pod connects to the pod's :15001 from the source port of one of the
    pod's live redirected connections: the lookup must refuse it, never hand it that
    connection's destination (and with it the pod's identity)."""
    loader = pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None
    lookup = loader.original_destinations()

    proc = pod_env.app(VIP, 80)  # the pod's application: redirected, held open below
    ready, _, _ = select.select([pod_env.outbound], [], [], WAIT_S)
    assert ready, "the connection to the VIP did not reach the pod's :15001"
    own, own_peer = pod_env.outbound.accept()
    pod_env.extra.append(own)
    live_port = int(own_peer[1])
    assert lookup.original_destination(own) == (ip(VIP), 80)

    try:
        attacker = pod_env.peer.socket(socket.AF_INET)
        pod_env.extra.append(attacker)
        attacker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        attacker.bind((OUTSIDER_IP, live_port))
        attacker.settimeout(WAIT_S)
        attacker.connect((POD_IP, 15001))
        ready, _, _ = select.select([pod_env.outbound], [], [], WAIT_S)
        assert ready
        hostile, hostile_peer = pod_env.outbound.accept()
        pod_env.extra.append(hostile)
        assert canonical(str(hostile_peer[0])) == OUTSIDER_IP and hostile_peer[1] == live_port

        with pytest.raises(OSError, match="not from the pod's own redirected sockets"):
            lookup.original_destination(hostile)
        # The pod's own connection still resolves: the refusal is about who asks.
        assert lookup.original_destination(own) == (ip(VIP), 80)
        own.sendall(b"pong-15001")
        assert pod_env.result(proc)["received"] == "pong-15001"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
