"""What the DNS proxy answers from the mesh state, and what it leaves to the upstream resolver."""
# ruff: noqa: E501  (the case table reads best one case a line)

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

import pytest

from ztunnel_py.dns.resolver import (
    RESULT_NO_RECORDS,
    RESULT_SUCCESS,
    RESULT_WRONG_FAMILY,
    MeshResolver,
    RecordType,
)
from ztunnel_py.state.model import (
    IpFamily,
    NetworkAddress,
    Service,
    Visibility,
    Workload,
    frozen_map,
)
from ztunnel_py.state.store import ProxyState, UpdateBatch

A, AAAA, CNAME = RecordType.A, RecordType.AAAA, RecordType.CNAME


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def svc(
    name: str,
    ns: str,
    *vips: str,
    hostname: str | None = None,
    network: str = "",
    **kw: object,
) -> Service:
    return Service(
        name=name,
        namespace=ns,
        hostname=hostname or f"{name}.{ns}.svc.cluster.local",
        vips=tuple(NetworkAddress(network, ip(v)) for v in vips),
        ports=frozen_map({80: 8080}),
        **kw,  # type: ignore[arg-type]
    )


def wl(uid: str, ns: str, *ips: str, services: tuple[str, ...] = (), **kw: object) -> Workload:
    return Workload(
        uid=uid,
        name=uid,
        namespace=ns,
        workload_ips=tuple(ip(i) for i in ips),
        services=frozen_map({s: frozen_map({80: 8080}) for s in services}),
        **kw,  # type: ignore[arg-type]
    )


def mesh() -> ProxyState:
    state = ProxyState()
    state.apply(
        UpdateBatch(
            services=(
                svc("productpage", "ns1", "9.9.9.9"),
                svc("example", "ns2", "10.10.10.10"),
                # the same name in two namespaces: the client's namespace decides
                svc("shared", "ns1", "10.0.1.1"),
                svc("shared", "ns2", "10.0.2.2"),
                svc("dual", "ns1", "2.2.2.2", "2001:db8::2"),
                svc("v4only", "ns1", "4.4.4.4", "2001:db8::4", ip_families=IpFamily.IPV4),
                svc("v6only", "ns1", "2001:db8::6", ip_families=IpFamily.IPV6),
                svc("nslocal", "ns2", "10.10.10.240", visibility=Visibility.NAMESPACE),
                svc("nslocalsame", "ns1", "10.10.10.241", visibility=Visibility.NAMESPACE),
                svc("both-networks", "ns1", "21.21.21.21", network=""),
                svc("nw2-only", "ns1", "22.22.22.22", network="nw2"),
                # ServiceEntries: a plain host, an auto-allocated VIP, wildcards
                svc("google", "ns1", "1.1.1.1", hostname="www.google.com"),
                svc("auto", "ns3", "240.240.0.7", hostname="api.partner.example"),
                svc("wild", "ns1", "10.10.10.10", hostname="*.wildcard"),
                svc("wild-ab", "ns1", "11.11.11.11", hostname="*.b.wildcard"),
                svc("mesh-domain", "ns1", "10.1.2.3", hostname="*.svc.mesh.company.net"),
                # a DNS-resolved ServiceEntry without addresses: not ours to answer
                svc("external", "ns1", hostname="headless.example.com"),
                # headless Kubernetes services: their workloads' addresses
                svc("headless", "ns1"),
                svc("headless-ipv6", "ns1"),
                # canonical wins over first when the client's namespace has none
                svc("canon", "ns5", "10.5.5.1", hostname="canon.io"),
                svc("canon", "ns6", "10.6.6.1", hostname="canon.io", canonical=True),
            ),
            workloads=(
                wl("pod0", "ns1", "30.30.30.30", "2001:db8::30", services=("ns1/headless.ns1.svc.cluster.local",)),
                wl("pod1", "ns1", "31.31.31.31", "2001:db8::31", services=("ns1/headless.ns1.svc.cluster.local",)),
                wl("pod6", "ns1", "2001:db8::33", services=("ns1/headless-ipv6.ns1.svc.cluster.local",)),
                wl("ext", "ns1", services=("ns1/headless.example.com",)),
            ),
        )
    )  # fmt: skip
    return state


def asked(host: str) -> tuple[str, ...]:
    """The labels of a query name, in the client's spelling."""
    return tuple(host.rstrip(".").split("."))


CLIENT = wl("client", "ns1", "10.244.0.10")


@dataclass(frozen=True)
class Case:
    id: str
    host: str
    qtype: int = A
    client: Workload = CLIENT
    # (owner, type, value); None means "not ours: forward"
    records: list[tuple[str, int, str]] | None = field(default_factory=list)
    result: str = RESULT_SUCCESS


CASES = [
    Case("fqdn", "productpage.ns1.svc.cluster.local.", records=[("productpage.ns1.svc.cluster.local", A, "9.9.9.9")]),
    Case("name.namespace", "productpage.ns1.", records=[("productpage.ns1", A, "9.9.9.9")]),
    Case("short name in the client's namespace", "productpage.", records=[("productpage", A, "9.9.9.9")]),
    Case("short name of another namespace is forwarded", "example.", records=None),
    Case("name.namespace of another namespace", "example.ns2.", records=[("example.ns2", A, "10.10.10.10")]),
    Case("name.namespace.svc", "example.ns2.svc.", records=[("example.ns2.svc", A, "10.10.10.10")]),
    Case(
        "search domain appended to name.namespace: CNAME to the stripped name",
        "productpage.ns1.ns1.svc.cluster.local.",
        records=[
            ("productpage.ns1.ns1.svc.cluster.local", CNAME, "productpage.ns1"),
            ("productpage.ns1", A, "9.9.9.9"),
        ],
    ),
    Case(
        "search domain appended to a ServiceEntry host",
        "www.google.com.ns1.svc.cluster.local.",
        records=[
            ("www.google.com.ns1.svc.cluster.local", CNAME, "www.google.com"),
            ("www.google.com", A, "1.1.1.1"),
        ],
    ),
    Case("ServiceEntry host", "www.google.com.", records=[("www.google.com", A, "1.1.1.1")]),
    Case("auto-allocated ServiceEntry VIP", "api.partner.example.", records=[("api.partner.example", A, "240.240.0.7")]),
    Case("mixed case is one name", "WWW.Google.COM.", records=[("WWW.Google.COM", A, "1.1.1.1")]),
    Case("client namespace picks among same-named services", "shared.", records=[("shared", A, "10.0.1.1")]),
    Case(
        "the other namespace's one by name.namespace",
        "shared.ns2.",
        records=[("shared.ns2", A, "10.0.2.2")],
    ),
    Case(
        "from ns2 the short name is ns2's",
        "shared.",
        client=wl("c2", "ns2", "10.244.0.11"),
        records=[("shared", A, "10.0.2.2")],
    ),
    Case("canonical wins outside the owning namespaces", "canon.io.", records=[("canon.io", A, "10.6.6.1")]),
    Case("A gives only IPv4", "dual.ns1.", records=[("dual.ns1", A, "2.2.2.2")]),
    Case("AAAA gives only IPv6", "dual.ns1.", AAAA, records=[("dual.ns1", AAAA, "2001:db8::2")]),
    Case("ip_families IPv4 refuses AAAA", "v4only.ns1.", AAAA, records=[], result=RESULT_WRONG_FAMILY),
    Case("ip_families IPv4 answers A", "v4only.ns1.", records=[("v4only.ns1", A, "4.4.4.4")]),
    Case("ip_families IPv6 refuses A", "v6only.ns1.", records=[], result=RESULT_WRONG_FAMILY),
    Case("no IPv6 VIP: empty AAAA", "productpage.ns1.", AAAA, records=[], result=RESULT_NO_RECORDS),
    Case("namespace visibility hides from other namespaces", "nslocal.ns2.svc.cluster.local.", records=None),
    Case(
        "namespace visibility shows in its own namespace",
        "nslocalsame.ns1.svc.cluster.local.",
        records=[("nslocalsame.ns1.svc.cluster.local", A, "10.10.10.241")],
    ),
    Case("VIP on another network only: no records", "nw2-only.ns1.", records=[], result=RESULT_NO_RECORDS),
    Case("wildcard", "foo.wildcard.", records=[("foo.wildcard", A, "10.10.10.10")]),
    Case("most specific wildcard", "a.b.wildcard.", records=[("a.b.wildcard", A, "11.11.11.11")]),
    Case("wildcard under a domain", "foo.foons.svc.mesh.company.net.", records=[("foo.foons.svc.mesh.company.net", A, "10.1.2.3")]),
    Case(
        "wildcard via a search domain: no CNAME",
        "foo.svc.mesh.company.net.ns1.svc.cluster.local.",
        records=[("foo.svc.mesh.company.net.ns1.svc.cluster.local", A, "10.1.2.3")],
    ),
    Case(
        "headless: every endpoint's address",
        "headless.ns1.svc.cluster.local.",
        records=[
            ("headless.ns1.svc.cluster.local", A, "30.30.30.30"),
            ("headless.ns1.svc.cluster.local", A, "31.31.31.31"),
        ],
    ),
    Case(
        "headless AAAA",
        "headless.ns1.",
        AAAA,
        records=[("headless.ns1", AAAA, "2001:db8::30"), ("headless.ns1", AAAA, "2001:db8::31")],
    ),
    Case("headless IPv6-only endpoints: empty A", "headless-ipv6.ns1.", records=[], result=RESULT_NO_RECORDS),
    Case("pod names under a headless service are forwarded", "pod0.headless.ns1.svc.cluster.local.", records=None),
    Case("ServiceEntry without addresses is forwarded", "headless.example.com.", records=None),
    Case("unknown name is forwarded", "www.bing.com.", records=None),
    Case("other record types are forwarded", "productpage.ns1.", 15, records=None),
    Case("a cluster domain of its own is not ours", "productpage.ns1.svc.cluster.remote.", records=None),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_answers(case: Case) -> None:
    resolver = MeshResolver(mesh(), rng=random.Random(1))
    answer = resolver.resolve(case.client, asked(case.host), case.qtype)
    if case.records is None:
        assert answer is None
        return
    assert answer is not None
    got = sorted((".".join(r.name), r.rdtype, r.value) for r in answer.records)
    assert got == sorted(case.records)
    assert answer.result == case.result


def test_cname_comes_first() -> None:
    resolver = MeshResolver(mesh())
    answer = resolver.resolve(CLIENT, ("productpage", "ns1", "ns1", "svc", "cluster", "local"), A)
    assert answer is not None
    assert [r.rdtype for r in answer.records] == [CNAME, A]


def test_ipv6_disabled_refuses_aaaa() -> None:
    resolver = MeshResolver(mesh(), ipv6_enabled=False)
    answer = resolver.resolve(CLIENT, ("dual", "ns1"), AAAA)
    assert answer is not None and answer.records == () and answer.result == RESULT_WRONG_FAMILY
    headless = resolver.resolve(CLIENT, ("headless", "ns1"), A)
    assert headless is not None and headless.addresses == 2


def test_dedicated_mode_uses_the_static_search_path() -> None:
    # In dedicated mode the node's resolv.conf search path is what a client appended.
    resolver = MeshResolver(mesh(), static_search_domains=["corp.example"])
    answer = resolver.resolve(CLIENT, ("www", "google", "com", "corp", "example"), A)
    assert answer is not None
    assert [(".".join(r.name), r.rdtype) for r in answer.records] == [
        ("www.google.com.corp.example", CNAME),
        ("www.google.com", A),
    ]
    # ... and the pod search path of shared mode no longer applies
    assert (
        resolver.resolve(CLIENT, ("www", "google", "com", "ns1", "svc", "cluster", "local"), A)
        is None
    )


def test_other_cluster_domain() -> None:
    resolver = MeshResolver(mesh(), cluster_domain="corp.internal")
    assert resolver.resolve(CLIENT, ("productpage", "ns1"), A) is None
    state = mesh()
    state.apply(
        UpdateBatch(services=(svc("x", "ns1", "10.9.9.9", hostname="x.ns1.svc.corp.internal"),))
    )
    resolver = MeshResolver(state, cluster_domain="corp.internal")
    answer = resolver.resolve(CLIENT, ("x",), A)
    assert answer is not None and [r.value for r in answer.records] == ["10.9.9.9"]


def test_answers_follow_state_changes() -> None:
    state = mesh()
    resolver = MeshResolver(state)
    assert resolver.resolve(CLIENT, ("late", "ns1"), A) is None
    state.apply(UpdateBatch(services=(svc("late", "ns1", "10.7.7.7"),)))
    answer = resolver.resolve(CLIENT, ("late", "ns1"), A)
    assert answer is not None and answer.records[0].value == "10.7.7.7"
    state.apply(UpdateBatch(removed_addresses=("ns1/late.ns1.svc.cluster.local",)))
    assert resolver.resolve(CLIENT, ("late", "ns1"), A) is None
