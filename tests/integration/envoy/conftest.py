"""Fixtures shared by the tests that run the real Envoy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ztunnel_py.testing.envoy import EnvoyProcess


@pytest.fixture
def envoys() -> Iterator[list[EnvoyProcess]]:
    """Every Envoy a test starts goes in here and is stopped afterwards."""
    started: list[EnvoyProcess] = []
    try:
        yield started
    finally:
        for envoy in started:
            envoy.stop()
