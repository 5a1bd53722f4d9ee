"""XdsClient against FakeIstiod over TLS: sync, pushes, NACKs, reconnects, auth, on demand."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from ztunnel_py.config import from_env
from ztunnel_py.protos import workload_pb2 as wl
from ztunnel_py.state.model import NetworkAddress, Workload
from ztunnel_py.state.store import ChangeSet, ProxyState, UpdateBatch
from ztunnel_py.testing.istiod import FakeIstiod
from ztunnel_py.testing.pki import CertificateAuthority
from ztunnel_py.testing.poll import wait_until_async
from ztunnel_py.xds.client import XdsClient, XdsMetrics
from ztunnel_py.xds.handlers import ADDRESS_TYPE, AUTHORIZATION_TYPE

ROOT = Path(__file__).resolve().parents[3]
LOCALHOST_YAML = (ROOT / "examples/localhost.yaml").read_text()
GUARD_S = 20.0  # a hang guard, not a performance expectation


@dataclass
class Harness:
    istiod: FakeIstiod
    tmp: Path
    state: ProxyState = field(default_factory=ProxyState)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    ready_calls: int = 0
    applied: list[UpdateBatch] = field(default_factory=list)
    client: XdsClient | None = None
    task: asyncio.Task[None] | None = None

    def env(self, **extra: str) -> dict[str, str]:
        root = self.tmp / "root-cert.pem"
        root.write_bytes(self.istiod.root_pem)
        return {
            "MESH_CONFIG_PATH": str(self.tmp / "no-mesh-config"),
            "XDS_ADDRESS": self.istiod.address,
            "XDS_ROOT_CA": str(root),
            "AUTH_TOKEN": str(self.tmp / "no-token"),
            "POD_NAME": "ztunnel-1",
            "POD_NAMESPACE": "istio-system",
            "NODE_NAME": "node-1",
            "INSTANCE_IP": "10.9.0.1",
            **extra,
        }

    def _apply(self, batch: UpdateBatch) -> ChangeSet:
        self.applied.append(batch)
        return self.state.apply(batch)

    def _on_ready(self) -> None:
        self.ready_calls += 1

    def start(self, **env: str) -> XdsClient:
        config = from_env(self.env(**env))
        self.client = XdsClient(
            config, self._apply, XdsMetrics(self.registry), on_ready=self._on_ready
        )
        self.task = asyncio.create_task(self.client.run())
        return self.client

    async def ready(self) -> XdsClient:
        await wait_until_async(lambda: self.ready_calls == 1, "client readiness")
        assert self.client is not None
        return self.client

    def terminations(self, reason: str) -> float:
        value = self.registry.get_sample_value(
            "istio_xds_connection_terminations_total", {"reason": reason}
        )
        return value or 0.0

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@pytest_asyncio.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    istiod = FakeIstiod(config_yaml=LOCALHOST_YAML)
    await istiod.start()
    h = Harness(istiod=istiod, tmp=tmp_path)
    try:
        yield h
    finally:
        await h.close()
        await istiod.stop()


LOCAL_UID = "cluster1//v1/Pod/default/local"
TCP_UID = "cluster1//v1/Pod/default/local-tcp"


def new_workload(i: int, ip: str | None = None) -> Workload:
    return Workload(
        uid=f"cluster1//v1/Pod/default/extra-{i}",
        name=f"extra-{i}",
        namespace="default",
        workload_ips=(ipaddress.ip_address(ip or f"127.0.1.{i}"),),
        services={"default/example.com": {80: 8080}},
    )


def node_of(harness: Harness, uid: str) -> str | None:
    w = harness.state.workload(uid)
    return None if w is None else w.node


@pytest.mark.asyncio
async def test_initial_sync_acks_and_headers(harness: Harness) -> None:
    token = harness.tmp / "istio-token"
    token.write_text("jwt-1\n")
    harness.istiod.token = "jwt-1"
    harness.start(AUTH_TOKEN=str(token), CLUSTER_ID="cluster9", XDS_HEADER_X_TEAM="mesh")
    await harness.ready()
    state = harness.state
    assert {w.uid for w in state.workloads()} == {LOCAL_UID, TCP_UID}
    assert {s.key for s in state.services()} == {"default/example.com", "default/example2.com"}
    assert [p.key for p in state.policies()] == ["default/deny-9999"]
    assert set(state.endpoints("default/example.com")) == {LOCAL_UID, TCP_UID}

    reqs = await harness.istiod.wait_for(lambda r: r.is_ack, count=2)
    initial = [r for r in harness.istiod.requests if r.is_initial]
    assert [r.type_url for r in initial] == [ADDRESS_TYPE, AUTHORIZATION_TYPE]
    assert (
        initial[0].node_id
        == "ztunnel~10.9.0.1~ztunnel-1.istio-system~istio-system.svc.cluster.local"
    )
    assert initial[0].headers["authorization"] == "Bearer jwt-1"
    assert initial[0].headers["clusterid"] == "cluster9"
    assert initial[0].headers["x_team"] == "mesh"
    sent_nonces = {(r.type_url, r.nonce) for r in harness.istiod.responses}
    assert {(r.type_url, r.nonce) for r in reqs} == sent_nonces
    assert harness.registry.get_sample_value("istio_xds_message_total", {"url": ADDRESS_TYPE}) == 1
    assert harness.registry.get_sample_value("istio_xds_message_bytes_total", {"url": ADDRESS_TYPE})


@pytest.mark.asyncio
async def test_incremental_add_change_and_remove(harness: Harness) -> None:
    harness.start()
    await harness.ready()
    state = harness.state
    harness.istiod.push(UpdateBatch(workloads=(new_workload(1),)))
    await wait_until_async(
        lambda: state.workload("cluster1//v1/Pod/default/extra-1"), "the added workload"
    )
    assert "cluster1//v1/Pod/default/extra-1" in state.endpoints("default/example.com")

    harness.istiod.push(UpdateBatch(workloads=(new_workload(1, ip="127.0.2.1"),)))
    moved = NetworkAddress("", ipaddress.ip_address("127.0.2.1"))
    await wait_until_async(lambda: state.workload_by_address(moved), "the changed workload")
    assert state.workload_by_address(NetworkAddress("", ipaddress.ip_address("127.0.1.1"))) is None

    harness.istiod.push(
        UpdateBatch(
            removed_addresses=("cluster1//v1/Pod/default/extra-1",),
            removed_policies=("default/deny-9999",),
        )
    )
    await wait_until_async(
        lambda: state.workload("cluster1//v1/Pod/default/extra-1") is None, "the removal"
    )
    await wait_until_async(lambda: state.policy("default/deny-9999") is None, "the policy removal")
    assert "cluster1//v1/Pod/default/extra-1" not in state.endpoints("default/example.com")
    client = harness.client
    assert client is not None
    assert "cluster1//v1/Pod/default/extra-1" not in client.session.versions(ADDRESS_TYPE)
    await harness.istiod.wait_for(lambda r: r.is_ack, count=5)
    assert not [r for r in harness.istiod.requests if r.is_nack]


@pytest.mark.asyncio
async def test_malformed_address_among_good_ones_is_nacked_alone(harness: Harness) -> None:
    harness.start()
    client = await harness.ready()
    bad = wl.Address(
        workload=wl.Workload(
            uid="cluster1//v1/Pod/default/bad",
            name="bad",
            namespace="default",
            addresses=[b"\x7f\x00\x01"],
        )
    )
    harness.istiod.push(
        UpdateBatch(workloads=(new_workload(1), new_workload(2))),
        raw=[(ADDRESS_TYPE, "cluster1//v1/Pod/default/bad", bad)],
    )
    (nack,) = await harness.istiod.wait_for(lambda r: r.is_nack)
    assert nack.error == (
        "cluster1//v1/Pod/default/bad: addresses[0] is 3 bytes, but an IP address is 4 or 16 bytes"
    )
    pushed = [r for r in harness.istiod.responses if "cluster1//v1/Pod/default/bad" in r.names]
    assert nack.nonce == pushed[0].nonce
    assert len(pushed[0].names) == 3  # the bad one travelled with the good ones
    assert harness.state.workload("cluster1//v1/Pod/default/extra-1") is not None
    assert harness.state.workload("cluster1//v1/Pod/default/extra-2") is not None
    assert harness.state.workload("cluster1//v1/Pod/default/bad") is None
    dump = client.dump()
    assert (
        dump["types"][ADDRESS_TYPE]["lastNack"]["rejected"][0]["name"]
        == "cluster1//v1/Pod/default/bad"
    )

    # The rejected resource is not echoed as held, so istiod re-sends it after a reconnect.
    harness.istiod.rotate()
    (second,) = await harness.istiod.wait_for(
        lambda r: r.is_initial and r.stream == 2 and r.type_url == ADDRESS_TYPE
    )
    assert "cluster1//v1/Pod/default/bad" not in second.initial_versions
    assert "cluster1//v1/Pod/default/extra-1" in second.initial_versions


@pytest.mark.asyncio
async def test_reconnect_echoes_versions_and_receives_only_changes(harness: Harness) -> None:
    harness.start()
    await harness.ready()
    istiod = harness.istiod
    before = {n: istiod.version(ADDRESS_TYPE, n) for n in istiod.resource_names(ADDRESS_TYPE)}

    await istiod.stop()
    # While the client is away: one workload changes, one service goes, one workload appears.
    current = harness.state.workload(TCP_UID)
    assert current is not None
    changed = dataclasses.replace(current, node="node-7")
    istiod.push(
        UpdateBatch(
            workloads=(changed, new_workload(3)), removed_addresses=("default/example2.com",)
        )
    )
    await istiod.start()

    (again,) = await istiod.wait_for(
        lambda r: r.is_initial and r.stream == 2 and r.type_url == ADDRESS_TYPE
    )
    assert again.initial_versions == before
    await wait_until_async(lambda: node_of(harness, TCP_UID) == "node-7", "the changed workload")
    await wait_until_async(
        lambda: harness.state.service("default/example2.com") is None, "the removed service"
    )
    (resp,) = [r for r in istiod.responses if r.stream == 2 and r.type_url == ADDRESS_TYPE]
    assert set(resp.names) == {TCP_UID, "cluster1//v1/Pod/default/extra-3"}
    assert resp.removed == ("default/example2.com",)
    # The untouched workload was never re-applied.
    assert harness.state.workload(LOCAL_UID) is not None
    reapplied = {w.uid for b in harness.applied[2:] for w in b.workloads}
    assert LOCAL_UID not in reapplied
    assert harness.ready_calls == 1


@pytest.mark.asyncio
async def test_backs_off_while_istiod_is_down_and_keeps_state(harness: Harness) -> None:
    harness.start()
    client = await harness.ready()
    await harness.istiod.stop()
    await wait_until_async(
        lambda: harness.terminations("ConnectionError") >= 3, "three failed connects"
    )
    assert "cannot connect" in client.dump()["lastError"]
    assert not client.connected
    assert {w.uid for w in harness.state.workloads()} == {LOCAL_UID, TCP_UID}
    assert client.ready
    await harness.istiod.start()
    await harness.istiod.wait_for_streams(2)
    await wait_until_async(lambda: client.connected, "reconnection")
    assert harness.task is not None
    assert not harness.task.done()


@pytest.mark.asyncio
async def test_wrong_token_logs_what_to_check_and_recovers(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="ztunnel_py.xds")
    token = harness.tmp / "istio-token"
    token.write_text("stale-token")
    harness.istiod.token = "fresh-token"
    client = harness.start(AUTH_TOKEN=str(token))

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records]

    await wait_until_async(
        lambda: any("PERMISSION_DENIED: authorization failed" in m for m in messages()),
        "istiod's refusal in the log",
    )
    refusals = harness.terminations("Error")
    hints = [m for m in messages() if f"Check that AUTH_TOKEN ({token})" in m]
    assert len(hints) >= refusals >= 1  # every refused attempt says what to check
    assert any(
        "refused our credentials (PERMISSION_DENIED: authorization failed)" in m for m in hints
    )
    assert harness.task is not None
    assert not harness.task.done()
    assert not client.ready

    token.write_text("fresh-token")  # the projected token was rotated: re-read on the next call
    await harness.ready()
    assert {w.uid for w in harness.state.workloads()} == {LOCAL_UID, TCP_UID}


@pytest.mark.asyncio
async def test_untrusted_server_certificate_is_a_connection_error(harness: Harness) -> None:
    other_root = harness.tmp / "other-root.pem"
    other_root.write_bytes(CertificateAuthority.create(common_name="someone else").root_pem)
    client = harness.start(XDS_ROOT_CA=str(other_root))
    await wait_until_async(
        lambda: harness.terminations("ConnectionError") >= 2, "refused TLS handshakes"
    )
    assert not client.ready
    assert harness.istiod.streams_opened == 0


@pytest.mark.asyncio
async def test_alternate_hostname_is_verified(harness: Harness) -> None:
    harness.start(ALT_XDS_HOSTNAME="istiod.istio-system.svc")
    await harness.ready()
    assert [p.key for p in harness.state.policies()] == ["default/deny-9999"]


@pytest.mark.asyncio
async def test_on_demand_lookups(harness: Harness) -> None:
    client = harness.start(XDS_ON_DEMAND="true", ISTIO_META_DNS_CAPTURE="false")
    await harness.ready()  # Authorization alone makes an on-demand client ready
    state = harness.state
    assert list(state.workloads()) == []
    (address_init,) = [
        r for r in harness.istiod.requests if r.is_initial and r.type_url == ADDRESS_TYPE
    ]
    assert (address_init.subscribe, address_init.unsubscribe) == (("*",), ("*",))

    await client.fetch_on_demand("/127.0.0.1", timeout=GUARD_S)
    found = state.workload_by_address(NetworkAddress("", ipaddress.ip_address("127.0.0.1")))
    assert found is not None
    assert found.uid == LOCAL_UID
    assert state.workload(TCP_UID) is None  # only what was asked for

    await client.fetch_on_demand("default/example.com", timeout=GUARD_S)
    assert state.service("default/example.com") is not None

    await client.fetch_on_demand("/10.99.0.1", timeout=0.2)  # exists nowhere: returns quietly
    assert state.workload_by_address(NetworkAddress("", ipaddress.ip_address("10.99.0.1"))) is None
    asked = [r.subscribe for r in harness.istiod.requests if r.subscribe and not r.is_initial]
    assert asked == [("/127.0.0.1",), ("default/example.com",), ("/10.99.0.1",)]

    # Resources fetched on demand stay subscribed: later changes are pushed.
    harness.istiod.push(UpdateBatch(workloads=(dataclasses.replace(found, node="node-5"),)))
    await wait_until_async(lambda: node_of(harness, LOCAL_UID) == "node-5", "pushed update")
    # ...and a reconnect re-subscribes them by echoing their versions.
    harness.istiod.rotate()
    (again,) = await harness.istiod.wait_for(
        lambda r: r.is_initial and r.stream == 2 and r.type_url == ADDRESS_TYPE
    )
    assert LOCAL_UID in again.initial_versions


@pytest.mark.asyncio
async def test_goaway_rotation_reconnects_at_once(harness: Harness) -> None:
    harness.start()
    client = await harness.ready()
    harness.istiod.rotate()
    await harness.istiod.wait_for_streams(2)
    await harness.istiod.wait_for(lambda r: r.stream == 2 and r.is_ack, count=2)
    assert harness.terminations("Reconnect") == 1
    assert harness.terminations("ConnectionError") == 0
    assert client.connection_id == 2
    assert harness.ready_calls == 1


@pytest.mark.asyncio
async def test_unexpected_status_is_an_error_with_backoff(harness: Harness) -> None:
    harness.start()
    await harness.ready()
    harness.istiod.close_streams(grpc.StatusCode.INTERNAL, "boom")
    await harness.istiod.wait_for_streams(2)
    assert harness.terminations("Error") == 1
    await harness.istiod.wait_for(lambda r: r.stream == 2 and r.is_ack, count=2)


@pytest.mark.asyncio
async def test_dropped_stream_reconnects_and_keeps_state(harness: Harness) -> None:
    harness.start()
    client = await harness.ready()
    harness.istiod.drop_streams()
    await harness.istiod.wait_for(lambda r: r.is_initial and r.stream == 2, count=2)
    # UNAVAILABLE after responses is an error (not a connect failure); the state stays.
    assert harness.terminations("Error") == 1
    assert harness.terminations("ConnectionError") == 0
    assert "stream reset by fake istiod" in client.dump()["lastError"]
    assert {w.uid for w in harness.state.workloads()} == {LOCAL_UID, TCP_UID}
