"""istio-cni's in-pod redirection rules, installed and removed inside a pod's netns.

In ``REDIRECT_MODE=iptables`` (and in the testbed, where we play istio-cni) every enrolled pod
gets the rules istio-cni installs (its ``default.golden``, REDIRECT variant):

- mangle ``ISTIO_PRERT``: packets carrying ztunnel's mark 0x539 tag their connection with
  connmark 0x111; mangle ``ISTIO_OUTPUT`` restores that connmark onto replies, and policy routing
  (``fwmark 0x111/0xfff lookup 100``, table 100 = ``local default dev lo``) hands those replies
  back to ztunnel's spoofed-source sockets;
- nat ``ISTIO_PRERT``: inbound TCP to anything but :15008 and 127.0.0.1, not marked 0x539 and
  not from the kubelet probe address, is REDIRECTed to :15006; with ``transparent_hbone``
  (ztunnel-py's ``TRANSPARENT_NETWORK_POLICIES``, not istio-cni's) TCP from a source port in
  15100-15199 is HBONE sent to the application's own port and goes to :15008 first;
- nat ``ISTIO_OUTPUT``: outbound TCP not marked 0x539 (and not via lo, not to 127.0.0.1, not on
  a 0x111 connection) is REDIRECTed to :15001; with DNS capture (istio-cni's default), UDP and
  TCP to port 53 not marked 0x539 go to ztunnel's DNS proxy on :15053 first;
- raw (DNS capture only): the DNS proxy's own upstream queries and their replies are tracked in
  conntrack zone 1, so they never collide with the pod's redirected queries.

Install is idempotent (our chains are rewritten whole; the jumps into them are added once);
remove deletes exactly what install added. Nothing outside the given netns is touched.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ztunnel_py.config import (
    DEFAULT_PACKET_MARK,
    HBONE_SOURCE_PORTS,
    PACKET_MARK_MASK,
    PORT_DNS,
    PORT_HBONE,
    PORT_INBOUND_PLAINTEXT,
    PORT_OUTBOUND,
    PROBE_IP4,
    PROBE_IP6,
    Config,
)
from ztunnel_py.errors import ZtunnelError

CHAIN_PRERT = "ISTIO_PRERT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"
# (table, built-in chain, our chain): the jumps that install adds and remove deletes.
_JUMPS = (
    ("mangle", "PREROUTING", CHAIN_PRERT),
    ("mangle", "OUTPUT", CHAIN_OUTPUT),
    ("nat", "PREROUTING", CHAIN_PRERT),
    ("nat", "OUTPUT", CHAIN_OUTPUT),
    ("raw", "PREROUTING", CHAIN_PRERT),
    ("raw", "OUTPUT", CHAIN_OUTPUT),
)
_TABLES = ("mangle", "nat", "raw")


class IptablesError(ZtunnelError):
    """A rule change inside a pod netns failed."""


@dataclass(frozen=True, slots=True)
class InpodRules:
    """The knobs istio-cni's in-pod rules have (constants from its ``config.go``)."""

    mark: int = DEFAULT_PACKET_MARK  # InpodMark: ztunnel's own sockets
    tproxy_mark: int = 0x111  # InpodTProxyMark: connections ztunnel spoofed a source for
    mask: int = PACKET_MARK_MASK
    route_table: int = 100
    rule_priority: int = 32764
    probe_ip4: str = str(PROBE_IP4)
    probe_ip6: str = str(PROBE_IP6)
    ipv6: bool = True
    dns_capture: bool = True  # istio-cni's ambient.dnsCapture default
    transparent_hbone: bool = False  # ztunnel-py's TRANSPARENT_NETWORK_POLICIES (one more rule)
    outbound_port: int = PORT_OUTBOUND
    inbound_plaintext_port: int = PORT_INBOUND_PLAINTEXT
    hbone_port: int = PORT_HBONE
    dns_port: int = PORT_DNS

    @classmethod
    def from_config(cls, config: Config) -> InpodRules:
        return cls(
            mark=config.packet_mark,
            ipv6=config.ipv6_enabled,
            dns_capture=config.dns_proxy,
            transparent_hbone=config.transparent_network_policies,
        )

    def chain_rules(self, family: int) -> dict[str, list[str]]:
        """The ``-A`` lines of our chains for ``family`` 4 or 6, per table (pure)."""
        lo_addr = "127.0.0.1/32" if family == 4 else "::1/128"
        probe = f"{self.probe_ip4}/32" if family == 4 else f"{self.probe_ip6}/128"
        mark = f"{self.mark:#x}/{self.mask:#x}"
        tmark = f"{self.tproxy_mark:#x}/{self.mask:#x}"
        mangle = [
            f"-A {CHAIN_PRERT} -m mark --mark {mark} -j CONNMARK --set-xmark {tmark}",
            f"-A {CHAIN_OUTPUT} -m connmark --mark {tmark} "
            "-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        ]
        nat = [f"-A {CHAIN_PRERT} -s {probe} -p tcp -j ACCEPT"]
        if self.transparent_hbone:
            sports = f"{HBONE_SOURCE_PORTS[0]}:{HBONE_SOURCE_PORTS[-1]}"
            hbone = self.hbone_port
            nat.append(
                f"-A {CHAIN_PRERT} -p tcp -m tcp --sport {sports} ! --dport {hbone} "
                f"-m mark ! --mark {mark} -j REDIRECT --to-ports {hbone}"
            )
        nat += [
            f"-A {CHAIN_PRERT} ! -d {lo_addr} -p tcp -m tcp ! --dport {self.hbone_port} "
            f"-m mark ! --mark {mark} -j REDIRECT --to-ports {self.inbound_plaintext_port}",
            f"-A {CHAIN_OUTPUT} -d {probe} -p tcp -j ACCEPT",
        ]
        if self.dns_capture:
            nat += [
                f"-A {CHAIN_OUTPUT} ! -o lo -p udp -m udp --dport 53 -m mark ! --mark {mark} "
                f"-j REDIRECT --to-ports {self.dns_port}",
                f"-A {CHAIN_OUTPUT} ! -d {lo_addr} -p tcp -m tcp --dport 53 "
                f"-m mark ! --mark {mark} -j REDIRECT --to-ports {self.dns_port}",
            ]
        nat += [
            f"-A {CHAIN_OUTPUT} -p tcp -m mark --mark {tmark} -j ACCEPT",
            f"-A {CHAIN_OUTPUT} ! -d {lo_addr} -o lo -j ACCEPT",
            f"-A {CHAIN_OUTPUT} ! -d {lo_addr} -p tcp -m mark ! --mark {mark} "
            f"-j REDIRECT --to-ports {self.outbound_port}",
        ]
        raw: list[str] = []
        if self.dns_capture:
            # ztunnel's upstream queries (marked) and their replies live in conntrack zone 1,
            # apart from the pod's own queries that nat redirects to the DNS proxy.
            raw = [
                f"-A {CHAIN_OUTPUT} -p udp -m mark --mark {mark} -m udp --dport 53 -j CT --zone 1",
                f"-A {CHAIN_PRERT} -p udp -m mark ! --mark {mark} -m udp --sport 53 -j CT --zone 1",
            ]
        return {"mangle": mangle, "nat": nat, "raw": raw}

    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)


# --------------------------------------------------------------------------- pure scripts


def existing_jumps(save_output: str) -> set[tuple[str, str, str]]:
    """Which of our jumps an ``iptables-save`` dump already has."""
    found: set[tuple[str, str, str]] = set()
    table = ""
    for raw in save_output.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
            continue
        for jt, builtin, chain in _JUMPS:
            if table == jt and line == f"-A {builtin} -j {chain}":
                found.add((jt, builtin, chain))
    return found


def existing_chains(save_output: str) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    table = ""
    for raw in save_output.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and table:
            found.add((table, line[1:].split()[0]))
    return found


def install_script(rules: InpodRules, family: int, save_output: str) -> str:
    """``iptables-restore --noflush`` input that (re)writes our chains and adds missing jumps."""
    have = existing_jumps(save_output)
    per_table = rules.chain_rules(family)
    out: list[str] = []
    for table in _TABLES:
        out.append(f"*{table}")
        out += [f":{CHAIN_PRERT} - [0:0]", f":{CHAIN_OUTPUT} - [0:0]"]  # declaring flushes them
        out += [f"-A {b} -j {c}" for t, b, c in _JUMPS if t == table and (t, b, c) not in have]
        out += per_table[table]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def remove_script(save_output: str) -> str:
    """``iptables-restore --noflush`` input that deletes our jumps and chains (if any)."""
    have = existing_jumps(save_output)
    chains = existing_chains(save_output)
    out: list[str] = []
    for table in _TABLES:
        ours = [c for c in (CHAIN_PRERT, CHAIN_OUTPUT) if (table, c) in chains]
        jumps = [f"-D {b} -j {c}" for t, b, c in _JUMPS if t == table and (t, b, c) in have]
        if not ours and not jumps:
            continue
        out.append(f"*{table}")
        out += jumps
        out += [f":{c} - [0:0]" for c in ours]  # flush first: -X needs an empty chain
        out += [f"-X {c}" for c in ours]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


# --------------------------------------------------------------------------- running it

NetnsRef = str | Path | int  # a netns file (/run/netns/x, /proc/<pid>/ns/net) or an open fd
Runner = Callable[[Sequence[str], str | None], str]


def netns_runner(netns: NetnsRef) -> Runner:
    """Run commands inside ``netns`` (through ``nsenter``), returning stdout."""
    pass_fds: tuple[int, ...] = ()
    if isinstance(netns, int):
        path, pass_fds = f"/proc/self/fd/{netns}", (netns,)
    else:
        path = str(netns)
        if not os.path.exists(path):
            raise IptablesError(f"netns {path} does not exist")

    def run(argv: Sequence[str], stdin: str | None) -> str:
        full = ["nsenter", f"--net={path}", "--", *argv]
        try:
            proc = subprocess.run(
                full, input=stdin, capture_output=True, text=True, check=False, pass_fds=pass_fds
            )
        except FileNotFoundError as e:
            raise IptablesError(
                f"{e.filename} not found: install it (nsenter: util-linux; ip: iproute2;"
                " sysctl: procps; iptables)"
            ) from None
        if proc.returncode != 0:
            command = " ".join(argv)
            raise IptablesError(
                f"{command} in netns {netns} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc.stdout

    return run


def _tool(family: int, name: str) -> str:
    return name if family == 4 else name.replace("iptables", "ip6tables")


def install(
    netns: NetnsRef, rules: InpodRules | None = None, *, runner: Runner | None = None
) -> None:
    """Install the in-pod rules and policy routing in ``netns``; safe to repeat."""
    rules = rules or InpodRules()
    run = runner or netns_runner(netns)
    run(["ip", "link", "set", "lo", "up"], None)  # a route via lo needs lo up (IPv6 checks)
    for family in rules.families():
        save = run([_tool(family, "iptables-save")], None)
        run([_tool(family, "iptables-restore"), "--noflush"], install_script(rules, family, save))
        ip = ["ip", f"-{family}"]
        selector = ["fwmark", f"{rules.tproxy_mark:#x}/{rules.mask:#x}"]
        if not run([*ip, "rule", "show", "pref", str(rules.rule_priority)], None).strip():
            run(
                [*ip, "rule", "add", *selector, "pref", str(rules.rule_priority),
                 "lookup", str(rules.route_table)],
                None,
            )  # fmt: skip
        default = "0.0.0.0/0" if family == 4 else "::/0"
        run(
            [
                *ip,
                "route",
                "replace",
                "local",
                default,
                "dev",
                "lo",
                "table",
                str(rules.route_table),
            ],
            None,
        )


def remove(
    netns: NetnsRef, rules: InpodRules | None = None, *, runner: Runner | None = None
) -> None:
    """Remove what ``install`` added; a netns without the rules is left as it is."""
    rules = rules or InpodRules()
    run = runner or netns_runner(netns)
    for family in rules.families():
        script = remove_script(run([_tool(family, "iptables-save")], None))
        if script:
            run([_tool(family, "iptables-restore"), "--noflush"], script)
        ip = ["ip", f"-{family}"]
        if run([*ip, "rule", "show", "pref", str(rules.rule_priority)], None).strip():
            run([*ip, "rule", "del", "pref", str(rules.rule_priority)], None)
        if run([*ip, "route", "show", "table", str(rules.route_table)], None).strip():
            run([*ip, "route", "flush", "table", str(rules.route_table)], None)


def is_installed(
    netns: NetnsRef, rules: InpodRules | None = None, *, runner: Runner | None = None
) -> bool:
    """Whether every jump and rule of ours is present (for status and tests)."""
    rules = rules or InpodRules()
    run = runner or netns_runner(netns)
    for family in rules.families():
        save = run([_tool(family, "iptables-save")], None)
        if existing_jumps(save) != set(_JUMPS):
            return False
        lines = {line.strip() for line in save.splitlines()}
        for chain_lines in rules.chain_rules(family).values():
            # Our rules are written in iptables-save's own spelling, so they compare as text.
            if not all(rule in lines for rule in chain_lines):
                return False
    return True
