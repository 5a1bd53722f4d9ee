"""tools/bench/memory.py's bookkeeping: the per-pod slope, the CSV round trip, /proc parsing."""

from __future__ import annotations

import os
from pathlib import Path

from tools.bench.memory import STATUS_KEYS, Point, read_csv, read_status, table, write_csv


def point(label: str, pods: int, rss_kib: int) -> Point:
    return Point(label, pods, {"VmRSS": rss_kib, "RssAnon": rss_kib // 2, "RssFile": 0})


def test_table_gives_mib_per_pod_between_pod_points_only() -> None:
    rows = table(
        [
            point("idle", 0, 40 * 1024),
            point("10 pods", 10, 50 * 1024),
            point("60 pods", 60, 55 * 1024),
        ]
    )
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]
    assert [c[5] for c in cells] == ["-", "-", "0.100"]  # (55 - 50) MiB / 50 pods
    assert [c[2] for c in cells] == ["40.0", "50.0", "55.0"]


def test_csv_round_trip(tmp_path: Path) -> None:
    points = [point("idle", 0, 1000), point("5 pods, ebpf", 5, 2000)]
    write_csv(points, tmp_path / "m.csv")
    assert read_csv(tmp_path / "m.csv") == points
    write_csv(points, tmp_path / "img" / "m.csv")  # a directory not made yet
    assert read_csv(tmp_path / "img" / "m.csv") == points


def test_read_status_of_this_process() -> None:
    status = read_status(os.getpid())
    assert set(status) == set(STATUS_KEYS)
    assert status["VmRSS"] >= status["RssAnon"] > 0
