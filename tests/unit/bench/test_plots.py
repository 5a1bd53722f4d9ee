"""tools/bench/plots.py and the report's new parts: what a run's results draw and render."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.bench import plots
from tools.bench.loads import CDF_PERCENTILES, Paced, Wrk, parse_paced
from tools.bench.nodemix import NodeMixResult
from tools.bench.report import DataPlaneResult, PodsResult, _data_plane, median_planes

pytest.importorskip("matplotlib")  # a dev dependency: installed wherever the tests run


def cdf(base: float) -> tuple[float, ...]:
    return tuple(base + q for q in CDF_PERCENTILES)


def plane(
    setup: str, base: float, *, cpu: float = 0.2, rps: float = 20000, workers: int = 1
) -> DataPlaneResult:
    return DataPlaneResult(
        setup=setup,
        paced=Paced(20000, base + 50, base + 90, base + 99, base + 100, cdf(base)),
        wrk=Wrk(rps, {"50": 1.0}),
        bulk_gbps=5.0,
        cpu_vcpu=cpu,
        cpu_user=cpu / 2,
        rss_mib=[70.0, 75.0],
        workers=workers,
    )


def rounds() -> list[list[DataPlaneResult]]:
    return [
        [plane("nomesh", 100), plane("envoy", 300), plane("iptables", 350), plane("ebpf", 320)],
        [plane("nomesh", 110), plane("envoy", 310), plane("iptables", 370), plane("ebpf", 330)],
        [plane("nomesh", 120), plane("envoy", 290), plane("iptables", 360), plane("ebpf", 340)],
    ]


def test_paced_cdf_line_is_parsed_and_checked() -> None:
    values = " ".join(str(v) for v in cdf(10))
    p = parse_paced(f"100 60 100 109 110\n{values}\n")
    assert (p.count, p.p50, p.cdf[0], p.cdf[-1]) == (100, 60.0, 10.0, 110.0)
    assert parse_paced("100 60 100 109 110\n").cdf == ()
    with pytest.raises(RuntimeError, match="cdf line has 3 values"):
        parse_paced("100 60 100 109 110\n1 2 3\n")


def test_medians_over_rounds_keep_the_cdf_per_percentile() -> None:
    medians = median_planes(rounds())
    assert medians["iptables"].paced.cdf == cdf(360)
    assert medians["envoy"].paced.p50 == 350


def test_write_all_draws_every_plot_the_results_allow(tmp_path: Path) -> None:
    mix = {
        "nodemix-envoy": NodeMixResult("nodemix-envoy", 10, 4.0, 4, {}, {"outside": 10000}),
        "nodemix-ebpf": NodeMixResult("nodemix-ebpf", 10, 1.0, 2, {}, {"outside": 10000}),
    }
    pods = PodsResult(100, 100, "ebpf", 5.0, 60.0, 70.0, 71.0, 100, 200)
    written = plots.write_all(tmp_path, rounds(), mix, pods, [(1, 50.0), (100, 60.0)])
    assert sorted(p.name for p in written) == sorted(plots.FILES.values())
    cdf_svg = (tmp_path / plots.FILES["cdf"]).read_text()
    for label in ("Envoy pair", "ztunnel-py, eBPF", "no mesh"):
        assert label in cdf_svg
    cpu_svg = (tmp_path / plots.FILES["cpu"]).read_text()
    assert (
        "Envoy sidecars, node mix" in cpu_svg and "0.100" in cpu_svg
    )  # 1 vCPU-s / 10 s / 1000 rps
    rss_svg = (tmp_path / plots.FILES["rss"]).read_text()
    assert "one Envoy sidecar: 70.0 MiB" in rss_svg  # the smaller sidecar of the pair
    assert "Date" not in rss_svg


def test_plots_are_reproducible(tmp_path: Path) -> None:
    first = plots.write_all(tmp_path / "a", rounds(), {}, None)
    second = plots.write_all(tmp_path / "b", rounds(), {}, None)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_saturation_takes_one_point_per_worker_count(tmp_path: Path) -> None:
    results = [
        plane("iptables", 300, rps=15000, workers=1),
        plane("iptables", 300, rps=26000, workers=2),
        plane("ebpf", 300, rps=18000, workers=1),
        plane("ebpf", 300, rps=30000, workers=2),
        plane("envoy", 300, rps=25000, workers=2),
    ]
    path = tmp_path / "w.svg"
    assert plots.saturation_by_workers(results, path)
    text = path.read_text()
    assert "Envoy pair, --concurrency 2: 25000" in text
    assert "worker processes per daemon" in text


def test_nothing_to_draw_writes_nothing(tmp_path: Path) -> None:
    assert plots.write_all(tmp_path, [], {}, None) == []
    assert list(tmp_path.iterdir()) == []


def test_issue16_targets_in_the_summary() -> None:
    from tools.bench.report import issue16_rows

    medians = median_planes(rounds())
    mix = {
        "nodemix-envoy": NodeMixResult("nodemix-envoy", 10, 4.0, 4, {}, {"outside": 10000}),
        "nodemix-iptables": NodeMixResult("nodemix-iptables", 10, 2.5, 2, {}, {"outside": 10000}),
        "nodemix-ebpf": NodeMixResult("nodemix-ebpf", 10, 1.5, 2, {}, {"outside": 10000}),
    }
    pods = PodsResult(100, 100, "ebpf", 5.0, 60.0, 84.0, 84.0, 100, 200)
    rows = issue16_rows(medians, pods, mix, [(1, 50.0), (100, 61.6)])
    cells = {tuple(c.strip() for c in r.strip("|").split("|")) for r in rows}
    cpu = "issue 16: proxy CPU at 1000 req/s"
    # Same CPU as the Envoy pair: met in iptables mode (bar 1.0x), not in eBPF mode (0.8x).
    assert (cpu, "ztunnel-py, eBPF / Envoy", "1.00x", "<= 0.80x", "**no**") in cells
    assert (cpu, "ztunnel-py, iptables / Envoy", "1.00x", "<= 1.00x", "yes") in cells
    hundred = "issue 16: 100 pods (idle) under half a sidecar"
    assert (hundred, "daemon / one sidecar", "0.88x", "<= 0.50x", "**no**") in cells
    mixed = "issue 16: node mix, total proxy CPU"
    assert (mixed, "eBPF / envoy", "0.38x", "<= 0.50x", "yes") in cells
    assert (mixed, "eBPF / iptables", "0.60x", "<= 1.00x", "yes") in cells
    assert sum("saturation" in r for r in rows) == 2 and sum("bulk" in r for r in rows) == 2


def test_workers_setup_feeds_the_saturation_plot(tmp_path: Path) -> None:
    from tools.bench.report import WorkersResult

    workers = [
        WorkersResult(1, "iptables", Wrk(15000, {}), 1.0, 2),
        WorkersResult(2, "iptables", Wrk(26000, {}), 1.8, 6),
    ]
    points = plots.workers_points(rounds(), workers)
    assert [(p.setup, p.workers, p.wrk.rps) for p in points[:2]] == [
        ("iptables", 1, 15000),
        ("iptables", 2, 26000),
    ]
    assert {p.setup for p in points[2:]} == {"envoy", "nomesh"}  # the reference lines
    assert plots.saturation_by_workers(points, tmp_path / "w.svg")
    # Without the workers setup: the one-worker data-plane runs.
    assert {p.workers for p in plots.workers_points(rounds(), [])} == {1}


def test_upstream_ztunnel_is_rendered_beside_the_others_and_compared() -> None:
    """run.py --ztunnel-bin adds a 'ztunnel' result: its rows, its ratio to Envoy and ours to
    it; without it the tables are as before and the summary never asks for it."""
    with_upstream = [[*rs, plane("ztunnel", 200, cpu=0.1, rps=40000)] for rs in rounds()]
    res = median_planes(with_upstream)
    lines = "\n".join(_data_plane(res))
    assert "| upstream ztunnel (Rust) | 20000 | 250 | 290 | 299 |" in lines
    # proxy vCPU: upstream 0.1 against Envoy 0.2; ztunnel-py 0.2 against upstream 0.1
    assert "| proxy vCPU at 1000 req/s | 0.100 | 0.50x | 2.00x | 2.00x |" in lines
    assert "| wrk req/s | 40000 | 2.00x | 0.50x | 0.50x |" in lines
    without = "\n".join(_data_plane(median_planes(rounds())))
    assert "upstream" not in without


def test_upstream_ztunnel_is_named_in_the_plots(tmp_path: Path) -> None:
    with_upstream = [[*rs, plane("ztunnel", 200, cpu=0.1, rps=40000)] for rs in rounds()]
    res = median_planes(with_upstream)
    assert plots.latency_cdf(res, tmp_path / "cdf.svg")
    assert plots.cpu_per_1000rps(res, {}, tmp_path / "cpu.svg")
    assert ">upstream ztunnel (Rust)<" in (tmp_path / "cdf.svg").read_text()
    assert ">upstream ztunnel (Rust), pod pair<" in (tmp_path / "cpu.svg").read_text()
