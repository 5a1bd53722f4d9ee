"""What the control plane and its worker processes say to each other (pure data).

Every message is a frozen dataclass, pickled by ``channel`` between processes of the same
installation. File descriptors (a pod's netns and listening sockets) travel beside the message
as ``SCM_RIGHTS``; ``fds`` says how many belong to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ztunnel_py.config import RedirectMode, WorkloadInfo
from ztunnel_py.state.store import UpdateBatch

# ---------------------------------------------------------------- control plane -> worker


@dataclass(frozen=True, slots=True)
class Hello:
    """First message: who the worker is and how connections reach the pods."""

    worker_id: int
    redirect_mode: RedirectMode
    log_levels: str  # RUST_LOG syntax, as last set on the control plane's /logging


@dataclass(frozen=True, slots=True)
class ApplyState:
    """A state batch, applied to the worker's own ``StateHub`` (a snapshot has ``replace``)."""

    batch: UpdateBatch


@dataclass(frozen=True, slots=True)
class ServePod:
    """Serve a pod: fds are its netns, then its :15001, :15006 and :15008 listeners, shared
    with every other worker (one accept queue per port)."""

    uid: str
    info: WorkloadInfo
    workload_uid: str
    netns_inode: int
    netns_cookie: int

    FDS = 4


@dataclass(frozen=True, slots=True)
class StopPod:
    """Stop accepting for the pod, drain its connections up to the deadline, then answer."""

    uid: str
    deadline_s: float


@dataclass(frozen=True, slots=True)
class Drain:
    """Stop accepting everywhere, let live connections finish up to the deadline, then exit."""

    deadline_s: float


@dataclass(frozen=True, slots=True)
class LogLevels:
    """``/logging`` changed the control plane's levels: the same spec for the worker."""

    spec: str


@dataclass(frozen=True, slots=True)
class CertificatesChanged:
    """The control plane's certificates changed (rotation, new root): drop cached copies."""


@dataclass(frozen=True, slots=True)
class Collect:
    """Ask for the worker's metric families and live-connection views."""

    request_id: int


@dataclass(frozen=True, slots=True)
class CertificateReply:
    request_id: int
    identity: str
    private_key_pem: bytes = b""
    chain_pem: tuple[bytes, ...] = ()  # leaf, intermediates..., then the roots in one element
    error: str = ""


# ---------------------------------------------------------------- worker -> control plane


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker applied the state snapshot and serves every pod it was given."""

    worker_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    request_id: int
    identity: str


@dataclass(frozen=True, slots=True)
class PodStopped:
    uid: str


@dataclass(frozen=True, slots=True)
class Draining:
    """The worker was told to drain (SIGTERM to it): start its replacement now."""

    worker_id: int


@dataclass(frozen=True, slots=True)
class Collected:
    request_id: int
    families: list[Any]  # prometheus_client Metric families, as its registry collects them
    connections: dict[str, Any]  # conntrack dump: workload uid -> inbound/outbound lists
    pools: dict[str, Any]  # pod uid -> HBONE pool dump


@dataclass(frozen=True, slots=True)
class SyncDone:
    """Everything the worker needs was sent (Hello, state, pods): answer ``Ready``."""
