"""Level changes are told to followers (the data-plane workers) with the spec applied."""

from __future__ import annotations

import pytest

from ztunnel_py.telemetry.logging import LevelController


def test_followers_hear_every_applied_spec_and_a_reset() -> None:
    levels = LevelController("info")
    heard: list[str] = []
    levels.followers.append(heard.append)
    levels.apply("warn,ztunnel::proxy=debug")
    levels.reset()
    assert heard == ["warn,ztunnel::proxy=debug", "info"]
    assert levels.spec == "info"


def test_a_bad_spec_reaches_no_follower() -> None:
    levels = LevelController("info")
    heard: list[str] = []
    levels.followers.append(heard.append)
    with pytest.raises(ValueError):
        levels.apply("loud")
    assert heard == []
    assert levels.spec == "info"
