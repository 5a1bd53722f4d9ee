"""ztunnel's log level syntax (``RUST_LOG``): ``info`` or ``warn,ztunnel::proxy=debug``.

Parsed where the configuration is read (a bad spec stops the daemon with the variable's name)
and where levels are applied (``telemetry.logging``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

LEVELS: Mapping[str, int] = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": 5,
}
ROOT_TARGET = "ztunnel_py"


def parse_level_spec(spec: str) -> tuple[int, dict[str, int]]:
    """``info`` or ``warn,ztunnel::proxy=debug,access=info`` -> (default level, per-target).

    Raises ``ValueError`` naming the bad part.
    """
    default = logging.INFO
    targets: dict[str, int] = {}
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        target, sep, level = part.rpartition("=")
        level = level.strip().lower()
        if level not in LEVELS:
            allowed = ", ".join(k for k in LEVELS if k != "warning")
            raise ValueError(f"unknown log level {level!r} in {part!r} (expected one of {allowed})")
        if sep:
            targets[normalize_target(target.strip())] = LEVELS[level]
        else:
            default = LEVELS[level]
    return default, targets


def normalize_target(target: str) -> str:
    name = target.replace("::", ".")
    if name == "ztunnel" or name.startswith("ztunnel."):
        name = ROOT_TARGET + name[len("ztunnel") :]
    return name


def display_target(name: str) -> str:
    """A logger name as ztunnel's target (``ztunnel_py.proxy.x`` -> ``ztunnel::proxy::x``):
    what ``/logging`` shows back."""
    if name == ROOT_TARGET or name.startswith(ROOT_TARGET + "."):
        name = "ztunnel" + name[len(ROOT_TARGET) :]
    return name.replace(".", "::")
