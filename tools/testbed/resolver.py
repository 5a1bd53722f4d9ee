"""An upstream DNS resolver for a testbed: Debian's dnsmasq in a namespace of its own.

It plays the cluster's DNS service (what the node's resolv.conf names): netns
``zttb-<tag>-dns`` is plugged into the testbed fabric at ``RESOLVER_IP`` with routes to every
node's pod subnet, so any pod reaches it through its node. dnsmasq answers only from the zone
it is given (``--local``: other names under those zones are NXDOMAIN, nothing is recursed
anywhere) and logs every query with its source address. The testbed's ``down()`` removes the
namespace with everything else under its prefix.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
from pyroute2 import NetNS, netns

from tools.testbed.plan import TestbedPlan

RESOLVER_IP = "192.168.244.250"
UNUSED_IP = "192.168.244.251"  # on the fabric, owned by nobody: queries there go unanswered
_START_TIMEOUT_S = 10.0


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it gets SIGTERM when the thread that spawns it dies: a SIGKILLed demo
    or test run then leaves no dnsmasq behind (util-linux's setpriv sets the parent-death signal,
    which survives the exec into ``ip netns exec`` and dnsmasq). Spawn it from the main thread:
    the signal follows the spawning thread, not the process."""
    return ["setpriv", "--pdeathsig", "TERM", "--", *argv]


class UpstreamResolver:
    def __init__(
        self,
        plan: TestbedPlan,
        work_dir: Path,
        records: Mapping[str, Sequence[str]],
        *,
        zones: Sequence[str] = ("example.test", "cluster.local"),
        udp_max: int | None = None,
    ) -> None:
        """``records``: name -> addresses; ``udp_max``: truncate UDP answers at this size."""
        self.plan = plan
        self.work_dir = work_dir
        self.records = records
        self.zones = zones
        self.udp_max = udp_max
        self.netns = f"{plan.prefix}dns"
        self.log_path = work_dir / "dnsmasq.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ namespace

    def up(self) -> None:
        if shutil.which("dnsmasq") is None:
            raise RuntimeError("dnsmasq not found: apt-get install dnsmasq-base (tools/setup.sh)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        netns.create(self.netns)
        node0 = self.plan.nodes[0]
        with NetNS(self.plan.fabric_netns) as fab:
            fab.link(
                "add", ifname="dns0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.netns}
            )
            idx = fab.link_lookup(ifname="dns0")[0]
            fab.link("set", index=idx, master=fab.link_lookup(ifname="br0")[0])
            fab.link("set", index=idx, state="up")
        with NetNS(self.netns) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=RESOLVER_IP, prefixlen=node0.fabric_prefixlen)
            ns.link("set", index=eth0, state="up")
            for node in self.plan.nodes:
                ns.route("add", dst=node.pod_cidr, gateway=node.fabric_ip)
        self.start_server()

    def down(self) -> None:
        self.stop_server()
        with contextlib.suppress(OSError):
            netns.remove(self.netns)

    # ------------------------------------------------------------------ dnsmasq

    def start_server(self) -> None:
        hosts = self.work_dir / "hosts"
        hosts.write_text(
            "".join(f"{ip} {name}\n" for name, ips in self.records.items() for ip in ips)
        )
        argv = [
            "ip", "netns", "exec", self.netns,
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", f"--addn-hosts={hosts}", f"--listen-address={RESOLVER_IP}",
            "--bind-interfaces", "--user=root", "--group=root", "--pid-file=",
            "--log-queries=extra", f"--log-facility={self.log_path}", "--cache-size=0",
            *(f"--local=/{zone}/" for zone in self.zones),
        ]  # fmt: skip
        if self.udp_max is not None:
            argv.append(f"--edns-packet-max={self.udp_max}")
        stderr = self.work_dir / "dnsmasq.stderr"
        with stderr.open("wb") as err:
            on_main = threading.current_thread() is threading.main_thread()
            self._proc = subprocess.Popen(
                die_with_parent(argv) if on_main else argv,
                stdin=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop_server()
                raise RuntimeError(f"dnsmasq did not start: {stderr.read_text().strip()}")
            time.sleep(0.05)

    def stop_server(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def _answers(self) -> bool:
        """Whether dnsmasq answers yet (asked from inside its own namespace)."""
        from ztunnel_py.netns import run_in_netns

        fd = open(f"/run/netns/{self.netns}", "rb")  # noqa: SIM115 (closed below)
        try:
            query = dns.message.make_query(f"probe.{self.zones[0]}", "A")
            run_in_netns(fd.fileno(), lambda: dns.query.udp(query, RESOLVER_IP, timeout=0.2))
        except (dns.exception.Timeout, OSError):
            return False
        finally:
            fd.close()
        return True

    def queries(self) -> list[str]:
        """dnsmasq's ``query[...]`` log lines so far (``query[A] name from <source ip>``)."""
        if not self.log_path.exists():
            return []
        return [line for line in self.log_path.read_text().splitlines() if "query[" in line]


def write_resolv_conf(
    path: Path, nameservers: Sequence[str], *, timeout_s: int = 2, attempts: int = 1
) -> Path:
    path.write_text(
        "".join(f"nameserver {ns}\n" for ns in nameservers)
        + "search example.test\n"
        + f"options timeout:{timeout_s} attempts:{attempts}\n"
    )
    return path
