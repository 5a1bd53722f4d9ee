"""Original-destination lookup, the config dump and the metrics, over fake maps (no root)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf.dump import dump_maps
from ztunnel_py.bpf.errors import OriginalDestinationNotFound
from ztunnel_py.bpf.metrics import BpfMetrics
from ztunnel_py.bpf.origdst import lookup_original_destination, orig_key, wire_family
from ztunnel_py.bpf.projection import addr16, be16, deny_key, dst_key, fill, pod_key
from ztunnel_py.testing.bpf import FakeMapOps, fake_maps

ip = ipaddress.ip_address


def orig_value(addr: str, port: int, family: int) -> bytes:
    value = t.ZtOrig(port=be16(port), family=family, kind=t.ZT_DST_SERVICE)
    fill(value.addr, addr16(ip(addr)))
    return bytes(value)


def test_origdst_lookup_by_cookie_port_and_family() -> None:
    orig = FakeMapOps(t.MAP_ORIG_DST)
    orig.update(orig_key(5, 40000, socket.AF_INET), orig_value("10.96.0.10", 80, socket.AF_INET))
    orig.update(orig_key(5, 40000, socket.AF_INET6), orig_value("fd00::10", 443, socket.AF_INET6))

    assert lookup_original_destination(
        orig, netns_cookie=5, peer_port=40000, family=socket.AF_INET
    ) == (ip("10.96.0.10"), 80)
    assert lookup_original_destination(
        orig, netns_cookie=5, peer_port=40000, family=socket.AF_INET6
    ) == (ip("fd00::10"), 443)
    with pytest.raises(OriginalDestinationNotFound) as info:
        lookup_original_destination(orig, netns_cookie=6, peer_port=40000, family=socket.AF_INET)
    assert isinstance(info.value, OSError)  # the proxy resets such connections


@pytest.mark.parametrize(
    ("peer", "family"),
    [("127.0.0.1", socket.AF_INET), ("::ffff:127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)],
)
def test_origdst_wire_family_treats_ipv4_mapped_as_ipv4(peer: str, family: int) -> None:
    assert wire_family(peer) == family


def test_dump_is_readable() -> None:
    maps = fake_maps()
    maps[t.MAP_DST].update(dst_key(ip("10.96.0.10"), 80), bytes(t.ZtDst(kind=t.ZT_DST_SERVICE)))
    maps[t.MAP_DST].update(dst_key(ip("fd00::5"), 0), bytes(t.ZtDst(kind=t.ZT_DST_WORKLOAD)))
    maps[t.MAP_PODS].update(pod_key(3), bytes(t.ZtPod(flags=3)))
    rule = deny_key(3, ipaddress.ip_network("10.1.0.0/16"), None)
    assert rule is not None
    maps[t.MAP_DENY].update(rule, bytes(t.ZtDeny(action=1)))

    dump = dump_maps(maps)
    assert dump[t.MAP_DST] == [
        {"address": "10.96.0.10", "port": 80, "kind": "service"},
        {"address": "fd00::5", "port": "*", "kind": "workload"},
    ]
    assert dump[t.MAP_PODS] == [{"netnsCookie": 3, "capture": ["outbound", "inbound"]}]
    assert dump[t.MAP_DENY] == [{"netnsCookie": 3, "source": "10.1.0.0/16", "port": "*"}]
    assert dump[t.MAP_LOCAL] == []


def test_metrics_expose_program_counters() -> None:
    registry = CollectorRegistry()
    counters = {"out_redirected": 4, "in_dropped_deny": 1}
    BpfMetrics(registry, lambda: counters)
    text = generate_latest(registry).decode()
    assert 'ztunnel_bpf_events_total{event="out_redirected"} 4.0' in text
    assert 'ztunnel_bpf_events_total{event="in_dropped_deny"} 1.0' in text
