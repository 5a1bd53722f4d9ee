"""Network-namespace switching for in-pod sockets (Python 3.11 has no ``os.setns``).

ztunnel creates each pod's listeners and upstream sockets *inside* the pod's netns: it switches
the calling thread into the pod netns, creates the socket, and switches back; a socket keeps the
netns it was created in. ``setns(CLONE_NEWNET)`` affects only the calling thread, and the switch
is two syscalls, so ``socket_in_netns`` does it inline on whatever thread calls it (the event
loop thread included: nothing else runs on that thread in between).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # Linux 5.14+

_T = TypeVar("_T")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(fd={fd}): {os.strerror(err)}")


class _HomeNetns(threading.local):
    fd: int = -1


_home = _HomeNetns()


def _home_fd() -> int:
    """This thread's own netns, opened once per thread before it ever switches."""
    if _home.fd < 0:
        _home.fd = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    return _home.fd


@contextlib.contextmanager
def entered(netns_fd: int) -> Iterator[None]:
    """Run the body with this thread in ``netns_fd``; always switch back, even on error."""
    home = _home_fd()
    setns(netns_fd)
    try:
        yield
    finally:
        setns(home)


def run_in_netns(netns_fd: int, fn: Callable[[], _T]) -> _T:
    with entered(netns_fd):
        return fn()


def socket_in_netns(
    netns_fd: int | None,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,
) -> socket.socket:
    """A new socket that lives in ``netns_fd`` (or the current netns when ``None``)."""
    if netns_fd is None:
        return socket.socket(family, type)
    with entered(netns_fd):
        return socket.socket(family, type)


def netns_cookie(sock: socket.socket) -> int:
    """The kernel's netns cookie of a socket (what BPF ``bpf_get_netns_cookie`` returns)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, "little")


def netns_inode(netns_fd: int) -> int:
    """The netns inode; ZDS compares it to tell a new netns for the same pod uid."""
    return os.fstat(netns_fd).st_ino


def cookie_of_netns(netns_fd: int) -> int:
    """The netns cookie of the namespace behind ``netns_fd`` (via a throwaway socket)."""
    with socket_in_netns(netns_fd, socket.AF_INET, socket.SOCK_DGRAM) as s:
        return netns_cookie(s)
