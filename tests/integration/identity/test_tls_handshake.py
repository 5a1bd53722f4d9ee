"""Real TLS handshakes on loopback with certificates made by the openssl CLI.

Our side uses identity.tls contexts and checks; the misbehaving peer is a plain ``ssl`` context
that loads the openssl-made files, so neither side's certificates come from our own code.
"""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass

import pytest
from cryptography import x509

from ztunnel_py.identity import tls
from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.spiffe import Identity

SERVER = Identity("cluster.local", "default", "server")
CLIENT = Identity("cluster.local", "default", "client")
TLS_LOGGER = "ztunnel_py.identity.tls"


def workload_cert(leaf, root_path, identity: Identity) -> WorkloadCertificate:
    return WorkloadCertificate.build(
        identity,
        leaf.key.read_bytes(),
        x509.load_pem_x509_certificate(leaf.cert.read_bytes()),
        [],
        x509.load_pem_x509_certificates(root_path.read_bytes()),
    )


def plain_server_context(leaf) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def plain_client_context(leaf, *, max_version=ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = max_version
    ctx.load_cert_chain(leaf.cert, leaf.key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


@dataclass
class Outcome:
    identity: Identity | None = None
    error: tls.TlsVerificationError | None = None


async def our_server(ctx: ssl.SSLContext, trust_domain: str):
    """A TCP server that upgrades to TLS with ``ctx`` and runs verify_client."""
    outcome = Outcome()
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(ctx)
            obj = writer.get_extra_info("ssl_object")
            outcome.identity = tls.verify_client(obj, trust_domain)
            assert obj.selected_alpn_protocol() == "h2"
            writer.write(b"ok")
            await writer.drain()
        except ssl.SSLError as e:
            outcome.error = tls.handshake_error(e, role="client")
        except tls.TlsVerificationError as e:
            outcome.error = e
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], outcome, done


async def our_client(port: int, ctx: ssl.SSLContext, expected) -> Outcome:
    outcome = Outcome()
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=tls.NO_SNI
        )
    except ssl.SSLError as e:
        outcome.error = tls.handshake_error(e, role="server")
        return outcome
    try:
        obj = writer.get_extra_info("ssl_object")
        assert obj.server_hostname is None  # no SNI was sent
        outcome.identity = tls.verify_server(obj, expected)
        assert obj.version() == "TLSv1.3"
        assert obj.selected_alpn_protocol() == "h2"
    except tls.TlsVerificationError as e:
        outcome.error = e
    finally:
        writer.close()
    return outcome


async def peer_server(ctx: ssl.SSLContext):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await reader.read(1)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


async def peer_client(port: int, ctx: ssl.SSLContext) -> None:
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=""
        )
        await reader.read(2)
        writer.close()
    except (ssl.SSLError, ConnectionError):
        pass  # our server refusing us is the point of these tests


def assert_logged(caplog, check: str) -> None:
    lines = [r.getMessage() for r in caplog.records if r.name == TLS_LOGGER]
    assert any(f"verification failed ({check})" in line for line in lines), lines


@pytest.fixture
def certs(openssl_pki):
    mesh = openssl_pki["mesh"]
    return {
        "server": workload_cert(openssl_pki["server"], mesh.root, SERVER),
        "client": workload_cert(openssl_pki["client"], mesh.root, CLIENT),
    }


@pytest.mark.asyncio
async def test_good_handshake_both_ways(certs, caplog):
    caplog.set_level(logging.WARNING, logger=TLS_LOGGER)
    server, port, outcome, done = await our_server(
        tls.server_context(certs["server"]), "cluster.local"
    )
    async with server:
        client = await our_client(port, tls.client_context(certs["client"]), [SERVER])
        await done.wait()
    assert client.error is None and client.identity == SERVER
    assert outcome.error is None and outcome.identity == CLIENT
    assert not [r for r in caplog.records if r.name == TLS_LOGGER]


def test_contexts_are_cached_per_certificate(certs):
    assert tls.client_context(certs["client"]) is tls.client_context(certs["client"])
    assert tls.server_context(certs["client"]) is not tls.client_context(certs["client"])
    ctx = tls.server_context(certs["server"])
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_TICKET
    assert ctx.num_tickets == 0
    assert tls.server_context(certs["server"], tls12_enabled=True).minimum_version is (
        ssl.TLSVersion.TLSv1_2
    )


@pytest.mark.parametrize(
    ("peer", "error_type", "check"),
    [
        ("server_expired", tls.CertificateExpired, "expired"),
        ("server_other_root", tls.UnknownRoot, "unknown root"),
        ("server_no_uri", tls.NoUriSan, "no URI SAN"),
    ],
)
@pytest.mark.asyncio
async def test_client_refuses_bad_server(openssl_pki, certs, caplog, peer, error_type, check):
    caplog.set_level(logging.WARNING, logger=TLS_LOGGER)
    server, port = await peer_server(plain_server_context(openssl_pki[peer]))
    async with server:
        outcome = await our_client(port, tls.client_context(certs["client"]), [SERVER])
    assert outcome.identity is None
    assert isinstance(outcome.error, error_type)
    assert outcome.error.check == check
    assert_logged(caplog, check)


@pytest.mark.asyncio
async def test_client_refuses_unexpected_server_identity(certs, caplog):
    caplog.set_level(logging.WARNING, logger=TLS_LOGGER)
    server, port, _, done = await our_server(tls.server_context(certs["server"]), "cluster.local")
    expected = [Identity("cluster.local", "default", "reviews")]
    async with server:
        outcome = await our_client(port, tls.client_context(certs["client"]), expected)
        await done.wait()
    assert isinstance(outcome.error, tls.UnexpectedIdentity)
    assert "sa/server" in str(outcome.error) and "sa/reviews" in str(outcome.error)
    assert_logged(caplog, "unexpected identity")


@pytest.mark.parametrize(
    ("peer", "error_type", "check"),
    [
        ("client_expired", tls.CertificateExpired, "expired"),
        ("client_other_root", tls.UnknownRoot, "unknown root"),
        ("client_other_td", tls.WrongTrustDomain, "wrong trust domain"),
        ("client_no_uri", tls.NoUriSan, "no URI SAN"),
    ],
)
@pytest.mark.asyncio
async def test_server_refuses_bad_client(openssl_pki, certs, caplog, peer, error_type, check):
    caplog.set_level(logging.WARNING, logger=TLS_LOGGER)
    server, port, outcome, done = await our_server(
        tls.server_context(certs["server"]), "cluster.local"
    )
    async with server:
        await peer_client(port, plain_client_context(openssl_pki[peer]))
        await done.wait()
    assert outcome.identity is None
    assert isinstance(outcome.error, error_type)
    assert outcome.error.check == check
    assert_logged(caplog, check)


@pytest.mark.asyncio
async def test_server_requires_a_client_certificate(certs, caplog):
    caplog.set_level(logging.WARNING, logger=TLS_LOGGER)
    server, port, outcome, done = await our_server(
        tls.server_context(certs["server"]), "cluster.local"
    )
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.verify_mode = ssl.CERT_NONE
    async with server:
        await peer_client(port, no_cert)
        await done.wait()
    assert isinstance(outcome.error, tls.NoPeerCertificate)
    assert_logged(caplog, "no peer certificate")


@pytest.mark.asyncio
async def test_tls12_is_refused_unless_enabled(openssl_pki, certs, caplog):
    caplog.set_level(logging.WARNING, logger=TLS_LOGGER)
    old_client = plain_client_context(openssl_pki["client"], max_version=ssl.TLSVersion.TLSv1_2)
    server, port, outcome, done = await our_server(
        tls.server_context(certs["server"]), "cluster.local"
    )
    async with server:
        await peer_client(port, old_client)
        await done.wait()
    assert isinstance(outcome.error, tls.HandshakeFailed)
    assert outcome.identity is None

    ctx12 = tls.server_context(certs["server"], tls12_enabled=True)
    server, port, outcome, done = await our_server(ctx12, "cluster.local")
    async with server:
        await peer_client(port, old_client)
        await done.wait()
    assert outcome.error is None and outcome.identity == CLIENT
