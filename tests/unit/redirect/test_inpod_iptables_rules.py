"""The in-pod rule scripts (istio-cni's REDIRECT variant), checked as text without a kernel."""

from __future__ import annotations

from collections.abc import Sequence

from ztunnel_py.redirect import iptables
from ztunnel_py.redirect.iptables import InpodRules, install_script, remove_script

EMPTY_SAVE = """*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
"""

INSTALLED_SAVE = """*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
COMMIT
"""


def test_v4_rules_match_istio_cni() -> None:
    rules = InpodRules().chain_rules(4)
    assert rules["mangle"] == [
        "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark "
        "--nfmask 0xffffffff --ctmask 0xffffffff",
    ]
    assert rules["nat"] == [
        "-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -j ACCEPT",
        "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 "
        "-m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
        "-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -j ACCEPT",
        # istio-cni's DNS capture (ambient.dnsCapture, on by default)
        "-A ISTIO_OUTPUT ! -o lo -p udp -m udp --dport 53 -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15053",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15053",
        "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15001",
    ]
    assert rules["raw"] == [
        "-A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1",
        "-A ISTIO_PRERT -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1",
    ]


def test_v6_rules_use_v6_loopback_and_probe_address() -> None:
    nat = InpodRules().chain_rules(6)["nat"]
    assert "-A ISTIO_PRERT -s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -j ACCEPT" in nat
    assert all("127.0.0.1" not in rule for rule in nat)
    assert any(rule.startswith("-A ISTIO_OUTPUT ! -d ::1/128 -o lo") for rule in nat)


def test_dns_redirect_only_with_dns_capture() -> None:
    assert not any("15053" in r for r in InpodRules(dns_capture=False).chain_rules(4)["nat"])
    nat = InpodRules(dns_capture=True).chain_rules(4)["nat"]
    dns = [r for r in nat if "--to-ports 15053" in r]
    assert len(dns) == 2
    # DNS redirects come before the catch-all TCP redirect to 15001.
    assert nat.index(dns[-1]) < nat.index(nat[-1])


def test_packet_mark_follows_config() -> None:
    nat = InpodRules(mark=0x123).chain_rules(4)["nat"]
    assert "-m mark ! --mark 0x123/0xfff -j REDIRECT --to-ports 15001" in nat[-1]


def test_install_adds_jumps_once() -> None:
    fresh = install_script(InpodRules(), 4, EMPTY_SAVE)
    assert fresh.count("-A PREROUTING -j ISTIO_PRERT") == 3  # mangle, nat and raw
    assert fresh.count("-A OUTPUT -j ISTIO_OUTPUT") == 3
    again = install_script(InpodRules(), 4, INSTALLED_SAVE)
    assert "-A PREROUTING" not in again and "-A OUTPUT" not in again
    # Our chains are redeclared (which flushes them) and refilled every time.
    assert again.count(":ISTIO_PRERT - [0:0]") == 3
    assert "REDIRECT --to-ports 15001" in again


def test_remove_deletes_jumps_then_chains_and_nothing_when_absent() -> None:
    script = remove_script(INSTALLED_SAVE)
    lines = script.splitlines()
    assert lines.count("-D PREROUTING -j ISTIO_PRERT") == 3
    assert lines.count("-X ISTIO_OUTPUT") == 3
    assert lines.index("-D OUTPUT -j ISTIO_OUTPUT") < lines.index("-X ISTIO_OUTPUT")
    assert remove_script(EMPTY_SAVE) == ""


def test_install_runs_restore_and_policy_routing_for_both_families() -> None:
    calls: list[tuple[tuple[str, ...], str | None]] = []

    def runner(argv: Sequence[str], stdin: str | None) -> str:
        calls.append((tuple(argv), stdin))
        return EMPTY_SAVE if argv[0].endswith("save") else ""

    iptables.install("/run/netns/unused", InpodRules(), runner=runner)
    argvs = [argv for argv, _ in calls]
    assert ("iptables-restore", "--noflush") in argvs
    assert ("ip6tables-restore", "--noflush") in argvs
    assert (
        "ip",
        "-4",
        "rule",
        "add",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ) in argvs
    assert (
        "ip",
        "-4",
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ) in argvs
    assert ("ip", "-6", "route", "replace", "local", "::/0", "dev", "lo", "table", "100") in argvs

    calls.clear()
    iptables.install("/run/netns/unused", InpodRules(ipv6=False), runner=runner)
    assert not any(argv[0].startswith("ip6tables") or argv[:2] == ("ip", "-6") for argv, _ in calls)


def test_transparent_hbone_rule_comes_before_the_plaintext_redirect() -> None:
    assert (
        InpodRules().chain_rules(4)["nat"]
        == InpodRules(transparent_hbone=False).chain_rules(4)["nat"]
    )
    nat = InpodRules(transparent_hbone=True).chain_rules(4)["nat"]
    hbone = (
        "-A ISTIO_PRERT -p tcp -m tcp --sport 15100:15199 ! --dport 15008 "
        "-m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15008"
    )
    assert nat.index(hbone) < next(i for i, r in enumerate(nat) if "--to-ports 15006" in r)
    assert hbone not in InpodRules().chain_rules(4)["nat"]
