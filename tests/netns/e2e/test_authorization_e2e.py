"""Authorization policies against the real daemons, in both redirect modes.

- an ALLOW by principal admits one client pod and refuses another: the refused client's own
  daemon sees the 401, the destination's names the refused identity, the admitted bytes flow;
- a DENY on a source address block closes plaintext from outside the mesh: the :15006 proxy
  resets it (iptables), or the kernel drops it in ``sk_lookup`` before any proxy sees it (eBPF);
- a policy pushed while a transfer runs closes that transfer, refuses new ones, and leaves the
  connections of clients it still allows alone; a source block pushed while plaintext from
  outside is open closes that connection too;
- ``AUTHZ_POLICY_INFO_LOGGING=true`` logs each decision, naming the policy, at INFO.

Access logs are read as JSON (``LOG_FORMAT=json``), metrics through ``prometheus_client``'s
parser; both are compared before and after, so the tests sharing a mesh do not see each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from tests.netns.e2e.support import (
    MODES,
    MeshMaker,
    NetnsServer,
    Scrape,
    access_records,
    any_address,
    apply_config,
    bpf_dump,
    exchange,
    finish_stream,
    held_connection,
    host_part,
    hostport,
    log_mark,
    log_records,
    mesh_tag,
    mode_family_params,
    netns_cookies,
    node_address,
    only_one,
    receiving_from,
    start_stream,
)
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import ExtraService, Mesh, MeshOptions
from tools.testbed.plan import PodPlan
from ztunnel_py.testing.daemon import Daemon
from ztunnel_py.testing.poll import HANG_GUARD_S, wait_until
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root]

ON_NODE_1 = ExtraService("only-n1", "10.96.0.101", ("pod-1-1",))
SERVER = "pod-1-1"  # behind ON_NODE_1, on node-1
ALLOWED, REFUSED = "pod-0-0", "pod-0-1"  # clients on node-0: service accounts app-0, app-1
RECORDER_PORT = 7777  # no app serves it: only a test's recorder listens there
ECHO = 9000
N = 300_000
FAILED = "istio_tcp_connections_failed_total"
CLOSED = "istio_tcp_connections_closed_total"
RECEIVED = "istio_tcp_received_bytes_total"  # client -> server, for either reporter
SENT = "istio_tcp_sent_bytes_total"  # server -> client
IN_DROPPED_DENY = {"event": "in_dropped_deny"}


@pytest.fixture(scope="module", params=mode_family_params())
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    redirect, family = request.param
    options = MeshOptions(
        tag=mesh_tag("az", redirect, family),
        redirect=redirect,
        ip_family=family,
        services=(ON_NODE_1,),
        env={"LOG_FORMAT": "json"},
    )
    shared = Mesh(options, Path(tmp_path_factory.mktemp(options.tag)))
    try:
        shared.up()
        yield shared
    finally:
        shared.down()


def principal(pod: PodPlan) -> str:
    """How policies name a peer: its SPIFFE identity without the scheme."""
    return pod.identity.removeprefix("spiffe://")


def policy(name: str, action: str, *clauses: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A ``WorkloadSelector`` policy with one rule made of ``clauses`` (AND'd)."""
    return {
        "name": name,
        "namespace": "default",
        "scope": "WorkloadSelector",
        "action": action,
        "rules": [list(clauses)],
    }


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


# ----------------------------------------------------------------------------- ALLOW


def test_allow_by_principal_admits_one_client_and_refuses_the_other(mesh: Mesh) -> None:
    src_node, dst_node = mesh.daemons["node-0"], mesh.daemons["node-1"]
    allowed, refused, server = mesh.pod(ALLOWED), mesh.pod(REFUSED), mesh.pod(SERVER)
    callers = policy("az-callers", "Allow", [{"principals": [principal(allowed)]}])
    apply_config(mesh, [callers], selected={SERVER: ["default/az-callers"]})
    try:
        marks = log_mark(src_node), log_mark(dst_node)
        before = Scrape(src_node), Scrape(dst_node)

        denied = mesh.client(refused.name, "echo", mesh.vip(ON_NODE_1), ECHO, "--bytes", "4096")
        served = mesh.client(allowed.name, "echo", mesh.vip(ON_NODE_1), ECHO, "--bytes", str(N))
        assert denied["result"] != "ok", denied
        assert denied["received"] == 0
        assert served["result"] == "ok", served
        assert served["received"] == N
        assert served["sha256"] == served["expected_sha256"]

        # The refused client's own daemon saw the destination's 401.
        at_source = only_one(
            lambda: access_records(
                src_node, marks[0], direction="outbound", src_identity=refused.identity
            ),
            "the source's access log of the refused connection",
        )
        assert at_source["level"] == "error"
        assert at_source["error"] == "http status: 401 Unauthorized"
        assert (at_source["dst.workload"], at_source["dst.identity"]) == (
            server.name,
            server.identity,
        )
        assert (at_source["bytes_sent"], at_source["bytes_recv"]) == (0, 0)

        # The destination names the refused client by its verified identity.
        at_destination = only_one(
            lambda: access_records(
                dst_node, marks[1], direction="inbound", src_identity=refused.identity
            ),
            "the destination's access log of the refused connection",
        )
        assert at_destination["error"].startswith("connection closed due to policy rejection")
        assert "no ALLOW policy matched" in at_destination["error"]
        assert at_destination["src.workload"] == refused.name
        admitted = only_one(
            lambda: access_records(
                dst_node, marks[1], direction="inbound", src_identity=allowed.identity
            ),
            "the destination's access log of the admitted connection",
        )
        assert "error" not in admitted
        assert (admitted["bytes_recv"], admitted["bytes_sent"]) == (N, N)

        after = Scrape(src_node), Scrape(dst_node)
        for i, reporter in enumerate(("source", "destination")):
            denial = {
                "reporter": reporter,
                "response_flags": "DENY",
                "source_principal": refused.identity,
                "destination_workload": server.app,
            }
            assert delta(before[i], after[i], FAILED, **denial) == 1, reporter
            assert delta(before[i], after[i], CLOSED, **denial) == 1, reporter
            # The admitted client's bytes flowed, and nothing of it counts as a denial.
            admitted_labels = {"reporter": reporter, "source_principal": allowed.identity}
            assert delta(before[i], after[i], RECEIVED, **admitted_labels) == N, reporter
            assert delta(before[i], after[i], SENT, **admitted_labels) == N, reporter
            assert delta(before[i], after[i], FAILED, **admitted_labels) == 0, reporter

        # Without AUTHZ_POLICY_INFO_LOGGING the decisions stay at DEBUG, below the log level.
        assert not [r for r in log_records(dst_node, marks[1]) if r["scope"] == "ztunnel_py.rbac"]
    finally:
        apply_config(mesh)


# ----------------------------------------------------------------------------- DENY, plaintext


def kernel_denies(daemon: Daemon, pod: PodPlan) -> list[dict[str, Any]]:
    """The pod's entries in the daemon's ``zt_deny`` map (the DENY rules the kernel enforces)."""
    cookie = netns_cookies(daemon)[pod.ip]
    return [e for e in bpf_dump(daemon)["maps"]["zt_deny"] if e["netnsCookie"] == cookie]


def test_deny_by_source_ip_block_closes_plaintext_from_outside_the_mesh(mesh: Mesh) -> None:
    pod = mesh.pod("pod-0-0")
    daemon = mesh.daemons["node-0"]
    node = mesh.plan.node("node-0")
    outside = f"/run/netns/{node.netns}"  # the node itself: not a pod, never enrolled
    outside_ip = node_address(mesh, node.name, pod.ip)  # its address toward the pods
    # IPv6: a zero-compressed block around the node's address, not just the one address.
    block_cidr = str(ip_network(f"{outside_ip}/{32 if '.' in outside_ip else 120}", strict=False))
    ebpf = mesh.options.redirect == "ebpf"
    with NetnsServer(pod.netns_path, any_address(pod.ip), RECORDER_PORT, echo=True) as recorder:
        assert exchange(outside, pod.ip, RECORDER_PORT, b"before") == ("ok", b"before")
        wait_until(lambda: [n for _, n in recorder.seen()] == [6], "the recorder to see it")
        recorder.clear()

        block = policy(
            "az-block",
            "Deny",
            [{"sourceIps": [block_cidr]}],
            [{"destinationPorts": [RECORDER_PORT]}],
        )
        apply_config(mesh, [block], selected={pod.name: ["default/az-block"]})
        try:
            if ebpf:  # address and port only: the kernel enforces it
                wait_until(
                    lambda: (
                        [(e["source"], e["port"]) for e in kernel_denies(daemon, pod)]
                        == [(block_cidr, RECORDER_PORT)]
                    ),
                    "the DENY rule in the pod's kernel map",
                )
            mark = log_mark(daemon)
            before = Scrape(daemon)

            outcome = exchange(outside, pod.ip, RECORDER_PORT, b"blocked")
            # The same client to a port the policy does not name still gets through.
            assert exchange(outside, pod.ip, ECHO, b"other port") == ("ok", b"other port")
            only_one(
                lambda: access_records(daemon, mark, **{"dst.addr": hostport(pod.ip, ECHO)}),
                "the access log of the allowed connection",
            )

            after = Scrape(daemon)
            denial = {
                "reporter": "destination",
                "response_flags": "DENY",
                "destination_workload": pod.app,
                "source_principal": "unknown",  # plaintext: no identity
                "connection_security_policy": "unknown",
            }
            blocked_records = access_records(
                daemon, mark, **{"dst.addr": hostport(pod.ip, RECORDER_PORT)}
            )
            if ebpf:
                # Dropped by sk_lookup: the client is refused, no proxy ever saw it.
                assert outcome == ("refused", b"")
                assert after.total("ztunnel_bpf_events_total", **IN_DROPPED_DENY) > before.total(
                    "ztunnel_bpf_events_total", **IN_DROPPED_DENY
                )
                assert blocked_records == []
                assert delta(before, after, FAILED, **denial) == 0
            else:
                # Accepted by the kernel, closed by the :15006 proxy, counted as a denial.
                assert outcome == ("reset", b"")
                (record,) = blocked_records
                assert record["direction"] == "inbound"
                assert record["src.addr"].startswith(host_part(outside_ip))
                assert "src.identity" not in record
                assert record["error"].startswith("connection closed due to policy rejection")
                assert "denied by policy default/az-block" in record["error"]
                assert delta(before, after, FAILED, **denial) == 1
                assert delta(before, after, CLOSED, **denial) == 1
            assert recorder.seen() == []  # not a byte reached the app
        finally:
            apply_config(mesh)
        if ebpf:
            wait_until(lambda: kernel_denies(daemon, pod) == [], "the kernel rule to go")
        assert exchange(outside, pod.ip, RECORDER_PORT, b"after") == ("ok", b"after")
        wait_until(lambda: [n for _, n in recorder.seen()] == [5], "the recorder to see it")


def test_deny_by_destination_ip_block_refuses_that_family_only(mesh: Mesh) -> None:
    """A DENY on a destination block (the server's primary address's subnet: an IPv6 /64 on
    the IPv6 and dual-stack testbeds) refuses HBONE to the server through that family's VIP;
    on a dual-stack testbed the same client still reaches the same server over IPv4."""
    src_node, dst_node = mesh.daemons["node-0"], mesh.daemons["node-1"]
    client, server = mesh.pod(ALLOWED), mesh.pod(SERVER)
    subnet = str(ip_network(f"{server.ip}/{server.prefixlen}", strict=False))
    block = policy("az-dst", "Deny", [{"destinationIps": [subnet]}])
    apply_config(mesh, [block], selected={SERVER: ["default/az-dst"]})
    try:
        mark = log_mark(dst_node)
        primary, *others = ON_NODE_1.vips(mesh.options.ip_family)
        denied = mesh.client(client.name, "echo", primary, ECHO, "--bytes", "4096")
        assert denied["result"] != "ok" and denied["received"] == 0, denied
        refusal = only_one(
            lambda: access_records(
                dst_node, mark, direction="inbound", src_identity=client.identity
            ),
            "the destination's access log of the refused connection",
        )
        assert "denied by policy default/az-dst" in refusal["error"]
        assert refusal["dst.addr"] == hostport(server.ip, 15008)  # the HBONE hop
        for vip in others:  # the other family's address is outside the block
            served = mesh.client(client.name, "echo", vip, ECHO, "--bytes", "4096")
            assert served["result"] == "ok" and served["received"] == 4096, served
        assert src_node.proc.poll() is None and dst_node.proc.poll() is None
    finally:
        apply_config(mesh)


# ----------------------------------------------------------------------------- live re-evaluation


def cutting_policy(kind: str, cut: PodPlan, kept: PodPlan) -> tuple[dict[str, Any], str]:
    """A policy that refuses ``cut`` and still admits ``kept``, and how its refusals read."""
    if kind == "deny":
        return policy("az-cut", "Deny", [{"principals": [principal(cut)]}]), (
            "denied by policy default/az-cut"
        )
    return policy("az-cut", "Allow", [{"principals": [principal(kept)]}]), (
        "no ALLOW policy matched"
    )


# Re-evaluation is the same code whatever the family: IPv4 only, to keep CI short.
@pytest.mark.parametrize("mesh", mode_family_params(("ipv4",)), indirect=True)
@pytest.mark.parametrize("kind", ["deny", "allow"])
def test_policy_pushed_during_a_transfer_closes_it_and_spares_allowed_clients(
    mesh: Mesh, kind: str
) -> None:
    dst_node = mesh.daemons["node-1"]
    kept_pod, cut_pod, server = mesh.pod(ALLOWED), mesh.pod(REFUSED), mesh.pod(SERVER)
    streams = []
    try:
        start = Scrape(dst_node)
        kept = start_stream(mesh, kept_pod.name, mesh.vip(ON_NODE_1), ECHO)
        streams.append(kept)
        cut = start_stream(mesh, cut_pod.name, mesh.vip(ON_NODE_1), ECHO)
        streams.append(cut)

        # Both are spliced through to the app before the policy arrives.
        wait_until(
            receiving_from(dst_node, start, [kept_pod.identity, cut_pod.identity]),
            "both streams to reach the destination's app",
        )
        mark = log_mark(dst_node)
        before = Scrape(dst_node)

        cutter, refusal_reason = cutting_policy(kind, cut_pod, kept_pod)
        apply_config(mesh, [cutter], selected={SERVER: ["default/az-cut"]})

        cut.wait(timeout=HANG_GUARD_S)  # ended by the destination, its stdin still open
        ended = finish_stream(cut)
        assert ended["result"] in {"reset", "closed"}, ended
        closed = only_one(
            lambda: access_records(
                dst_node, mark, direction="inbound", src_identity=cut_pod.identity
            ),
            "the destination's access log of the cut stream",
        )
        assert closed["error"] == "connection closed due to policy change"
        assert closed["bytes_recv"] > 0  # it had been transferring
        denial = {
            "reporter": "destination",
            "response_flags": "DENY",
            "source_principal": cut_pod.identity,
        }
        assert delta(before, Scrape(dst_node), CLOSED, **denial) == 1

        # New connections of the cut client are refused; the other client's are not.
        again = mesh.client(cut_pod.name, "echo", mesh.vip(ON_NODE_1), ECHO, "--bytes", "4096")
        assert again["result"] != "ok", again
        assert again["received"] == 0
        refusal = only_one(
            lambda: [
                r
                for r in access_records(
                    dst_node, mark, direction="inbound", src_identity=cut_pod.identity
                )
                if "policy rejection" in r.get("error", "")
            ],
            "the destination's access log of the refused reconnection",
        )
        assert refusal_reason in refusal["error"]
        fresh = mesh.client(kept_pod.name, "echo", mesh.vip(ON_NODE_1), ECHO, "--bytes", "4096")
        assert fresh["result"] == "ok", fresh

        # The allowed stream ran on, untouched, and ends cleanly with every byte back.
        assert kept.poll() is None
        result = finish_stream(kept)
        assert result["result"] == "ok", result
        assert result["sent"] == result["received"] > 0
        assert result["sha256"] == result["expected_sha256"]

        # Its access-log line (beside the short echo's) shows it whole and error-free.
        def kept_records() -> list[dict[str, Any]]:
            return access_records(
                dst_node, mark, direction="inbound", src_identity=kept_pod.identity
            )

        wait_until(lambda: len(kept_records()) == 2, "the access log of the allowed stream")
        records = kept_records()
        assert all("error" not in r for r in records), records
        assert [
            (r["bytes_recv"], r["bytes_sent"], r["dst.identity"])
            for r in records
            if r["bytes_recv"] != 4096
        ] == [(result["sent"], result["received"], server.identity)]
        assert delta(before, Scrape(dst_node), FAILED, source_principal=kept_pod.identity) == 0
    finally:
        apply_config(mesh)
        for proc in streams:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.parametrize("mesh", mode_family_params(("ipv4", "ipv6")), indirect=True)
def test_source_block_pushed_while_plaintext_is_open_closes_it(mesh: Mesh) -> None:
    """The open connection was accepted by the :15006 proxy (after REDIRECT or sk_lookup), so
    the proxy closes it; in eBPF mode the kernel also refuses the next one."""
    pod = mesh.pod("pod-0-0")
    daemon = mesh.daemons["node-0"]
    node = mesh.plan.node("node-0")
    outside, outside_ip = f"/run/netns/{node.netns}", node_address(mesh, node.name, pod.ip)
    mark = log_mark(daemon)
    before = Scrape(daemon)
    try:
        with held_connection(outside, pod.ip, ECHO) as held:
            host_bits = 32 if "." in outside_ip else 128
            block = policy("az-hold", "Deny", [{"sourceIps": [f"{outside_ip}/{host_bits}"]}])
            apply_config(mesh, [block], selected={pod.name: ["default/az-hold"]})
            try:
                cut = held.recv(64)  # EOF or reset: the proxy closed it
            except ConnectionResetError:
                cut = b""
            assert cut == b""
        closed = only_one(
            lambda: [
                r
                for r in access_records(daemon, mark, direction="inbound")
                if r["src.addr"].startswith(host_part(outside_ip))
            ],
            "the access log of the closed connection",
        )
        assert closed["error"] == "connection closed due to policy change"
        assert (closed["bytes_recv"], closed["bytes_sent"]) == (4, 4)  # the held ping
        after = Scrape(daemon)
        denial = {
            "reporter": "destination",
            "response_flags": "DENY",
            "destination_workload": pod.app,
            "connection_security_policy": "unknown",
        }
        assert delta(before, after, CLOSED, **denial) == 1
        expected = "refused" if mesh.options.redirect == "ebpf" else "reset"
        assert exchange(outside, pod.ip, ECHO, b"again")[0] == expected
    finally:
        apply_config(mesh)


# ----------------------------------------------------------------------------- decision logging


@pytest.mark.parametrize("redirect", MODES)
def test_authz_policy_info_logging_names_the_deciding_policy(
    make_mesh: MeshMaker, redirect: str
) -> None:
    mesh = make_mesh(
        "al",
        redirect,
        nodes=1,
        pods_per_node=3,
        env={"LOG_FORMAT": "json", "AUTHZ_POLICY_INFO_LOGGING": "true"},
    )
    client, server, intruder = mesh.pod("pod-0-0"), mesh.pod("pod-0-1"), mesh.pod("pod-0-2")
    daemon = mesh.daemons["node-0"]
    apply_config(
        mesh,
        [
            policy("al-allow", "Allow", [{"principals": [principal(client)]}]),
            policy("al-deny", "Deny", [{"principals": [principal(intruder)]}]),
        ],
        selected={server.name: ["default/al-allow", "default/al-deny"]},
    )
    mark = log_mark(daemon)
    served = mesh.client(client.name, "echo", server.ip, ECHO, "--bytes", "4096")
    assert served["result"] == "ok", served
    refused = mesh.client(intruder.name, "echo", server.ip, ECHO, "--bytes", "4096")
    assert refused["received"] == 0, refused

    def decisions() -> list[dict[str, Any]]:
        return [r for r in log_records(daemon, mark) if r["scope"] == "ztunnel_py.rbac"]

    wait_until(lambda: len(decisions()) >= 2, "both decisions in the log")
    allowed, denied = decisions()
    assert (allowed["level"], allowed["message"], allowed["policy"], allowed["allowed"]) == (
        "info",
        "allowed by policy default/al-allow",
        "default/al-allow",
        True,
    )
    assert f"({client.identity})->{server.ip}:{ECHO}" in allowed["conn"]
    assert (denied["level"], denied["message"], denied["policy"], denied["allowed"]) == (
        "info",
        "denied by policy default/al-deny",
        "default/al-deny",
        False,
    )
    assert f"({intruder.identity})->{server.ip}:{ECHO}" in denied["conn"]
