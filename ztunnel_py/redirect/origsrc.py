"""Policy routing inside a pod for original-source connections in eBPF mode (``ENABLE_ORIG_SRC``).

With original source on, the proxy dials the pod's application from the client's address. The
application's replies go to that address, which the pod's routes send out of the pod: they
must come back to the proxy's socket instead. istio-cni's in-pod rules (iptables mode) do it
with a connmark (0x111) and ``fwmark 0x111/0xfff lookup 100``. eBPF mode has no iptables, so
the daemon sets, in each enrolled pod's netns:

- ``net.ipv4.tcp_fwmark_accept=1``: a connection the application accepts takes the mark of
  the SYN that opened it (IPv4 and IPv6);
- the proxy's spoofing sockets carry ``PACKET_MARK | ORIG_SRC_MARK`` (0x1539: still 0x539
  under istio-cni's 0xfff mask, so no rule ever captures them), so the application's socket,
  its SYN-ACK and every reply carry the 0x1000 bit;
- ``ip rule fwmark 0x1000/0x1000 lookup 1337`` (pref 32763) with table 1337 =
  ``local default dev lo``: those replies are delivered locally, to the proxy's transparent
  socket. The proxy's other sockets (0x539) are untouched.

Install is idempotent; the pod's netns goes away with the pod, so nothing is removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ztunnel_py.config import ORIG_SRC_MARK, Config
from ztunnel_py.errors import ZtunnelError
from ztunnel_py.redirect.iptables import IptablesError, NetnsRef, Runner, netns_runner
from ztunnel_py.redirect.listeners import PodListeners
from ztunnel_py.redirect.workloads import EnrolledPod

log = logging.getLogger(__name__)

ORIG_SRC_ROUTE_TABLE = 1337
ORIG_SRC_RULE_PRIORITY = 32763


@dataclass(frozen=True, slots=True)
class OrigSrcRouting:
    mark: int = ORIG_SRC_MARK
    table: int = ORIG_SRC_ROUTE_TABLE
    priority: int = ORIG_SRC_RULE_PRIORITY
    ipv6: bool = True


def install(netns: NetnsRef, routing: OrigSrcRouting, *, runner: Runner | None = None) -> None:
    """Set the sysctl, rule and routes in ``netns``; safe to repeat."""
    run = runner or netns_runner(netns)
    run(["ip", "link", "set", "lo", "up"], None)
    run(["sysctl", "-q", "-w", "net.ipv4.tcp_fwmark_accept=1"], None)
    _install_family(run, routing, 4)
    if routing.ipv6:
        try:
            _install_family(run, routing, 6)
        except IptablesError as e:  # IPv6 off inside this pod: it has no IPv6 peers either
            log.info("no IPv6 original-source routing in netns %s: %s", netns, e)


def _install_family(run: Runner, routing: OrigSrcRouting, family: int) -> None:
    ip = ["ip", f"-{family}"]
    if not run([*ip, "rule", "show", "pref", str(routing.priority)], None).strip():
        run(
            [*ip, "rule", "add", "fwmark", f"{routing.mark:#x}/{routing.mark:#x}",
             "pref", str(routing.priority), "lookup", str(routing.table)],
            None,
        )  # fmt: skip
    default = "0.0.0.0/0" if family == 4 else "::/0"
    table = str(routing.table)
    run([*ip, "route", "replace", "local", default, "dev", "lo", "table", table], None)


class OrigSrcRoutes:
    """An ``EnrollmentListener`` (eBPF mode with ``ENABLE_ORIG_SRC``): routes each pod's
    replies to original-source connections back to the proxy."""

    def __init__(self, config: Config, *, runner: Runner | None = None) -> None:
        self.routing = OrigSrcRouting(ipv6=config.ipv6_enabled)
        self._runner = runner

    def pod_added(self, pod: EnrolledPod, listeners: PodListeners) -> None:
        try:
            install(pod.netns_fd, self.routing, runner=self._runner)
        except IptablesError as e:
            raise ZtunnelError(f"original-source routing for pod {pod.uid}: {e}") from None

    def pod_removed(self, pod: EnrolledPod) -> None:
        return None  # the rules live and die with the pod's netns
