"""A real kube-apiserver accepts what we ship: the chart rendered with our overlays and the
plain manifests, first as a server-side dry run, then created for real (strict field
validation, so an unknown or misspelt field is an error, not a silently dropped one).

The API server is the Istio lab's (tools/lab/controlplane.py, binaries from tools/lab/build.sh,
which CI runs before the tests), started without CRDs or istiod.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import EBPF_VALUES, IPTABLES_VALUES, load_values, render
from tools.k8s.render import PLAIN
from tools.lab.controlplane import ControlPlane


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("apiserver"))
    plane.start_kubernetes()
    try:
        plane.kubectl("create", "namespace", "istio-system")
        yield plane
    finally:
        plane.stop()


def manifests(tmp_path: Path) -> dict[str, Path]:
    rendered = {
        "helm-iptables": render(IPTABLES_VALUES),
        "helm-ebpf": render(EBPF_VALUES),
    }
    files = {}
    for name, docs in rendered.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump_all(docs))
    for path in sorted(PLAIN.glob("*.yaml")):
        files[f"plain-{path.stem}"] = path
    return files


def test_the_api_server_accepts_every_manifest(server: ControlPlane, tmp_path: Path) -> None:
    image = load_values(IPTABLES_VALUES[0])["image"]
    files = manifests(tmp_path)
    assert set(files) == {"helm-iptables", "helm-ebpf", "plain-ztunnel-py", "plain-ztunnel-py-ebpf"}
    for name, path in files.items():
        dry = server.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(path))
        assert "(server dry run)" in dry, (name, dry)
        assert server.kubectl_result("get", "daemonset", "-n", "istio-system").stdout == ""
        server.kubectl("create", "--validate=strict", "-f", str(path))
        stored = json.loads(
            server.kubectl("get", "daemonset", "ztunnel", "-n", "istio-system", "-o", "json")
        )
        (container,) = stored["spec"]["template"]["spec"]["containers"]
        assert container["image"] == image, name
        assert container["args"] == ["proxy", "ztunnel"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert ("/sys/fs/bpf" in mounts) == ("ebpf" in name), name
        server.kubectl("delete", "--wait=true", "-f", str(path))


def test_a_misspelt_field_is_refused_so_acceptance_means_something(
    server: ControlPlane, tmp_path: Path
) -> None:
    docs = [d for d in yaml.safe_load_all((PLAIN / "ztunnel-py.yaml").read_text()) if d]
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    daemonset["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = server.kubectl_result("apply", "--dry-run=server", "--validate=strict", "-f", str(path))
    assert out.returncode != 0
    assert 'unknown field "spec.template.spec.containers[0].readOnlyRootFilesytem"' in out.stderr
