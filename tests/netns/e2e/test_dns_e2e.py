"""The DNS proxy of the real daemons, in both redirect modes, with a real upstream resolver.

A testbed mesh (two nodes, two pods each) with extra services: a name shared by two
namespaces, a headless service, a ServiceEntry with an auto-allocated VIP and a wildcard one.
Debian's dnsmasq, in a namespace of its own on the fabric, plays the cluster DNS service that
the node's resolv.conf names; it serves ``example.test`` and truncates UDP answers at 512 bytes.
Pods send their queries where a pod's resolver would (a kube-dns VIP, or straight at the
upstream): istio-cni's rules (iptables mode) or the BPF programs (eBPF mode) must bring every
one of them to the pod's DNS proxy on :15053.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import pytest

from tests.netns.e2e.support import MODES, Scrape, log_mark, log_records, mesh_tag
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import ExtraService, Mesh, MeshOptions
from tools.testbed.resolver import RESOLVER_IP, UpstreamResolver, write_resolv_conf
from ztunnel_py.redirect import iptables
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root, pytest.mark.slow]

DNS_CLIENT = Path(__file__).parents[3] / "tools" / "testbed" / "dnsclient.py"
KUBE_DNS = "10.96.0.53"  # where the pods' resolv.conf would point: nothing listens there
CLIENT = "pod-0-0"
BIG = [f"192.0.2.{i}" for i in range(1, 61)]  # 60 A records: ~1 KB, more than 512 bytes
SERVICES = (
    ExtraService("shared", "10.96.0.120", ("pod-1-0",)),
    ExtraService("shared", "10.96.0.121", ("pod-1-1",), namespace="other"),
    ExtraService("db", "", ("pod-0-1", "pod-1-1")),  # headless
    ExtraService("partner", "240.240.0.7", ("pod-1-1",), host="api.partner.example"),
    ExtraService("wild", "240.240.0.8", ("pod-1-0",), host="*.wild.example"),
    # a ServiceEntry with resolution DNS: its endpoint is a hostname that dnsmasq resolves
    ExtraService("ext", "240.240.0.9", (), host="ext.example.test", ports={80: 8080}),
)
HOSTNAME_WORKLOAD = {
    "uid": "se-ext",
    "name": "ext",
    "namespace": "default",
    "hostname": "ext.example.test",
    "protocol": "TCP",
    "services": {"default/ext.example.test": {80: 8080}},
}


class DnsMesh:
    def __init__(self, mesh: Mesh, resolver: UpstreamResolver) -> None:
        self.mesh = mesh
        self.resolver = resolver

    def run(self, pod: str, *args: str) -> dict[str, Any]:
        proc = self.mesh.bed.run(pod, [sys.executable, str(DNS_CLIENT), *args], timeout=60)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def ask(
        self,
        name: str,
        rdtype: str = "A",
        *,
        pod: str = CLIENT,
        server: str = KUBE_DNS,
        **flags: Any,
    ) -> dict[str, Any]:
        extra = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is True]
        if "payload" in flags:
            extra += ["--payload", str(flags["payload"])]
        reply = self.run(pod, "query", server, name, rdtype, *extra)
        assert "rcode" in reply, f"{name} from {pod} via {server}: {reply}"
        return reply

    def addresses(self, name: str, rdtype: str = "A", **kw: Any) -> list[str]:
        reply = self.ask(name, rdtype, **kw)
        assert reply.get("rcode") == "NOERROR", reply
        return sorted(a[2] for a in reply["answers"] if a[1] == rdtype)

    def ip(self, pod: str) -> str:
        return self.mesh.pod(pod).ip


@pytest.fixture(scope="module", params=MODES)
def dns_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DnsMesh]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    redirect: str = request.param
    work = tmp_path_factory.mktemp(f"dns-{redirect}")
    resolv = write_resolv_conf(work / "resolv.conf", [RESOLVER_IP], timeout_s=1, attempts=2)
    options = MeshOptions(
        tag=mesh_tag("dns", redirect),
        redirect=redirect,
        services=SERVICES,
        workloads=(HOSTNAME_WORKLOAD,),
        env={"DNS_RESOLV_CONF": str(resolv), "LOG_FORMAT": "json", "RUST_LOG": "info,dns=debug"},
    )
    mesh = Mesh(options, work / "mesh")
    resolver = UpstreamResolver(
        mesh.plan,
        work / "resolver",
        {
            "www.example.test": ["192.0.2.200"],
            "big.example.test": BIG,
            "ext.example.test": [mesh.plan.pod("pod-1-1").ip],
        },
        udp_max=512,
    )
    try:
        mesh.up()
        resolver.up()
        yield DnsMesh(mesh, resolver)
    finally:
        resolver.down()
        mesh.down()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("app-0.default.svc.cluster.local.", ["10.96.0.10"]),
        ("app-0.", ["10.96.0.10"]),  # the pod's own namespace
        ("app-1.default.", ["10.96.0.11"]),
        ("shared.", ["10.96.0.120"]),  # the client's namespace wins
        ("shared.other.", ["10.96.0.121"]),
        ("shared.other.svc.cluster.local.", ["10.96.0.121"]),
        ("api.partner.example.", ["240.240.0.7"]),  # ServiceEntry, auto-allocated VIP
        ("anything.wild.example.", ["240.240.0.8"]),  # wildcard ServiceEntry
    ],
)
def test_mesh_names_resolve_from_the_mesh(
    dns_mesh: DnsMesh, name: str, expected: list[str]
) -> None:
    reply = dns_mesh.ask(name)
    assert reply["rcode"] == "NOERROR" and reply["aa"], reply
    assert sorted(a[2] for a in reply["answers"]) == expected
    assert {a[3] for a in reply["answers"]} == {30}  # ztunnel's TTL


def test_headless_service_answers_its_pods(dns_mesh: DnsMesh) -> None:
    want = sorted([dns_mesh.ip("pod-0-1"), dns_mesh.ip("pod-1-1")])
    assert dns_mesh.addresses("db.default.svc.cluster.local.") == want
    # no IPv6 anywhere: AAAA is an empty authoritative answer, not NXDOMAIN
    reply = dns_mesh.ask("db.default.svc.cluster.local.", "AAAA")
    assert reply["rcode"] == "NOERROR" and reply["answers"] == [] and reply["aa"]


def test_tcp_queries_are_served_too(dns_mesh: DnsMesh) -> None:
    assert dns_mesh.addresses("app-1.default.svc.cluster.local.", tcp=True) == ["10.96.0.11"]
    assert dns_mesh.addresses("www.example.test.", tcp=True) == ["192.0.2.200"]


def test_other_names_are_forwarded_from_inside_the_pod(dns_mesh: DnsMesh) -> None:
    reply = dns_mesh.ask("www.example.test.")
    assert reply["rcode"] == "NOERROR" and not reply["aa"]
    assert [a[2] for a in reply["answers"]] == ["192.0.2.200"]
    assert dns_mesh.ask("nope.example.test.")["rcode"] == "NXDOMAIN"
    # The upstream saw the query from the pod's own address: forwarded from the pod's netns.
    seen = [q for q in dns_mesh.resolver.queries() if "www.example.test" in q]
    assert seen and all(f"from {dns_mesh.ip(CLIENT)}" in q for q in seen), seen


def test_pod_queries_never_bypass_the_proxy(dns_mesh: DnsMesh) -> None:
    before = len(dns_mesh.resolver.queries())
    # Straight at the upstream resolver, which does not know mesh names (NXDOMAIN there):
    for tcp in (False, True):
        reply = dns_mesh.ask("app-0.default.svc.cluster.local.", server=RESOLVER_IP, tcp=tcp)
        assert reply["rcode"] == "NOERROR" and reply["aa"], reply
        assert [a[2] for a in reply["answers"]] == ["10.96.0.10"]
    assert not any("app-0" in q for q in dns_mesh.resolver.queries()[before:])


def test_udp_truncation_falls_back_to_tcp(dns_mesh: DnsMesh) -> None:
    # dnsmasq truncates UDP answers at 512 bytes: 60 records only come over TCP upstream,
    # yet the client gets them all in one UDP answer (it offered 4096 bytes).
    reply = dns_mesh.ask("big.example.test.", payload=4096)
    assert reply["rcode"] == "NOERROR" and not reply["tc"]
    assert sorted(a[2] for a in reply["answers"]) == sorted(BIG)
    # A client that offers 512 bytes is told to retry over TCP, and there gets it all.
    small = dns_mesh.ask("big.example.test.", no_edns=True)
    assert small["tc"] and small["answers"] == []
    assert len(dns_mesh.ask("big.example.test.", tcp=True, no_edns=True)["answers"]) == 60


def test_unreachable_upstream_is_servfail_and_mesh_names_still_resolve(dns_mesh: DnsMesh) -> None:
    daemon = dns_mesh.mesh.daemons["node-0"]
    failures_before = Scrape(daemon).total("istio_dns_upstream_failures_total")
    drop = ["ip", "netns", "exec", dns_mesh.resolver.netns, "iptables", "-I", "INPUT",
            "-p", "udp", "--dport", "53", "-j", "DROP"]  # fmt: skip
    subprocess.run(drop, check=True)
    try:
        # resolv.conf: timeout 1s, 2 attempts; the client itself would wait 8s
        reply = dns_mesh.ask("www.example.test.")
        assert reply.get("rcode") == "SERVFAIL", reply
        assert dns_mesh.addresses("app-0.") == ["10.96.0.10"]
        # a flood of unanswerable queries from another pod: dropped beyond the in-flight
        # bound; this pod's mesh names keep resolving
        assert dns_mesh.run("pod-0-1", "flood", KUBE_DNS, "flood.example.test", "3000")["sent"]
        assert dns_mesh.addresses("shared.other.") == ["10.96.0.121"]
    finally:
        subprocess.run([*drop[:5], "-D", *drop[6:]], check=True)
    assert dns_mesh.addresses("www.example.test.") == ["192.0.2.200"]
    assert Scrape(daemon).total("istio_dns_upstream_failures_total") > failures_before


def test_malformed_queries_are_refused_cleanly(dns_mesh: DnsMesh) -> None:
    header = "123401000001000000000000"
    formerr = dns_mesh.run(CLIENT, "raw", KUBE_DNS, header + "05616263")  # cut short
    assert formerr["reply"] is not None
    reply = dns.message.from_wire(bytes.fromhex(formerr["reply"]))
    assert reply.id == 0x1234 and reply.rcode() == 1  # FORMERR
    assert dns_mesh.run(CLIENT, "raw", KUBE_DNS, "00")["reply"] is None  # nothing to answer
    too_long = header + "3f" + "61" * 63 + "3f" + "61" * 63 + "3f" + "61" * 63 + "3f" + "61" * 63
    assert (
        dns_mesh.run(CLIENT, "raw", KUBE_DNS, too_long + "3f" + "61" * 63 + "0000010001")["reply"]
        is not None
    )  # a name over 255 octets: FORMERR
    assert dns_mesh.addresses("app-0.") == ["10.96.0.10"]


def test_metrics_and_access_log(dns_mesh: DnsMesh) -> None:
    daemon = dns_mesh.mesh.daemons["node-0"]
    mark = log_mark(daemon)
    dns_mesh.addresses("app-0.")
    dns_mesh.addresses("www.example.test.")
    scrape = Scrape(daemon)
    labels = {
        "request_query_type": "a",
        "request_protocol": "udp",
        "source_canonical_service": "app-0",
        "source_canonical_revision": "latest",
    }
    assert scrape.exact("istio_dns_requests_total", labels) >= 2
    assert scrape.exact("istio_dns_upstream_requests_total", labels) >= 1
    assert scrape.total("istio_dns_upstream_request_duration_seconds_count", **labels) >= 1
    records = [r for r in log_records(daemon, mark) if r.get("scope") == "dns"]
    by_domain = {r.get("domain"): r for r in records}
    assert by_domain["app-0."]["result"] == "success"
    assert by_domain["app-0."]["src.workload"] == CLIENT
    assert by_domain["app-0."]["src.namespace"] == "default"
    assert by_domain["app-0."]["query"] == "A" and by_domain["app-0."]["endpoints"] == 1
    assert by_domain["www.example.test."]["result"] == "forwarded"


def test_istio_cni_dns_rules_and_bpf_capture_together(dns_mesh: DnsMesh) -> None:
    """istio-cni installs its DNS rules whatever the redirect mode: with them in the pod too,
    every query still reaches the proxy exactly once (eBPF mode: kernel capture first)."""
    pod = "pod-0-1"
    netns = dns_mesh.mesh.pod(pod).netns_path
    ebpf = dns_mesh.mesh.options.redirect == "ebpf"
    iptables.install(netns)  # already there in iptables mode: install is idempotent
    try:
        assert iptables.is_installed(netns)
        for tcp in (False, True):
            assert dns_mesh.addresses("shared.other.", pod=pod, tcp=tcp) == ["10.96.0.121"]
            assert dns_mesh.addresses("www.example.test.", pod=pod, tcp=tcp) == ["192.0.2.200"]
            via_upstream = dns_mesh.ask("app-0.", pod=pod, server=RESOLVER_IP, tcp=tcp)
            assert via_upstream["aa"] and via_upstream["answers"][0][2] == "10.96.0.10"
    finally:
        if ebpf:
            iptables.remove(netns)


def test_hostname_service_entry_is_resolved_on_demand(dns_mesh: DnsMesh) -> None:
    """ServiceEntry ``resolution: DNS``: the VIP's endpoint is a hostname, looked up when the
    connection is made (ztunnel's on-demand DNS), here to pod-1-1's app server."""
    reply = dns_mesh.mesh.client(CLIENT, "http", "240.240.0.9", 80)
    assert reply.get("result") == "ok", reply
    assert reply["body"].strip() == "pod-1-1"
    scrape = Scrape(dns_mesh.mesh.daemons["node-0"])
    assert scrape.total("istio_on_demand_dns_total", hostname="ext.example.test") >= 1
    assert scrape.total("istio_on_demand_dns_total", source_canonical_service="app-0") >= 1
