"""Dedicated mode: the real daemon serves DNS on ``DNS_PROXY_ADDR`` in its own netns (root).

The daemon runs inside a namespace of its own, as a dedicated ztunnel runs beside its
workload; dnsmasq there plays the node's resolver (resolv.conf, whose ``search`` path is the
client's in dedicated mode).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
import yaml

from ztunnel_py.testing.daemon import run_daemon
from ztunnel_py.testing.netns import Netns, NetnsPool
from ztunnel_py.testing.poll import wait_until
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root]

VM_IP = "10.99.0.1"
PROXY_ADDR = ("127.0.0.1", 16053)
CONFIG = {
    "workloads": [
        {
            "uid": "vm-0",
            "name": "vm-0",
            "namespace": "ns1",
            "serviceAccount": "vm",
            "workloadIps": [VM_IP],
            "protocol": "HBONE",
            "canonicalName": "vm",
            "canonicalRevision": "v1",
        }
    ],
    "services": [
        {
            "name": "web",
            "namespace": "ns1",
            "hostname": "web.ns1.svc.cluster.local",
            "vips": ["/10.96.0.7"],
            "ports": {80: 8080},
        },
        {
            "name": "google",
            "namespace": "ns1",
            "hostname": "www.google.com",
            "vips": ["/240.240.0.1"],
            "ports": {443: 443},
        },
    ],
}


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Netns]:
    require(shutil.which("dnsmasq") is not None, "dnsmasq (apt-get install dnsmasq-base)")
    with NetnsPool() as pool:
        ns = pool.netns("vm")
        ns.sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        ns.sh("ip", "addr", "add", f"{VM_IP}/24", "dev", "eth0")
        ns.sh("ip", "link", "set", "eth0", "up")
        dnsmasq = ns.popen(
            ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
             "--no-hosts", "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root",
             "--group=root", "--pid-file=", "--local=/corp.example/",
             "--host-record=db.corp.example,192.0.2.7"],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            yield ns
        finally:
            dnsmasq.terminate()
            dnsmasq.wait(timeout=10)


def ask(ns: Netns, name: str) -> dns.message.Message | None:
    query = dns.message.make_query(name, "A")
    try:
        return ns.run(lambda: dns.query.udp(query, PROXY_ADDR[0], port=PROXY_ADDR[1], timeout=2))
    except (dns.exception.Timeout, OSError):
        return None


def test_dedicated_mode_serves_dns_on_dns_proxy_addr(vm: Netns, tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(CONFIG))
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\nsearch corp.example\n")
    env = {
        "PROXY_MODE": "dedicated",
        "PROXY_WORKLOAD_INFO": "ns1/vm-0/vm",
        "LOCAL_XDS_PATH": str(tmp_path / "mesh.yaml"),
        "LOCAL_CA_DIR": str(tmp_path / "ca"),
        "REDIRECT_MODE": "iptables",
        "DNS_RESOLV_CONF": str(tmp_path / "resolv.conf"),
        "ISTIO_META_DNS_PROXY_ADDR": f"{PROXY_ADDR[0]}:{PROXY_ADDR[1]}",
    }
    with run_daemon(env, log_dir=tmp_path / "logs", netns=vm.name, wait="none") as daemon:
        wait_until(
            lambda: ask(vm, "web.ns1.svc.cluster.local.") is not None or daemon.proc.poll(),
            "the dedicated DNS proxy to answer",
        )
        assert daemon.proc.poll() is None, daemon.log()

        reply = ask(vm, "web.ns1.svc.cluster.local.")
        assert reply is not None and reply.answer[0][0].address == "10.96.0.7"
        # The node's search path (resolv.conf) is the client's in dedicated mode.
        reply = ask(vm, "www.google.com.corp.example.")
        assert reply is not None
        assert [(r.rdtype, r[0].to_text()) for r in reply.answer] == [
            (dns.rdatatype.CNAME, "www.google.com."),
            (dns.rdatatype.A, "240.240.0.1"),
        ]
        # Everything else goes to the node's resolver.
        reply = ask(vm, "db.corp.example.")
        assert reply is not None and reply.answer[0][0].address == "192.0.2.7"
        reply = ask(vm, "nope.corp.example.")
        assert reply is not None and reply.rcode() == dns.rcode.NXDOMAIN
