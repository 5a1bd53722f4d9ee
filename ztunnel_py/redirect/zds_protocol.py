"""ZDS, the istio-cni node agent's protocol, without I/O: wire codec, session rules, backoff.

The agent (server) and ztunnel (client) exchange one raw protobuf per SOCK_SEQPACKET packet, no
length prefix. ztunnel says ``ZdsHello{V1}``; the agent replays every pod it knows (``add`` with
the pod's netns fd as SCM_RIGHTS, or ``keep`` for a pod whose netns it no longer holds), sends
``snapshot_sent``, and from then on sends ``add``/``del`` as pods come and go. Each request gets
an ``Ack`` (empty ``error`` = ACK, otherwise a NACK with the reason).

``ZdsSession`` holds the rules: what each request means for the pods we hold, which replies to
give, which requests are protocol errors, and when we are ready. It is fed decoded requests and
returns ``ZdsStep``s; ``ztunnel_py.redirect.zds`` moves the bytes and file descriptors.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from google.protobuf.message import DecodeError

from ztunnel_py.config import WorkloadInfo
from ztunnel_py.errors import ZtunnelError
from ztunnel_py.protos import zds_pb2

MAX_MESSAGE_SIZE = 1024  # ztunnel's read buffer; a longer packet arrives with MSG_TRUNC
MSG_TRUNC = 0x20
MSG_CTRUNC = 0x08
BACKOFF_INITIAL_S = 0.01
BACKOFF_MAX_S = 15.0
ACK_DEADLINE_S = 5.0  # the agent's read/write deadline per request


class ZdsError(ZtunnelError):
    """Something in the ZDS exchange was wrong; the message says what."""


class ZdsMessageError(ZdsError):
    """A packet that is not a valid request (bad protobuf, wrong fds, truncated)."""


# --------------------------------------------------------------------------- decoded requests


@dataclass(frozen=True, slots=True)
class AddPod:
    """``add``: enrol the pod; ``netns_fd`` is ours to keep or close."""

    uid: str
    info: WorkloadInfo
    netns_fd: int


@dataclass(frozen=True, slots=True)
class KeepPod:
    """``keep`` (snapshot only): the agent lost this pod's netns, but the pod still exists."""

    uid: str


@dataclass(frozen=True, slots=True)
class DelPod:
    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotSent:
    """Every pod the agent knows has been named on this connection."""


ZdsRequest = AddPod | KeepPod | DelPod | SnapshotSent


def decode_request(data: bytes, fds: Sequence[int], flags: int = 0) -> ZdsRequest:
    """One received packet into a request, enforcing the fd rules.

    On error nothing is taken: the caller still owns (and must close) every fd in ``fds``.
    """
    if flags & MSG_TRUNC:
        raise ZdsMessageError(
            f"received a truncated message (longer than {MAX_MESSAGE_SIZE} bytes)"
        )
    if flags & MSG_CTRUNC:
        raise ZdsMessageError("received truncated control data (too many file descriptors)")
    if len(fds) > 1:
        raise ZdsMessageError(f"expected at most 1 file descriptor, got {len(fds)}")
    req = zds_pb2.WorkloadRequest()
    try:
        req.ParseFromString(data)
    except DecodeError as e:
        raise ZdsMessageError(f"not a WorkloadRequest protobuf: {e}") from None
    kind = req.WhichOneof("payload")
    if kind is None:
        raise ZdsMessageError("WorkloadRequest has no payload (a newer agent's message type?)")
    if kind != "add" and fds:
        raise ZdsMessageError(
            f"unexpected file descriptor on a {kind!r} request (only add carries one)"
        )
    if kind == "add":
        add = req.add
        if not fds:
            raise ZdsMessageError(f"add for pod {add.uid!r} carries no netns file descriptor")
        if not add.uid:
            raise ZdsMessageError("add has an empty pod uid")
        if not add.HasField("workload_info"):
            raise ZdsMessageError(f"add for pod {add.uid!r} has no workload_info (required)")
        wi = add.workload_info
        info = WorkloadInfo(
            namespace=wi.namespace, name=wi.name, service_account=wi.service_account
        )
        return AddPod(add.uid, info, fds[0])
    if kind == "keep":
        return KeepPod(req.keep.uid)
    if kind == "del":
        return DelPod(getattr(req, "del").uid)  # "del" is a Python keyword
    return SnapshotSent()


def encode_hello() -> bytes:
    return zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString()


def encode_ack(error: str = "") -> bytes:
    return zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=error)).SerializeToString()


# The agent's side of the codec (the fake agent in ztunnel_py.testing uses it).


def encode_add(uid: str, info: WorkloadInfo) -> bytes:
    wi = zds_pb2.WorkloadInfo(
        name=info.name, namespace=info.namespace, service_account=info.service_account
    )
    return zds_pb2.WorkloadRequest(
        add=zds_pb2.AddWorkload(uid=uid, workload_info=wi)
    ).SerializeToString()


def encode_keep(uid: str) -> bytes:
    return zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid=uid)).SerializeToString()


def encode_del(uid: str) -> bytes:
    req = zds_pb2.WorkloadRequest()
    getattr(req, "del").uid = uid  # "del" is a Python keyword
    return req.SerializeToString()


def encode_snapshot_sent() -> bytes:
    return zds_pb2.WorkloadRequest(snapshot_sent=zds_pb2.SnapshotSent()).SerializeToString()


def decode_hello(data: bytes) -> int:
    """The version a client announced; raises ``ZdsMessageError`` if it is not a hello."""
    hello = zds_pb2.ZdsHello()
    try:
        hello.ParseFromString(data)
    except DecodeError as e:
        raise ZdsMessageError(f"not a ZdsHello protobuf: {e}") from None
    return int(hello.version)


def decode_ack(data: bytes) -> str:
    """The ``error`` of an Ack (empty for ACK); raises ``ZdsMessageError`` for anything else."""
    resp = zds_pb2.WorkloadResponse()
    try:
        resp.ParseFromString(data)
    except DecodeError as e:
        raise ZdsMessageError(f"not a WorkloadResponse protobuf: {e}") from None
    if resp.WhichOneof("payload") != "ack":
        raise ZdsMessageError("WorkloadResponse carries no ack")
    return resp.ack.error


# --------------------------------------------------------------------------- the session


@dataclass(frozen=True, slots=True)
class EnrollPod:
    """Start (or keep) the pod's proxy; the handler takes ownership of ``netns_fd``."""

    uid: str
    info: WorkloadInfo
    netns_fd: int


@dataclass(frozen=True, slots=True)
class RemovePod:
    uid: str


PodAction = EnrollPod | RemovePod


@dataclass(frozen=True, slots=True)
class ZdsStep:
    """What to do about one request: run ``actions`` in order, then reply.

    ``error`` is the NACK reason (empty = ACK). A failed ``EnrollPod`` turns an ACK into a NACK
    too, but the pod stays held (the manager retries it). ``disconnect``: the connection cannot
    go on after this reply; reconnect and let the agent replay its snapshot.
    """

    actions: tuple[PodAction, ...] = ()
    error: str = ""
    disconnect: bool = False


class Phase(enum.Enum):
    DISCONNECTED = "disconnected"
    SNAPSHOT = "snapshot"  # connected, the agent is replaying its pods
    LIVE = "live"  # snapshot received: incremental add/del only


class ZdsSession:
    """The pods we hold according to the agent, across reconnects, and the per-connection rules."""

    def __init__(self) -> None:
        self._pods: dict[str, WorkloadInfo] = {}
        self._named: set[str] = set()
        self.phase = Phase.DISCONNECTED

    @property
    def ready(self) -> bool:
        """Connected and the snapshot of this connection has been received."""
        return self.phase is Phase.LIVE

    @property
    def pods(self) -> Mapping[str, WorkloadInfo]:
        return MappingProxyType(self._pods)

    def connected(self) -> None:
        """A new connection (the hello is being sent): expect a fresh snapshot."""
        self.phase = Phase.SNAPSHOT
        self._named.clear()

    def disconnected(self) -> None:
        """The connection ended; the pods stay until the next snapshot says otherwise."""
        self.phase = Phase.DISCONNECTED
        self._named.clear()

    def receive(self, request: ZdsRequest) -> ZdsStep:
        if self.phase is Phase.DISCONNECTED:
            raise RuntimeError("ZdsSession.receive() called without connected()")
        match request:
            case AddPod(uid, info, fd):
                if self.phase is Phase.SNAPSHOT:
                    self._named.add(uid)
                self._pods[uid] = info
                return ZdsStep(actions=(EnrollPod(uid, info, fd),))
            case KeepPod(uid):
                if self.phase is Phase.LIVE:
                    return self._protocol_error(f"keep for pod {uid!r} received after the snapshot")
                self._named.add(uid)
                return ZdsStep()
            case DelPod(uid):
                # Before the snapshot a del only un-names the pod, but removing it now is the
                # same outcome as letting the reconcile do it, and frees its listeners sooner.
                self._named.discard(uid)
                if self._pods.pop(uid, None) is None:
                    return ZdsStep()
                return ZdsStep(actions=(RemovePod(uid),))
            case SnapshotSent():
                if self.phase is Phase.LIVE:
                    return self._protocol_error("snapshot received twice on one connection")
                gone = [uid for uid in self._pods if uid not in self._named]
                for uid in gone:
                    del self._pods[uid]
                self._named.clear()
                self.phase = Phase.LIVE
                return ZdsStep(actions=tuple(RemovePod(uid) for uid in gone))
        raise TypeError(f"not a ZDS request: {request!r}")

    def unreadable(self, reason: str) -> ZdsStep:
        """A packet could not be decoded: NACK it and start over on a new connection."""
        self.phase = Phase.DISCONNECTED
        return ZdsStep(error=f"failure to read message: {reason}", disconnect=True)

    def _protocol_error(self, reason: str) -> ZdsStep:
        self.phase = Phase.DISCONNECTED
        return ZdsStep(error=f"protocol error: {reason}", disconnect=True)


class Backoff:
    """Reconnect delays: ``initial`` doubling up to ``maximum``; optional +-``jitter`` fraction."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL_S,
        maximum: float = BACKOFF_MAX_S,
        *,
        factor: float = 2.0,
        jitter: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        if self.jitter:
            delay *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return min(delay, self.maximum)

    def reset(self) -> None:
        self._next = self.initial
