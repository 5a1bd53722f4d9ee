"""The daemon process configured for istiod: xDS over TLS with a token, certificates from the CA."""

from __future__ import annotations

from pathlib import Path

from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.testing.daemon import http, run_daemon
from ztunnel_py.testing.istiod_thread import BackgroundIstiod
from ztunnel_py.testing.poll import eventually

ROOT = Path(__file__).resolve().parents[2]
MESH = (ROOT / "examples/localhost.yaml").read_text()


def istiod_env(istiod: BackgroundIstiod, tmp_path: Path) -> dict[str, str]:
    token = tmp_path / "istio-token"
    token.write_text("good-token")
    return {
        "XDS_ADDRESS": istiod.address,
        "CA_ADDRESS": istiod.address,
        "XDS_ROOT_CA": istiod.root_pem.decode(),
        "CA_ROOT_CA": istiod.root_pem.decode(),
        "AUTH_TOKEN": str(token),
        "NODE_NAME": "local",
        "CLUSTER_ID": "cluster1",
        "INPOD_ENABLED": "false",
    }


def test_daemon_syncs_from_istiod_and_gets_certificates_from_its_ca(tmp_path: Path) -> None:
    with BackgroundIstiod(config_yaml=MESH, token="good-token") as istiod:
        env = istiod_env(istiod, tmp_path)
        with run_daemon(env, log_dir=tmp_path, wait="ready") as d:
            dump = d.config_dump()
            assert {w["name"] for w in dump["workloads"]} == {"local", "local-tcp"}
            assert dump["xds"]  # the xDS session's view: held versions per type
            (cert,) = dump["certificates"]
            assert cert["identity"] == "spiffe://cluster.local/ns/default/sa/default"
            assert cert["state"] == "Available"
            # The CA was asked with the token, the cluster id and impersonation metadata.
            (request, *_) = istiod.ca.requests
            assert request.impersonated_identity == "spiffe://cluster.local/ns/default/sa/default"

            # An incremental push reaches the running daemon.
            extra = Workload(uid="cluster1//v1/Pod/default/late", name="late", namespace="default")
            fake, loop = istiod.istiod, istiod.loop
            assert fake is not None and loop is not None
            loop.call(lambda: fake.push(UpdateBatch(workloads=(extra,))))

            def pushed() -> None:
                names = {w["name"] for w in d.config_dump()["workloads"]}
                assert names == {"local", "local-tcp", "late"}

            eventually(pushed)
            metrics = http(d.stats + "/metrics").text
            assert "istio_xds_message_total" in metrics

            # /debug/xds: the stream and, per type, what was last ACKed; no token anywhere.
            view = http(d.admin + "/debug/xds").json()
            assert view["source"] == "istiod" and view["connected"] is True
            assert view["address"] == istiod.address
            for state in view["types"].values():
                assert state["acked"] is True and state["lastAck"]["nonce"]
                assert state["lastNack"] is None
            everything = http(d.admin + "/debug/dump").text
            assert "good-token" not in everything and "PRIVATE KEY" not in everything


def test_wrong_token_keeps_the_daemon_up_and_not_ready(tmp_path: Path) -> None:
    with BackgroundIstiod(config_yaml=MESH, token="good-token") as istiod:
        env = istiod_env(istiod, tmp_path)
        (tmp_path / "istio-token").write_text("stale-token")
        with run_daemon(env, log_dir=tmp_path) as d:

            def complains() -> None:
                assert "AUTH_TOKEN" in d.log()

            eventually(complains)
            reply = http(d.ready_url)
            assert reply.status == 503 and "state manager" in reply.text
            assert d.proc.poll() is None
            # Fixing the token file is enough: it is re-read on every call.
            (tmp_path / "istio-token").write_text("good-token")
            d.wait_ready()
