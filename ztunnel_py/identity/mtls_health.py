"""Whether this node can speak mTLS with its peers, for readiness.

A node whose trust root differs from its peers' (a daemon that lost ``LOCAL_CA_DIR`` and made
a new root, a CA rotated on one side only) has valid certificates of its own, so the
certificate readiness check is satisfied, yet every cross-node tunnel fails. The outbound
connector reports each handshake here. After ``threshold`` consecutive handshakes whose peer
certificate does not chain to our roots, readiness is blocked (``mtls``) with a reason that
names the likely cause; the next handshake that succeeds releases it. Only handshakes we start
count, towards peers the control plane told us about: a stranger presenting a foreign
certificate to our :15008 cannot make the node unready.
"""

from __future__ import annotations

import logging

from ztunnel_py.identity.tls import UnknownRoot
from ztunnel_py.readiness import Readiness

log = logging.getLogger(__name__)

READY_MTLS = "mtls"
DEFAULT_THRESHOLD = 3


class MtlsHealth:
    def __init__(self, readiness: Readiness, *, threshold: int = DEFAULT_THRESHOLD) -> None:
        self.readiness = readiness
        self.threshold = threshold
        self.unknown_root_failures = 0  # since start, for /config_dump and tests
        self._consecutive = 0
        self._blocked = False

    def handshake_succeeded(self) -> None:
        self._consecutive = 0
        if self._blocked:
            self._blocked = False
            self.readiness.release(READY_MTLS)
            log.warning("mTLS with peers works again; readiness restored")

    def handshake_failed(self, error: Exception) -> None:
        if not isinstance(error, UnknownRoot):
            return  # a peer's own problem (expired, wrong identity), not ours
        self.unknown_root_failures += 1
        self._consecutive += 1
        if self._consecutive >= self.threshold and not self._blocked:
            self._blocked = True
            reason = (
                f"{self._consecutive} handshakes in a row found peers whose certificates do not"
                " chain to this node's root; the node's CA root differs from the mesh's (was"
                " LOCAL_CA_DIR lost, or the root rotated on one side only?)"
            )
            self.readiness.block(READY_MTLS, reason)
            log.error("not ready: %s: %s", reason, error)
