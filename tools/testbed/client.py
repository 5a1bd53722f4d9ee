"""An application client inside a testbed pod (started by ``Testbed.popen``: the pod's netns and
cgroup, so both redirect modes see it as the pod's own traffic). Standard library only.

    python client.py echo HOST PORT --bytes N      send N bytes, half-close, read the echo back
    python client.py http HOST PORT                one GET, print the body
    python client.py stream HOST PORT --seconds S  send and read for S seconds (or until cut),
                                                   then half-close and read the echo's rest
    python client.py stream HOST PORT --until-eof  the same, until stdin reaches EOF

Prints one JSON line: ``result`` (ok | refused | reset | timeout | closed | error), bytes sent
and received, the sha256 of what came back and of what was sent (``expected_sha256``), ``peer``
(getpeername: what the app believes it is connected to), ``error``. ``stream`` first prints
``{"event": "connected"}`` once its connection is up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time


def pattern(n: int) -> bytes:
    block = bytes(range(256)) * 256
    return (block * (n // len(block) + 1))[:n]


def connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def peer_of(sock: socket.socket) -> str:
    """What the application believes it is connected to (getpeername): ``ip:port``, or
    ``[ip]:port`` for IPv6."""
    host, port = sock.getpeername()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def outcome(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timeout"
    return "error"


def echo(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {"sent": 0, "received": 0}
    data = pattern(args.bytes)
    digest = hashlib.sha256()
    try:
        with connect(args.host, args.port, args.timeout) as sock:
            out["peer"] = peer_of(sock)
            sock.sendall(data)
            out["sent"] = len(data)
            sock.shutdown(socket.SHUT_WR)
            received = 0
            while chunk := sock.recv(262144):
                digest.update(chunk)
                received += len(chunk)
            out["received"] = received
        out["result"] = "ok"
    except OSError as e:
        out["result"] = outcome(e)
        out["error"] = str(e)
    out["sha256"] = digest.hexdigest()
    out["expected_sha256"] = hashlib.sha256(data).hexdigest()
    return out


def http(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    try:
        with connect(args.host, args.port, args.timeout) as sock:
            out["peer"] = peer_of(sock)
            sock.sendall(
                f"GET / HTTP/1.1\r\nHost: {args.host}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        out["status"] = head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else ""
        out["body"] = body.decode(errors="replace")
        out["result"] = "ok" if data else "closed"
    except OSError as e:
        out["result"] = outcome(e)
        out["error"] = str(e)
    return out


def stream_block(index: int) -> bytes:
    """4 KiB that differ from block to block, so a lost or repeated block changes the checksum."""
    return hashlib.sha256(index.to_bytes(8, "big")).digest() * 128


def stdin_closed() -> threading.Event:
    done = threading.Event()

    def wait_eof() -> None:
        while os.read(sys.stdin.fileno(), 4096):
            pass
        done.set()

    threading.Thread(target=wait_eof, daemon=True).start()
    return done


def stream(args: argparse.Namespace) -> dict[str, object]:
    """Keep a connection busy (to the echo port), then drain the echo; report how it ended."""
    out: dict[str, object] = {"sent": 0, "received": 0}
    sent_digest, received_digest = hashlib.sha256(), hashlib.sha256()
    stop = stdin_closed() if args.until_eof else None
    deadline = time.monotonic() + args.seconds
    sent = received = 0

    def keep_going() -> bool:
        return not stop.is_set() if stop is not None else time.monotonic() < deadline

    try:
        with connect(args.host, args.port, args.timeout) as sock:
            out["peer"] = peer_of(sock)
            print(json.dumps({"event": "connected"}), flush=True)
            index = 0
            while keep_going():
                block = stream_block(index)
                index += 1
                sock.sendall(block)
                sent_digest.update(block)
                sent += len(block)
                got = sock.recv(65536)
                if not got:
                    out["result"] = "closed"
                    break
                received_digest.update(got)
                received += len(got)
                time.sleep(0.02)
            else:
                sock.shutdown(socket.SHUT_WR)
                while got := sock.recv(262144):
                    received_digest.update(got)
                    received += len(got)
                out["result"] = "ok"
    except OSError as e:
        out["result"] = outcome(e)
        out["error"] = str(e)
    out["sent"], out["received"] = sent, received
    out["sha256"] = received_digest.hexdigest()
    out["expected_sha256"] = sent_digest.hexdigest()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["echo", "http", "stream"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--bytes", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--until-eof", action="store_true", help="stream: stop at stdin's EOF")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    result = {"echo": echo, "http": http, "stream": stream}[args.mode](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
