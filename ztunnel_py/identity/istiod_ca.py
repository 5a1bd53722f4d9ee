"""istiod's ``IstioCertificateService`` over gRPC: the CA client of the istiod mode.

It talks to ``CA_ADDRESS`` as ztunnel does (``src/identity/caclient.rs``): server-only TLS
verified against ``CA_ROOT_CA`` (a file, ``SYSTEM`` or inline PEM, with ``ALT_CA_HOSTNAME`` as
the name to check), no client certificate, ``authorization: Bearer`` read from ``AUTH_TOKEN``
on every call, ``clusterid``, ``CA_HEADER_*``; ``validity_duration`` is ``SECRET_TTL``; in
``PROXY_MODE=shared`` the request's ``metadata`` carries ``{"ImpersonatedIdentity": "<spiffe
id>"}``. A file root is re-read when it changes, and the channel rebuilt, as ztunnel's
root-cert watcher does.

Its own module because it pulls in grpc (about 10 MiB of RSS): ``caclient.build_ca_client``
imports it only when ``CA_ADDRESS`` is set, so the local CA and ``FAKE_CA`` never load grpc.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import grpc

from ztunnel_py.config import Config, ProxyMode, RootCertKind
from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.csr import generate_csr
from ztunnel_py.identity.errors import CaError, CertificateError
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.istiod_auth import AuthError, call_metadata, secure_channel
from ztunnel_py.protos import ca_pb2, ca_pb2_grpc

log = logging.getLogger(__name__)

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
# A hung istiod must not hold one of the secret manager's fetch slots forever.
CALL_TIMEOUT_S = 30.0
# In-flight calls on a channel replaced after a root rotation get this long to finish.
OLD_CHANNEL_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class _FileStamp:
    inode: int
    size: int
    mtime_ns: int


def _stamp(path: str) -> _FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)


class IstiodCaClient:
    def __init__(self, config: Config) -> None:
        if config.ca_address is None:
            raise ValueError("IstiodCaClient needs CA_ADDRESS")
        self._config = config
        self._address: str = config.ca_address
        self._impersonate = config.proxy_mode is ProxyMode.SHARED
        self._ttl_s = int(config.secret_ttl_s)
        self._channel: grpc.aio.Channel | None = None
        self._root_stamp: _FileStamp | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    async def fetch_certificate(self, identity: Identity) -> WorkloadCertificate:
        csr = generate_csr(identity)
        request = ca_pb2.IstioCertificateRequest(csr=csr.csr_pem, validity_duration=self._ttl_s)
        if self._impersonate:
            request.metadata.update({IMPERSONATED_IDENTITY: str(identity)})
        try:
            metadata = call_metadata(self._config, extra_headers=self._config.ca_headers)
            channel = self._current_channel()
        except AuthError as e:
            raise CaError(f"cannot request a certificate for {identity}: {e}") from None
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        try:
            response = await stub.CreateCertificate(
                request, metadata=metadata, timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            raise CaError(self._describe_rpc_error(identity, e)) from None
        try:
            return WorkloadCertificate.from_ca_response(
                identity, csr.private_key_pem, list(response.cert_chain)
            )
        except CertificateError as e:
            raise CaError(f"istiod at {self._address} answered badly for {identity}: {e}") from e

    def _current_channel(self) -> grpc.aio.Channel:
        root = self._config.ca_root_cert
        stamp = _stamp(root.value) if root.kind is RootCertKind.FILE else None
        if self._channel is not None and stamp == self._root_stamp:
            return self._channel
        channel = secure_channel(
            self._address, root, self._config.alt_ca_hostname, env_name="CA_ROOT_CA"
        )
        if self._channel is not None:
            log.info(
                "CA root certificate changed; rebuilt the channel to istiod",
                extra={"fields": {"path": root.value, "address": self._address}},
            )
            task = asyncio.get_running_loop().create_task(
                self._channel.close(grace=OLD_CHANNEL_GRACE_S)
            )
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        self._channel = channel
        self._root_stamp = stamp
        return channel

    def _describe_rpc_error(self, identity: Identity, error: grpc.aio.AioRpcError) -> str:
        code = error.code()
        details = error.details() or ""
        msg = (
            f"CreateCertificate for {identity} at {self._address} failed:"
            f" {code.name if code else 'UNKNOWN'}: {details}"
        )
        if code is grpc.StatusCode.UNAUTHENTICATED and "impersonation" in details:
            msg += (
                " (istiod lets a node proxy request certificates for other identities only if"
                " its service account is in CA_TRUSTED_NODE_ACCOUNTS, default"
                " istio-system/ztunnel, and a pod with that identity runs on this node)"
            )
        elif code is grpc.StatusCode.UNAUTHENTICATED:
            msg += f" (check AUTH_TOKEN={self._config.auth_token} and CLUSTER_ID)"
        elif code is grpc.StatusCode.UNAVAILABLE:
            msg += (
                " (is istiod reachable, and does CA_ROOT_CA hold the root that signed its"
                " serving certificate?)"
            )
        return msg

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
