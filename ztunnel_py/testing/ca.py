"""A fake istiod CA: ``istio.v1.auth.IstioCertificateService`` on any grpc.aio server.

It signs CSRs with a ``testing.pki.CertificateAuthority`` and answers in istiod's shape (leaf,
intermediates, roots last). Tests can make it misbehave (``behaviour``) and read back every
request it saw (``requests``: CSR, validity, metadata including ImpersonatedIdentity, and the
call headers such as ``authorization`` and ``clusterid``).

``FakeCaClient`` is the in-process counterpart for tests that need no gRPC at all: a
``CaClient`` for ``SecretManager`` that signs with the same test PKI, on a test's clock, and can be
held (``gate``) or made to fail (``fail``).

Usage::

    fake = FakeCa(CertificateAuthority.create())
    fake.add_to_server(server)          # any grpc.aio.Server, e.g. FakeIstiod's
    # or standalone, over TLS:
    server, port = await start_tls_server([fake], server_cert)
"""

from __future__ import annotations

import asyncio
import datetime
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from google.protobuf import json_format

from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.clock import Clock
from ztunnel_py.identity.csr import generate_csr, parse_csr
from ztunnel_py.identity.errors import CaError, CertificateError
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.protos import ca_pb2, ca_pb2_grpc
from ztunnel_py.testing.pki import CertificateAuthority, IssuedCert, cert_to_pem

WRONG_IDENTITY = "spiffe://cluster.local/ns/intruder/sa/intruder"


class Behaviour(enum.Enum):
    SIGN = "sign"  # answer correctly
    UNAVAILABLE = "unavailable"  # abort with UNAVAILABLE
    UNAUTHENTICATED = "unauthenticated"  # abort as istiod does on an impersonation failure
    WRONG_IDENTITY = "wrong identity"  # a valid leaf, but for WRONG_IDENTITY
    BAD_CHAIN = "bad chain"  # a leaf signed by a CA that is not in the roots sent
    GARBAGE = "garbage"  # cert_chain elements that are not PEM
    NO_ROOT = "no root"  # only the leaf, no roots element


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    csr: str
    validity_duration: int
    metadata: dict[str, Any]
    headers: dict[str, str]

    @property
    def impersonated_identity(self) -> str | None:
        value = self.metadata.get("ImpersonatedIdentity")
        return str(value) if value is not None else None

    @property
    def csr_uris(self) -> tuple[str, ...]:
        return parse_csr(self.csr).uris


@dataclass(eq=False)
class FakeCa(ca_pb2_grpc.IstioCertificateServiceServicer):
    authority: CertificateAuthority
    behaviour: Behaviour = Behaviour.SIGN
    default_ttl_s: float = 86400.0
    # When set, requests must carry ``authorization: Bearer <required_token>``.
    required_token: str | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    issued: list[x509.Certificate] = field(default_factory=list)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(self, server)

    @property
    def root_pem(self) -> bytes:
        return self.authority.root_pem

    async def CreateCertificate(
        self,
        request: ca_pb2.IstioCertificateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ca_pb2.IstioCertificateResponse:
        headers = {
            k: (v.decode() if isinstance(v, bytes) else v)
            for k, v in (context.invocation_metadata() or ())
        }
        recorded = RecordedRequest(
            csr=request.csr,
            validity_duration=request.validity_duration,
            metadata=json_format.MessageToDict(request.metadata),
            headers=headers,
        )
        self.requests.append(recorded)

        wanted = None if self.required_token is None else f"Bearer {self.required_token}"
        if wanted is not None and headers.get("authorization") != wanted:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authenticate failure")
        if self.behaviour is Behaviour.UNAVAILABLE:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake CA told to be unavailable")
        if self.behaviour is Behaviour.UNAUTHENTICATED:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "request impersonation authentication failure"
            )
        try:
            public_key = parse_csr(request.csr).public_key
        except CertificateError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"CSR parsing error ({e})")
            raise  # abort raises; this keeps type checkers aware

        identity = recorded.impersonated_identity or (recorded.csr_uris or ("",))[0]
        if not identity:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no identity in the request")
        if self.behaviour is Behaviour.WRONG_IDENTITY:
            identity = WRONG_IDENTITY
        ttl = request.validity_duration if request.validity_duration > 0 else self.default_ttl_s
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        signer = (
            CertificateAuthority.create(common_name="unrelated CA")
            if self.behaviour is Behaviour.BAD_CHAIN
            else self.authority
        )
        leaf = signer.issue_workload(
            identity,
            not_before=now - datetime.timedelta(minutes=2),
            not_after=now + datetime.timedelta(seconds=ttl),
            public_key=public_key,
        )
        self.issued.append(leaf.cert)
        return ca_pb2.IstioCertificateResponse(cert_chain=self._chain(leaf))

    def _chain(self, leaf: IssuedCert) -> Sequence[str]:
        if self.behaviour is Behaviour.GARBAGE:
            return ["not a certificate", "also not a certificate"]
        intermediates = [cert_to_pem(c).decode() for c in self._intermediates()]
        if self.behaviour is Behaviour.NO_ROOT:
            return [leaf.cert_pem.decode()]
        return [leaf.cert_pem.decode(), *intermediates, self.authority.root_pem.decode()]

    def _intermediates(self) -> list[x509.Certificate]:
        return _intermediates_of(self.authority)


async def start_tls_server(
    servicers: Sequence[FakeCa],
    server_cert: IssuedCert,
    *,
    host: str = "127.0.0.1",
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio TLS server (no client certificates, as istiod's :15012) on a free port."""
    server = grpc.aio.server()
    for servicer in servicers:
        servicer.add_to_server(server)
    credentials = grpc.ssl_server_credentials([(server_cert.key_pem, server_cert.chain_pem)])
    port = server.add_secure_port(f"{host}:0", credentials)
    await server.start()
    return server, port


class FakeCaClient:
    """A ``CaClient`` signing with ``authority``; certificates start at ``clock.wall()``."""

    def __init__(
        self,
        authority: CertificateAuthority,
        clock: Clock,
        *,
        lifetime_s: float = 3600.0,
    ) -> None:
        self.authority = authority
        self.clock = clock
        self.lifetime_s = lifetime_s
        self.calls: list[Identity] = []
        self.fail: str | None = None  # when set, every call raises CaError(fail)
        self.gate: asyncio.Event | None = None  # when set, calls wait for it
        self.in_flight = 0

    async def fetch_certificate(self, identity: Identity) -> WorkloadCertificate:
        self.calls.append(identity)
        self.in_flight += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail is not None:
                raise CaError(self.fail)
            req = generate_csr(identity)
            start = datetime.datetime.fromtimestamp(int(self.clock.wall()), tz=datetime.UTC)
            leaf = self.authority.issue_workload(
                str(identity),
                not_before=start,
                not_after=start + datetime.timedelta(seconds=self.lifetime_s),
                public_key=parse_csr(req.csr_pem).public_key,
            )
            chain = [leaf.cert_pem.decode()]
            chain += [cert_to_pem(c).decode() for c in _intermediates_of(self.authority)]
            chain.append(self.authority.root_pem.decode())
            return WorkloadCertificate.from_ca_response(identity, req.private_key_pem, chain)
        finally:
            self.in_flight -= 1

    def count(self, identity: Identity) -> int:
        return sum(1 for c in self.calls if c == identity)


def _intermediates_of(authority: CertificateAuthority) -> list[x509.Certificate]:
    if not authority.parents:
        return []
    return [authority.cert, *authority.parents[:-1]]
