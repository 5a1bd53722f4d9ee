"""The BPF programs over IPv6 on the real kernel: connect6, sendmsg6/recvmsg6, getpeername6,
the IPv6 keys of zt_dst, zt_local and zt_deny, and sk_lookup for IPv6 (root; conftest.py).

Every test sends real IPv6 (or IPv4-mapped) traffic between the test pod and its peer; the IPv4
paths are in test_bpf_datapath.py and test_bpf_dns.py.
"""

from __future__ import annotations

import ipaddress
import select
import socket

import pytest

from ztunnel_py.config import PROBE_IP6
from ztunnel_py.rbac.model import Action, Authorization, Match, Scope
from ztunnel_py.state.model import InboundProtocol, NetworkAddress, Service, Workload, frozen_map
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.testing.bpf import (
    OUTSIDER_IP6,
    PEER_IP,
    PEER_IP6,
    POD_IP,
    POD_IP6,
    VIP6,
    WAIT_S,
    PodEnv,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf]
ip = ipaddress.ip_address
DNS, PROXY_DNS = 53, 15053


def udp_socket(env: PodEnv, in_pod: bool, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = (env.pod if in_pod else env.peer).socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    env.extra.append(sock)
    return sock


def answer_one(sock: socket.socket, reply: bytes) -> str | None:
    """Receive one datagram (``None`` when none comes), answer it; returns the sender's IP."""
    ready, _, _ = select.select([sock], [], [], WAIT_S)
    if not ready:
        return None
    data, peer = sock.recvfrom(512)
    sock.sendto(reply + b":" + data, peer)
    return str(peer[0])


def nothing_waiting(sock: socket.socket) -> bool:
    ready, _, _ = select.select([sock], [], [], 0)
    return not ready


# ------------------------------------------------------------------ DNS (sendmsg6, recvmsg6)


@pytest.mark.parametrize("connected", [False, True], ids=["sendto", "connected"])
def test_udp_dns_to_an_ipv6_resolver_goes_to_the_proxy_on_ipv6_loopback(
    pod_env: PodEnv, connected: bool
) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    proxy6 = udp_socket(pod_env, True, "::1", PROXY_DNS)
    proxy4 = udp_socket(pod_env, True, "127.0.0.1", PROXY_DNS)
    upstream = udp_socket(pod_env, False, PEER_IP6, DNS)

    proc = pod_env.app(PEER_IP6, DNS, family=6, udp=True, connected=connected, send="q6")
    assert answer_one(proxy6, b"proxy6") == "::1", "the query did not reach [::1]:15053"
    result = pod_env.result(proc)

    assert result["result"] == "answered" and result["received"] == "proxy6:q6"
    assert result["source"] == [PEER_IP6, DNS], "recvmsg6 must show the resolver asked"
    if connected:
        assert result["peer"] == [PEER_IP6, DNS], "getpeername6 must show the resolver dialled"
    assert nothing_waiting(upstream), "the query also reached the upstream resolver"
    assert nothing_waiting(proxy4)


def test_udp_dns_from_an_ipv6_socket_to_an_ipv4_mapped_resolver_stays_on_ipv4(
    pod_env: PodEnv,
) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    proxy4 = udp_socket(pod_env, True, "127.0.0.1", PROXY_DNS)
    proxy6 = udp_socket(pod_env, True, "::1", PROXY_DNS)
    mapped = f"::ffff:{PEER_IP}"

    proc = pod_env.app(mapped, DNS, family=6, udp=True, send="qm")
    assert answer_one(proxy4, b"proxy4") == "127.0.0.1"
    result = pod_env.result(proc)

    assert result["received"] == "proxy4:qm"
    assert result["source"] == [mapped, DNS]
    assert nothing_waiting(proxy6)


def test_tcp_dns_to_an_ipv6_resolver_goes_to_the_proxy(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    proxy = pod_env.listen(pod_env.pod, "::1", PROXY_DNS)

    proc = pod_env.app(PEER_IP6, DNS, family=6, send="tcp-q6")
    served = pod_env.serve_one(proxy, b"tcp-a6")
    result = pod_env.result(proc)

    assert served is not None and served.received == b"tcp-q6"
    assert ip(served.peer[0]) == ip("::1")
    assert result["received"] == "tcp-a6"
    assert result["peer"] == [PEER_IP6, DNS]


def test_dns_to_ipv6_loopback_resolver_is_left_alone(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    proxy6 = udp_socket(pod_env, True, "::1", PROXY_DNS)
    local = udp_socket(pod_env, True, "::1", DNS)

    proc = pod_env.app("::1", DNS, family=6, udp=True, send="q")
    assert answer_one(local, b"local") is not None
    assert pod_env.result(proc)["source"] == ["::1", DNS]
    assert nothing_waiting(proxy6)


# ------------------------------------------------------------------ outbound (connect6)


def test_outbound_to_an_ipv6_workload_address_is_captured(pod_env: PodEnv) -> None:
    loader = pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None
    real = pod_env.listen(pod_env.peer, PEER_IP6, 8080)
    before = pod_env.counters()

    proc = pod_env.app(PEER_IP6, 8080, family=6)
    served = pod_env.serve_one(pod_env.outbound, b"pong-15001")
    assert served is not None, "the connection to the IPv6 workload did not reach :15001"
    assert ip(served.peer[0]) == ip("::1")
    dst = loader.original_destinations().original_destination(served.sock)
    served.sock.close()
    result = pod_env.result(proc)

    assert dst == (ip(PEER_IP6), 8080)
    assert result["peer"] == [PEER_IP6, 8080]
    assert result["received"] == "pong-15001"
    assert nothing_waiting(real), "the mesh workload was reached in plaintext"
    assert pod_env.counters()["out_redirected"] == before["out_redirected"] + 1


def test_outbound_ipv6_is_refused_when_the_daemon_is_down(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None
    real = pod_env.listen(pod_env.peer, PEER_IP6, 8080)
    pod_env.outbound.close()
    pod_env.outbound = None

    for host, port in ((VIP6, 80), (PEER_IP6, 8080)):
        result = pod_env.result(pod_env.app(host, port, family=6))
        assert result["result"] == "refused", f"[{host}]:{port} gave {result}"
    assert nothing_waiting(real), "a mesh destination was reached in plaintext"


def test_outbound_to_the_pods_own_ipv6_address_stays_local(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None and pod_env.inbound is not None
    app = pod_env.listen(pod_env.pod, "::", 8080)
    before = pod_env.counters()

    proc = pod_env.app(POD_IP6, 8080, family=6)  # a mesh workload address, the pod's own
    served = pod_env.serve_one(app, b"pong-app")
    result = pod_env.result(proc)

    assert served is not None and result["received"] == "pong-app"
    assert nothing_waiting(pod_env.outbound) and nothing_waiting(pod_env.inbound)
    after = pod_env.counters()
    assert after["out_local_skipped"] == before["out_local_skipped"] + 1
    assert after["in_local_skipped"] == before["in_local_skipped"] + 1


def test_ipv4_mapped_vip_from_xds_captures_nothing(pod_env: PodEnv) -> None:
    """A VIP istiod sends as ``::ffff:10.96.0.30`` is an IPv6 address ztunnel never matches;
    the kernel must not capture 10.96.0.30 for it (it would in the 16-byte layout)."""
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None and pod_env.sync is not None
    mapped = Service(
        name="mapped",
        namespace="default",
        hostname="mapped.default.svc.cluster.local",
        vips=(NetworkAddress("", ip("::ffff:10.96.0.30")),),
        ports=frozen_map({80: 8080}),
    )
    endpoint = Workload(
        uid="mapped-w",
        name="mapped",
        namespace="default",
        workload_ips=(ip("::ffff:10.77.0.2"),),
        protocol=InboundProtocol.HBONE,
        services=frozen_map({mapped.key: frozen_map({80: 8080})}),
    )
    pod_env.sync.state_changed(
        pod_env.state.apply(UpdateBatch(workloads=(endpoint,), services=(mapped,)))
    )
    before = pod_env.counters()

    for host, family in (("10.96.0.30", 4), ("::ffff:10.96.0.30", 6)):
        pod_env.result(pod_env.app(host, 80, family=family))  # no route: fails, uncaptured
    assert nothing_waiting(pod_env.outbound)
    after = pod_env.counters()
    assert after["out_passthrough"] == before["out_passthrough"] + 2
    assert after["out_redirected"] == before["out_redirected"]


# ------------------------------------------------------------------ inbound (sk_lookup)


def test_inbound_ipv6_source_cidr_deny_is_dropped_in_the_kernel(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.inbound is not None
    app = pod_env.listen(pod_env.pod, "::", 8080)
    before = pod_env.counters()

    denied = pod_env.peer.socket(socket.AF_INET6)
    pod_env.extra.append(denied)
    denied.bind((OUTSIDER_IP6, 0))
    denied.settimeout(WAIT_S)
    with pytest.raises(ConnectionRefusedError):
        denied.connect((POD_IP6, 8080))
    assert pod_env.counters()["in_dropped_deny"] == before["in_dropped_deny"] + 1
    assert nothing_waiting(pod_env.inbound) and nothing_waiting(app)

    # The rule names a port: the same source to another port is steered as usual.
    other = pod_env.peer.socket(socket.AF_INET6)
    pod_env.extra.append(other)
    other.bind((OUTSIDER_IP6, 0))
    other.settimeout(WAIT_S)
    other.connect((POD_IP6, 8081))
    other.sendall(b"hi")
    served = pod_env.serve_one(pod_env.inbound, b"ok")
    assert served is not None and ip(served.peer[0]) == ip(OUTSIDER_IP6)
    assert (ip(served.local[0]), served.local[1]) == (ip(POD_IP6), 8081)

    # A source outside the prefix, to the denied port: steered too.
    allowed = pod_env.peer.socket(socket.AF_INET6)
    pod_env.extra.append(allowed)
    allowed.bind((PEER_IP6, 0))
    allowed.settimeout(WAIT_S)
    allowed.connect((POD_IP6, 8080))
    allowed.sendall(b"hi")
    served = pod_env.serve_one(pod_env.inbound, b"ok")
    assert served is not None and ip(served.peer[0]) == ip(PEER_IP6)


def test_inbound_from_the_ipv6_probe_address_reaches_the_application(pod_env: PodEnv) -> None:
    """kubelet's probes come from PROBE_IP6 (zt_cfg.probe_ip6): never steered to :15006."""
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.inbound is not None
    # The peer plays the node: the probe address is its own, reached through it.
    pod_env.peer.sh("ip", "addr", "add", f"{PROBE_IP6}/128", "dev", "lo")
    pod_env.pod.sh("ip", "-6", "route", "add", f"{PROBE_IP6}/128", "via", PEER_IP6)
    app = pod_env.listen(pod_env.pod, "::", 8080)
    before = pod_env.counters()

    probe = pod_env.peer.socket(socket.AF_INET6)
    pod_env.extra.append(probe)
    probe.bind((str(PROBE_IP6), 0))
    probe.settimeout(WAIT_S)
    probe.connect((POD_IP6, 8080))
    probe.sendall(b"GET /healthz")
    served = pod_env.serve_one(app, b"200")
    assert served is not None and ip(served.peer[0]) == PROBE_IP6
    assert nothing_waiting(pod_env.inbound)
    assert pod_env.counters()["in_passthrough"] == before["in_passthrough"] + 1


def test_inbound_deny_on_the_pods_ipv6_destination_is_dropped_in_the_kernel(
    pod_env: PodEnv,
) -> None:
    """A DENY naming the pod's IPv6 address as destination becomes a rule on every IPv6
    source: IPv6 connections are refused in the kernel, IPv4 ones to the same port are not."""
    pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.inbound is not None and pod_env.sync is not None
    deny6 = Authorization(
        name="deny-v6-dst",
        namespace="default",
        scope=Scope.NAMESPACE,
        action=Action.DENY,
        rules=(
            (
                (
                    Match(
                        destination_ips=(ipaddress.ip_network(f"{POD_IP6}/128"),),
                        destination_ports=(8081,),
                    ),
                ),
            ),
        ),
    )
    pod_env.sync.state_changed(pod_env.state.apply(UpdateBatch(policies=(deny6,))))
    app = pod_env.listen(pod_env.pod, "::", 8081)
    before = pod_env.counters()

    denied = pod_env.peer.socket(socket.AF_INET6)
    pod_env.extra.append(denied)
    denied.settimeout(WAIT_S)
    with pytest.raises(ConnectionRefusedError):
        denied.connect((POD_IP6, 8081))
    assert pod_env.counters()["in_dropped_deny"] == before["in_dropped_deny"] + 1
    assert nothing_waiting(pod_env.inbound) and nothing_waiting(app)

    allowed = pod_env.peer.socket(socket.AF_INET)
    pod_env.extra.append(allowed)
    allowed.settimeout(WAIT_S)
    allowed.connect((POD_IP, 8081))
    allowed.sendall(b"hi")
    served = pod_env.serve_one(pod_env.inbound, b"ok")
    assert served is not None and (served.local[1], served.received) == (8081, b"hi")


# ------------------------------------------------------------------ IPV6_ENABLED=false


def test_ipv6_disabled_leaves_ipv6_traffic_alone_and_still_captures_ipv4(pod_env: PodEnv) -> None:
    """IPV6_ENABLED=false: no IPv6 listeners, so no IPv6 capture (as iptables mode installs no
    ip6tables rules); IPv4, also from an IPv6 socket (IPv4-mapped), is captured as before."""
    loader = pod_env.start_loader(ipv6=False)
    pod_env.enroll()
    assert pod_env.outbound is not None and pod_env.inbound is not None
    real = pod_env.listen(pod_env.peer, PEER_IP6, 8080)  # a mesh workload address
    app = pod_env.listen(pod_env.pod, "::", 8082)
    upstream = udp_socket(pod_env, False, PEER_IP6, DNS)
    proxy6 = udp_socket(pod_env, True, "::1", PROXY_DNS)
    before = pod_env.counters()

    # Outbound IPv6 to a mesh workload: straight to it.
    proc = pod_env.app(PEER_IP6, 8080, family=6)
    served = pod_env.serve_one(real, b"pong-real")
    assert served is not None and pod_env.result(proc)["received"] == "pong-real"
    assert nothing_waiting(pod_env.outbound)

    # DNS to an IPv6 resolver: straight to it.
    proc = pod_env.app(PEER_IP6, DNS, family=6, udp=True, send="q")
    assert answer_one(upstream, b"upstream") is not None
    assert pod_env.result(proc)["source"] == [PEER_IP6, DNS]
    assert nothing_waiting(proxy6)

    # Inbound IPv6: the application itself, not :15006.
    client = pod_env.peer.socket(socket.AF_INET6)
    pod_env.extra.append(client)
    client.settimeout(WAIT_S)
    client.connect((POD_IP6, 8082))
    client.sendall(b"hello6")
    assert pod_env.serve_one(app, b"app") is not None
    assert nothing_waiting(pod_env.inbound)

    after = pod_env.counters()
    assert after["out_redirected"] == before["out_redirected"]
    assert after["in_passthrough"] == before["in_passthrough"] + 1

    # IPv4-mapped from an IPv6 socket is IPv4 on the wire: still captured.
    proc = pod_env.app(f"::ffff:{PEER_IP}", 8080, family=6)
    served = pod_env.serve_one(pod_env.outbound, b"pong-15001")
    assert served is not None, "IPv4 (mapped) was not captured with IPv6 disabled"
    dst = loader.original_destinations().original_destination(served.sock)
    assert dst == (ip(PEER_IP), 8080)
    served.sock.close()
    assert pod_env.result(proc)["received"] == "pong-15001"
    # And inbound IPv4 is steered as before.
    client4 = pod_env.peer.socket(socket.AF_INET)
    pod_env.extra.append(client4)
    client4.settimeout(WAIT_S)
    client4.connect((POD_IP, 8082))
    client4.sendall(b"hello4")
    assert pod_env.serve_one(pod_env.inbound, b"ok") is not None


def test_ipv6_outsider_reusing_a_live_source_port_gets_no_original_destination(
    pod_env: PodEnv,
) -> None:
    """As the IPv4 test in test_bpf_datapath.py: an IPv6 host connecting to the pod's [::]:15001
    from the source port of a live IPv6 redirected connection is refused the lookup."""
    loader = pod_env.start_loader()
    pod_env.enroll()
    assert pod_env.outbound is not None
    lookup = loader.original_destinations()

    proc = pod_env.app(VIP6, 80, family=6)
    ready, _, _ = select.select([pod_env.outbound], [], [], WAIT_S)
    assert ready, "the connection to the IPv6 VIP did not reach :15001"
    own, own_peer = pod_env.outbound.accept()
    pod_env.extra.append(own)
    assert lookup.original_destination(own) == (ip(VIP6), 80)
    try:
        attacker = pod_env.peer.socket(socket.AF_INET6)
        pod_env.extra.append(attacker)
        attacker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        attacker.bind((OUTSIDER_IP6, int(own_peer[1])))
        attacker.settimeout(WAIT_S)
        attacker.connect((POD_IP6, 15001))
        ready, _, _ = select.select([pod_env.outbound], [], [], WAIT_S)
        assert ready
        hostile, hostile_peer = pod_env.outbound.accept()
        pod_env.extra.append(hostile)
        assert ip(hostile_peer[0]) == ip(OUTSIDER_IP6) and hostile_peer[1] == own_peer[1]
        with pytest.raises(OSError, match="not from the pod's own redirected sockets"):
            lookup.original_destination(hostile)
        assert lookup.original_destination(own) == (ip(VIP6), 80)
        own.sendall(b"pong-15001")
        assert pod_env.result(proc)["received"] == "pong-15001"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
