"""Inbound authorization as the proxy servers ask for it: one decision per connection."""

from __future__ import annotations

import logging
from typing import Protocol

from ztunnel_py.rbac.evaluate import ConnectionInfo, Decision, evaluate, log_decision
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState

#: Where authorization decisions are logged (``AUTHZ_POLICY_INFO_LOGGING``).
AUTHORIZATION_LOGGER = "ztunnel_py.rbac"


class Authorizer(Protocol):
    """Inbound L4 authorization (``rbac.evaluate``); called once per connection."""

    def check(self, conn: ConnectionInfo) -> Decision: ...


class PermitAll:
    def check(self, conn: ConnectionInfo) -> Decision:
        return Decision(True, None, "allowed: no authorizer configured")


class PolicyAuthorizer:
    """Authorizes against the policies that apply to ``workload`` in ``state``.

    Every decision is logged, naming the deciding policy: at INFO with ``info_logging``
    (``AUTHZ_POLICY_INFO_LOGGING=true``), at DEBUG otherwise, as ztunnel's ``authpol_log``.
    """

    def __init__(
        self,
        state: ProxyState,
        workload: Workload,
        *,
        info_logging: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self._state = state
        self._workload = workload
        self._info_logging = info_logging
        self._logger = logger or logging.getLogger(AUTHORIZATION_LOGGER)

    def check(self, conn: ConnectionInfo) -> Decision:
        # The store may have a newer version of the workload (policy selectors changed).
        current = self._state.workload(self._workload.uid) or self._workload
        # The policies that apply to it: global, its namespace's, those selecting it.
        decision = evaluate(conn, self._state.policies_for(current))
        log_decision(self._logger, decision, conn, self._info_logging)
        return decision
