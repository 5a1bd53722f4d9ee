"""Authentication to istiod, shared by the xDS and CA clients: token, headers, TLS roots.

As ztunnel (``src/identity/auth.rs``, ``src/config.rs``, ``src/tls/control.rs``):

- server-only TLS, verified against ``XDS_ROOT_CA``/``CA_ROOT_CA``: a file, ``SYSTEM`` (the OS
  trust store) or inline PEM; no client certificate;
- every call carries ``authorization: Bearer <token>`` and ``clusterid: <CLUSTER_ID>``.
  ``AUTH_TOKEN`` names a file that is re-read on every call; a value that is not an existing
  path is the token itself; when the default token file does not exist, no auth header is sent;
- ``XDS_HEADER_*`` / ``CA_HEADER_*`` become extra metadata.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from ztunnel_py.config import DEFAULT_TOKEN, Config, RootCert, RootCertKind
from ztunnel_py.errors import ZtunnelError

# ztunnel's limits for the control-plane channel (src/xds/client.rs, src/tls/control.rs).
MAX_MESSAGE_BYTES = 200 * 1024 * 1024
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


class AuthError(ZtunnelError):
    """Credentials for istiod cannot be prepared (token or root certificate)."""


def read_token(token_path: str) -> str | None:
    """The bearer token for one call, or ``None`` when no token is configured.

    An existing file is read fresh (projected tokens rotate); an empty file is an error, as in
    ztunnel. A value that is not an existing path is a literal token, except the default path,
    whose absence means "no authentication" (a local or test istiod).
    """
    path = Path(token_path)
    if path.exists():
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise AuthError(f"cannot read AUTH_TOKEN file {token_path}: {e.strerror}") from None
        if not token:
            raise AuthError(
                f"AUTH_TOKEN file {token_path} exists but is empty: "
                "is the projected service-account token mounted?"
            )
        return token
    if token_path == DEFAULT_TOKEN or not token_path:
        return None
    return token_path


def call_metadata(
    config: Config,
    token_path: str | None = None,
    cluster_id: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """gRPC metadata for one call: bearer token + cluster id (when there is a token), extras.

    ``token_path`` and ``cluster_id`` default to the config's ``AUTH_TOKEN`` and ``CLUSTER_ID``;
    pass ``config.xds_headers`` or ``config.ca_headers`` as ``extra_headers``.
    """
    token = read_token(config.auth_token if token_path is None else token_path)
    metadata: list[tuple[str, str]] = []
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
        metadata.append(("clusterid", config.cluster_id if cluster_id is None else cluster_id))
    for key, value in (extra_headers or {}).items():
        metadata.append((key.lower(), value))
    return metadata


def load_root_pem(root: RootCert, *, env_name: str = "XDS_ROOT_CA") -> bytes | None:
    """PEM bytes of the trust roots; ``None`` means gRPC's built-in roots."""
    if root.kind is RootCertKind.INLINE:
        return root.value.encode()
    if root.kind is RootCertKind.SYSTEM:
        cafile = ssl.get_default_verify_paths().cafile
        if cafile and Path(cafile).is_file():
            return Path(cafile).read_bytes()
        return None
    try:
        pem = Path(root.value).read_bytes()
    except OSError as e:
        raise AuthError(
            f"cannot read {env_name} file {root.value}: {e.strerror}; "
            f"set {env_name} to the istiod root certificate (a file, SYSTEM or inline PEM)"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise AuthError(f"{env_name} file {root.value} holds no PEM certificate")
    return pem


def channel_credentials(
    root: RootCert, *, env_name: str = "XDS_ROOT_CA"
) -> grpc.ChannelCredentials:
    """Server-only TLS: verify istiod against ``root``; we present no client certificate."""
    return grpc.ssl_channel_credentials(root_certificates=load_root_pem(root, env_name=env_name))


def channel_options(alt_hostname: str | None) -> list[tuple[str, Any]]:
    """Channel options for istiod: message size, HTTP/2 keepalive, alternate TLS name.

    gRPC checks one name per channel, so with ``ALT_*_HOSTNAME`` set the certificate must carry
    the alternate name (ztunnel accepts either the address's host or the alternate).
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if alt_hostname:
        options.append(("grpc.ssl_target_name_override", alt_hostname))
    return options


def grpc_target(address: str) -> tuple[str, bool]:
    """``https://host:port`` -> (``host:port``, uses TLS). A missing port means 443/80."""
    parts = urlsplit(address)
    host = parts.hostname or ""
    if not host:
        raise AuthError(f"control-plane address {address!r} has no host")
    secure = parts.scheme != "http"
    port = parts.port or (443 if secure else 80)
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}", secure


def secure_channel(
    address: str, root: RootCert, alt_hostname: str | None, *, env_name: str = "XDS_ROOT_CA"
) -> grpc.aio.Channel:
    """A grpc.aio channel to istiod (plaintext only for an explicit ``http://`` address)."""
    target, secure = grpc_target(address)
    options = channel_options(alt_hostname)
    if not secure:
        return grpc.aio.insecure_channel(target, options=options)
    creds = channel_credentials(root, env_name=env_name)
    return grpc.aio.secure_channel(target, creds, options=options)
