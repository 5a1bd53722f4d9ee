"""The soak command (``tools/soak.py``, run by hand for 30 minutes) works end to end: a few
seconds with a few connections produce samples, a CSV and a plot, and no errors."""

from __future__ import annotations

import csv
from pathlib import Path

from tools.soak import main


def test_a_short_soak_writes_its_samples_and_plot(tmp_path: Path) -> None:
    code = main(
        ["--connections", "20", "--duration", "2", "--interval", "0.5", "--out", str(tmp_path)]
    )
    with (tmp_path / "soak.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and {"rss_mib", "fds", "loop_lag_ms", "alive", "errors"} <= rows[0].keys()
    assert int(rows[-1]["completed"]) > 0
    assert all(r["errors"] == "0" for r in rows)
    assert (tmp_path / "soak.svg").read_text().startswith("<svg")
    assert code == 0
