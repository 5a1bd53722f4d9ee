"""Token, metadata and TLS-root helpers shared by the xDS and CA clients."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from ztunnel_py.config import DEFAULT_TOKEN, Config, RootCert, RootCertKind, from_env
from ztunnel_py.istiod_auth import (
    AuthError,
    call_metadata,
    channel_credentials,
    channel_options,
    grpc_target,
    load_root_pem,
    read_token,
)
from ztunnel_py.testing.pki import CertificateAuthority


def config(**env: str) -> Config:
    return from_env({"MESH_CONFIG_PATH": "/nonexistent", "XDS_ADDRESS": "istiod:15012", **env})


def test_token_file_is_reread_on_every_call(tmp_path: Path) -> None:
    token = tmp_path / "istio-token"
    token.write_text("first\n")
    cfg = config(AUTH_TOKEN=str(token), CLUSTER_ID="c1")
    assert call_metadata(cfg) == [("authorization", "Bearer first"), ("clusterid", "c1")]
    token.write_text("second")
    assert call_metadata(cfg)[0] == ("authorization", "Bearer second")


def test_a_value_that_is_not_a_path_is_a_literal_token() -> None:
    assert read_token("eyJhbGciOi.literal.jwt") == "eyJhbGciOi.literal.jwt"


def test_missing_default_token_means_no_auth_headers() -> None:
    assert not Path(DEFAULT_TOKEN).exists()
    assert read_token(DEFAULT_TOKEN) is None
    cfg = config(XDS_HEADER_X_EXTRA="1")
    assert call_metadata(cfg, extra_headers=cfg.xds_headers) == [("x_extra", "1")]


def test_empty_token_file_is_an_error_that_says_so(tmp_path: Path) -> None:
    token = tmp_path / "istio-token"
    token.write_text("")
    with pytest.raises(AuthError, match="exists but is empty"):
        read_token(str(token))


def test_explicit_arguments_override_the_config(tmp_path: Path) -> None:
    cfg = config(CLUSTER_ID="c1")
    md = call_metadata(cfg, "static-token", "c2", {"X-Ca": "yes"})
    assert md == [("authorization", "Bearer static-token"), ("clusterid", "c2"), ("x-ca", "yes")]


def test_root_cert_sources(tmp_path: Path) -> None:
    pem = CertificateAuthority.create().root_pem
    path = tmp_path / "root-cert.pem"
    path.write_bytes(pem)
    assert load_root_pem(RootCert(RootCertKind.FILE, str(path))) == pem
    assert load_root_pem(RootCert(RootCertKind.INLINE, pem.decode())) == pem
    system = load_root_pem(RootCert(RootCertKind.SYSTEM))
    assert system is None or b"BEGIN CERTIFICATE" in system
    assert isinstance(
        channel_credentials(RootCert(RootCertKind.FILE, str(path))), grpc.ChannelCredentials
    )


def test_missing_root_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match=r"cannot read CA_ROOT_CA file .*missing\.pem"):
        load_root_pem(
            RootCert(RootCertKind.FILE, str(tmp_path / "missing.pem")), env_name="CA_ROOT_CA"
        )


def test_root_file_without_pem_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "root.pem"
    path.write_text("not a certificate")
    with pytest.raises(AuthError, match="no PEM certificate"):
        load_root_pem(RootCert(RootCertKind.FILE, str(path)))


def test_alternate_hostname_overrides_the_tls_name() -> None:
    assert ("grpc.ssl_target_name_override", "istiod.example") in channel_options("istiod.example")
    assert all(k != "grpc.ssl_target_name_override" for k, _ in channel_options(None))
    assert ("grpc.max_receive_message_length", 200 * 1024 * 1024) in channel_options(None)


@pytest.mark.parametrize(
    ("address", "target", "secure"),
    [
        ("https://istiod.istio-system.svc:15012", "istiod.istio-system.svc:15012", True),
        ("https://10.0.0.1", "10.0.0.1:443", True),
        ("https://[fd00::1]:15012", "[fd00::1]:15012", True),
        ("http://localhost:15010", "localhost:15010", False),
    ],
)
def test_grpc_target(address: str, target: str, secure: bool) -> None:
    assert grpc_target(address) == (target, secure)
