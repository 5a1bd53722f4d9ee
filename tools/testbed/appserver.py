"""The testbed's application server: a keep-alive HTTP responder and a TCP echo, in one process.

Started inside a pod's netns by the testbed (``python appserver.py --name pod-0-1``). HTTP
answers every request with ``<pod name>\\n`` (so a client sees which endpoint it reached); the
echo port returns every byte it gets. Standard library only: it runs under any Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal


async def serve_http(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = f"{name}\n".encode()
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            keep_alive = True
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                key = key.strip().lower()
                if key == b"content-length":
                    length = int(value.strip() or 0)
                elif key == b"connection" and value.strip().lower() == b"close":
                    keep_alive = False
            if length:
                await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\n".encode()
                + (b"" if keep_alive else b"Connection: close\r\n")
                + b"\r\n"
                + body
            )
            await writer.drain()
            if not keep_alive:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def serve_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(name: str, http_port: int, echo_port: int) -> None:
    servers = [
        await asyncio.start_server(
            lambda r, w: serve_http(name, r, w), port=http_port, backlog=1024
        ),
        await asyncio.start_server(serve_echo, port=echo_port, backlog=1024),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--http", type=int, default=8080)
    parser.add_argument("--echo", type=int, default=9000)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.name, args.http, args.echo))
