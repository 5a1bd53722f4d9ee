"""Sampled stacks -> the formats flame-graph tools open. Pure.

A sample is a stack of frame names, root first. ``collapsed`` is Brendan Gregg's folded format
(``root;child;leaf count`` per line), which ``flamegraph.pl``, speedscope and most profilers
import; ``speedscope`` is speedscope's own JSON ("sampled" profile), which also carries the
sampling interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Stack = tuple[str, ...]

SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"


def frame_name(qualname: str, filename: str, firstlineno: int) -> str:
    """``App.dump (ztunnel_py/app.py:120)``: the package-relative path keeps names short."""
    short = filename
    for marker in ("/site-packages/", "/dist-packages/", "/ztunnel_py/", "/lib/python3"):
        at = filename.rfind(marker)
        if at < 0:
            continue
        if marker == "/ztunnel_py/":
            short = filename[at + 1 :]
        elif marker == "/lib/python3":  # the standard library: drop .../lib/python3.X/
            short = filename[filename.find("/", at + len(marker)) + 1 :]
        else:
            short = filename[at + len(marker) :]
        break
    # ';' separates frames in the folded format; keep it out of names.
    return f"{qualname} ({short}:{firstlineno})".replace(";", ",")


def collapsed(samples: Mapping[Stack, int]) -> str:
    lines = [f"{';'.join(stack)} {count}" for stack, count in sorted(samples.items()) if stack]
    return "\n".join(lines) + ("\n" if lines else "")


def speedscope(samples: Mapping[Stack, int], *, interval_s: float, name: str) -> dict[str, Any]:
    frames: dict[str, int] = {}
    stacks: list[list[int]] = []
    weights: list[float] = []
    for stack, count in sorted(samples.items()):
        stacks.append([frames.setdefault(f, len(frames)) for f in stack])
        weights.append(count * interval_s)
    total = sum(weights)
    return {
        "$schema": SPEEDSCOPE_SCHEMA,
        "shared": {"frames": [{"name": f} for f in frames]},
        "profiles": [
            {
                "type": "sampled",
                "name": name,
                "unit": "seconds",
                "startValue": 0,
                "endValue": total,
                "samples": stacks,
                "weights": weights,
            }
        ],
        "exporter": "ztunnel-py",
    }
