"""ZDS rules and wire codec without sockets: ``ZdsSession``, ``decode_request``, backoff."""

from __future__ import annotations

import itertools
import random

import pytest

from ztunnel_py.config import WorkloadInfo
from ztunnel_py.protos import zds_pb2
from ztunnel_py.redirect.zds_protocol import (
    MSG_CTRUNC,
    MSG_TRUNC,
    AddPod,
    Backoff,
    DelPod,
    EnrollPod,
    KeepPod,
    RemovePod,
    SnapshotSent,
    ZdsMessageError,
    ZdsSession,
    decode_ack,
    decode_hello,
    decode_request,
    encode_ack,
    encode_add,
    encode_del,
    encode_hello,
    encode_keep,
    encode_snapshot_sent,
)

INFO = WorkloadInfo(namespace="default", name="web-1", service_account="web")


def add(uid: str, fd: int = 7) -> AddPod:
    return AddPod(uid, INFO, fd)


def is_ready(session: ZdsSession) -> bool:
    # A call, so mypy does not carry an earlier `assert not is_ready(session)` past a receive().
    return session.ready


def live_session(*uids: str) -> ZdsSession:
    session = ZdsSession()
    session.connected()
    for uid in uids:
        session.receive(add(uid))
    session.receive(SnapshotSent())
    return session


# ----------------------------------------------------------------------------- codec


def test_hello_announces_v1() -> None:
    hello = zds_pb2.ZdsHello.FromString(encode_hello())
    assert hello.version == zds_pb2.V1
    assert decode_hello(encode_hello()) == zds_pb2.V1


def test_ack_and_nack_round_trip() -> None:
    assert decode_ack(encode_ack()) == ""
    assert decode_ack(encode_ack("failure to start proxy: boom")) == "failure to start proxy: boom"
    assert zds_pb2.WorkloadResponse.FromString(encode_ack("x")).WhichOneof("payload") == "ack"


def test_add_decodes_with_its_fd_and_workload_info() -> None:
    msg = decode_request(encode_add("uid-1", INFO), [11])
    assert msg == AddPod("uid-1", INFO, 11)


def test_del_uid_is_field_2() -> None:
    # WorkloadRequest.del (field 2) holding DelWorkload.uid (field 2): 0x12 len 0x12 len "x".
    assert decode_request(b"\x12\x03\x12\x01x", []) == DelPod("x")
    # The same payload with the uid in field 1 is an unknown field: the uid reads as empty.
    assert decode_request(b"\x12\x03\x0a\x01x", []) == DelPod("")
    assert encode_del("x") == b"\x12\x03\x12\x01x"


def test_keep_and_snapshot_decode() -> None:
    assert decode_request(encode_keep("k"), []) == KeepPod("k")
    assert decode_request(encode_snapshot_sent(), []) == SnapshotSent()


@pytest.mark.parametrize(
    ("data", "fds", "flags", "complaint"),
    [
        (encode_add("u", INFO), [], 0, "carries no netns file descriptor"),
        (encode_keep("u"), [3], 0, "unexpected file descriptor on a 'keep'"),
        (encode_del("u"), [3], 0, "unexpected file descriptor on a 'del'"),
        (encode_snapshot_sent(), [3], 0, "unexpected file descriptor on a 'snapshot_sent'"),
        (encode_add("u", INFO), [3, 4], 0, "expected at most 1 file descriptor, got 2"),
        (encode_add("u", INFO), [3], MSG_TRUNC, "truncated message"),
        (encode_add("u", INFO), [3], MSG_CTRUNC, "truncated control data"),
        (b"\xff\xff\xff", [], 0, "not a WorkloadRequest"),
        (b"", [], 0, "no payload"),
        (
            zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload(uid="u")).SerializeToString(),
            [3],
            0,
            "no workload_info",
        ),
        (encode_add("", INFO), [3], 0, "empty pod uid"),
    ],
)
def test_malformed_requests_are_refused(
    data: bytes, fds: list[int], flags: int, complaint: str
) -> None:
    with pytest.raises(ZdsMessageError, match=complaint):
        decode_request(data, fds, flags)


# ----------------------------------------------------------------------------- session


def test_not_ready_until_snapshot() -> None:
    session = ZdsSession()
    assert not is_ready(session)
    session.connected()
    step = session.receive(add("a"))
    assert not is_ready(session)
    assert step.actions == (EnrollPod("a", INFO, 7),)
    assert step.error == "" and not step.disconnect
    step = session.receive(SnapshotSent())
    assert is_ready(session)
    assert step.actions == ()
    assert step.error == ""


def test_add_after_snapshot_enrolls_and_acks() -> None:
    session = live_session()
    step = session.receive(add("late", fd=9))
    assert step.actions == (EnrollPod("late", INFO, 9),)
    assert step.error == ""
    assert "late" in session.pods


def test_keep_is_allowed_only_before_the_snapshot() -> None:
    session = ZdsSession()
    session.connected()
    step = session.receive(KeepPod("k"))
    assert step.error == "" and step.actions == ()
    session.receive(SnapshotSent())
    step = session.receive(KeepPod("k"))
    assert "keep" in step.error and "after the snapshot" in step.error
    assert step.disconnect
    assert not is_ready(session)


def test_second_snapshot_is_a_protocol_error() -> None:
    session = live_session("a")
    step = session.receive(SnapshotSent())
    assert "snapshot received twice" in step.error
    assert step.disconnect
    assert not is_ready(session)
    assert "a" in session.pods  # a protocol error does not drop pods; the next snapshot decides


def test_snapshot_removes_pods_that_were_not_named() -> None:
    session = live_session("a", "b", "c", "d")
    session.disconnected()
    assert not is_ready(session)
    session.connected()
    session.receive(add("a"))
    session.receive(KeepPod("c"))
    step = session.receive(SnapshotSent())
    assert set(step.actions) == {RemovePod("b"), RemovePod("d")}
    assert set(session.pods) == {"a", "c"}
    assert is_ready(session)


def test_reconnect_forgets_the_names_of_the_previous_snapshot() -> None:
    session = ZdsSession()
    session.connected()
    session.receive(add("a"))
    session.disconnected()  # the agent restarted before its snapshot was complete
    session.connected()
    step = session.receive(SnapshotSent())
    assert step.actions == (RemovePod("a"),)


def test_del_removes_known_pods_and_ignores_unknown() -> None:
    session = live_session("a")
    assert session.receive(DelPod("a")).actions == (RemovePod("a"),)
    step = session.receive(DelPod("never-added"))
    assert step.actions == () and step.error == ""
    assert "a" not in session.pods


def test_del_before_snapshot_unnames_the_pod() -> None:
    session = ZdsSession()
    session.connected()
    session.receive(add("a"))
    assert session.receive(DelPod("a")).actions == (RemovePod("a"),)
    assert session.receive(SnapshotSent()).actions == ()
    assert dict(session.pods) == {}


def test_unreadable_packet_nacks_and_disconnects() -> None:
    session = live_session()
    step = session.unreadable("expected at most 1 file descriptor, got 2")
    assert step.error == "failure to read message: expected at most 1 file descriptor, got 2"
    assert step.disconnect
    assert not is_ready(session)


def test_receive_without_a_connection_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        ZdsSession().receive(SnapshotSent())


# ----------------------------------------------------------------------------- backoff


def test_backoff_doubles_from_10ms_to_15s_and_resets() -> None:
    backoff = Backoff()
    delays = [backoff.next() for _ in range(14)]
    assert delays[:4] == [0.01, 0.02, 0.04, 0.08]
    assert delays[-1] == 15.0
    assert all(a <= b for a, b in itertools.pairwise(delays))
    backoff.reset()
    assert backoff.next() == 0.01


def test_backoff_jitter_stays_within_bounds() -> None:
    backoff = Backoff(1.0, 1.0, jitter=0.2, rng=random.Random(7))
    delays = [backoff.next() for _ in range(50)]
    assert all(0.8 <= d <= 1.0 for d in delays)
    assert len(set(delays)) > 1
