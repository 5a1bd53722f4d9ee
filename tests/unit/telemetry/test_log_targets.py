"""``/logging`` speaks ztunnel's targets both ways."""

from __future__ import annotations

import logging

from ztunnel_py.log_levels import display_target
from ztunnel_py.telemetry.logging import LevelController


def test_logger_names_are_shown_as_ztunnel_targets() -> None:
    assert display_target("ztunnel_py") == "ztunnel"
    assert display_target("ztunnel_py.proxy.inbound") == "ztunnel::proxy::inbound"
    assert display_target("access") == "access"


def test_levels_round_trip_through_ztunnel_target_names() -> None:
    levels = LevelController("info")
    try:
        levels.apply("warn,ztunnel::proxy=debug,access=error")
        assert levels.describe() == "warn,access=error,ztunnel::proxy=debug"
        assert logging.getLogger("ztunnel_py.proxy").level == logging.DEBUG
    finally:
        levels.reset()
