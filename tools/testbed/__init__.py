"""A laptop-sized cluster: nodes and pods as network namespaces, for tests, demos and benchmarks.

``make_plan`` lays out N nodes with M pods each (pure); ``Testbed(plan, options).up()`` builds it
(root), writes the matching ztunnel local config, and starts an app server in every pod;
``down()`` removes all of it, also after a crash (``Testbed.load(tag).down()``).
Command line: ``python -m tools.testbed up|down|status``.
"""

from __future__ import annotations

from tools.testbed.bed import (
    DEFAULT_STATE_DIR,
    Testbed,
    TestbedError,
    TestbedOptions,
    cgroup2_mount,
)
from tools.testbed.plan import (
    NodePlan,
    PlanError,
    PodPlan,
    ServicePlan,
    TestbedPlan,
    local_config,
    make_plan,
    render_local_config,
)

__all__ = [
    "DEFAULT_STATE_DIR",
    "NodePlan",
    "PlanError",
    "PodPlan",
    "ServicePlan",
    "Testbed",
    "TestbedError",
    "TestbedOptions",
    "TestbedPlan",
    "cgroup2_mount",
    "local_config",
    "make_plan",
    "render_local_config",
]
