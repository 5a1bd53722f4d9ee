"""Pod enrollment for eBPF mode: the hook the workload manager calls around each pod's proxy.

``BpfEnrollment`` has the shape of ``redirect.workloads.EnrollmentListener`` (structurally:
this module does not import the workload manager). The order follows the design:

on add    1. the pod's :15006 listener goes into ``zt_inbound_sk``,
          2. its sk_lookup program is attached to its netns (pinned per pod uid),
          3. its maps entries are reconciled, the ``zt_pods`` switch written last;
on remove the reverse: the ``zt_pods`` entry goes first (capture stops), then the link, then
          the listener entry (the kernel also drops it when the listener closes).
"""

from __future__ import annotations

import logging
import socket
from typing import Protocol

from ztunnel_py.bpf.errors import BpfError
from ztunnel_py.bpf.loader import BpfLoader
from ztunnel_py.bpf.projection import EnrolledPod
from ztunnel_py.bpf.reconcile import MapSync, ReconcileError
from ztunnel_py.netns import cookie_of_netns
from ztunnel_py.state.model import IPAddress, Workload
from ztunnel_py.state.store import ChangeSet

log = logging.getLogger(__name__)


class PodLike(Protocol):
    @property
    def uid(self) -> str: ...
    @property
    def netns_fd(self) -> int: ...
    @property
    def netns_cookie(self) -> int: ...
    @property
    def workload(self) -> Workload | None: ...
    @property
    def ips(self) -> tuple[IPAddress, ...]: ...


class ListenersLike(Protocol):
    @property
    def inbound_plaintext(self) -> socket.socket: ...
    @property
    def inbound_hbone(self) -> socket.socket: ...


class BpfEnrollment:
    def __init__(self, loader: BpfLoader, sync: MapSync) -> None:
        self.loader = loader
        self.sync = sync
        self._cookies: dict[str, int] = {}

    def pod_added(self, pod: PodLike, listeners: ListenersLike) -> None:
        cookie = pod.netns_cookie or cookie_of_netns(pod.netns_fd)
        self._cookies[pod.uid] = cookie
        self.loader.register_inbound_listener(cookie, listeners.inbound_plaintext)
        if self.loader.transparent_hbone:
            self.loader.register_hbone_listener(cookie, listeners.inbound_hbone)
        self.loader.pods.attach(pod.uid, pod.netns_fd, cookie)
        workload_uid = pod.workload.uid if pod.workload is not None else None
        try:
            self.sync.enroll(EnrolledPod(pod.uid, cookie, tuple(pod.ips), workload_uid))
        except ReconcileError as e:
            # The pod's switch was still written if its own entry could be (fail closed).
            log.error("bpf maps for pod %s are incomplete: %s", pod.uid, e)

    def pod_removed(self, pod: PodLike) -> None:
        cookie = self._cookies.pop(pod.uid, pod.netns_cookie)
        try:
            self.sync.unenroll(pod.uid)
        except ReconcileError as e:
            log.error("bpf maps after removing pod %s are incomplete: %s", pod.uid, e)
        try:
            self.loader.pods.detach(pod.uid)
            if cookie:
                self.loader.unregister_inbound_listener(cookie)
                if self.loader.transparent_hbone:
                    self.loader.unregister_hbone_listener(cookie)
        except (BpfError, OSError) as e:
            log.error("cannot detach the sk_lookup program of pod %s: %s", pod.uid, e)

    def state_changed(self, changes: ChangeSet | None = None) -> None:
        try:
            self.sync.state_changed(changes)
        except ReconcileError as e:
            log.error("bpf maps are incomplete after a state change: %s", e)
