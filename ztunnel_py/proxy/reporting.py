"""How the proxy servers report a connection to the telemetry sink once they know its fate."""

from __future__ import annotations

import asyncio
import http
from typing import Protocol

from ztunnel_py.identity.errors import IdentityError
from ztunnel_py.identity.tls import TlsVerificationError
from ztunnel_py.proxy.conntrack import POLICY_CHANGE_ERROR
from ztunnel_py.proxy.revocation import CERT_REVOKED_ERROR
from ztunnel_py.proxy.splice import SpliceResult, TunnelRefused
from ztunnel_py.telemetry.connections import ConnectionRecord, TelemetrySink
from ztunnel_py.telemetry.metrics import ResponseFlags


class CountedSplice(Protocol):
    """What ``report_splice`` reads of a ``TcpSplice`` or ``HboneSplice``."""

    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def done(self) -> asyncio.Future[SpliceResult]: ...


_CLOSE_FLAGS = {
    POLICY_CHANGE_ERROR: ResponseFlags.DENY,
    CERT_REVOKED_ERROR: ResponseFlags.CERT_REVOKED,
}


def report_splice(
    telemetry: TelemetrySink, record: ConnectionRecord, splice: CountedSplice, *, reads_source: bool
) -> None:
    """Report a spliced connection as opened, with its live byte counts, and as closed once
    the splice is done.

    ``reads_source``: the splice's ``bytes_in`` are read from the source (outbound, inbound
    plaintext) rather than from the destination (inbound HBONE, whose TCP side is the app).
    The close is reported from the splice itself, so a handler cancelled at shutdown still
    reports it.
    """

    def progress() -> tuple[int, int]:
        if reads_source:
            return splice.bytes_in, splice.bytes_out
        return splice.bytes_out, splice.bytes_in

    def closed(done: asyncio.Future[SpliceResult]) -> None:
        if done.cancelled():
            toward, back = progress()
            error: str | None = "connection cancelled"
        else:
            result = done.result()
            toward, back = (
                (result.bytes_in, result.bytes_out)
                if reads_source
                else (result.bytes_out, result.bytes_in)
            )
            error = result.error
        # A tracked connection aborted on a policy update (conntrack) ends as a denial, one
        # whose peer a new CRL revoked as CERT_REVOKED.
        flags = _CLOSE_FLAGS.get(error) if error is not None else None
        telemetry.connection_closed(
            record, bytes_sent=toward, bytes_received=back, error=error, flags=flags
        )

    telemetry.connection_opened(record, progress)
    splice.done.add_done_callback(closed)


def setup_failure(e: Exception) -> tuple[str, ResponseFlags]:
    """The access log error and response flag of a connection that never got spliced."""
    if isinstance(e, TunnelRefused):
        try:
            status = f"{e.status} {http.HTTPStatus(e.status).phrase}"
        except ValueError:
            status = str(e.status)
        flags = ResponseFlags.DENY if e.status == 401 else ResponseFlags.CONNECT
        return f"http status: {status}", flags
    if isinstance(e, TlsVerificationError):
        return f"tls error: {e}", ResponseFlags.TLS_FAILURE
    if isinstance(e, IdentityError):
        return f"identity error: {e}", ResponseFlags.IDENTITY_ERROR
    if isinstance(e, OSError):
        return f"connection failed: {e}", ResponseFlags.CONNECT
    return str(e), ResponseFlags.CONNECT  # our own errors already say what failed
