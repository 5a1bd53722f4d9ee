"""A closed-loop DNS load generator that runs inside a testbed pod; prints one JSON line.

    python dnsload.py <server> <name> <seconds> <concurrency> [<mark>]

Each of ``concurrency`` workers owns a connected UDP socket and keeps one query in flight:
send, wait for the matching answer (1 s at most, else counted as lost), repeat until
``seconds`` are up. ``mark`` sets SO_MARK on the sockets (0x539: the capture rules and BPF
programs leave such sockets alone, so the query goes straight to ``server``).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import sys
import time

import dns.message
import uvloop


async def worker(
    server: str, wire: bytes, deadline: float, mark: int, out: list[float], lost: list[int]
) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    sock.setblocking(False)
    sock.connect((server, 53))
    body = wire[2:]
    try:
        while time.monotonic() < deadline:
            ident = random.getrandbits(16).to_bytes(2, "big")
            start = time.perf_counter()
            await loop.sock_sendall(sock, ident + body)
            try:
                async with asyncio.timeout(1.0):
                    while (await loop.sock_recv(sock, 4096))[:2] != ident:
                        pass
            except TimeoutError:
                lost[0] += 1
                continue
            out.append(time.perf_counter() - start)
    finally:
        sock.close()


async def main() -> None:
    server, name, seconds, concurrency = (
        sys.argv[1],
        sys.argv[2],
        float(sys.argv[3]),
        int(sys.argv[4]),
    )
    mark = int(sys.argv[5], 0) if len(sys.argv) > 5 else 0
    wire = dns.message.make_query(name, "A").to_wire()
    latencies: list[float] = []
    lost = [0]
    start = time.monotonic()
    deadline = start + seconds
    await asyncio.gather(
        *(worker(server, wire, deadline, mark, latencies, lost) for _ in range(concurrency))
    )
    elapsed = time.monotonic() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    print(
        json.dumps(
            {
                "queries": len(latencies),
                "lost": lost[0],
                "qps": len(latencies) / elapsed,
                "p50_ms": q[49] * 1000,
                "p90_ms": q[89] * 1000,
                "p99_ms": q[98] * 1000,
            }
        )
    )


if __name__ == "__main__":
    uvloop.run(main())
