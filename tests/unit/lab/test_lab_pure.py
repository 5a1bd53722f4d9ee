"""The Istio lab's pure parts: its plan, istio-cni's enrollment rule, finding the binaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.lab import binaries
from tools.lab.cluster import lab_plan
from tools.lab.cni import wants_ambient

NS = {0: "lab-ambient", 1: "lab-ambient", 2: "lab-late"}


def test_lab_plan_puts_each_pod_index_in_its_namespace_with_its_service() -> None:
    plan = lab_plan("t", 2, 3, NS)
    assert {(p.name, p.namespace) for p in plan.pods} == {
        (f"pod-{i}-{j}", NS[j]) for i in range(2) for j in range(3)
    }
    # echo would span namespaces, which a Kubernetes Service cannot.
    assert {(s.name, s.namespace) for s in plan.services} == {
        ("app-0", "lab-ambient"),
        ("app-1", "lab-ambient"),
        ("app-2", "lab-late"),
    }
    assert plan.pod("pod-1-2").identity == "spiffe://cluster.local/ns/lab-late/sa/app-2"


@pytest.mark.parametrize(
    ("ns_labels", "pod_labels", "expected"),
    [
        ({"istio.io/dataplane-mode": "ambient"}, {}, True),
        ({}, {}, False),
        ({"istio.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "none"}, False),
        ({}, {"istio.io/dataplane-mode": "ambient"}, True),
        ({"istio.io/dataplane-mode": "sidecar"}, {}, False),
    ],
)
def test_istio_cni_enrols_ambient_namespaces_unless_the_pod_opts_out(
    ns_labels: dict[str, str], pod_labels: dict[str, str], expected: bool
) -> None:
    assert wants_ambient(ns_labels, pod_labels) is expected


def test_binaries_are_looked_up_by_pinned_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZTPY_LAB_CACHE", str(tmp_path))
    with pytest.raises(binaries.LabBinariesMissing, match=r"run tools/lab/build\.sh"):
        binaries.find_binaries()
    kube = binaries.gomod_version("k8s.io/kubernetes")
    etcd = binaries.gomod_version("go.etcd.io/etcd/server/v3")
    istio = binaries.istio_version()
    assert kube.startswith("v1.36.") and etcd.startswith("v3.6.")
    for name, version in (("kubernetes", kube), ("etcd", etcd), ("istio", istio)):
        (tmp_path / f"{name}-{version}").mkdir()
        (tmp_path / f"{name}-{version}" / ".built").touch()
    found = binaries.find_binaries()
    assert found.kube_apiserver == tmp_path / f"kubernetes-{kube}" / "kube-apiserver"
    assert found.pilot_discovery == tmp_path / f"istio-{istio}" / "pilot-discovery"
    assert found.etcd == tmp_path / f"etcd-{etcd}" / "etcd"
