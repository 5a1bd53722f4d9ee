"""The real daemon imports only what its mode needs: no grpc, xDS client or istiod CA client
(about 10 MiB of RSS) unless istiod is configured.

Python's ``-X importtime`` (``PYTHONPROFILEIMPORTTIME``) makes the daemon log every module it
imports, when it imports it: the log of a daemon that has started and served its ports lists
everything its start-up path loaded.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ztunnel_py.testing.daemon import free_port, http, run_daemon

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples/localhost.yaml"
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", re.MULTILINE)
ISTIOD_ONLY = (
    "grpc",
    "grpc_tools",  # grpc's own __init__ imports it when installed (dev environments)
    "envoy.service.discovery.v3",
    "ztunnel_py.xds.client",
    "ztunnel_py.identity.istiod_ca",
    "ztunnel_py.istiod_auth",
    "ztunnel_py.protos.ca_pb2",
    "ztunnel_py.protos.workload_pb2",
)


def imported(log: str) -> set[str]:
    modules = set(IMPORT_LINE.findall(log))
    assert "ztunnel_py.app" in modules, "no import profile in the daemon's log"
    return modules


def local_env(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "config.yaml"
    shutil.copy(EXAMPLE, config)
    return {
        "LOCAL_XDS_PATH": str(config),
        "LOCAL_CA_DIR": str(tmp_path / "ca"),
        "PYTHONPROFILEIMPORTTIME": "1",
    }


def test_local_mode_without_pods_loads_no_grpc_and_no_protobuf(tmp_path: Path) -> None:
    env = {**local_env(tmp_path), "INPOD_ENABLED": "false"}
    with run_daemon(env, log_dir=tmp_path, wait="ready") as d:
        assert d.config_dump()["workloads"]  # the local config was loaded and is served
        assert http(d.stats + "/metrics").status == 200
        modules = imported(d.log())
    assert not modules & set(ISTIOD_ONLY)
    # Nothing else in this mode speaks protobuf either: ZDS (the pods' agent) is off.
    assert "google.protobuf" not in modules
    assert "ztunnel_py.redirect.zds" not in modules
    assert "dns" not in modules  # dnspython: the DNS proxy's, loaded with the first pod


def test_local_mode_with_the_cni_agent_loads_zds_but_no_grpc(tmp_path: Path) -> None:
    # No agent listens on the socket: the daemon keeps retrying, its ports are open.
    env = {
        **local_env(tmp_path),
        "REDIRECT_MODE": "iptables",  # nothing installed on the host either way
        "INPOD_UDS": str(tmp_path / "no-agent.sock"),
    }
    with run_daemon(env, log_dir=tmp_path, wait="listening") as d:
        assert http(d.ready_url).status == 503  # waiting for the istio-cni node agent
        modules = imported(d.log())
    assert "ztunnel_py.redirect.zds" in modules
    assert not modules & set(ISTIOD_ONLY)
    # The DNS proxy is on (the default) but no pod came yet: dnspython is not loaded.
    assert "ztunnel_py.dns.proxy" in modules
    assert not {"dns", "dns.message", "ztunnel_py.dns.server"} & modules


def test_istiod_mode_loads_the_grpc_clients(tmp_path: Path) -> None:
    # Unreachable istiod for both xDS and the CA: the clients are built, the state never comes.
    address = f"https://127.0.0.1:{free_port()}"
    env = {
        "XDS_ADDRESS": address,
        "CA_ADDRESS": address,
        "INPOD_ENABLED": "false",
        "PYTHONPROFILEIMPORTTIME": "1",
    }
    with run_daemon(env, log_dir=tmp_path, wait="listening") as d:
        modules = imported(d.log())
    assert {
        "grpc",
        "ztunnel_py.xds.client",
        "ztunnel_py.identity.istiod_ca",
        "envoy.service.discovery.v3",
    } <= modules
