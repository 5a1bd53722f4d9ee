"""Helpers for the deployment tests: helm renders of Istio's ztunnel chart with our overlays.

helm and the chart come from tools/k8s/tools.sh (cached by version; tools/setup.sh builds them).
Without them these tests skip, or fail under ZT_REQUIRE_PRIVILEGED=1 as CI runs them.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tools.k8s.render import ROOT, VALUES, helm_template
from ztunnel_py.testing.privileged import require

IPTABLES_VALUES = (VALUES / "ztunnel-py.values.yaml",)
EBPF_VALUES = (*IPTABLES_VALUES, VALUES / "ztunnel-py-ebpf.values.yaml")


@functools.cache
def _tools() -> dict[str, str] | None:
    try:
        out = subprocess.run(
            [str(ROOT / "tools" / "k8s" / "tools.sh")],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,  # the cache is there or it is not: never build from a test
            env={**os.environ, "GOPROXY": "off"},  # only what is cached already
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def helm_and_chart() -> tuple[str, str]:
    tools = _tools()
    require(tools is not None, "helm and Istio's ztunnel chart (run tools/setup.sh)")
    assert tools is not None
    return tools["HELM"], tools["ZTUNNEL_CHART"]


def render(values: Sequence[Path] = (), *, set_values: Sequence[str] = ()) -> list[dict[str, Any]]:
    helm, chart = helm_and_chart()
    return helm_template(helm, chart, values, set_values=set_values)


def load_values(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def kinds(docs: Sequence[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)
