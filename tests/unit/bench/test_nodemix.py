"""tools/bench/nodemix.py: the plan's shares, merging paced runs, the report and Envoy's config."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from tools.bench.loads import Paced
from tools.bench.nodemix import (
    MIX,
    Flow,
    NodeMixResult,
    envoy_client_config,
    median_result,
    merge,
    plan_flows,
    render,
)
from ztunnel_py.testing.envoy import CertFiles


def test_each_client_splits_connections_and_requests_half_quarter_quarter() -> None:
    flows = plan_flows(nodes=2, conns_per_client=8, rate_per_client=400)
    for client in ("pod-0-0", "pod-1-0"):
        mine = [f for f in flows if f.client == client]
        conns = Counter[str]()
        rate: dict[str, float] = {}
        for f in mine:
            conns[f.kind] += f.conns
            rate[f.kind] = rate.get(f.kind, 0.0) + f.rate
        assert sum(conns.values()) == 8
        assert sum(rate.values()) == pytest.approx(400)
        for kind, share in MIX.items():
            assert Fraction(conns[kind], 8) == share
            assert rate[kind] == pytest.approx(400 * float(share))


def test_destinations_are_on_the_nodes_their_class_says() -> None:
    for f in plan_flows(nodes=3, conns_per_client=4, rate_per_client=100):
        client_node = int(f.client.split("-")[1])
        dest_node, dest_index = (int(x) for x in f.dest.split("-")[1:])
        if f.kind == "same-node":
            assert (dest_node, dest_index) == (client_node, 1)
        elif f.kind == "cross-node":
            assert dest_node != client_node and dest_index == 1
        else:
            assert dest_index == 2  # the pods outside the mesh


def test_outside_traffic_goes_to_both_nodes() -> None:
    outside = [f for f in plan_flows(conns_per_client=8) if f.kind == "outside"]
    assert {f.dest for f in outside if f.client == "pod-0-0"} == {"pod-0-2", "pod-1-2"}


@pytest.mark.parametrize(("nodes", "conns", "rate"), [(1, 8, 100), (2, 6, 100), (2, 8, 0)])
def test_plans_that_cannot_hold_the_mix_are_refused(nodes: int, conns: int, rate: float) -> None:
    with pytest.raises(ValueError, match=r"nodes|conns_per_client|rate_per_client"):
        plan_flows(nodes=nodes, conns_per_client=conns, rate_per_client=rate)


def paced(count: int, p50: float, p99: float) -> Paced:
    return Paced(count, p50, p50 * 1.5, p99, p99 * 2)


def test_merge_sums_requests_and_weights_percentiles_by_requests() -> None:
    runs = [
        (Flow("pod-0-0", "pod-0-2", "outside", 2, 100), paced(100, 100, 300)),
        (Flow("pod-0-0", "pod-1-2", "outside", 2, 100), paced(300, 200, 400)),
        (Flow("pod-0-0", "pod-0-1", "same-node", 2, 100), paced(100, 500, 900)),
    ]
    r = merge("nodemix-ebpf", 2.0, 0.5, 2, runs)
    assert r.requests == {"outside": 400, "same-node": 100}
    assert r.latency["outside"].p50 == 200  # the 300-request flow outweighs the other
    assert r.latency["outside"].max == 800
    assert r.total_requests == 500
    assert r.vcpu == pytest.approx(0.25)
    assert r.vcpu_per_1000rps == pytest.approx(0.25 / 250 * 1000)
    assert r.cpu_us_per_request == pytest.approx(1000)


def result(setup: str, cpu_s: float) -> NodeMixResult:
    return NodeMixResult(
        setup, 10.0, cpu_s, 2, {"outside": paced(5000, 100, 200)}, {"outside": 5000}
    )


def test_median_over_rounds() -> None:
    m = median_result([result("nodemix-ebpf", c) for c in (1.0, 3.0, 2.0)])
    assert m.cpu_s == 2.0 and m.requests == {"outside": 5000}


def test_report_gives_the_ratios_issue_16_sets_targets_on() -> None:
    results = {
        "nodemix-envoy": result("nodemix-envoy", 4.0),
        "nodemix-iptables": result("nodemix-iptables", 2.0),
        "nodemix-ebpf": result("nodemix-ebpf", 1.5),
    }
    text = "\n".join(render(results, rounds=3))
    assert "| proxy CPU, ztunnel-py eBPF / Envoy sidecars | 0.38x | < 0.50x | yes |" in text
    assert "ztunnel-py, iptables (captures everything) | 0.75x | < 1.00x | yes |" in text
    assert "medians of 3 rounds" in text
    results["nodemix-ebpf"] = result("nodemix-ebpf", 2.5)
    text = "\n".join(render(results, rounds=1))
    assert "| 0.62x | < 0.50x | **no** |" in text


def test_envoy_client_tunnels_mesh_destinations_and_passes_the_rest_through() -> None:
    certs = CertFiles(Path("c.pem"), Path("k.pem"), Path("r.pem"))
    config = envoy_client_config(
        mesh_servers={"10.244.0.3": "spiffe://a", "10.244.1.3": "spiffe://b"},
        hbone_port=15008,
        outbound_port=15001,
        certs=certs,
        admin_port=15900,
        mark=0x539,
    )
    (listener,) = config["static_resources"]["listeners"]
    matched = [c["filter_chain_match"]["prefix_ranges"][0] for c in listener["filter_chains"]]
    assert [m["address_prefix"] for m in matched] == ["10.244.0.3", "10.244.1.3"]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert clusters["passthrough"]["type"] == "ORIGINAL_DST"
    (mark,) = clusters["passthrough"]["upstream_bind_config"]["socket_options"]
    assert (mark["level"], mark["name"], mark["int_value"]) == (1, 36, 0x539)
    default = listener["default_filter_chain"]["filters"][0]["typed_config"]
    assert default["cluster"] == "passthrough" and "tunneling_config" not in default
    for chain in listener["filter_chains"]:
        proxy = chain["filters"][0]["typed_config"]
        assert proxy["cluster"].startswith("hbone") and "tunneling_config" in proxy
