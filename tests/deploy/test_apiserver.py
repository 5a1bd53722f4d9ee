"""A real kube-apiserver accepts what we ship: the chart rendered with our overlays and the
plain manifests, first as a server-side dry run, then created for real (strict field
validation, so an unknown or misspelt field is an error, not a silently dropped one).

The binaries come from the Istio lab (tools/lab/build.sh, issue 12). Where the lab is part of
the tree they must be there (CI builds them in tools/setup.sh); before it lands, the test
uses them if a lab build left them on this machine, and otherwise skips and says why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy.apiserver import ApiServer, api_server, lab_binaries
from tests.deploy.support import EBPF_VALUES, IPTABLES_VALUES, load_values, render
from tools.k8s.render import PLAIN
from ztunnel_py.testing.privileged import require


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    binaries = lab_binaries()
    require(binaries is not None, "the lab's kube-apiserver, kubectl and etcd (tools/lab/build.sh)")
    assert binaries is not None
    with api_server(binaries, tmp_path_factory.mktemp("apiserver")) as srv:
        srv.kubectl("create", "namespace", "istio-system")
        yield srv


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


def test_the_api_server_accepts_every_manifest(server: ApiServer, tmp_path: Path) -> None:
    image = load_values(IPTABLES_VALUES[0])["image"]
    files = manifests(tmp_path)
    assert set(files) == {"helm-iptables", "helm-ebpf", "plain-ztunnel-py", "plain-ztunnel-py-ebpf"}
    for name, path in files.items():
        dry = server.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(path))
        assert "(server dry run)" in dry.stdout, (name, dry.stdout)
        assert server.kubectl("get", "daemonset", "-n", "istio-system", check=False).stdout == ""
        server.kubectl("create", "--validate=strict", "-f", str(path))
        stored = json.loads(
            server.kubectl("get", "daemonset", "ztunnel", "-n", "istio-system", "-o", "json").stdout
        )
        (container,) = stored["spec"]["template"]["spec"]["containers"]
        assert container["image"] == image, name
        assert container["args"] == ["proxy", "ztunnel"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert ("/sys/fs/bpf" in mounts) == ("ebpf" in name), name
        server.kubectl("delete", "--wait=true", "-f", str(path))


def test_a_misspelt_field_is_refused_so_acceptance_means_something(
    server: ApiServer, tmp_path: Path
) -> None:
    docs = [d for d in yaml.safe_load_all((PLAIN / "ztunnel-py.yaml").read_text()) if d]
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    daemonset["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = server.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", str(path), check=False
    )
    assert out.returncode != 0
    assert 'unknown field "spec.template.spec.containers[0].readOnlyRootFilesytem"' in out.stderr
