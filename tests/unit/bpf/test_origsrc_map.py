"""``zt_orig_src`` entries: one per spoofed socket while it connects, keyed as sk_lookup reads."""

from __future__ import annotations

import socket

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf.dump import describe
from ztunnel_py.bpf.origsrc import BpfSpoofedSources, orig_src_key
from ztunnel_py.netns import netns_cookie
from ztunnel_py.testing.bpf import FakeMapOps


def test_key_is_the_sockets_netns_cookie_mapped_address_and_network_order_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        key = t.ZtOrigSrcKey.from_buffer_copy(orig_src_key(sock))
        assert key.netns_cookie == netns_cookie(sock)
        assert bytes(key.addr) == bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
        assert key.port == socket.htons(port)
        assert bytes(key.pad) == bytes(6)


def test_an_entry_lives_from_connecting_to_connected() -> None:
    orig_src = FakeMapOps(t.MAP_ORIG_SRC)
    spoofed = BpfSpoofedSources(orig_src)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        spoofed.connecting(sock)
        assert list(orig_src.entries) == [orig_src_key(sock)]
        spoofed.connected(sock)
        assert orig_src.entries == {}
        spoofed.connected(sock)  # twice (a failed connect after a cancel): nothing to remove


def test_the_dump_shows_each_entry_as_cookie_and_source() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        entry = describe(t.MAP_ORIG_SRC, orig_src_key(sock), bytes(4))
        assert entry == {"netnsCookie": netns_cookie(sock), "source": f"127.0.0.1:{port}"}
