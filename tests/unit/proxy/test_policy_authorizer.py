"""``PolicyAuthorizer`` logs every decision it makes (``AUTHZ_POLICY_INFO_LOGGING``)."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from ztunnel_py.proxy.authorization import AUTHORIZATION_LOGGER, PolicyAuthorizer
from ztunnel_py.rbac.evaluate import ConnectionInfo
from ztunnel_py.rbac.model import Action, Authorization, Match, StringMatch, StringMatchKind
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch

WORKLOAD = Workload(
    uid="w1", name="w1", namespace="ns1", workload_ips=(ipaddress.ip_address("10.0.0.2"),)
)
CALLER = "spiffe://cluster.local/ns/ns1/sa/caller"


def conn(identity: str | None) -> ConnectionInfo:
    return ConnectionInfo(
        src_ip=ipaddress.ip_address("10.0.0.1"),
        src_port=40000,
        dst_ip=ipaddress.ip_address("10.0.0.2"),
        dst_port=8080,
        src_identity=identity,
    )


@pytest.fixture
def state() -> ProxyState:
    caller = Match(
        principals=(StringMatch(StringMatchKind.EXACT, CALLER.removeprefix("spiffe://")),)
    )
    allow = Authorization(
        name="callers", namespace="ns1", action=Action.ALLOW, rules=(((caller,),),)
    )
    s = ProxyState()
    s.apply(UpdateBatch(workloads=(WORKLOAD,), policies=(allow,)))
    return s


def decision_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == AUTHORIZATION_LOGGER]


def test_decisions_are_logged_at_info_naming_the_policy(
    state: ProxyState, caplog: pytest.LogCaptureFixture
) -> None:
    authorizer = PolicyAuthorizer(state, WORKLOAD, info_logging=True)
    caplog.set_level(logging.INFO, logger=AUTHORIZATION_LOGGER)

    assert authorizer.check(conn(CALLER)).allowed
    assert not authorizer.check(conn(None)).allowed

    allowed, denied = decision_records(caplog)
    assert (allowed.levelno, allowed.getMessage()) == (
        logging.INFO,
        "allowed by policy ns1/callers",
    )
    assert allowed.fields["policy"] == "ns1/callers"  # type: ignore[attr-defined]
    assert allowed.fields["allowed"] is True  # type: ignore[attr-defined]
    assert CALLER in allowed.fields["conn"]  # type: ignore[attr-defined]
    assert (denied.levelno, denied.getMessage()) == (
        logging.INFO,
        "denied: no ALLOW policy matched",
    )
    assert denied.fields["allowed"] is False  # type: ignore[attr-defined]


def test_without_the_flag_decisions_are_debug_only(
    state: ProxyState, caplog: pytest.LogCaptureFixture
) -> None:
    authorizer = PolicyAuthorizer(state, WORKLOAD)
    caplog.set_level(logging.INFO, logger=AUTHORIZATION_LOGGER)
    assert authorizer.check(conn(CALLER)).allowed
    assert decision_records(caplog) == []

    caplog.set_level(logging.DEBUG, logger=AUTHORIZATION_LOGGER)
    assert authorizer.check(conn(CALLER)).allowed
    (record,) = decision_records(caplog)
    assert (record.levelno, record.getMessage()) == (logging.DEBUG, "allowed by policy ns1/callers")
