from __future__ import annotations

import logging

import pytest

from ztunnel_py.telemetry.ratelimit import LimitedLog


def test_burst_then_suppressed_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = LimitedLog(logging.getLogger("t.rl"), interval_s=10, burst=2, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "t.rl")
    results = [limited.warning("reset", "stream %d reset", i) for i in range(100)]
    assert results[:2] == [True, True] and not any(results[2:])
    assert [r.getMessage() for r in caplog.records] == ["stream 0 reset", "stream 1 reset"]
    now[0] = 10.0
    assert limited.warning("reset", "stream %d reset", 100)
    assert caplog.records[-1].getMessage() == "stream 100 reset (98 similar lines suppressed)"
    assert limited.warning("other", "a different kind"), "keys are limited separately"


def test_disabled_level_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    limited = LimitedLog(logging.getLogger("t.rl2"), burst=1)
    caplog.set_level(logging.ERROR, "t.rl2")
    assert not limited.info("k", "quiet")
    assert caplog.records == []
