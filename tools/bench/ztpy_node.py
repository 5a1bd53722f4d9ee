"""One ztunnel-py node proxy serving one pod, for the benchmark (run as root).

Composes the proxy servers (``ztunnel_py.proxy.pod.start_pod_proxy``) the way in-pod mode does:
the pod's :15001/:15006/:15008 listeners are created inside the pod's network namespace,
upstream sockets too (marked 0x539), original destinations come from SO_ORIGINAL_DST (iptables
REDIRECT in the pod), and the mesh state is a fixed two-workload local config. Certificates
come from PEM files written by ``run.py`` (one test CA). This stands in for the daemon until
``app.py`` composes the same servers.

    python tools/bench/ztpy_node.py --netns NS --ip 10.0.0.1 --sa client \
        --peer-ip 10.0.0.2 --peer-sa server --pki DIR --ready FILE
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import random
import signal
import socket
from pathlib import Path

import uvloop

from ztunnel_py.config import Config, RootCert, RootCertKind
from ztunnel_py.hbone.connection import HboneSettings, Role
from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.proxy.memory import tune_malloc
from ztunnel_py.proxy.outbound import HboneConnector
from ztunnel_py.proxy.pod import start_pod_proxy
from ztunnel_py.proxy.pool import HbonePool
from ztunnel_py.proxy.seams import FetchedCertificates
from ztunnel_py.proxy.sockopt import PodSocketFactory, SoOriginalDst
from ztunnel_py.redirect.netns import run_in_netns
from ztunnel_py.state.model import InboundProtocol, Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch


def workload(name: str, ip: str) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/default/{name}",
        name=name,
        namespace="default",
        service_account=name,
        workload_ips=(ipaddress.ip_address(ip),),
        protocol=InboundProtocol.HBONE,
    )


def listeners(netns_fd: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    def make() -> list[socket.socket]:
        out = []
        for port in (15001, 15006, 15008):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
            s.bind(("0.0.0.0", port))
            s.listen(4096)
            s.setblocking(False)
            out.append(s)
        return out

    a, b, c = run_in_netns(netns_fd, make)
    return a, b, c


async def main(args: argparse.Namespace) -> None:
    root = RootCert(RootCertKind.FILE, str(Path(args.pki) / "root.pem"))
    config = Config(xds_address=None, ca_address=None, xds_root_cert=root, ca_root_cert=root)
    me = workload(args.sa, args.ip)
    peer = workload(args.peer_sa, args.peer_ip)
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(me, peer)))
    pki = Path(args.pki)
    identity = Identity("cluster.local", "default", args.sa)
    cert = WorkloadCertificate.from_ca_response(
        identity,
        (pki / f"{args.sa}-key.pem").read_bytes(),
        [(pki / f"{args.sa}.pem").read_text(), (pki / "root.pem").read_text()],
    )

    async def fetch(wanted: Identity) -> WorkloadCertificate:
        if wanted != identity:
            raise LookupError(f"this benchmark node only has a certificate for {identity}")
        return cert

    certs = FetchedCertificates(fetch)
    netns_fd = os.open(f"/run/netns/{args.netns}", os.O_RDONLY)
    sockets = PodSocketFactory(config, netns_fd)
    pool = HbonePool(
        HboneConnector(
            certificates=certs,
            sockets=sockets,
            settings=HboneSettings.for_role(Role.CLIENT, config),
        )
    )
    proxy = await start_pod_proxy(
        workload=me,
        listeners=listeners(netns_fd),
        state=state,
        config=config,
        certificates=certs,
        pool=pool,
        sockets=sockets,
        original_destination=SoOriginalDst(),
        rng=random.Random(),
    )
    Path(args.ready).write_text(str(os.getpid()))  # noqa: ASYNC240 (once, at start)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.stop(1.0)
    await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--netns", "--ip", "--sa", "--peer-ip", "--peer-sa", "--pki", "--ready"):
        parser.add_argument(flag, required=True)
    tune_malloc()
    uvloop.run(main(parser.parse_args()))
