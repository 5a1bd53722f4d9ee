"""Composition of the data plane: redirection (eBPF or iptables), enrolled pods, their proxies.

Part of the composition root (``app.py`` builds one ``DataPlane``): it picks the redirect mode,
loads the BPF programs when eBPF is used, runs the ZDS client that enrolls pods (or, in
dedicated mode, enrolls the daemon's own namespace), and starts one ``PodProxy`` per pod from
one ``ProxyInputs`` (certificates, original destinations, telemetry, live policy
re-evaluation) and the pod's own ``PodInputs`` (workload, netns sockets, pool, authorizer).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from ztunnel_py.bpf.errors import BpfError  # plain exceptions: no libbpf behind them
from ztunnel_py.config import (
    KERNEL_SPLICE_ENV,
    PORT_INBOUND_PLAINTEXT,
    Config,
    ProxyMode,
    RedirectMode,
    WorkloadInfo,
)
from ztunnel_py.dns.proxy import DnsProxyStarter, pod_forwarder, read_resolv_conf
from ztunnel_py.dns.resolvconf import ResolvConf
from ztunnel_py.dns.telemetry import DnsMetrics, OnDemandDnsMetrics
from ztunnel_py.errors import UnsupportedFeature, ZtunnelError
from ztunnel_py.identity.mtls_health import MtlsHealth
from ztunnel_py.proxy.certificates import CertificateSource
from ztunnel_py.proxy.coexist import KernelMapThenConntrack, LocalAddressUnlessRedirected
from ztunnel_py.proxy.conntrack import ConnectionTracker
from ztunnel_py.proxy.inputs import Demand, HostnameResolver, PodInputs, ProxyInputs
from ztunnel_py.proxy.kernel_splice import KernelSplicer
from ztunnel_py.proxy.memory import trim_heap
from ztunnel_py.proxy.pod import PodProxy, pod_pool, start_pod_proxy
from ztunnel_py.proxy.pool import HbonePool
from ztunnel_py.proxy.revocation import CrlManager
from ztunnel_py.proxy.self_listener import SelfListener, self_listener_wanted
from ztunnel_py.proxy.sockets import OriginalDestination, SpoofedSources
from ztunnel_py.proxy.sockopt import PodSocketFactory, SoOriginalDst
from ztunnel_py.readiness import Readiness
from ztunnel_py.redirect.listeners import PodListeners
from ztunnel_py.redirect.origsrc import OrigSrcRoutes
from ztunnel_py.redirect.workloads import (
    EnrolledPod,
    EnrollmentListener,
    PodProxyFactory,
    WorkloadManager,
)
from ztunnel_py.state.hub import StateHub
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ChangeSet
from ztunnel_py.telemetry.connections import TelemetrySink

if TYPE_CHECKING:  # the BPF modules load libbpf: imported only when eBPF mode is used
    from ztunnel_py.bpf.loader import BpfLoader
    from ztunnel_py.bpf.reconcile import MapSync
    from ztunnel_py.dns.server import DnsServer  # dnspython: loaded with the first pod
    from ztunnel_py.redirect.zds import ZdsClient  # protobuf: only when pods come over ZDS

log = logging.getLogger(__name__)

READY_WORKLOADS = "workload proxy manager"
DEDICATED_UID = "dedicated"


@dataclass(slots=True)
class _PodHandle:
    proxy: PodProxy
    pool: HbonePool
    dns: DnsServer | None = None
    on_stop: Callable[[], object] = lambda: None

    async def stop(self, deadline_s: float) -> None:
        self.on_stop()
        if self.dns is not None:
            await self.dns.stop()
        await self.proxy.stop(deadline_s)
        await self.pool.close()


class PodProxyStarter:
    """The workload manager's ``PodProxyFactory``: one proxy (and HBONE pool) per pod, and
    the pod's DNS proxy when it is on."""

    def __init__(
        self,
        inputs: ProxyInputs,
        *,
        dns: DnsProxyStarter | None = None,
        hostnames: Callable[[int], HostnameResolver] | None = None,
    ) -> None:
        self._inputs = inputs
        self._dns = dns
        self._hostnames = hostnames  # on-demand DNS, per pod netns
        self.pools: dict[str, HbonePool] = {}  # pod uid -> its pool, while the pod is up

    async def start(self, pod: EnrolledPod, listeners: PodListeners) -> _PodHandle:
        if pod.workload is None:
            raise ZtunnelError(f"pod {pod.uid} has no xDS workload yet")
        dns = await self.start_dns(pod.netns_fd, pod.workload.uid)
        try:
            return await self._start_proxy(pod, pod.workload, listeners, dns)
        except BaseException:
            if dns is not None:
                await dns.stop()
            raise

    async def start_dns(self, netns_fd: int, uid: str) -> DnsServer | None:
        """The pod's DNS proxy, inside its netns (``ISTIO_META_DNS_CAPTURE=false``: none)."""
        if self._dns is None:
            return None
        state = self._inputs.state
        return await self._dns.start(netns_fd, lambda: state.workload(uid))

    async def _start_proxy(
        self, pod: EnrolledPod, workload: Workload, listeners: PodListeners, dns: DnsServer | None
    ) -> _PodHandle:
        inputs = self._inputs
        sockets = PodSocketFactory(inputs.config, pod.netns_fd, spoofed=inputs.spoofed_sources)
        pool = pod_pool(inputs, sockets)
        pod_inputs = PodInputs(
            workload=workload,
            sockets=sockets,
            pool=pool,
            authorizer=inputs.authorizer_for(workload),
            hostnames=self._hostnames(pod.netns_fd) if self._hostnames else None,
        )
        proxy = await start_pod_proxy(inputs, pod_inputs, listeners.sockets())
        self.pools[pod.uid] = pool
        return _PodHandle(proxy, pool, dns, on_stop=lambda: self.pools.pop(pod.uid, None))


class DataPlane:
    def __init__(
        self,
        *,
        config: Config,
        hub: StateHub,
        certificates: CertificateSource,
        registry: CollectorRegistry,
        readiness: Readiness,
        telemetry: TelemetrySink,
        rng: random.Random,
        spawn: Callable[[str, Coroutine[Any, Any, None]], None],
    ) -> None:
        self.config = config
        self.hub = hub
        self.registry = registry
        self.readiness = readiness
        self.spawn = spawn
        self.conntrack = ConnectionTracker()
        self.mtls_health = MtlsHealth(readiness)
        self.redirect_mode: RedirectMode | None = None
        self.bpf: BpfLoader | None = None
        self.bpf_sync: MapSync | None = None
        self.manager: WorkloadManager | None = None
        self.zds: ZdsClient | None = None
        self.starter: PodProxyStarter | None = None
        self.self_listener: SelfListener | None = None  # ztunnel's own HBONE listener
        self.kernel_splice: KernelSplicer | None = None
        # XDS_ON_DEMAND: the xDS client's lookup, set by the composition root before start().
        self.demand: Demand | None = None
        # CRL_PATH: the revocation check of every handshake, set by the composition root.
        self.revocation: CrlManager | None = None
        # Multi-worker mode: pods are served by worker processes (set before start()).
        self.serve_elsewhere: Callable[[PodProxyStarter], PodProxyFactory] | None = None
        # Live connections and HBONE pools as the views show them (the workers' in that mode).
        self.connection_views: Callable[[], dict[str, Any]] = self.conntrack.dump
        self.pool_views: Callable[[], dict[str, Any]] = self._pool_dumps
        self._certificates = certificates
        self._telemetry = telemetry
        self._rng = rng
        hub.subscribe("policy re-evaluation", self._policies_changed)

    @property
    def enabled(self) -> bool:
        """In-pod mode (ZDS) or dedicated mode; with neither the daemon serves no traffic."""
        return self.config.inpod_enabled or self.config.proxy_mode is ProxyMode.DEDICATED

    def _policies_changed(self, changes: ChangeSet) -> None:
        if changes.policies_changed:
            self.conntrack.on_policy_change(self.hub.state)

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        if not self.enabled:
            log.warning(
                "INPOD_ENABLED=false and PROXY_MODE=shared: no pod will be served"
                " (set PROXY_MODE=dedicated with PROXY_WORKLOAD_INFO to proxy this namespace)"
            )
            return
        resolv_conf = read_resolv_conf(self.config.dns_resolv_conf)
        dns = self._dns_starter(resolv_conf)
        listeners: list[EnrollmentListener] = []
        # iptables REDIRECT: SO_ORIGINAL_DST on both capture ports.
        original_destination: OriginalDestination = SoOriginalDst()
        inbound_original_destination: OriginalDestination | None = SoOriginalDst()
        spoofed_sources: SpoofedSources | None = None
        self.redirect_mode = self._choose_redirect_mode()
        if self.redirect_mode is RedirectMode.EBPF:
            try:
                loader, enrollment = self._start_bpf()
            except (UnsupportedFeature, BpfError) as e:
                if self.config.redirect_mode is RedirectMode.EBPF:
                    raise  # asked for explicitly: the operator must see why it cannot run
                log.warning("eBPF redirection is not available (%s); using iptables mode", e)
                self.redirect_mode = RedirectMode.IPTABLES
            else:
                listeners.append(enrollment)
                # istio-cni's in-pod REDIRECT rules may still be installed: what they catch
                # has its destination in conntrack (proxy/coexist.py).
                original_destination = KernelMapThenConntrack(loader.original_destinations())
                inbound_original_destination = LocalAddressUnlessRedirected(PORT_INBOUND_PLAINTEXT)
                if self.config.enable_orig_src:
                    # No istio-cni rules to lean on: the daemon routes replies itself and
                    # keeps sk_lookup off its own spoofed connections.
                    spoofed_sources = loader.spoofed_sources()
                    listeners.append(OrigSrcRoutes(self.config))
        if self.serve_elsewhere is None:  # else each worker process splices its own
            self.kernel_splice = start_kernel_splice(self.config)
        inputs = self.proxy_inputs(
            original_destination, inbound_original_destination, spoofed_sources
        )
        if self_listener_wanted(self.config):
            self.self_listener = SelfListener(inputs, self.spawn)
            self.hub.subscribe("self HBONE listener", self.self_listener.state_changed)
            self.self_listener.state_changed()
        starter = self.starter = PodProxyStarter(
            inputs, dns=dns, hostnames=self._on_demand_dns(resolv_conf)
        )
        pods: PodProxyFactory = (
            starter if self.serve_elsewhere is None else self.serve_elsewhere(starter)
        )
        self.manager = WorkloadManager.from_config(
            self.config, self.hub.state, pods, self.registry, listeners=listeners
        )
        if self.demand is not None:
            self.manager.demand_workload = self._demand_workload
        self.hub.subscribe("workload manager", self.manager.state_changed)
        if self.config.proxy_mode is ProxyMode.DEDICATED:
            self.spawn("dedicated proxy", self._enroll_own_namespace())
        else:
            from ztunnel_py.redirect.zds import ZdsClient

            self.readiness.block(READY_WORKLOADS, "waiting for the istio-cni node agent")
            self.zds = ZdsClient(self.config.inpod_uds, self.manager, on_ready=self._zds_ready)
            self.spawn("zds", self.zds.run())

    def proxy_inputs(
        self,
        original_destination: OriginalDestination,
        inbound_original_destination: OriginalDestination | None,
        spoofed_sources: SpoofedSources | None = None,
    ) -> ProxyInputs:
        """What every pod's proxy is built from (``ProxyInputs``), for this daemon's state."""
        splicer = self.kernel_splice
        return ProxyInputs(
            config=self.config,
            state=self.hub.state,
            certificates=self._certificates,
            original_destination=original_destination,
            inbound_original_destination=inbound_original_destination,
            telemetry=self._telemetry,
            conntrack=self.conntrack,
            rng=self._rng,
            demand=self.demand,
            handshakes=self.mtls_health,
            revocation=self.revocation,
            spoofed_sources=spoofed_sources,
            kernel_splice=splicer if splicer is not None and splicer.enabled else None,
        )

    def start_worker(
        self, redirect_mode: RedirectMode, orig_dst_map_fd: int | None
    ) -> PodProxyStarter:
        """A worker process's data plane: pods come from the control plane with their
        listeners, so no redirection, BPF loading or enrolment here; only the proxies (DNS
        stays with the control plane). ``orig_dst_map_fd``: the BPF original-destination
        map, in eBPF mode."""
        self.redirect_mode = redirect_mode
        original_destination: OriginalDestination = SoOriginalDst()
        inbound_original_destination: OriginalDestination | None = SoOriginalDst()
        if orig_dst_map_fd is not None:
            from ztunnel_py.bpf import _types
            from ztunnel_py.bpf.maps import LibbpfMap
            from ztunnel_py.bpf.origdst import BpfOriginalDestination

            kernel = BpfOriginalDestination(LibbpfMap(_types.MAP_ORIG_DST, orig_dst_map_fd))
            original_destination = KernelMapThenConntrack(kernel)
            inbound_original_destination = LocalAddressUnlessRedirected(PORT_INBOUND_PLAINTEXT)
        resolv_conf = read_resolv_conf(self.config.dns_resolv_conf)
        # A worker's outbound and inbound sides pair up only within the worker: it splices.
        self.kernel_splice = start_kernel_splice(self.config)
        self.starter = PodProxyStarter(
            self.proxy_inputs(original_destination, inbound_original_destination),
            hostnames=self._on_demand_dns(resolv_conf),
        )
        return self.starter

    def _on_demand_dns(self, conf: ResolvConf) -> Callable[[int], HostnameResolver]:
        """ztunnel's on-demand DNS for hostname-only workloads, asked from each pod."""
        metrics = OnDemandDnsMetrics(self.registry)
        config, rng = self.config, self._rng

        def for_pod(netns_fd: int) -> HostnameResolver:
            # dnspython (2.2 MiB) loads with the first pod, not at idle.
            from ztunnel_py.dns.ondemand import OnDemandResolver

            return OnDemandResolver(
                pod_forwarder(config, conf, netns_fd),
                metrics=metrics,
                ipv6_enabled=config.ipv6_enabled,
                rng=rng,
            )

        return for_pod

    def _dns_starter(self, conf: ResolvConf) -> DnsProxyStarter | None:
        if not self.config.dns_proxy:
            log.info(
                "DNS proxy off (ISTIO_META_DNS_CAPTURE=false): if istio-cni still captures DNS"
                " (ambient.dnsCapture), enrolled pods cannot resolve names"
            )
            return None
        log.info(
            "DNS proxy on %s in every pod, forwarding to %s",
            self.config.dns_proxy_addr,
            ", ".join(f"{ip}:{port}" for ip, port in conf.nameservers),
        )
        return DnsProxyStarter(
            self.config,
            self.hub.state,
            metrics=DnsMetrics(self.registry),
            resolv_conf=conf,
            rng=self._rng,
        )

    def _demand_workload(self, info: WorkloadInfo) -> None:
        """A pod whose workload istiod has not sent (on-demand mode): ask for it by uid."""
        assert self.demand is not None
        uid = f"{self.config.cluster_id}//Pod/{info.namespace}/{info.name}"
        self.spawn(f"on-demand {uid}", self.demand(uid))

    def _choose_redirect_mode(self) -> RedirectMode:
        mode = self.config.redirect_mode
        if mode is not None:
            return mode
        try:
            self._bpf_cgroup()
        except UnsupportedFeature as e:
            log.warning("eBPF redirection is not available (%s); using iptables mode", e)
            return RedirectMode.IPTABLES
        return RedirectMode.EBPF

    def _bpf_cgroup(self) -> Path:
        from ztunnel_py.bpf.mounts import find_pods_cgroup

        path = self.config.bpf_cgroup_path or find_pods_cgroup()
        if path is None:
            raise UnsupportedFeature(
                "pods cgroup", "no kubepods cgroup on a cgroup v2 mount; set BPF_CGROUP_PATH"
            )
        return path

    def _start_bpf(self) -> tuple[BpfLoader, EnrollmentListener]:
        from ztunnel_py.bpf.enrollment import BpfEnrollment
        from ztunnel_py.bpf.loader import BpfLoader
        from ztunnel_py.bpf.metrics import BpfMetrics
        from ztunnel_py.bpf.reconcile import MapSync, Reconciler

        cgroup_path = self._bpf_cgroup()
        loader = BpfLoader.from_config(self.config, cgroup_path=cgroup_path)
        loader.start()  # probes the kernel; UnsupportedFeature names what is missing
        self.bpf = loader
        sync = MapSync(self.hub.state, Reconciler(loader.maps), network=self.config.network)
        sync.reconciler.resync()
        # Pods the previous daemon enrolled stay captured until the agent's snapshot.
        if sync.inherit():
            log.info("keeping %d pods of the previous daemon captured", len(sync.inherited))
        self.bpf_sync = sync
        enrollment = BpfEnrollment(loader, sync)
        self.hub.subscribe("bpf maps", enrollment.state_changed)
        BpfMetrics(self.registry, loader.read_counters)
        log.info("eBPF redirection attached at %s", cgroup_path)
        return loader, enrollment

    async def _enroll_own_namespace(self) -> None:
        info = self.config.proxy_workload_info
        assert info is not None and self.manager is not None
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        await self.manager.enroll(DEDICATED_UID, info, fd)

    def _zds_ready(self, ready: bool) -> None:
        if not ready:
            self.readiness.block(READY_WORKLOADS, "waiting for the istio-cni node agent")
            return
        self.readiness.release(READY_WORKLOADS)
        if self.bpf is not None and self.manager is not None:
            held = self.manager.pods()
            # Pods deleted while we were away still have pinned sk_lookup links: drop them.
            pruned = self.bpf.pods.prune(held.keys())
            if pruned:
                log.info("removed the BPF links of %d pods that are gone", len(pruned))
            self._release_inherited({pod.netns_cookie for pod in held.values()})

    def _release_inherited(self, held_cookies: set[int]) -> None:
        """After a snapshot: the previous daemon's pods that the agent did not name go."""
        from ztunnel_py.bpf.reconcile import ReconcileError

        if self.bpf_sync is None or not self.bpf_sync.inherited:
            return
        try:
            self.bpf_sync.release_inherited(held_cookies)
        except ReconcileError as e:
            log.error("bpf maps are incomplete after dropping pods that are gone: %s", e)

    def orig_dst_map_fd(self) -> int | None:
        """The BPF original-destination map (eBPF mode), for the worker processes."""
        if self.bpf is None:
            return None
        from ztunnel_py.bpf import _types

        return self.bpf.maps[_types.MAP_ORIG_DST].fd

    # ------------------------------------------------------------------ admin and stop

    def dump(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "redirectMode": self.redirect_mode.value if self.redirect_mode else None,
        }
        if self.bpf is not None:
            out["bpf"] = self.bpf.dump()
        if self.self_listener is not None:
            out["selfListener"] = self.self_listener.dump()
        return out

    def workload_state(self) -> dict[str, Any]:
        """ztunnel's ``workloadState``: a pod that is up lists its live connections."""
        if self.manager is None:
            return {}
        out = self.manager.dump()
        connections = self.connection_views()
        for uid, pod in self.manager.pods().items():
            entry = out.get(uid)
            if entry is not None and entry["state"] == "Up" and pod.workload is not None:
                none: dict[str, list[Any]] = {"inbound": [], "outbound": []}
                entry["connections"] = connections.get(pod.workload.uid, none)
        return out

    def debug_pods(self) -> list[dict[str, Any]]:
        """Enrolled pods as the debug views show them."""
        if self.manager is None:
            return []
        return [
            {
                "uid": uid,
                "name": pod.info.name,
                "namespace": pod.info.namespace,
                "serviceAccount": pod.info.service_account,
                "state": state.value if (state := self.manager.pod_state(uid)) else None,
                "workload": pod.workload.uid if pod.workload is not None else None,
                "ips": [str(ip) for ip in pod.ips],
                "netnsInode": pod.netns_inode,
                "netnsCookie": pod.netns_cookie or None,
            }
            for uid, pod in sorted(self.manager.pods().items())
        ]

    def debug_connections(self) -> dict[str, Any]:
        """Live connections per workload uid, and each pod's HBONE pool."""
        return {"byWorkload": self.connection_views(), "pools": self.pool_views()}

    def _pool_dumps(self) -> dict[str, Any]:
        pools = self.starter.pools if self.starter is not None else {}
        return {uid: pool.dump() for uid, pool in sorted(pools.items())}

    def debug_listeners(self) -> list[dict[str, Any]]:
        """Every up pod's proxy ports, inside its network namespace."""
        pools = self.starter.pools if self.starter is not None else {}
        if self.manager is None:
            return []
        pods = self.manager.pods()
        return [
            {
                "pod": uid,
                "ips": [str(ip) for ip in pods[uid].ips],
                "outbound": 15001,
                "inboundPlaintext": 15006,
                "inboundHbone": 15008,
            }
            for uid in sorted(pools)
            if uid in pods
        ]

    def debug_bpf(self) -> dict[str, Any] | None:
        """Programs, attach points, counters and every map's entries (eBPF mode only)."""
        if self.bpf is None:
            return None
        from ztunnel_py.bpf.dump import dump_every_map

        return {
            "adopted": self.bpf.adopted,
            "attachPoints": self.bpf.attach_points(),
            "counters": self.bpf.read_counters(),
            "maps": dump_every_map(self.bpf.maps),
        }

    def debug_redirect(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.redirect_mode.value if self.redirect_mode else None,
            "enabled": self.enabled,
        }
        if self.redirect_mode is RedirectMode.IPTABLES:
            out["rules"] = (
                "istio-cni's in-pod iptables rules: outbound TCP REDIRECT to 15001, inbound"
                " non-HBONE TCP to 15006; the proxy reads SO_ORIGINAL_DST"
            )
        if self.bpf is not None:
            out["attachPoints"] = self.bpf.attach_points()
            out["inheritedPods"] = sorted(self.bpf_sync.inherited) if self.bpf_sync else []
        if self.kernel_splice is not None:
            out["kernelSplice"] = self.kernel_splice.debug()
        return out

    async def stop(self, deadline_s: float) -> None:
        """Stop enrolling, close every pod's listeners, drain connections up to the deadline.

        BPF maps and links stay pinned: enrolled pods keep failing closed while we are away.
        """
        if self.zds is not None:
            self.zds.close()
        if self.manager is not None:
            await self.manager.shutdown(deadline_s)
        if self.self_listener is not None:
            await self.self_listener.stop(deadline_s)
        if self.kernel_splice is not None:
            self.kernel_splice.close()
        if self.bpf is not None:
            await asyncio.to_thread(self.bpf.close)


def start_kernel_splice(config: Config) -> KernelSplicer:
    """The kernel splice of same-node connections, or why it is off (said once, at start)."""
    if config.kernel_splice is False:
        log.info(
            "kernel splice off (%s=false): same-node connections are copied by the proxy",
            KERNEL_SPLICE_ENV,
        )
        return KernelSplicer(None, f"off: {KERNEL_SPLICE_ENV}=false")
    from ztunnel_py.bpf.objects import DEFAULT_OBJECT_DIR
    from ztunnel_py.bpf.splice import SpliceMaps

    try:
        maps = SpliceMaps.load(config.bpf_object_dir or DEFAULT_OBJECT_DIR)
        try:
            maps.self_test()
        except BaseException:
            maps.close()
            raise
    except (BpfError, OSError) as e:
        if config.kernel_splice:
            raise UnsupportedFeature(
                "kernel splice (sockhash + sk_skb stream verdict)",
                f"{e}; unset {KERNEL_SPLICE_ENV} to copy same-node connections in Python",
            ) from e
        log.warning(
            "kernel splice not available (%s): same-node connections are copied by the proxy",
            e,
        )
        return KernelSplicer(None, f"off: {e}")
    finally:
        # libbpf parsed the kernel's BTF for the sk_skb program (~11 MiB, freed at once), and
        # tune_malloc's thresholds would keep that heap resident for the daemon's lifetime.
        trim_heap()
    log.info("kernel splice on: allowed same-node connections are carried by the kernel")
    return KernelSplicer(maps, "on")
