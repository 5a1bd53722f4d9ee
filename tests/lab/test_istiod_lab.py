"""ztunnel-py against the real Istio control plane: istiod and a Kubernetes API server (root).

The session's lab (tests/lab/conftest.py) has two nodes with three pods each: pods 0 and 1 of
every node live in ``lab-ambient`` (labelled ``istio.io/dataplane-mode=ambient`` from the
start), pod 2 in ``lab-late`` (unlabelled). Services ``app-0``/``app-1`` (in ``lab-ambient``)
and ``app-2`` (in ``lab-late``) select pod ``j`` of every node. Nothing about the mesh is given
to the daemons locally: workloads, services and policies come from istiod over xDS, certificates
from istiod's CA, and the lab's istio-cni enrols pods from the namespaces' labels.

Each test leaves the lab as it found it (labels, policies, pods), since they share it.
"""

from __future__ import annotations

import base64
import json
import secrets
import signal
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.netns.e2e.support import (
    access_records,
    finish_stream,
    log_mark,
    proxy_listeners,
    start_stream,
)
from tools.lab.cluster import AMBIENT_LABEL
from tools.lab.mesh import LabMesh, LabOptions
from ztunnel_py.admin.debug import SECTIONS
from ztunnel_py.testing.daemon import Daemon, http
from ztunnel_py.testing.poll import eventually, wait_until

# The first test also brings the session's lab up (control plane, testbed, daemons).
pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]

AMBIENT, LATE = "lab-ambient", "lab-late"
ECHO = 9000
TD = "cluster.local"


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


def workloads(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """The daemon's workloads from istiod, by ``namespace/name``."""
    return {f"{w['namespace']}/{w['name']}": w for w in daemon.config_dump()["workloads"]}


def services(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {f"{s['namespace']}/{s['name']}": s for s in daemon.config_dump()["services"]}


def served_pods(daemon: Daemon) -> set[str]:
    """``namespace/name`` of the pods this daemon serves (``Up`` in its workloadState)."""
    state = daemon.config_dump()["workloadState"]
    return {
        f"{v['info']['namespace']}/{v['info']['name']}"
        for v in state.values()
        if v["state"] == "Up"
    }


def protocol_is(daemon: Daemon, key: str, protocol: str) -> bool:
    return bool(workloads(daemon)[key]["protocol"] == protocol)


def serves(daemon: Daemon, key: str, expected: bool) -> bool:
    return (key in served_pods(daemon)) == expected


def has_policy(daemon: Daemon, name: str) -> bool:
    return any(p["name"] == name for p in daemon.config_dump()["policies"])


def echo(lab: LabMesh, pod: str, ip: str, n: int = 4096) -> dict[str, Any]:
    return lab.client(pod, "echo", ip, ECHO, "--bytes", str(n))


@pytest.fixture
def policy(lab: LabMesh) -> Iterator[str]:
    """A policy name the test may create; deleted afterwards whatever happened."""
    name = "lab-test-policy"
    yield name
    assert lab.cluster is not None
    try:
        lab.cluster.delete_authorization_policy(AMBIENT, name)
    except Exception as e:  # absent already is fine
        assert getattr(e, "status", None) == 404, e


# ----------------------------------------------------------------------------- debug views

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"


def test_debug_dump_shows_the_real_istiod_and_keeps_secrets_out(lab: LabMesh) -> None:
    """/debug/dump of a daemon fed by the real istiod: the stream, per-type ACKs and the
    istiod-issued certificates are there; the bound service-account token and keys are not."""
    for node in lab.plan.nodes:
        daemon = lab.daemons[node.name]
        reply = http(daemon.admin + "/debug/dump", timeout=30)
        assert reply.status == 200, reply.text
        token = lab.token_path(node.name).read_text().strip()
        assert token and token not in reply.text
        assert "PRIVATE KEY" not in reply.text
        doc = reply.json()
        assert list(doc) == list(SECTIONS)
        xds = doc["xds"]
        assert xds["connected"] is True and xds["lastError"] is None, xds
        for type_url in (ADDRESS_TYPE, AUTHORIZATION_TYPE):
            state = xds["types"][type_url]
            assert state["acked"] and state["lastAck"] is not None, (type_url, state)
            assert state["lastNack"] is None, (type_url, state)
        identities = {c["identity"] for c in doc["certificates"]["certificates"]}
        mine = {
            spiffe(p.namespace, p.service_account)
            for p in lab.plan.pods_on(node.name)
            if p.namespace == AMBIENT
        }
        assert mine <= identities, (mine, identities)


# ----------------------------------------------------------------------------- enrollment


def test_pods_of_an_ambient_namespace_arrive_from_istiod_and_are_served(lab: LabMesh) -> None:
    for node in lab.plan.nodes:
        daemon = lab.daemons[node.name]
        got = workloads(daemon)
        for pod in (p for p in lab.plan.pods if p.namespace == AMBIENT):
            w = got[f"{AMBIENT}/{pod.name}"]
            # istiod's own fields: its uid scheme, the pod's node, the app label as the
            # canonical name, HBONE because istio-cni marked the pod redirected.
            assert w["uid"] == f"Kubernetes//Pod/{AMBIENT}/{pod.name}"
            assert w["protocol"] == "HBONE"
            assert w["workloadIps"] == [pod.ip]
            assert w["node"] == pod.node
            assert w["serviceAccount"] == pod.service_account
            assert w["canonicalName"] == pod.app
            assert w["clusterId"] == "Kubernetes"
            assert w["status"] == "Healthy"
        mine = {
            f"{AMBIENT}/{p.name}" for p in lab.plan.pods_on(node.name) if p.namespace == AMBIENT
        }
        assert served_pods(daemon) == mine

    # Served: a call across nodes goes through both daemons with the pods' identities.
    client, server = lab.pod("pod-0-0"), lab.pod("pod-1-1")
    mark = log_mark(lab.daemons["node-1"])
    result = echo(lab, client.name, server.ip)
    assert result["result"] == "ok" and result["received"] == result["sent"], result
    eventually(
        lambda: (
            access_records(
                lab.daemons["node-1"],
                mark,
                src_identity=spiffe(AMBIENT, "app-0"),
                dst_identity=spiffe(AMBIENT, "app-1"),
            )
            or pytest.fail("no access record yet")
        )
    )


def test_pods_of_an_unlabelled_namespace_are_not_captured(lab: LabMesh) -> None:
    for node in lab.plan.nodes:
        daemon = lab.daemons[node.name]
        late = [p for p in lab.plan.pods_on(node.name) if p.namespace == LATE]
        for pod in late:
            # istiod knows the pod (every pod is a workload) but not as an HBONE one.
            assert workloads(daemon)[f"{LATE}/{pod.name}"]["protocol"] == "TCP"
            assert proxy_listeners(lab, pod.name) == {}
            assert f"{LATE}/{pod.name}" not in served_pods(daemon)
    marks = {n: log_mark(d) for n, d in lab.daemons.items()}
    result = echo(lab, "pod-0-2", lab.pod("pod-1-2").ip)
    assert result["result"] == "ok", result
    for name, daemon in lab.daemons.items():
        assert access_records(daemon, marks[name]) == [], f"{name} proxied a plain connection"


def test_labelling_a_namespace_at_run_time_enrols_its_pods(lab: LabMesh) -> None:
    assert lab.cluster is not None
    late = [p for p in lab.plan.pods if p.namespace == LATE]
    lab.cluster.set_ambient(LATE, True)
    try:
        for pod in late:
            lab.wait_enrolled(LATE, pod.name)
        for pod in late:
            daemon = lab.daemons[pod.node]
            wait_until(
                partial(protocol_is, daemon, f"{LATE}/{pod.name}", "HBONE"),
                f"istiod to mark {pod.name} HBONE",
            )
            wait_until(partial(serves, daemon, f"{LATE}/{pod.name}", True), "served")
            assert set(proxy_listeners(lab, pod.name)) == {15001, 15006, 15008}
        mark = log_mark(lab.daemons["node-1"])
        result = echo(lab, "pod-0-2", lab.pod("pod-1-2").ip)
        assert result["result"] == "ok", result
        eventually(
            lambda: (
                access_records(lab.daemons["node-1"], mark, dst_identity=spiffe(LATE, "app-2"))
                or pytest.fail("no access record yet")
            )
        )
    finally:
        lab.cluster.set_ambient(LATE, False)
    for pod in late:
        lab.wait_enrolled(LATE, pod.name, enrolled=False)
        daemon = lab.daemons[pod.node]
        wait_until(partial(serves, daemon, f"{LATE}/{pod.name}", False), "unserved")
        wait_until(
            partial(protocol_is, daemon, f"{LATE}/{pod.name}", "TCP"),
            "istiod to drop HBONE once the pod is no longer redirected",
        )
    labels = lab.cluster.core.read_namespace(LATE).metadata.labels or {}
    assert AMBIENT_LABEL not in labels


# ----------------------------------------------------------------------------- policy


def test_authorization_policy_created_changed_deleted_through_the_api_server(
    lab: LabMesh, policy: str
) -> None:
    assert lab.cluster is not None
    server = lab.pod("pod-1-1")  # app-1 on node-1
    first, second = "pod-0-0", "pod-0-1"  # service accounts app-0 and app-1, on node-0

    def allow_only(sa: str) -> dict[str, Any]:
        return {
            "selector": {"matchLabels": {"app": "app-1"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/{AMBIENT}/sa/{sa}"]}}]}],
        }

    def outcome(pod: str) -> str:
        result = echo(lab, pod, server.ip)
        return "allowed" if result["result"] == "ok" and result["received"] > 0 else "denied"

    def policy_key_everywhere(present: bool) -> bool:
        key = f"{AMBIENT}/{policy}"
        return all(
            (key in {f"{p['namespace']}/{p['name']}" for p in d.config_dump()["policies"]})
            == present
            for d in lab.daemons.values()
        )

    assert (outcome(first), outcome(second)) == ("allowed", "allowed")

    lab.cluster.apply_authorization_policy(AMBIENT, policy, allow_only("app-0"))
    wait_until(lambda: policy_key_everywhere(True), "istiod to push the policy")
    eventually(lambda: assert_outcomes(outcome, first, second, ("allowed", "denied")))
    dumped = next(p for p in lab.daemons["node-1"].config_dump()["policies"] if p["name"] == policy)
    assert dumped["scope"] == "WorkloadSelector" and dumped["action"] == "Allow", dumped
    wl = workloads(lab.daemons["node-1"])[f"{AMBIENT}/{server.name}"]
    assert f"{AMBIENT}/{policy}" in wl["authorizationPolicies"]

    lab.cluster.apply_authorization_policy(AMBIENT, policy, allow_only("app-1"))
    eventually(lambda: assert_outcomes(outcome, first, second, ("denied", "allowed")))

    lab.cluster.delete_authorization_policy(AMBIENT, policy)
    wait_until(lambda: policy_key_everywhere(False), "istiod to withdraw the policy")
    eventually(lambda: assert_outcomes(outcome, first, second, ("allowed", "allowed")))


def assert_outcomes(outcome: Any, first: str, second: str, expected: tuple[str, str]) -> None:
    got = (outcome(first), outcome(second))
    assert got == expected, got


# ----------------------------------------------------------------------------- services


def test_service_endpoints_follow_pod_changes(lab: LabMesh) -> None:
    assert lab.cluster is not None
    gone = lab.pod("pod-1-0")  # one of app-0's two endpoints
    key = f"{AMBIENT}/app-0"
    uid = f"Kubernetes//Pod/{AMBIENT}/{gone.name}"

    def endpoints(daemon: Daemon) -> set[str]:
        return set(services(daemon)[key]["endpoints"])

    def endpoints_are(daemon: Daemon, expected: set[str]) -> bool:
        return endpoints(daemon) == expected

    both = {f"Kubernetes//Pod/{AMBIENT}/pod-0-0", uid}
    for daemon in lab.daemons.values():
        assert endpoints(daemon) == both
        assert services(daemon)[key]["vips"] == [f"/{lab.plan.services[0].vip}"]

    lab.cluster.delete_pod(AMBIENT, gone.name)
    try:
        for daemon in lab.daemons.values():
            wait_until(partial(endpoints_are, daemon, both - {uid}), "the endpoint to go")
        vip = next(s.vip for s in lab.plan.services if s.name == "app-0")
        for _ in range(4):  # every call lands on the endpoint that is left
            result = lab.client("pod-0-1", "http", vip, 80)
            assert result["result"] == "ok" and result["body"].strip() == "pod-0-0", result
    finally:
        lab.cluster.create_pod(gone)
    for daemon in lab.daemons.values():
        wait_until(partial(endpoints_are, daemon, both), "the re-created pod to come back")
    lab.wait_enrolled(AMBIENT, gone.name)


# ----------------------------------------------------------------------------- certificates


def test_certificates_come_from_istiods_ca_with_the_pods_identities(lab: LabMesh) -> None:
    root = x509.load_pem_x509_certificate(lab.root_cert_path.read_bytes())
    for node in lab.plan.nodes:
        daemon = lab.daemons[node.name]
        wanted = {
            spiffe(p.namespace, p.service_account)
            for p in lab.plan.pods_on(node.name)
            if p.namespace == AMBIENT
        }
        certs = {c["identity"]: c for c in daemon.config_dump()["certificates"]}
        assert wanted <= set(certs), (wanted, set(certs))
        for identity in wanted:
            entry = certs[identity]
            assert entry["state"] == "Available", entry
            leaf = _load(entry["certChain"][0]["pem"])
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == [identity]
            roots = [_load(r["pem"]) for r in entry["rootCerts"]]
            assert root in roots
            chain = [_load(c["pem"]) for c in entry["certChain"]]
            # Signed by istiod's self-signed CA: the leaf's issuer is the published root.
            assert chain[-1].issuer == root.subject
            chain[-1].verify_directly_issued_by(root)


def _load(b64_pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(b64_pem))


# ----------------------------------------------------------------------------- istiod restart


def test_istiod_killed_and_restarted_keeps_connections_and_daemons_resync(
    lab: LabMesh, policy: str
) -> None:
    assert lab.cluster is not None
    server = lab.pod("pod-1-1")
    streams_before = {n: d.config_dump()["xds"]["connectionId"] for n, d in lab.daemons.items()}
    stream = start_stream(lab, "pod-0-0", server.ip, ECHO)
    try:
        lab.cp.stop_istiod(signal.SIGKILL)
        # While istiod is gone, the daemons keep serving what they hold.
        during = echo(lab, "pod-0-1", server.ip)
        assert during["result"] == "ok", during
        # A change made while istiod is down must reach the daemons after it is back.
        lab.cluster.apply_authorization_policy(
            AMBIENT,
            policy,
            {
                "selector": {"matchLabels": {"app": "app-1"}},
                "action": "DENY",
                "rules": [{"to": [{"operation": {"ports": ["7777"]}}]}],
            },
        )
        lab.cp.start_istiod()
        for daemon in lab.daemons.values():
            wait_until(
                partial(has_policy, daemon, policy),
                "the daemon to resync from the restarted istiod",
                timeout=90,
            )
    finally:
        if not lab.cp.istiod_running:
            lab.cp.start_istiod()
        result = finish_stream(stream)
    assert result["result"] == "ok", result
    assert result["received"] == result["sent"] > 0
    assert result["sha256"] == result["expected_sha256"]
    for name, daemon in lab.daemons.items():  # a new ADS stream, to the new istiod
        xds = daemon.config_dump()["xds"]
        assert xds["connected"] and xds["connectionId"] > streams_before[name], xds


# ----------------------------------------------------------------------------- NACKs


def test_every_resource_istiod_sent_was_accepted(lab: LabMesh) -> None:
    """docs/istio-lab.md lists what istiod sends that ztunnel-py refuses; this names any
    resource that a daemon NACKed over the session so far (the tests above ran first)."""
    for name, daemon in lab.daemons.items():
        types = daemon.config_dump()["xds"]["types"]
        assert set(types) == {
            "type.googleapis.com/istio.workload.Address",
            "type.googleapis.com/istio.security.Authorization",
        }
        for type_url, state in types.items():
            assert state["acked"], (name, type_url)
            assert state["lastNack"] is None, (name, type_url, state["lastNack"])
        held = types["type.googleapis.com/istio.workload.Address"]["resources"]
        # Every pod and service istiod knows (ztunnel pods included) is held by name.
        assert "Kubernetes//Pod/lab-ambient/pod-0-0" in held
        assert "lab-ambient/app-0.lab-ambient.svc.cluster.local" in held


# ----------------------------------------------------------------------------- istioctl


@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        ("workloads", ["NAMESPACE", "POD NAME", "pod-0-0", "HBONE", "lab-late", "TCP"]),
        ("services", ["NAMESPACE", "SERVICE NAME", "app-0", "10.96.0.10"]),
        ("policies", ["NAMESPACE", "POLICY NAME"]),
        ("certificates", ["CERTIFICATE NAME", spiffe(AMBIENT, "app-0"), "Leaf", "Available"]),
        ("connections", ["WORKLOAD", "DIRECTION", "REMOTE TARGET"]),
    ],
)
def test_istioctl_reads_every_daemons_dump(
    lab: LabMesh, tmp_path: Path, kind: str, expect: list[str]
) -> None:
    for node in lab.plan.nodes:
        dump = tmp_path / f"{node.name}.json"
        dump.write_text(json.dumps(lab.daemons[node.name].config_dump()))
        proc = subprocess.run(
            [
                str(lab.cp.binaries.istioctl),
                f"--kubeconfig={lab.cp.kubeconfig}",
                "ztunnel-config",
                kind,
                "--file",
                str(dump),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        for text in expect:
            assert text in proc.stdout, (node.name, kind, proc.stdout)


# ----------------------------------------------------------------------------- eBPF mode


@pytest.mark.bpf
def test_ebpf_redirection_with_the_real_istiod(tmp_path: Path) -> None:
    """The daemons' default redirect mode against istiod: what istiod marks HBONE is captured
    in the kernel and carried over HBONE; the unlabelled namespace's traffic is not."""
    lab = LabMesh(
        LabOptions(tag=f"lbe{secrets.token_hex(2)}", redirect="ebpf", env={"LOG_FORMAT": "json"}),
        tmp_path / "lab",
    )
    lab.up()
    try:
        marks = {n: log_mark(d) for n, d in lab.daemons.items()}
        served = echo(lab, "pod-0-0", lab.pod("pod-1-1").ip)
        assert served["result"] == "ok" and served["received"] == served["sent"], served
        eventually(
            lambda: (
                access_records(
                    lab.daemons["node-1"],
                    marks["node-1"],
                    src_identity=spiffe(AMBIENT, "app-0"),
                    dst_identity=spiffe(AMBIENT, "app-1"),
                )
                or pytest.fail("no access record yet")
            )
        )
        marks = {n: log_mark(d) for n, d in lab.daemons.items()}
        plain = echo(lab, "pod-0-2", lab.pod("pod-1-2").ip)
        assert plain["result"] == "ok", plain
        for name, daemon in lab.daemons.items():
            assert access_records(daemon, marks[name]) == [], f"{name} proxied a plain connection"
    finally:
        lab.down()
