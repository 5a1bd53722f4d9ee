"""The admin's ``/debug`` views on a real daemon in local mode (no root needed).

Local mode with ``NODE_NAME`` set to the example's node, so the embedded CA issues real
certificates (and private keys) that must show up as certificates and never as keys.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztunnel_py.admin.debug import EXTRA_VIEWS, SECTIONS
from ztunnel_py.testing.daemon import Daemon, http, run_daemon
from ztunnel_py.testing.poll import eventually

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples/localhost.yaml"
SECRET_HEADER = "Bearer do-not-leak-0b5e"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    config = tmp_path / "config.yaml"
    shutil.copy(EXAMPLE, config)
    env = {
        "LOCAL_XDS_PATH": str(config),
        "LOCAL_CA_DIR": str(tmp_path / "ca"),
        "NODE_NAME": "local",  # the example's workloads are on node "local": certs get issued
        "INPOD_ENABLED": "false",
        "XDS_HEADER_AUTHORIZATION": SECRET_HEADER,
    }
    with run_daemon(env, log_dir=tmp_path, wait="ready") as d:
        yield d


def get_json(d: Daemon, path: str) -> object:
    reply = http(d.admin + path, timeout=30)
    assert reply.status == 200, (path, reply.text)
    assert reply.headers["Content-Type"] == "application/json"
    return json.loads(reply.body)


def assert_no_secrets(text: str) -> None:
    assert "PRIVATE KEY" not in text
    assert SECRET_HEADER not in text


def test_index_lists_every_view_and_each_answers(daemon: Daemon) -> None:
    index = get_json(daemon, "/debug")
    assert isinstance(index, dict)
    paths = [v["path"] for v in index["views"]]
    assert paths == [f"/debug/{n}" for n in [*SECTIONS, *EXTRA_VIEWS]]
    for name in SECTIONS:
        get_json(daemon, f"/debug/{name}")  # 200 and JSON, for each


def test_dump_has_every_section_and_no_secrets(daemon: Daemon) -> None:
    reply = http(daemon.admin + "/debug/dump", timeout=30)
    doc = reply.json()
    assert list(doc) == list(SECTIONS)
    assert_no_secrets(reply.text)
    assert doc["build"]["version"] and doc["build"]["pid"] == daemon.proc.pid
    assert doc["config"]["xdsHeaders"] == {"authorization": "<redacted>"}
    assert doc["xds"]["source"] == "local" and doc["xds"]["localConfig"]["loads"] == 1
    certs = doc["certificates"]
    (cert,) = certs["certificates"]
    assert cert["identity"] == "spiffe://cluster.local/ns/default/sa/default"
    assert cert["state"] == "Available"
    assert cert["certChain"][0]["serialNumber"] and "pem" not in cert["certChain"][0]
    (rotation,) = certs["rotation"]
    assert 0 < rotation["nextFetchInSeconds"] <= 24 * 3600  # renewed at half-life, jittered
    admin = next(s for s in doc["listeners"]["daemon"] if s["name"] == "admin")
    assert f"127.0.0.1:{daemon.admin_port}" in admin["addresses"]
    assert doc["runtime"]["workers"] == 1 and doc["runtime"]["aliveTasks"] > 0
    assert doc["redirect"] == {"mode": None, "enabled": False}
    assert doc["bpf"] is None  # no eBPF in control-plane-only mode
    messages = [e["message"] for e in doc["errors"]["recent"]]
    assert any("no pod will be served" in m for m in messages)
    # /config_dump keeps the certificates (istioctl reads them) but not the header either
    assert_no_secrets(http(daemon.admin + "/config_dump").text)


def test_sections_alone_and_bad_section(daemon: Daemon) -> None:
    part = http(daemon.admin + "/debug/dump?section=runtime,build").json()
    assert list(part) == ["build", "runtime"]
    bad = http(daemon.admin + "/debug/dump?section=nope")
    assert bad.status == 400 and "the sections are build, config" in bad.json()["error"]


def test_logs_view_has_the_recent_lines(daemon: Daemon) -> None:
    lines = get_json(daemon, "/debug/logs")
    assert isinstance(lines, dict)
    assert any(line["message"].startswith("ztunnel-py 0.1.0 running") for line in lines["lines"])


def test_loop_lag_is_measured(daemon: Daemon) -> None:
    def sampled() -> None:
        assert http(daemon.admin + "/debug/runtime").json()["loopLagSeconds"]["samples"] > 0

    eventually(sampled)
    text = http(daemon.stats + "/metrics").text
    assert "ztunnel_py_event_loop_lag_seconds_count" in text
    assert "tokio_num_workers 1.0" in text


def big_config(path: Path, workloads: int) -> None:
    """A local config with many workloads, so that building ``/config_dump`` is real work."""
    lines = ["workloads:"] + [
        f"  - {{uid: c//Pod/default/w{i}, name: w{i}, namespace: default,"
        f" workloadIps: [10.{i // 250}.{i % 250}.1], protocol: HBONE}}"
        for i in range(workloads)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_cpu_profile_under_load_names_the_hot_functions(tmp_path: Path) -> None:
    config = tmp_path / "big.yaml"
    big_config(config, 2000)
    env = {"LOCAL_XDS_PATH": str(config), "INPOD_ENABLED": "false"}
    with run_daemon(env, log_dir=tmp_path, wait="ready") as daemon:
        profile_under_load(daemon)


def profile_under_load(daemon: Daemon) -> None:
    stop = threading.Event()

    def load() -> None:  # keep the daemon busy building its config dump
        while not stop.is_set():
            http(daemon.admin + "/config_dump", timeout=30)

    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        reply = http(daemon.admin + "/debug/pprof/profile?seconds=2", timeout=30)
        speedscope = http(
            daemon.admin + "/debug/pprof/profile?seconds=1&format=speedscope", timeout=30
        )
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert reply.status == 200
    lines = reply.text.splitlines()
    assert lines and all(line.rsplit(" ", 1)[1].isdigit() for line in lines)  # folded stacks
    # the dump's own code is on the sampled stacks, named with its file
    assert "App.dump (ztunnel_py/app.py:" in reply.text
    assert "state_dump (ztunnel_py/admin/dump.py:" in reply.text
    doc = speedscope.json()
    assert doc["profiles"][0]["type"] == "sampled"
    assert any("App.dump" in f["name"] for f in doc["shared"]["frames"])


def test_profile_parameters_are_checked(daemon: Daemon) -> None:
    reply = http(daemon.admin + "/debug/pprof/profile?seconds=0")
    assert reply.status == 400 and "expected 1-300" in reply.json()["error"]
    reply = http(daemon.admin + "/debug/pprof/profile?seconds=1&format=pdf")
    assert reply.status == 400


def test_heap_top_allocations(daemon: Daemon) -> None:
    first = get_json(daemon, "/debug/pprof/heap")
    assert isinstance(first, dict) and first["startedNow"] is True
    http(daemon.admin + "/config_dump")  # allocate something while tracing
    second = get_json(daemon, "/debug/pprof/heap?limit=5")
    assert isinstance(second, dict) and second["startedNow"] is False
    assert 0 < len(second["top"]) <= 5
    assert all(t["sizeBytes"] > 0 and t["traceback"] for t in second["top"])
    assert get_json(daemon, "/debug/pprof/heap?stop") == {"tracing": False, "wasTracing": True}


def run_cli(d: Daemon, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "debug", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def test_cli_dump_and_bundle(daemon: Daemon, tmp_path: Path) -> None:
    admin = f"127.0.0.1:{daemon.admin_port}"
    one = run_cli(daemon, "dump", "--section", "build", "--admin", admin)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["pid"] == daemon.proc.pid
    everything = run_cli(daemon, "dump", "--admin", admin)
    assert list(json.loads(everything.stdout)) == list(SECTIONS)

    extra_log = tmp_path / "container.log"
    extra_log.write_text("a line from the container runtime\n")
    out = tmp_path / "bundle.tar.gz"
    stats = f"127.0.0.1:{daemon.stats_port}"
    made = run_cli(
        daemon,
        "bundle",
        "--admin",
        admin,
        "--stats",
        stats,
        "-o",
        str(out),
        "--log",
        str(extra_log),
    )
    assert made.returncode == 0, made.stderr
    with tarfile.open(out) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m) for m in tar.getmembers()}
        contents = {name: f.read() if f else b"" for name, f in files.items()}
    assert set(contents) == {
        "debug.json",
        "config_dump.json",
        "logs.json",
        "metrics.txt",
        "logs/container.log",
        "manifest.json",
    }
    assert json.loads(contents["manifest.json"])["problems"] == []
    assert list(json.loads(contents["debug.json"])) == list(SECTIONS)
    assert b"istio_build" in contents["metrics.txt"]
    for data in contents.values():
        assert_no_secrets(data.decode(errors="replace"))


def test_cli_says_when_the_daemon_is_not_there(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "debug", "dump", "--admin", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1 and "is ztunnel-py running?" in proc.stderr


def test_abuse_of_the_admin_port_leaves_the_daemon_serving(daemon: Daemon) -> None:
    """Garbage, a huge head, a stalled request and more connections than allowed: each gets
    an error or a closed connection, and the daemon goes on answering."""
    port = daemon.admin_port

    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(data)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    assert raw(b"\x16\x03\x01 not http at all\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert raw(huge).startswith(b"HTTP/1.1 431 ")
    stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
    stalled.sendall(b"GET /config_dump HTTP/1.1\r\n")  # and nothing more
    held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(80)]
    try:
        # past the limit of 64, the daemon closes a new connection at once, saying nothing
        assert held[-1].recv(1) == b""
    finally:
        for s in held:
            s.close()
    # the stalled request times out with a 408 (the daemon's 10 s request limit)
    stalled.settimeout(30)
    assert stalled.recv(65536).startswith(b"HTTP/1.1 408 ")
    stalled.close()

    def serving() -> None:
        admin = next(
            s
            for s in http(daemon.admin + "/debug/listeners").json()["daemon"]
            if s["name"] == "admin"
        )
        assert admin["refusedConnections"] > 0
        assert http(daemon.admin + "/config_dump").status == 200

    eventually(serving)
    assert http(daemon.ready_url).status == 200 and daemon.proc.poll() is None
