"""Istio's ztunnel chart rendered with our overlays, and the plain manifests rendered from it.

- the iptables overlay changes the image and nothing else the chart renders;
- the eBPF overlay adds exactly the bpffs and host cgroup mounts and the eBPF env, and the
  daemon reads that env as eBPF mode with pins on the node's bpffs;
- the container runs as the chart runs ztunnel (args, uid/gid, read-only root, capabilities);
- manifests/plain/ are what tools/k8s/render.py renders now (equivalent to the chart).
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from tests.deploy.support import (
    EBPF_VALUES,
    IPTABLES_VALUES,
    helm_and_chart,
    kinds,
    load_values,
    render,
)
from tools.k8s.podrun import daemonset_pod
from tools.k8s.render import VALUES, VARIANTS
from tools.k8s.render import render as render_plain
from ztunnel_py.config import RedirectMode, from_env

CHART_CAPS = ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]
DOWNWARD = {
    "POD_NAME": "ztunnel-x",
    "POD_NAMESPACE": "istio-system",
    "NODE_NAME": "node-0",
    "INSTANCE_IP": "10.0.0.5",
    "SERVICE_ACCOUNT": "ztunnel",
    "ZTUNNEL_CPU_LIMIT": "2",
    "ZTUNNEL_RESOURCE_CPU_LIMIT": "2",
    "ZTUNNEL_RESOURCE_CPU_REQUEST": "1",
}


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The env the kubelet would give: values, and the downward API filled from DOWNWARD."""
    return {v["name"]: str(v["value"]) if "value" in v else DOWNWARD[v["name"]]
            for v in container["env"]}  # fmt: skip


def without_image(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    docs = copy.deepcopy(docs)
    _, container = daemonset_pod(docs)
    container.pop("image")
    container.pop("imagePullPolicy", None)
    return docs


def test_iptables_overlay_swaps_the_image_and_nothing_else() -> None:
    stock = render()
    ours = render(IPTABLES_VALUES)
    assert kinds(ours) == ["DaemonSet", "ServiceAccount"]
    _, container = daemonset_pod(ours)
    assert container["image"] == load_values(IPTABLES_VALUES[0])["image"]
    assert container["image"] != daemonset_pod(stock)[1]["image"]
    assert without_image(ours) == without_image(stock)


def test_container_runs_as_the_chart_runs_ztunnel() -> None:
    for values in (IPTABLES_VALUES, EBPF_VALUES):
        _, container = daemonset_pod(render(values))
        assert container["args"] == ["proxy", "ztunnel"]
        assert "command" not in container  # the image's entrypoint takes the chart's args
        sc = container["securityContext"]
        assert (sc["runAsUser"], sc["runAsGroup"], sc["readOnlyRootFilesystem"]) == (0, 1337, True)
        assert sc["capabilities"] == {"drop": ["ALL"], "add": CHART_CAPS}
        assert container["readinessProbe"]["httpGet"] == {"port": 15021, "path": "/healthz/ready"}


def test_the_daemon_reads_the_iptables_render_as_auto_mode_from_istiod() -> None:
    _, container = daemonset_pod(render(IPTABLES_VALUES))
    config = from_env(container_env(container))
    assert config.redirect_mode is None  # auto: eBPF where the node allows, else iptables
    assert config.inpod_enabled
    assert config.xds_address == "https://istiod.istio-system.svc:15012"
    assert config.node_name == "node-0"


def test_ebpf_overlay_adds_the_node_mounts_and_env_and_nothing_else() -> None:
    pod, container = daemonset_pod(render(EBPF_VALUES))
    base_pod, base_container = daemonset_pod(render(IPTABLES_VALUES))
    added_volumes = [v for v in pod["volumes"] if v not in base_pod["volumes"]]
    assert added_volumes == [
        {"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "Directory"}},
        {"name": "host-cgroup", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}},
    ]
    added_mounts = [m for m in container["volumeMounts"] if m not in base_container["volumeMounts"]]
    assert added_mounts == [
        {"name": "bpffs", "mountPath": "/sys/fs/bpf"},
        {"name": "host-cgroup", "mountPath": "/host/sys/fs/cgroup", "readOnly": True},
    ]
    added_env = {k: v for k, v in container_env(container).items()
                 if k not in container_env(base_container)}  # fmt: skip
    assert added_env == {"REDIRECT_MODE": "ebpf", "BPF_PIN_PATH": "/sys/fs/bpf/ztunnel-py"}
    config = from_env(container_env(container))
    assert config.redirect_mode is RedirectMode.EBPF
    assert config.bpf_pin_path.is_relative_to("/sys/fs/bpf")  # on the node's bpffs mount


def test_user_values_still_merge_with_the_overlays() -> None:
    # An operator's own --set lands beside ours (env is a map: merged, not replaced).
    _, container = daemonset_pod(render(EBPF_VALUES, set_values=["env.RUST_LOG_STYLE=never",
                                                                  "logLevel=debug"]))  # fmt: skip
    env = container_env(container)
    assert (env["REDIRECT_MODE"], env["RUST_LOG_STYLE"], env["RUST_LOG"]) == (
        "ebpf",
        "never",
        "debug",
    )


def test_plain_manifests_are_the_current_render() -> None:
    helm, chart = helm_and_chart()
    for variant in VARIANTS:
        assert variant.output.read_text() == render_plain(variant, helm, chart), (
            f"{variant.output} is stale: run python3 tools/k8s/render.py"
        )


def test_plain_ebpf_manifest_adds_the_bpf_capability() -> None:
    docs = [
        d
        for d in yaml.safe_load_all((VALUES.parent / "plain" / "ztunnel-py-ebpf.yaml").read_text())
        if d
    ]
    _, container = daemonset_pod(docs)
    assert container["securityContext"]["capabilities"]["add"] == [*CHART_CAPS, "BPF"]
    assert daemonset_pod(render(EBPF_VALUES))[1]["volumeMounts"] == container["volumeMounts"]


def test_the_documented_swap_back_renders_the_stock_chart() -> None:
    # docs/kubernetes.md, "Swap back": these --set values undo both overlays.
    swap_back = ["image=ztunnel", "imagePullPolicy=null", "env=null", "volumes=null",
                 "volumeMounts=null"]  # fmt: skip
    assert render(EBPF_VALUES, set_values=swap_back) == render()
