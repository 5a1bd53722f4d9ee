"""istio-cni's enrollment decisions for the lab, driving the project's fake agent (ZDS).

The real istio-cni node agent watches Namespaces and Pods; a running pod on its node whose
namespace is labelled ``istio.io/dataplane-mode=ambient`` (and that does not opt out with the
pod label ``istio.io/dataplane-mode=none``) is enrolled: in-pod redirection is set up (iptables
mode), the pod's netns is handed to ztunnel (``AddWorkload``), and the pod is annotated
``ambient.istio.io/redirection=enabled``, which is what makes istiod give its workload the HBONE
protocol. Removing the label undoes all three. This controller does the same against the lab's
API server, one per node, with ``FakeCniAgent`` as the ZDS server. It polls the API server
(a few requests per interval) instead of keeping informers: the fake trades latency for size.

The pod's netns path is the one thing a real agent learns from the container runtime; here the
testbed's plan provides it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.lab.cluster import AMBIENT_LABEL, LabCluster
from ztunnel_py.config import WorkloadInfo
from ztunnel_py.redirect import iptables
from ztunnel_py.testing.cni_agent import FakeCniAgent

log = logging.getLogger(__name__)
POLL_INTERVAL_S = 0.25


@dataclass(frozen=True, slots=True)
class _Eligible:
    uid: str
    info: WorkloadInfo
    netns_path: str


def wants_ambient(namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str]) -> bool:
    """istio-cni's rule: the namespace is ambient and the pod does not opt out."""
    if pod_labels.get(AMBIENT_LABEL) == "none":
        return False
    return (
        namespace_labels.get(AMBIENT_LABEL) == "ambient"
        or pod_labels.get(AMBIENT_LABEL) == "ambient"
    )


@dataclass
class LabCniController:
    """Enrolls the ambient pods of one node with that node's daemon, following the API server."""

    node: str
    agent: FakeCniAgent
    cluster: LabCluster
    netns_of: Callable[[str, str], str | None]  # (namespace, pod name) -> netns path
    install_iptables: bool  # iptables redirect mode: set up istio-cni's in-pod rules too
    enrolled: dict[str, _Eligible] = field(default_factory=dict)  # by pod uid
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=100))  # the latest only
    _task: asyncio.Task[None] | None = None
    _synced: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        await self.agent.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.agent.stop()

    async def wait_synced(self) -> None:
        """Until one full reconcile has run (every eligible pod at start handed over)."""
        await self._synced.wait()

    async def _run(self) -> None:
        while True:
            try:
                await self.reconcile()
                self._synced.set()
            except Exception as e:  # a fake keeps going, like the agent
                log.warning("lab CNI %s: reconcile failed: %s", self.node, e)
                self.errors.append(str(e))
            await asyncio.sleep(POLL_INTERVAL_S)

    async def reconcile(self) -> None:
        namespaces, pods = await asyncio.to_thread(self._read_cluster)
        wanted: dict[str, _Eligible] = {}
        for pod in pods:
            meta, spec, status = pod.metadata, pod.spec, pod.status
            if spec.node_name != self.node or status.phase != "Running" or not status.pod_ip:
                continue
            if meta.deletion_timestamp is not None:
                continue
            if not wants_ambient(namespaces.get(meta.namespace, {}), meta.labels or {}):
                continue
            netns = self.netns_of(meta.namespace, meta.name)
            if netns is None:
                continue  # not a testbed pod (e.g. the ztunnel pods): no netns to hand over
            wanted[meta.uid] = _Eligible(
                meta.uid,
                WorkloadInfo(
                    namespace=meta.namespace,
                    name=meta.name,
                    service_account=spec.service_account_name,
                ),
                netns,
            )
        for uid in [u for u in self.enrolled if u not in wanted]:
            await self._remove(self.enrolled.pop(uid))
        for uid, pod in wanted.items():
            if uid not in self.enrolled:
                await self._add(pod)

    def _read_cluster(self) -> tuple[dict[str, dict[str, str]], list[Any]]:
        namespaces: dict[str, dict[str, str]] = {
            ns.metadata.name: dict(ns.metadata.labels or {})
            for ns in self.cluster.core.list_namespace().items
        }
        pods = self.cluster.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node}"
        ).items
        return namespaces, list(pods)

    async def _add(self, pod: _Eligible) -> None:
        if self.install_iptables:
            await asyncio.to_thread(iptables.install, pod.netns_path)
        error = await self.agent.add_pod(pod.uid, pod.info, Path(pod.netns_path))
        if error:
            log.warning(
                "lab CNI %s: ztunnel refused %s/%s: %s",
                self.node,
                pod.info.namespace,
                pod.info.name,
                error,
            )
            self.errors.append(error)
            return  # retried on the next pass, as istio-cni retries
        self.enrolled[pod.uid] = pod
        await asyncio.to_thread(
            self.cluster.annotate_redirection, pod.info.namespace, pod.info.name, True
        )
        log.info("lab CNI %s: enrolled %s/%s", self.node, pod.info.namespace, pod.info.name)

    async def _remove(self, pod: _Eligible) -> None:
        await self.agent.del_pod(pod.uid)
        if self.install_iptables:
            await asyncio.to_thread(iptables.remove, pod.netns_path)
        with contextlib.suppress(Exception):  # the pod may be gone already
            await asyncio.to_thread(
                self.cluster.annotate_redirection, pod.info.namespace, pod.info.name, False
            )
        log.info("lab CNI %s: removed %s/%s", self.node, pod.info.namespace, pod.info.name)
