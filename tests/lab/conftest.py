"""The Istio lab for a whole test session: real etcd, kube-apiserver and istiod (root).

One lab per session: the control plane's start-up is the expensive part, so every test in
tests/lab shares it and leaves it as it found it (labels, policies and pods restored).
The binaries come from tools/lab/build.sh's cache; CI builds them first (tools/test.sh).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tools.lab.binaries import LabBinariesMissing, find_binaries
from tools.lab.mesh import LabMesh, LabOptions
from tools.testbed import cgroup2_mount
from ztunnel_py.testing.privileged import require


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabMesh]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    try:
        find_binaries()
    except LabBinariesMissing as e:
        require(False, str(e))
    tag = f"lab{secrets.token_hex(2)}"
    mesh = LabMesh(
        LabOptions(tag=tag, env={"LOG_FORMAT": "json"}),
        tmp_path_factory.mktemp("lab") / tag,
    )
    mesh.up()
    try:
        yield mesh
    finally:
        mesh.down()
