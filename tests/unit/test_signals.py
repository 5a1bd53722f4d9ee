"""ShutdownController: the first signal drains, every later one forces."""

from __future__ import annotations

import signal

from ztunnel_py.signals import ShutdownController


def test_first_signal_drains_and_the_next_ones_force() -> None:
    calls: list[str] = []
    ctl = ShutdownController(
        graceful=lambda: calls.append("drain"), force=lambda: calls.append("force")
    )
    ctl.on_signal(signal.SIGTERM)
    assert calls == ["drain"]
    ctl.on_signal(signal.SIGINT)
    ctl.on_signal(signal.SIGTERM)
    assert calls == ["drain", "force", "force"]
    assert ctl.signals == 3
