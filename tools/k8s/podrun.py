"""Run a rendered DaemonSet's container with podman the way the kubelet would run it.

The container spec is taken as rendered (image, command/args, env, volume mounts,
securityContext); what the kubelet fills in on a node is given by the caller: downward-API
values, where each hostPath lives on this machine (a test's private directory for the node's
``/var/run/ztunnel``), the files behind configMap and projected volumes, and the network
namespace that stands for the pod's. Anything in the spec this module does not know how to
reproduce is an error, so a chart change cannot be silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# runc: crun refuses hybrid cgroup hosts. The kubelet applies no seccomp profile unless the pod
# asks for one (Unconfined), and no extra tmpfs on a read-only root.
PODMAN_RUN = ("podman", "run", "--runtime", "runc", "--pull", "never", "--cgroupns", "private")
ULIMITS = ("--ulimit", "nofile=16384:16384", "--ulimit", "nproc=4096:4096")


class UnsupportedSpec(ValueError):
    """The container spec uses something this translation does not reproduce."""


@dataclass(frozen=True)
class Node:
    """What the kubelet would supply for one pod on this machine."""

    downward: Mapping[str, str]  # fieldPath or resource (limits.cpu) -> value
    host_paths: Mapping[str, Path] = field(default_factory=dict)  # hostPath -> local dir
    volume_files: Mapping[str, Path] = field(default_factory=dict)  # configMap/projected dirs
    netns: str | None = None  # a netns path for the pod; None: its own empty one


def daemonset_pod(docs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, its only container) of the only DaemonSet in ``docs``."""
    (ds,) = [d for d in docs if d.get("kind") == "DaemonSet"]
    pod: dict[str, Any] = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def env_args(container: Mapping[str, Any], node: Node) -> list[str]:
    out: list[str] = []
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            value = str(var["value"])
        else:
            source = var["valueFrom"]
            ref = source.get("fieldRef", {}).get("fieldPath") or source.get(
                "resourceFieldRef", {}
            ).get("resource")
            if ref is None or ref not in node.downward:
                raise UnsupportedSpec(f"env {name}: no value for {source} (give it in downward)")
            value = node.downward[ref]
        out += ["--env", f"{name}={value}"]
    return out


def security_args(container: Mapping[str, Any]) -> list[str]:
    sc = container.get("securityContext", {})
    if sc.get("privileged"):
        raise UnsupportedSpec("privileged containers are not reproduced")
    out = ["--security-opt", "seccomp=unconfined"]
    caps = sc.get("capabilities", {})
    for cap in caps.get("drop", []):
        out += ["--cap-drop", cap.lower()]
    for cap in caps.get("add", []):
        out += ["--cap-add", cap.upper()]
    if "runAsUser" in sc:
        out += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', 0)}"]
    if sc.get("readOnlyRootFilesystem"):
        out += ["--read-only", "--read-only-tmpfs=false"]
    if sc.get("allowPrivilegeEscalation") is False:
        out += ["--security-opt", "no-new-privileges"]
    return out


def volume_args(pod: Mapping[str, Any], container: Mapping[str, Any], node: Node) -> list[str]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out: list[str] = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        target = mount["mountPath"]
        options = "ro" if mount.get("readOnly") else "rw"
        if "hostPath" in volume:
            host_path = volume["hostPath"]["path"]
            local = node.host_paths.get(host_path, Path(host_path))
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                local.mkdir(parents=True, exist_ok=True)
            elif not local.exists():
                raise UnsupportedSpec(f"hostPath {host_path} ({local}) does not exist")
            out += ["--volume", f"{local}:{target}:{options},rbind"]
        elif "emptyDir" in volume:
            out += ["--tmpfs", f"{target}:rw,mode=1777"]
        elif "configMap" in volume or "projected" in volume:
            if mount["name"] not in node.volume_files:
                raise UnsupportedSpec(f"volume {mount['name']}: give its files in volume_files")
            out += ["--volume", f"{node.volume_files[mount['name']]}:{target}:ro"]
        else:
            raise UnsupportedSpec(f"volume {mount['name']}: kind {sorted(volume)} not reproduced")
    return out


def podman_run_argv(docs: Sequence[Mapping[str, Any]], *, name: str, node: Node) -> list[str]:
    """``podman run`` for the DaemonSet's container in ``docs`` (foreground, not removed)."""
    pod, container = daemonset_pod(docs)
    if pod.get("hostNetwork"):
        raise UnsupportedSpec("hostNetwork pods are not reproduced")
    argv = [*PODMAN_RUN, *ULIMITS, "--name", name]
    argv += ["--network", f"ns:{node.netns}" if node.netns else "none"]
    argv += security_args(container)
    argv += env_args(container, node)
    argv += volume_args(pod, container, node)
    if container.get("workingDir"):
        argv += ["--workdir", container["workingDir"]]
    if container.get("command"):
        argv += ["--entrypoint", container["command"][0]]
    argv.append(container["image"])
    argv += [*container.get("command", [])[1:], *container.get("args", [])]
    return argv
