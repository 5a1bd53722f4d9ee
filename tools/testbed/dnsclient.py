"""A DNS client that runs inside a testbed pod (``Testbed.run``); prints one JSON line.

    python dnsclient.py query <server> <name> <type> [--tcp] [--no-edns] [--payload N]
    python dnsclient.py flood <server> <name> <count>      # fire-and-forget UDP queries
    python dnsclient.py raw <server> <hex bytes>           # one datagram, the reply if any

``server`` is where the pod's own resolver would send queries (port 53): with DNS capture on,
the pod's rules or the BPF programs take them to the DNS proxy wherever they were addressed.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype


def query(argv: list[str]) -> dict[str, object]:
    server, name, rdtype = argv[0], argv[1], argv[2]
    tcp = "--tcp" in argv
    edns = "--no-edns" not in argv
    payload = int(argv[argv.index("--payload") + 1]) if "--payload" in argv else 1232
    message = dns.message.make_query(name, rdtype, use_edns=0 if edns else False, payload=payload)
    start = time.monotonic()
    try:
        if tcp:
            reply = dns.query.tcp(message, server, timeout=8)
        else:
            reply = dns.query.udp(message, server, timeout=8, raise_on_truncation=False)
    except (dns.exception.DNSException, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}", "elapsed": time.monotonic() - start}
    return {
        "rcode": dns.rcode.to_text(reply.rcode()),
        "tc": bool(reply.flags & dns.flags.TC),
        "aa": bool(reply.flags & dns.flags.AA),
        "answers": [
            [rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), rdata.to_text(), rrset.ttl]
            for rrset in reply.answer
            for rdata in rrset
        ],
        "elapsed": time.monotonic() - start,
    }


def flood(argv: list[str]) -> dict[str, object]:
    server, name, count = argv[0], argv[1], int(argv[2])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent = 0
    for i in range(count):
        wire = dns.message.make_query(f"n{i}.{name}", "A").to_wire()
        try:
            sock.sendto(wire, (server, 53))
            sent += 1
        except BlockingIOError:
            time.sleep(0.001)
    return {"sent": sent}


def raw(argv: list[str]) -> dict[str, object]:
    server, data = argv[0], bytes.fromhex(argv[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    sock.sendto(data, (server, 53))
    try:
        reply = sock.recv(65535)
    except TimeoutError:
        return {"reply": None}
    return {"reply": reply.hex()}


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    handler = {"query": query, "flood": flood, "raw": raw}[mode]
    print(json.dumps(handler(args)))


if __name__ == "__main__":
    main()
