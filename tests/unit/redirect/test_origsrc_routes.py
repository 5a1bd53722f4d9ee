"""The policy routing eBPF mode installs in a pod for original-source replies (no netns here:
the commands are recorded)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ztunnel_py.errors import ZtunnelError
from ztunnel_py.redirect import origsrc
from ztunnel_py.redirect.iptables import IptablesError
from ztunnel_py.redirect.origsrc import OrigSrcRouting, install
from ztunnel_py.testing.proxy_harness import make_config


class Recorder:
    def __init__(self, *, rules_present: bool = False, fail_v6: bool = False) -> None:
        self.commands: list[str] = []
        self.rules_present = rules_present
        self.fail_v6 = fail_v6

    def __call__(self, argv: Sequence[str], stdin: str | None) -> str:
        command = " ".join(argv)
        self.commands.append(command)
        if self.fail_v6 and command.startswith("ip -6 route"):
            raise IptablesError(f"{command} failed: RTNETLINK answers: Permission denied")
        if " rule show " in command and self.rules_present:
            return "32763:\tfrom all fwmark 0x1000/0x1000 lookup 1337\n"
        return ""


def test_install_sets_fwmark_accept_a_rule_on_the_orig_src_bit_and_a_local_table() -> None:
    run = Recorder()
    install("/run/netns/unused", OrigSrcRouting(), runner=run)
    assert run.commands == [
        "ip link set lo up",
        "sysctl -q -w net.ipv4.tcp_fwmark_accept=1",
        "ip -4 rule show pref 32763",
        "ip -4 rule add fwmark 0x1000/0x1000 pref 32763 lookup 1337",
        "ip -4 route replace local 0.0.0.0/0 dev lo table 1337",
        "ip -6 rule show pref 32763",
        "ip -6 rule add fwmark 0x1000/0x1000 pref 32763 lookup 1337",
        "ip -6 route replace local ::/0 dev lo table 1337",
    ]


def test_install_again_adds_no_second_rule() -> None:
    run = Recorder(rules_present=True)
    install("/run/netns/unused", OrigSrcRouting(ipv6=False), runner=run)
    assert not [c for c in run.commands if " rule add " in c]


def test_a_pod_without_ipv6_still_gets_its_ipv4_routing() -> None:
    run = Recorder(fail_v6=True)
    install("/run/netns/unused", OrigSrcRouting(), runner=run)
    assert "ip -4 route replace local 0.0.0.0/0 dev lo table 1337" in run.commands


def test_a_failure_fails_the_pods_enrolment_with_its_cause() -> None:
    def broken(argv: Sequence[str], stdin: str | None) -> str:
        raise IptablesError("sysctl -q -w net.ipv4.tcp_fwmark_accept=1 failed: not found")

    routes = origsrc.OrigSrcRoutes(make_config(), runner=broken)

    class Pod:
        uid = "pod-uid"
        netns_fd = 0

    with pytest.raises(ZtunnelError, match="original-source routing for pod pod-uid: sysctl"):
        routes.pod_added(Pod(), None)  # type: ignore[arg-type]
