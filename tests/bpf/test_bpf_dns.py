"""DNS capture by the BPF programs on the real kernel (root; see conftest.py for the setup).

The test plays the pod's DNS proxy with its own UDP/TCP sockets on the pod's 127.0.0.1:15053
and the upstream resolver with sockets on the peer's address: a captured query reaches the
first, a query left alone the second.
"""

from __future__ import annotations

import select
import socket

import pytest

from ztunnel_py.testing.bpf import PEER_IP, WAIT_S, PodEnv

pytestmark = [pytest.mark.root, pytest.mark.bpf]
DNS = 53
PROXY_DNS = 15053
MARK = 0x539


def udp_listener(env: PodEnv, ns_is_pod: bool, host: str, port: int) -> socket.socket:
    sock = (env.pod if ns_is_pod else env.peer).socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    env.extra.append(sock)
    return sock


def answer_one(sock: socket.socket, reply: bytes) -> tuple[str, int] | None:
    """Receive one datagram (``None`` when none comes) and answer it."""
    ready, _, _ = select.select([sock], [], [], WAIT_S)
    if not ready:
        return None
    data, peer = sock.recvfrom(512)
    sock.sendto(reply + b":" + data, peer)
    return str(peer[0]), int(peer[1])


@pytest.mark.parametrize("connected", [False, True], ids=["sendto", "connected"])
def test_udp_to_port_53_goes_to_the_pods_dns_proxy(pod_env: PodEnv, connected: bool) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    proxy = udp_listener(pod_env, True, "127.0.0.1", PROXY_DNS)
    upstream = udp_listener(pod_env, False, PEER_IP, DNS)

    proc = pod_env.app(PEER_IP, DNS, udp=True, connected=connected, send="q1")
    assert answer_one(proxy, b"proxy") is not None, "the query did not reach :15053"
    result = pod_env.result(proc)

    assert result["result"] == "answered" and result["received"] == "proxy:q1"
    # The answer looks like it came from the resolver the application asked.
    assert result["source"] == [PEER_IP, DNS]
    if connected:
        assert result["peer"] == [PEER_IP, DNS]
    ready, _, _ = select.select([upstream], [], [], 0)
    assert not ready, "the query also reached the upstream resolver"


def test_tcp_to_port_53_goes_to_the_pods_dns_proxy(pod_env: PodEnv) -> None:
    pod_env.start_loader()
    pod_env.enroll()
    proxy = pod_env.listen(pod_env.pod, "127.0.0.1", PROXY_DNS)
    before = pod_env.counters()

    proc = pod_env.app(PEER_IP, DNS, send="tcp-query")
    served = pod_env.serve_one(proxy, b"tcp-answer")
    result = pod_env.result(proc)

    assert served is not None and served.received == b"tcp-query"
    assert result["result"] == "connected" and result["received"] == "tcp-answer"
    assert result["peer"] == [PEER_IP, DNS], "getpeername must show the resolver dialled"
    # DNS sockets are not mesh connections: nothing is published for :15001.
    assert pod_env.counters()["orig_published"] == before["orig_published"]


@pytest.mark.parametrize(
    ("case", "host", "mark", "dns_capture"),
    [
        ("a resolver on loopback", "127.0.0.53", 0, True),
        ("the proxy's own upstream socket", PEER_IP, MARK, True),
        ("DNS capture off", PEER_IP, 0, False),
    ],
    ids=["loopback", "proxy-mark", "capture-off"],
)
def test_port_53_left_alone(
    pod_env: PodEnv, case: str, host: str, mark: int, dns_capture: bool
) -> None:
    pod_env.start_loader(dns_capture=dns_capture)
    pod_env.enroll()
    proxy = udp_listener(pod_env, True, "127.0.0.1", PROXY_DNS)
    on_loopback = host.startswith("127.")
    upstream = udp_listener(pod_env, on_loopback, host, DNS)

    proc = pod_env.app(host, DNS, udp=True, mark=mark, send="q")
    assert answer_one(upstream, b"upstream") is not None, f"{case}: the resolver got nothing"
    result = pod_env.result(proc)

    assert result["received"] == "upstream:q" and result["source"] == [host, DNS]
    ready, _, _ = select.select([proxy], [], [], 0)
    assert not ready, f"{case}: captured, but must not be"


def test_unenrolled_pod_is_not_captured(pod_env: PodEnv) -> None:
    pod_env.start_loader()  # programs attached, the pod never enrolled
    upstream = udp_listener(pod_env, False, PEER_IP, DNS)
    proc = pod_env.app(PEER_IP, DNS, udp=True, send="q")
    assert answer_one(upstream, b"upstream") is not None
    assert pod_env.result(proc)["source"] == [PEER_IP, DNS]
