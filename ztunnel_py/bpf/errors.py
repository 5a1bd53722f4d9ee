"""Errors of the BPF data plane: loading, attaching, map access, pinned state."""

from __future__ import annotations

import errno as errno_mod
import os

from ztunnel_py.errors import ZtunnelError


class BpfError(ZtunnelError):
    """Something the kernel or libbpf refused; ``errno`` is set when the kernel gave one."""

    def __init__(self, message: str, *, errno: int = 0) -> None:
        self.errno = errno
        super().__init__(message)


class LibbpfError(BpfError):
    """A libbpf or bpf(2) call failed: ``op`` names it, ``detail`` says what it was about."""

    def __init__(self, op: str, errno: int, detail: str = "", *, log: str = "") -> None:
        self.op = op
        self.detail = detail
        self.log = log
        reason = os.strerror(errno) if errno else "failed"
        text = f"{op}({detail}): {reason}" if detail else f"{op}: {reason}"
        if errno == errno_mod.EPERM:
            text += " (needs root, or CAP_BPF and CAP_NET_ADMIN)"
        if log:
            text += "\n" + log
        super().__init__(text, errno=errno)


class KeyNotFound(BpfError, LookupError):
    """A lookup found no entry for the key (deleting a missing key is not an error)."""

    def __init__(self, map_name: str, key: bytes) -> None:
        self.map_name = map_name
        self.key = key
        super().__init__(f"{map_name}: no entry for key {key.hex()}", errno=errno_mod.ENOENT)


class MapFull(BpfError):
    """The map has no room for another entry (its max_entries is reached)."""

    def __init__(self, map_name: str, max_entries: int) -> None:
        self.map_name = map_name
        super().__init__(
            f"{map_name} is full ({max_entries} entries): too many pods, destinations or rules "
            "for this build's map sizes (bpf/include/zt_maps.h)",
            errno=errno_mod.E2BIG,
        )


class IncompatiblePinnedState(BpfError):
    """Pinned maps or links were left by a daemon whose layout differs from ours."""

    def __init__(self, pin_path: str, reason: str) -> None:
        self.pin_path = pin_path
        super().__init__(
            f"pinned BPF state at {pin_path} is incompatible with this build: {reason}. "
            f"Roll back to the daemon that created it, or remove {pin_path} (existing pods "
            "lose redirection until they are re-enrolled) and start again"
        )


class OriginalDestinationNotFound(ZtunnelError, OSError):
    """An accepted :15001 connection has no recorded original destination (an ``OSError``,
    so the proxy resets the connection as for any socket error)."""

    def __init__(self, netns_cookie: int, peer_port: int, family: int) -> None:
        self.netns_cookie = netns_cookie
        self.peer_port = peer_port
        self.family = family
        super().__init__(
            errno_mod.ENOENT,
            f"no original destination for peer port {peer_port} in netns cookie {netns_cookie} "
            "(was the connection redirected by the BPF connect hook?)",
        )


class NotRedirected(ZtunnelError, OSError):
    """A :15001 connection that the connect hook cannot have made (it rewrites to the pod's
    loopback): a peer reaching the port from outside. Refused before any map lookup."""

    def __init__(self, peer_ip: str, peer_port: int, local_ip: str) -> None:
        super().__init__(
            errno_mod.EPERM,
            f"connection from {peer_ip}:{peer_port} to {local_ip}:15001 refused: not from the "
            "pod's own redirected sockets (eBPF mode only honours connections on loopback)",
        )
