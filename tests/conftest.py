"""Suite-wide policy for privileged tests.

Tests marked ``root`` (network namespaces, iptables, SO_MARK) or ``bpf`` (kernel programs) skip
on a machine where they cannot run, *unless* ``ZT_REQUIRE_PRIVILEGED=1`` is set: then a missing
privilege or feature fails the test instead, so CI (which sets it, and runs as root) can never
pass by skipping. Tests that find a missing kernel feature at run time call ``require(...)``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import uvloop
from hypothesis import settings

from ztunnel_py.testing.privileged import missing_privileges, require_privileged_env

# No timing thresholds in tests: a property test on a loaded machine is slow, not wrong.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker in ("root", "bpf"):
            if item.get_closest_marker(marker) is None:
                continue
            reason = missing_privileges(marker)
            if reason is None:
                continue
            if require_privileged_env():
                item.add_marker(pytest.mark.usefixtures("_privileged_required_but_missing"))
                item.user_properties.append(("missing", reason))
            else:
                item.add_marker(
                    pytest.mark.skip(
                        reason=f"{reason} (set ZT_REQUIRE_PRIVILEGED=1 to fail instead)"
                    )
                )


@pytest.fixture
def _privileged_required_but_missing(request: pytest.FixtureRequest) -> None:
    reasons = [v for k, v in request.node.user_properties if k == "missing"]
    pytest.fail(f"ZT_REQUIRE_PRIVILEGED=1 but {'; '.join(map(str, reasons))}")


@pytest.fixture(scope="session")
def is_root() -> bool:
    return os.geteuid() == 0


# The proxy's tests run on uvloop, the loop the daemon uses.
_TESTS = Path(__file__).parent
_UVLOOP_DIRS = (_TESTS / "component/proxy", _TESTS / "netns/proxy", _TESTS / "integration/envoy")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if any(Path(str(item.path)).is_relative_to(d) for d in _UVLOOP_DIRS):
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
