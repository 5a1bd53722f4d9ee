"""An application inside a test pod: joins a cgroup and a netns, then makes one TCP connection.

Run as ``python podclient.py '<json>'`` with keys ``cgroup`` (directory), ``netns`` (path of a
netns file), ``family`` (4 or 6), ``host``, ``port``, optional ``mark`` and ``send``. It joins the
cgroup *before* creating its socket (a socket belongs to its creator's cgroup), so the BPF
programs on the parent cgroup see it, exactly as they see a pod's application. Prints one JSON
line: ``{"result": "connected"|"refused"|"timeout"|"error", "peer": ..., "sock": ...,
"received": ...}``.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
from typing import Any

CLONE_NEWNET = 0x40000000


def main() -> None:
    req = json.loads(sys.argv[1])
    with open(os.path.join(req["cgroup"], "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(req["netns"], os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)

    family = socket.AF_INET6 if req["family"] == 6 else socket.AF_INET
    out: dict[str, object] = {}
    if req.get("udp"):
        print(json.dumps(datagram(req, family)), flush=True)
        return
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if req.get("mark"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, req["mark"])
        s.settimeout(req.get("timeout", 3.0))
        try:
            s.connect((req["host"], req["port"]))
            out["result"] = "connected"
            out["peer"] = list(s.getpeername()[:2])
            out["sock"] = list(s.getsockname()[:2])
            s.sendall(req.get("send", "ping").encode())
            out["received"] = s.recv(256).decode()
        except ConnectionRefusedError:
            out["result"] = "refused"
        except TimeoutError:
            out["result"] = "timeout"
        except OSError as e:
            out["result"] = "error"
            out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)


def datagram(req: dict[str, Any], family: int) -> dict[str, object]:
    """One UDP request and its answer; ``connected``: connect() first, then send()."""
    out: dict[str, object] = {}
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        if req.get("mark"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, req["mark"])
        s.settimeout(float(req.get("timeout", 3.0)))
        dst = (req["host"], req["port"])
        payload = str(req.get("send", "ping")).encode()
        try:
            if req.get("connected"):
                s.connect(dst)
                out["peer"] = list(s.getpeername()[:2])
                s.send(payload)
            else:
                s.sendto(payload, dst)
            data, source = s.recvfrom(256)
            out["result"] = "answered"
            out["received"] = data.decode()
            out["source"] = list(source[:2])
        except TimeoutError:
            out["result"] = "timeout"
        except OSError as e:
            out["result"] = "error"
            out["error"] = f"{type(e).__name__}: {e}"
    return out


if __name__ == "__main__":
    main()
