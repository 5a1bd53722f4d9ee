"""eBPF mode's original-destination lookup honours only connections between loopback
addresses (the connect hook's rewrite), whatever the map holds for the peer's port."""

from __future__ import annotations

import socket

import pytest

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf.errors import NotRedirected
from ztunnel_py.bpf.origdst import BpfOriginalDestination, orig_key
from ztunnel_py.testing.bpf import FakeMapOps

COOKIE = 4242
LIVE_PORT = 41000


class Accepted:
    """What the lookup reads from an accepted socket."""

    def __init__(self, peer: tuple[str, int], local: tuple[str, int]) -> None:
        self.peer, self.local = peer, local

    def getpeername(self) -> tuple[str, int]:
        return self.peer

    def getsockname(self) -> tuple[str, int]:
        return self.local


@pytest.fixture
def lookup(monkeypatch: pytest.MonkeyPatch) -> BpfOriginalDestination:
    orig = FakeMapOps(t.MAP_ORIG_DST)
    value = t.ZtOrig(port=socket.htons(80), family=socket.AF_INET)
    value.addr[10], value.addr[11] = 0xFF, 0xFF
    value.addr[12:16] = [10, 96, 0, 10]
    orig.update(orig_key(COOKIE, LIVE_PORT, socket.AF_INET), bytes(value))
    monkeypatch.setattr("ztunnel_py.bpf.origdst.netns_cookie", lambda _sock: COOKIE)
    return BpfOriginalDestination(orig)


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
    ],
)
def test_the_pods_own_redirected_connection_finds_its_destination(
    lookup: BpfOriginalDestination, peer: str, local: str
) -> None:
    dst = lookup.original_destination(Accepted((peer, LIVE_PORT), (local, 15001)))  # type: ignore[arg-type]
    assert (str(dst[0]), dst[1]) == ("10.96.0.10", 80)


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("10.77.0.3", "10.77.0.1"),  # another host, to the pod's address
        ("::ffff:10.77.0.3", "::ffff:10.77.0.1"),
        ("10.77.0.1", "10.77.0.1"),  # the pod's own address, not the hook's rewrite
        ("127.0.0.1", "10.77.0.1"),
    ],
)
def test_a_connection_the_hook_cannot_have_made_is_refused(
    lookup: BpfOriginalDestination, peer: str, local: str
) -> None:
    with pytest.raises(NotRedirected, match="not from the pod's own redirected sockets"):
        lookup.original_destination(Accepted((peer, LIVE_PORT), (local, 15001)))  # type: ignore[arg-type]
