"""What the application behind the inbound proxy sees, through real daemons in both modes.

- ``ENABLE_ORIG_SRC=true``: the server's peer is the client pod's IP (the proxy binds it
  transparently; the pod's replies are routed back to the proxy);
  ``ENABLE_ORIG_SRC=false``: the peer is the pod's own IP, as before.
- A workload whose ``applicationTunnel`` asks for PROXY on port 15088: its app, listening on
  loopback only (``LOCALHOST_APP_TUNNEL``), reads a PROXY v2 header naming the client pod, the
  HBONE target and the client's SPIFFE id, then the client's bytes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from proxyprotocol.result import ProxyResult, ProxyResultIPv4
from proxyprotocol.v2 import ProxyProtocolV2

from tests.netns.e2e.support import MODES, MeshMaker
from tools.testbed.mesh import Mesh
from ztunnel_py.netns import run_in_netns
from ztunnel_py.proxy.app_tunnel import PROXY_TLV_PEER_IDENTITY
from ztunnel_py.testing.poll import HANG_GUARD_S

pytestmark = [pytest.mark.root]

PEER_PORT = 9100  # a server of the test's own in the destination pod
TUNNEL_PORT = 15088


@dataclass
class Accepted:
    peer: tuple[str, int]
    header: ProxyResult | None


class RecordingServer:
    """A TCP server inside a pod's netns (a thread): records each connection's peer (and its
    PROXY header, if asked to read one), then echoes until EOF."""

    def __init__(self, netns_path: str, host: str, port: int, *, proxy_header: bool) -> None:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.sock = run_in_netns(fd, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        finally:
            os.close(fd)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.proxy_header = proxy_header
        self.accepted: list[Accepted] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                self.errors.append(e)
                return
            with conn:
                conn.settimeout(HANG_GUARD_S)
                try:
                    self._one(conn, peer)
                except (OSError, ValueError) as e:
                    self.errors.append(e)

    def _one(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        header = None
        if self.proxy_header:
            head = _read_exactly(conn, 16)
            rest = _read_exactly(conn, int.from_bytes(head[14:16], "big"))
            header = ProxyProtocolV2().unpack(head + rest)
        self.accepted.append(Accepted(peer, header))
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HANG_GUARD_S)
        self.sock.close()


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ValueError(f"connection closed after {len(out)} of {n} header bytes")
        out += chunk
    return out


@contextlib.contextmanager
def recording(
    mesh: Mesh, pod: str, host: str, port: int, *, proxy_header: bool = False
) -> Iterator[RecordingServer]:
    server = RecordingServer(mesh.pod(pod).netns_path, host, port, proxy_header=proxy_header)
    try:
        yield server
    finally:
        server.close()


def _echo(mesh: Mesh, client: str, ip: str, port: int) -> None:
    result = mesh.client(client, "echo", ip, port, "--bytes", "65536")
    assert result["result"] == "ok", result
    assert result["sha256"] == result["expected_sha256"]


def _tunnelled(pod: str) -> dict[str, dict[str, object]]:
    return {pod: {"applicationTunnel": {"protocol": "PROXY", "port": TUNNEL_PORT}}}


def _assert_header(seen: Accepted, client_ip: str, target: tuple[str, int], identity: str) -> None:
    assert isinstance(seen.header, ProxyResultIPv4)
    assert str(seen.header.source[0]) == client_ip
    assert (str(seen.header.dest[0]), seen.header.dest[1]) == target
    assert dict(seen.header.tlv.items()) == {PROXY_TLV_PEER_IDENTITY: identity.encode()}


@pytest.mark.parametrize("redirect", MODES)
def test_with_original_source_the_app_sees_the_client_pod_and_the_tunnel_names_it(
    make_mesh: MeshMaker, redirect: str
) -> None:
    mesh = make_mesh(
        "osr", redirect, env={"ENABLE_ORIG_SRC": "true"}, workload_fields=_tunnelled("pod-1-1")
    )
    client, plain, tunnelled = mesh.pod("pod-0-0"), mesh.pod("pod-1-0"), mesh.pod("pod-1-1")
    with recording(mesh, plain.name, "0.0.0.0", PEER_PORT) as app:
        _echo(mesh, client.name, plain.ip, PEER_PORT)
        assert not app.errors
        assert [a.peer[0] for a in app.accepted] == [client.ip]
    # The tunnel's app listens on loopback only: LOCALHOST_APP_TUNNEL dials it there.
    with recording(mesh, tunnelled.name, "127.0.0.1", TUNNEL_PORT, proxy_header=True) as app:
        _echo(mesh, client.name, tunnelled.ip, 9000)
        assert not app.errors
        (seen,) = app.accepted
        assert seen.peer[0] == "127.0.0.1"
        _assert_header(seen, client.ip, (tunnelled.ip, 9000), client.identity)


@pytest.mark.parametrize("redirect", MODES)
def test_without_original_source_the_app_sees_its_own_pods_ip(
    make_mesh: MeshMaker, redirect: str
) -> None:
    mesh = make_mesh(
        "nos",
        redirect,
        env={"ENABLE_ORIG_SRC": "false", "LOCALHOST_APP_TUNNEL": "false"},
        workload_fields=_tunnelled("pod-1-1"),
    )
    client, plain, tunnelled = mesh.pod("pod-0-0"), mesh.pod("pod-1-0"), mesh.pod("pod-1-1")
    with recording(mesh, plain.name, "0.0.0.0", PEER_PORT) as app:
        _echo(mesh, client.name, plain.ip, PEER_PORT)
        assert not app.errors
        assert [a.peer[0] for a in app.accepted] == [plain.ip]
    # LOCALHOST_APP_TUNNEL=false: the tunnel is dialled at the pod's IP; the header still
    # names the client.
    with recording(mesh, tunnelled.name, "0.0.0.0", TUNNEL_PORT, proxy_header=True) as app:
        _echo(mesh, client.name, tunnelled.ip, 9000)
        assert not app.errors
        (seen,) = app.accepted
        assert seen.peer[0] == tunnelled.ip
        _assert_header(seen, client.ip, (tunnelled.ip, 9000), client.identity)
