"""tools/k8s/podrun.py: a DaemonSet's container spec becomes the podman run the kubelet's
would amount to, and whatever it cannot reproduce is refused by name."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from tools.k8s.podrun import Node, UnsupportedSpec, podman_run_argv


def daemonset(container: dict[str, Any], volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pod = {"containers": [container], "volumes": volumes}
    return [{"kind": "DaemonSet", "spec": {"template": {"spec": pod}}}]


def test_the_chart_shaped_container_translates_flag_by_flag(tmp_path: Path) -> None:
    container = {
        "image": "localhost/ztunnel-py:0.1.0",
        "args": ["proxy", "ztunnel"],
        "env": [
            {"name": "RUST_LOG", "value": "info"},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "RUST_LOG", "value": "debug"},  # a later entry wins, kept in order
        ],
        "securityContext": {
            "allowPrivilegeEscalation": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]},
            "readOnlyRootFilesystem": True,
            "runAsUser": 0,
            "runAsGroup": 1337,
        },
        "volumeMounts": [
            {"name": "sock", "mountPath": "/var/run/ztunnel"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "ca", "mountPath": "/var/run/secrets/istio"},
            {"name": "cg", "mountPath": "/host/sys/fs/cgroup", "readOnly": True},
        ],
    }
    volumes = [
        {"name": "sock", "hostPath": {"path": "/var/run/ztunnel", "type": "DirectoryOrCreate"}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "ca", "configMap": {"name": "istio-ca-root-cert"}},
        {"name": "cg", "hostPath": {"path": str(tmp_path), "type": "Directory"}},
    ]
    node = Node(
        downward={"spec.nodeName": "node-0", "limits.cpu": "2"},
        host_paths={"/var/run/ztunnel": tmp_path / "zds"},
        volume_files={"ca": tmp_path},
    )
    argv = podman_run_argv(daemonset(container, volumes), name="zt", node=node)
    assert argv[-3:] == ["localhost/ztunnel-py:0.1.0", "proxy", "ztunnel"]
    assert (tmp_path / "zds").is_dir()  # DirectoryOrCreate
    flags = list(itertools.pairwise(argv))
    assert ("--network", "none") in flags
    assert ("--user", "0:1337") in flags
    assert ("--cap-drop", "all") in flags
    assert {b for a, b in flags if a == "--cap-add"} == {"NET_ADMIN", "SYS_ADMIN"}
    assert "--read-only" in argv and "--read-only-tmpfs=false" in argv
    assert "no-new-privileges" not in argv  # allowPrivilegeEscalation: true
    env = [b for a, b in flags if a == "--env"]
    assert env == ["RUST_LOG=info", "NODE_NAME=node-0", "CPU=2", "RUST_LOG=debug"]
    assert ("--volume", f"{tmp_path / 'zds'}:/var/run/ztunnel:rw,rbind") in flags
    assert ("--tmpfs", "/tmp:rw,mode=1777") in flags
    assert ("--volume", f"{tmp_path}:/var/run/secrets/istio:ro") in flags
    assert ("--volume", f"{tmp_path}:/host/sys/fs/cgroup:ro,rbind") in flags


@pytest.mark.parametrize(
    ("container", "volumes", "node", "error"),
    [
        ({"image": "i", "securityContext": {"privileged": True}}, [], Node({}), "privileged"),
        (
            {"image": "i", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "a"}}}]},
            [],
            Node({}),
            "env X",
        ),
        (
            {"image": "i", "volumeMounts": [{"name": "s", "mountPath": "/s"}]},
            [{"name": "s", "secret": {"secretName": "x"}}],
            Node({}),
            "kind",
        ),
        (
            {"image": "i", "volumeMounts": [{"name": "h", "mountPath": "/h"}]},
            [{"name": "h", "hostPath": {"path": "/nonexistent/ztpy-deploy"}}],
            Node({}),
            "does not exist",
        ),
    ],
)
def test_what_cannot_be_reproduced_is_refused(
    container: dict[str, Any], volumes: list[dict[str, Any]], node: Node, error: str
) -> None:
    with pytest.raises(UnsupportedSpec, match=error):
        podman_run_argv(daemonset(container, volumes), name="zt", node=node)
