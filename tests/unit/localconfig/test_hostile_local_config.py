"""Hostile local config files: whatever is written to LOCAL_XDS_PATH, the daemon refuses it
with a short, clear error and keeps its last good state; the watcher never dies, and parsing
runs off the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from ztunnel_py.errors import MAX_ERROR_CHARS, LocalConfigError
from ztunnel_py.state.store import ChangeSet, ProxyState, UpdateBatch
from ztunnel_py.testing.poll import wait_until_async
from ztunnel_py.xds import local_source
from ztunnel_py.xds.local import load_local_config_file, parse_local_config
from ztunnel_py.xds.local_source import LocalConfigSource
from ztunnel_py.xds.yaml_load import MAX_ALIAS_NODES, MAX_DEPTH

GOOD = """
workloads:
- uid: cluster1//v1/Pod/default/a
  name: a
  namespace: default
  workloadIps: [10.0.0.1]
"""

# Nine levels of nine references: 9**9 (~387 million) nodes once the aliases are expanded.
ALIAS_BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{c}: &{c} [{','.join(['*' + p] * 9)}]"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "workloads: *i",
    ]
)


def workloads_yaml(n: int) -> str:
    lines = ["workloads:"]
    for i in range(n):
        lines += [
            f"- uid: cluster1//v1/Pod/default/w{i}",
            f"  name: w{i}",
            "  namespace: default",
            f"  workloadIps: [10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}]",
            "  protocol: HBONE",
            "  serviceAccount: sa",
        ]
    return "\n".join(lines) + "\n"


def test_invalid_utf8_is_refused_with_where_it_is(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(GOOD.encode() + b"  name: \xff\xfe\n")
    with pytest.raises(LocalConfigError, match="not valid UTF-8") as info:
        load_local_config_file(path)
    assert "byte" in str(info.value)


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    deep = "workloads: " + "[" * 10_000 + "]" * 10_000
    with pytest.raises(LocalConfigError, match=f"deeper than {MAX_DEPTH}"):
        parse_local_config(deep)
    deep_map = "workloads:\n" + "".join(" " * i + "a:\n" for i in range(1, 3000))
    with pytest.raises(LocalConfigError, match=f"deeper than {MAX_DEPTH}"):
        parse_local_config(deep_map)


def test_alias_bomb_is_refused_with_a_short_error() -> None:
    assert len(ALIAS_BOMB) < 500
    with pytest.raises(LocalConfigError, match="aliases") as info:
        parse_local_config(ALIAS_BOMB)
    assert str(MAX_ALIAS_NODES) in str(info.value)
    assert len(str(info.value)) <= MAX_ERROR_CHARS + 200


def test_a_few_aliases_are_fine() -> None:
    doc = GOOD.replace("workloadIps: [10.0.0.1]", "workloadIps: &ips [10.0.0.1]") + (
        "- uid: cluster1//v1/Pod/default/b\n  name: b\n  namespace: default\n  workloadIps: *ips\n"
    )
    batch = parse_local_config(doc)
    assert [w.name for w in batch.workloads] == ["a", "b"]


def test_error_quoting_a_huge_value_is_truncated() -> None:
    with pytest.raises(LocalConfigError, match="unknown field") as info:
        parse_local_config("workloads:\n- ? " + "k" * 200_000 + "\n  : 1\n")
    assert len(str(info.value)) <= MAX_ERROR_CHARS + 200
    assert "truncated" in str(info.value)


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(GOOD + "#" * 2048)
    with pytest.raises(LocalConfigError, match="larger than 1024 bytes"):
        load_local_config_file(path, max_bytes=1024)


class Applied:
    def __init__(self) -> None:
        self.state = ProxyState()
        self.batches: list[UpdateBatch] = []

    def __call__(self, batch: UpdateBatch) -> ChangeSet:
        self.batches.append(batch)
        return self.state.apply(batch)


@pytest.mark.asyncio
async def test_watcher_refuses_every_hostile_file_and_keeps_the_last_good_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_source, "POLL_INTERVAL_S", 0.01)
    path = tmp_path / "config.yaml"
    path.write_text(GOOD)
    applied = Applied()
    source = LocalConfigSource(applied, path=path)
    source.load()
    watch = asyncio.create_task(source.watch())
    hostile = [
        b"workloads: [\xff]\n",
        ("workloads: " + "[" * 10_000 + "]" * 10_000).encode(),
        ALIAS_BOMB.encode(),
        b"workloads: {",
    ]
    try:
        for n, content in enumerate(hostile, start=1):
            path.write_bytes(content + b"\n" * n)  # a new size: the poll sees a change
            await wait_until_async(
                lambda n=n: source.last_error is not None and source.failures == n,  # type: ignore[misc]
                f"hostile file {n} to be refused",
            )
            assert not watch.done(), f"the watcher died on hostile file {n}"
            assert len(source.last_error or "") <= MAX_ERROR_CHARS + 500
            assert [w.name for w in applied.state.workloads()] == ["a"]
        path.write_text(GOOD.replace("name: a", "name: b"))
        await wait_until_async(lambda: source.last_error is None, "the good file")
        assert [w.name for w in applied.state.workloads()] == ["b"]
    finally:
        watch.cancel()


@pytest.mark.asyncio
async def test_reload_parses_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD)
    source = LocalConfigSource(Applied(), path=path)
    source.load()
    path.write_text(workloads_yaml(2000))
    loop_thread = threading.get_ident()
    parsed_on: list[int] = []
    real = local_source.load_local_config_file  # type: ignore[attr-defined]

    def spy(*args: object, **kw: object) -> UpdateBatch:
        parsed_on.append(threading.get_ident())
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(local_source, "load_local_config_file", spy)
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = ticks
    assert await source.reload_async()
    stop = True
    await task
    assert parsed_on and parsed_on[0] != loop_thread
    assert ticks > start + 1, "the event loop did not run while the file was parsed"
