"""The real daemon process: admin, metrics, readiness, logging, reload, drain and exit."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ztunnel_py.testing.daemon import free_port, http, run_daemon
from ztunnel_py.testing.poll import eventually
from ztunnel_py.testing.privileged import require

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples/localhost.yaml"


@pytest.fixture
def local_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    shutil.copy(EXAMPLE, path)
    return path


def base_env(tmp_path: Path, config: Path) -> dict[str, str]:
    return {
        "LOCAL_XDS_PATH": str(config),
        "LOCAL_CA_DIR": str(tmp_path / "ca"),
        "CONNECTION_TERMINATION_DEADLINE": "2s",
        "INPOD_ENABLED": "false",  # no istio-cni agent here: control plane and admin only
    }


def test_serves_config_dump_metrics_and_readiness(tmp_path: Path, local_config: Path) -> None:
    with run_daemon(base_env(tmp_path, local_config), log_dir=tmp_path, wait="ready") as d:
        dump = d.config_dump()
        uids = [w["uid"] for w in dump["workloads"]]
        assert uids == ["cluster1//v1/Pod/default/local", "cluster1//v1/Pod/default/local-tcp"]
        assert [s["hostname"] for s in dump["services"]] == ["example.com", "example2.com"]
        assert dump["policies"][0]["name"] == "deny-9999"
        assert dump["config"]["localXdsPath"] == str(local_config)
        assert dump["staticConfig"]["loads"] == 1

        for path in ("/metrics", "/stats/prometheus"):
            reply = http(d.stats + path)
            assert reply.status == 200
            assert 'istio_build{component="ztunnel"' in reply.text
            assert "process_resident_memory_bytes" in reply.text
        om = http(d.stats + "/metrics", headers={"Accept": "application/openmetrics-text"})
        assert om.headers["Content-Type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")

        ready = http(d.ready_url)
        assert (ready.status, ready.text) == (200, "ready\n")
        index = http(d.admin + "/")
        assert index.status == 200 and "/config_dump" in index.text
        assert http(d.admin + "/nope").status == 404


def test_admin_listens_on_localhost_only(tmp_path: Path, local_config: Path) -> None:
    with run_daemon(base_env(tmp_path, local_config), log_dir=tmp_path) as d:
        with socket.create_connection(("127.0.0.1", d.admin_port), timeout=2):
            pass
        if socket.has_ipv6 and Path("/proc/net/if_inet6").exists():
            assert http(f"http://[::1]:{d.admin_port}/").status == 200  # as ztunnel: ::1 too
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", d.admin_port), timeout=2)
        # Metrics and readiness are for Prometheus and kubelet: reachable on any address.
        with socket.create_connection(("127.0.0.2", d.stats_port), timeout=2):
            pass


def test_logging_levels_change_at_run_time(tmp_path: Path, local_config: Path) -> None:
    with run_daemon(base_env(tmp_path, local_config), log_dir=tmp_path) as d:
        assert http(d.admin + "/logging").status == 405
        assert http(d.admin + "/logging", method="POST").text == "current log level is info\n"
        changed = http(d.admin + "/logging?level=ztunnel::xds=debug,warn", method="POST")
        assert changed.text == "current log level is warn,ztunnel::xds=debug\n"
        bad = http(d.admin + "/logging?level=loud", method="POST")
        assert bad.status == 400 and "unknown log level 'loud'" in bad.text
        reset = http(d.admin + "/logging?reset", method="POST")
        assert reset.text == "current log level is info\n"


def test_quitquitquit_drains_and_exits_within_the_deadline(
    tmp_path: Path, local_config: Path
) -> None:
    with run_daemon(base_env(tmp_path, local_config), log_dir=tmp_path) as d:
        reply = http(d.admin + "/quitquitquit", method="POST")
        assert reply.status == 200
        assert d.wait(timeout=10) == 0
        assert "shutdown requested through /quitquitquit" in d.log()


def test_quitquitquit_needs_post(tmp_path: Path, local_config: Path) -> None:
    with run_daemon(base_env(tmp_path, local_config), log_dir=tmp_path) as d:
        assert http(d.admin + "/quitquitquit").status == 405
        assert d.proc.poll() is None


def test_sigterm_drains_and_exits_zero(tmp_path: Path, local_config: Path) -> None:
    with run_daemon(base_env(tmp_path, local_config), log_dir=tmp_path) as d:
        d.signal(signal.SIGTERM)
        assert d.wait(timeout=10) == 0
        assert "received SIGTERM, draining" in d.log()


def test_readiness_is_503_until_configuration_arrives(tmp_path: Path) -> None:
    # istiod configured but unreachable: the state manager never gets its first ACK.
    env = {
        "XDS_ADDRESS": f"https://127.0.0.1:{free_port()}",
        "FAKE_CA": "true",
        "INPOD_ENABLED": "false",
    }
    with run_daemon(env, log_dir=tmp_path) as d:
        reply = http(d.ready_url)
        assert reply.status == 503
        assert "pending: state manager" in reply.text


def test_json_log_format(tmp_path: Path, local_config: Path) -> None:
    env = {**base_env(tmp_path, local_config), "LOG_FORMAT": "json"}
    with run_daemon(env, log_dir=tmp_path) as d:
        http(d.admin + "/quitquitquit", method="POST")
        d.wait(timeout=10)
        lines = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    assert lines, "the daemon logged nothing"
    assert all({"level", "time", "scope", "message"} <= line.keys() for line in lines)
    assert any(line["message"].startswith("ztunnel-py 0.1.0 running") for line in lines)


def test_bad_environment_exits_before_opening_any_port(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "run"],
        env={"REDIRECT_MODE": "tc", "ADMIN_PORT": str(port), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 78
    assert "invalid REDIRECT_MODE='tc': expected ebpf or iptables" in proc.stderr
    assert "listening" not in proc.stderr


def test_bad_local_config_at_start_is_fatal_and_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("workloads:\n  - {uid: u, name: a, namespace: n, workloadIps: [nope]}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "run"],
        env={"LOCAL_XDS_PATH": str(bad), "ADMIN_PORT": str(free_port()), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 78
    assert "workloads[0].workloadIps[0]: 'nope' is not an IP address" in proc.stderr
    assert "listening" not in proc.stderr


def test_reload_applies_good_files_and_keeps_last_good_state_on_bad_ones(
    tmp_path: Path, local_config: Path
) -> None:
    with run_daemon(base_env(tmp_path, local_config), log_dir=tmp_path) as d:
        local_config.write_text(local_config.read_text() + "\nbogus: 1\n")

        def refused() -> None:
            static = d.config_dump()["staticConfig"]
            assert static["lastError"] is not None and "bogus: unknown field" in static["lastError"]

        eventually(refused)
        assert len(d.config_dump()["workloads"]) == 2  # the last good state is still served
        assert "keeping the last good state" in d.log()

        local_config.write_text("workloads:\n  - {uid: only, name: only, namespace: default}\n")

        def reloaded() -> None:
            dump = d.config_dump()
            assert [w["uid"] for w in dump["workloads"]] == ["only"]
            assert dump["staticConfig"]["lastError"] is None

        eventually(reloaded)


def test_validate_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "validate", str(EXAMPLE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0 and "2 workloads, 2 services, 1 policies" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  - {name: s, namespace: n, hostname: h, vips: [10.0.0.1]}\n")
    fail = subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "validate", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert fail.returncode == 1
    assert "services[0].vips[0]" in fail.stderr


def test_config_dump_command_and_proxy_ztunnel_alias(tmp_path: Path, local_config: Path) -> None:
    with run_daemon(
        base_env(tmp_path, local_config), log_dir=tmp_path, argv=("proxy", "ztunnel")
    ) as d:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "ztunnel_py",
                "config-dump",
                "--admin",
                f"127.0.0.1:{d.admin_port}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(out.stdout)["workloads"][0]["name"] == "local"
    missing = subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "config-dump", "--admin", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1 and "is ztunnel-py running?" in missing.stderr


def test_certificates_for_node_workloads_gate_readiness_and_show_in_dump(
    tmp_path: Path, local_config: Path
) -> None:
    env = {**base_env(tmp_path, local_config), "NODE_NAME": "local"}
    with run_daemon(env, log_dir=tmp_path, wait="ready") as d:
        certs = d.config_dump()["certificates"]
        assert [c["identity"] for c in certs] == ["spiffe://cluster.local/ns/default/sa/default"]
        (cert,) = certs
        assert cert["state"] == "Available"
        assert cert["certChain"] and cert["rootCerts"]
        assert {"pem", "serialNumber", "validFrom", "expirationTime"} <= cert["certChain"][0].keys()
    # The local CA's root lives in LOCAL_CA_DIR, private to root.
    ca_dir = tmp_path / "ca"
    assert (ca_dir.stat().st_mode & 0o077) == 0
    assert (ca_dir / "ca-key.pem").exists()


def test_a_local_ca_directory_others_can_read_is_refused(
    tmp_path: Path, local_config: Path
) -> None:
    ca_dir = tmp_path / "open-ca"
    ca_dir.mkdir(mode=0o755)
    ca_dir.chmod(0o755)
    env = {
        **base_env(tmp_path, local_config),
        "LOCAL_CA_DIR": str(ca_dir),
        "ADMIN_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "run"],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 78
    assert str(ca_dir) in proc.stderr
    assert "listening" not in proc.stderr


def test_explicit_ebpf_mode_that_cannot_work_stops_the_daemon_and_says_why(
    tmp_path: Path, local_config: Path
) -> None:
    not_a_cgroup = tmp_path / "not-a-cgroup"
    not_a_cgroup.mkdir()
    env = {
        **base_env(tmp_path, local_config),
        "INPOD_ENABLED": "true",
        "INPOD_UDS": str(tmp_path / "zds.sock"),
        "REDIRECT_MODE": "ebpf",
        "BPF_CGROUP_PATH": str(not_a_cgroup),
        "BPF_PIN_PATH": str(tmp_path / "pins"),
        "ADMIN_PORT": str(free_port()),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "ztunnel_py", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 78
    assert f"{not_a_cgroup} is not a cgroup v2 directory" in proc.stderr


def test_unset_redirect_mode_falls_back_to_iptables_where_ebpf_cannot_work(
    tmp_path: Path, local_config: Path
) -> None:
    not_a_cgroup = tmp_path / "not-a-cgroup"
    not_a_cgroup.mkdir()
    env = {
        **base_env(tmp_path, local_config),
        "INPOD_ENABLED": "true",
        "INPOD_UDS": str(tmp_path / "zds.sock"),  # no agent: enrolment just waits
        "BPF_CGROUP_PATH": str(not_a_cgroup),
        "BPF_PIN_PATH": str(tmp_path / "pins"),
    }
    with run_daemon(env, log_dir=tmp_path) as d:
        assert d.config_dump()["dataPlane"]["redirectMode"] == "iptables"
        assert "eBPF redirection is not available" in d.log()
        assert "using iptables mode" in d.log()


def test_a_new_local_ca_root_is_loud(tmp_path: Path, local_config: Path) -> None:
    """Losing LOCAL_CA_DIR makes the next start mint a new root that peers do not trust: the
    log says so as a warning and a metric counts it, while a restart that finds the root
    stays quiet."""
    env = base_env(tmp_path, local_config)
    created = "ztunnel_py_local_ca_roots_created_total 1.0"
    with run_daemon(env, log_dir=tmp_path / "first", wait="ready") as d:
        assert created in http(d.stats + "/metrics").text
        assert "WARN" in d.log() and "created a new local CA root" in d.log()
    with run_daemon(env, log_dir=tmp_path / "second", wait="ready") as d:
        assert "ztunnel_py_local_ca_roots_created_total 0.0" in http(d.stats + "/metrics").text
        assert "created a new local CA root" not in d.log()
    shutil.rmtree(tmp_path / "ca")  # the state directory is lost
    with run_daemon(env, log_dir=tmp_path / "third", wait="ready") as d:
        assert created in http(d.stats + "/metrics").text
        assert "peers that trust the previous root" in d.log()


@pytest.mark.parametrize("ipv6", [True, False], ids=["IPV6_ENABLED=true", "IPV6_ENABLED=false"])
def test_ipv6_enabled_decides_the_ipv6_listeners(
    tmp_path: Path, local_config: Path, ipv6: bool
) -> None:
    """ztunnel: with IPV6_ENABLED=false, admin is 127.0.0.1 only and metrics and readiness bind
    0.0.0.0 instead of [::]; nothing listens on an IPv6 address."""
    require(Path("/proc/net/if_inet6").exists(), "the host has no IPv6 (::1) to compare with")
    env = {**base_env(tmp_path, local_config), "IPV6_ENABLED": str(ipv6).lower()}
    with run_daemon(env, log_dir=tmp_path, wait="ready") as d:
        for port in (d.admin_port, d.stats_port, d.readiness_port):
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
            if ipv6:
                with socket.create_connection(("::1", port), timeout=2):
                    pass
            else:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("::1", port), timeout=2)
