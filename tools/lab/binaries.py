"""Where ``tools/lab/build.sh`` puts the lab's binaries, and finding them (pure paths, no builds).

Layout: ``$ZTPY_LAB_CACHE`` (default ``/var/cache/ztunnel-py/lab``) holds one directory per
component and version, complete when it contains ``.built``:

- ``kubernetes-<v>/kube-apiserver``, ``kubernetes-<v>/kubectl``
- ``etcd-<v>/etcd``
- ``istio-<v>/pilot-discovery``, ``istio-<v>/istioctl``, ``istio-<v>/crd-all.gen.yaml``

The versions come from ``tools/lab/versions.env`` (istio) and ``tools/lab/gomod/go.mod``
(kubernetes and etcd), so bumping a pin there is all it takes to get a fresh build.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

LAB_DIR = Path(__file__).parent
DEFAULT_CACHE = Path("/var/cache/ztunnel-py/lab")
_REQUIRE = re.compile(r"^\s*(?:require\s+)?(\S+)\s+(v\S+)", re.MULTILINE)


class LabBinariesMissing(RuntimeError):
    """A binary of the lab has not been built on this machine."""


def cache_root() -> Path:
    return Path(os.environ.get("ZTPY_LAB_CACHE") or DEFAULT_CACHE)


def istio_version() -> str:
    for line in (LAB_DIR / "versions.env").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ISTIO_VERSION":
            return value.strip()
    raise LabBinariesMissing("tools/lab/versions.env has no ISTIO_VERSION")


def gomod_version(module: str) -> str:
    """The version ``tools/lab/gomod/go.mod`` pins ``module`` at."""
    text = (LAB_DIR / "gomod" / "go.mod").read_text()
    for found, version in _REQUIRE.findall(text):
        if found == module:
            return str(version)
    raise LabBinariesMissing(f"tools/lab/gomod/go.mod does not require {module}")


@dataclass(frozen=True)
class LabBinaries:
    kube_apiserver: Path
    kubectl: Path
    etcd: Path
    pilot_discovery: Path
    istioctl: Path
    istio_crds: Path
    istio_version: str
    kubernetes_version: str
    etcd_version: str


def component_dir(name: str, version: str) -> Path:
    return cache_root() / f"{name}-{version}"


def find_binaries() -> LabBinaries:
    """The cached binaries; ``LabBinariesMissing`` says how to build the ones that are absent."""
    kube_v = gomod_version("k8s.io/kubernetes")
    etcd_v = gomod_version("go.etcd.io/etcd/server/v3")
    istio_v = istio_version()
    kube, etcd, istio = (
        component_dir("kubernetes", kube_v),
        component_dir("etcd", etcd_v),
        component_dir("istio", istio_v),
    )
    missing = [str(d) for d in (kube, etcd, istio) if not (d / ".built").exists()]
    if missing:
        raise LabBinariesMissing(
            f"the Istio lab is not built here ({', '.join(missing)} missing): "
            "run tools/lab/build.sh (a cold build takes tens of minutes)"
        )
    return LabBinaries(
        kube_apiserver=kube / "kube-apiserver",
        kubectl=kube / "kubectl",
        etcd=etcd / "etcd",
        pilot_discovery=istio / "pilot-discovery",
        istioctl=istio / "istioctl",
        istio_crds=istio / "crd-all.gen.yaml",
        istio_version=istio_v,
        kubernetes_version=kube_v,
        etcd_version=etcd_v,
    )
