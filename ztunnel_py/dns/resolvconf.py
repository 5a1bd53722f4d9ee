"""The node's ``/etc/resolv.conf``, read as a stub resolver reads it (pure: text in, data out).

ztunnel forwards what it does not answer to the nameservers of its own resolv.conf (normally
the cluster's DNS service), with the resolver options found there: ``timeout`` (default 5 s)
per try and ``attempts`` (default 2) rounds over the servers. Its ``search`` list is the
client's search path in dedicated mode.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ztunnel_py.state.model import IPAddress

DNS_PORT = 53
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_ATTEMPTS = 2
MAX_TIMEOUT_S = 30.0  # glibc's RES_MAXRETRANS
MAX_ATTEMPTS = 5  # glibc's RES_MAXRETRY
MAX_NAMESERVERS = 3  # glibc's MAXNS: later ones are ignored


@dataclass(frozen=True, slots=True)
class ResolvConf:
    nameservers: tuple[tuple[IPAddress, int], ...]
    search: tuple[str, ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_S
    attempts: int = DEFAULT_ATTEMPTS
    problems: tuple[str, ...] = ()  # lines we could not use, for a warning at start


def parse_resolv_conf(text: str) -> ResolvConf:
    nameservers: list[tuple[IPAddress, int]] = []
    search: tuple[str, ...] = ()
    timeout_s = DEFAULT_TIMEOUT_S
    attempts = DEFAULT_ATTEMPTS
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        keyword, *args = line.split()
        if keyword == "nameserver" and args:
            try:
                ip = ipaddress.ip_address(args[0].split("%", 1)[0])
            except ValueError:
                problems.append(f"line {number}: {args[0]!r} is not an IP address")
                continue
            if len(nameservers) < MAX_NAMESERVERS:
                nameservers.append((ip, DNS_PORT))
        elif keyword in ("search", "domain") and args:
            search = tuple(args) if keyword == "search" else (args[0],)
        elif keyword == "options":
            for option in args:
                name, _, value = option.partition(":")
                if name == "timeout" and value.isdigit():
                    timeout_s = min(max(float(value), 1.0), MAX_TIMEOUT_S)
                elif name == "attempts" and value.isdigit():
                    attempts = min(max(int(value), 1), MAX_ATTEMPTS)
    if not nameservers:
        # What a stub resolver does without one: the local host.
        nameservers.append((ipaddress.ip_address("127.0.0.1"), DNS_PORT))
    return ResolvConf(tuple(nameservers), search, timeout_s, attempts, tuple(problems))
