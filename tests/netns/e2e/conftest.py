"""Fixtures for the end-to-end tests: whole meshes of real ``ztunnel-py`` processes (root).

``make_mesh`` brings up meshes for one test and tears every one of them down afterwards, also
when the test fails (namespaces, cgroups, daemons, the fake agents, BPF pins).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.e2e.support import MeshMaker, mesh_tag
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import Mesh, MeshOptions
from ztunnel_py.testing.privileged import require


@pytest.fixture
def make_mesh(tmp_path: Path) -> Iterator[MeshMaker]:
    meshes: list[Mesh] = []

    def make(test: str, redirect: str, **options: Any) -> Mesh:
        require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
        family = options.get("ip_family", "ipv4")
        opts = MeshOptions(tag=mesh_tag(test, redirect, family), redirect=redirect, **options)
        mesh = Mesh(opts, tmp_path / opts.tag)
        meshes.append(mesh)
        mesh.up()
        return mesh

    try:
        yield make
    finally:
        for mesh in meshes:
            mesh.down()
