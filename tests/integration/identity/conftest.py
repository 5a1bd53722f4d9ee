"""Certificates made independently of our code, with the ``openssl`` command line."""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_CA_CONFIG = """\
[ ca ]
default_ca = testca
[ testca ]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
[ anything ]
commonName = optional
organizationName = optional
[ root ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ leaf ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = critical, ${{ENV::SAN}}
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


@dataclass(frozen=True)
class OpensslLeaf:
    cert: Path
    key: Path


class OpensslPki:
    """One root per instance; leaves signed with ``openssl ca`` (explicit validity dates)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory / name
        self.dir.mkdir(parents=True)
        (self.dir / "index.txt").write_text("")
        (self.dir / "serial").write_text("1000\n")
        (self.dir / "ca.cnf").write_text(_CA_CONFIG.format(dir=self.dir))
        self.root_key = self.dir / "root-key.pem"
        self.root = self.dir / "root-cert.pem"
        _openssl(
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            str(self.root_key),
            cwd=self.dir,
        )
        _openssl(
            "req",
            "-new",
            "-x509",
            "-key",
            str(self.root_key),
            "-subj",
            f"/O=cluster.local/CN={name}",
            "-days",
            "3650",
            "-config",
            str(self.dir / "ca.cnf"),
            "-extensions",
            "root",
            "-out",
            str(self.root),
            cwd=self.dir,
            env={**os.environ, "SAN": "URI:unused"},
        )

    def leaf(
        self,
        stem: str,
        san: str,
        *,
        start: str = "20200101000000Z",
        end: str = "20991231000000Z",
    ) -> OpensslLeaf:
        """``san`` in openssl syntax, e.g. ``URI:spiffe://td/ns/a/sa/b`` or ``DNS:x``."""
        key = self.dir / f"{stem}-key.pem"
        csr = self.dir / f"{stem}.csr"
        cert = self.dir / f"{stem}.pem"
        _openssl(
            "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key), cwd=self.dir
        )
        _openssl(
            "req", "-new", "-key", str(key), "-subj", f"/CN={stem}", "-out", str(csr), cwd=self.dir
        )
        _openssl(
            "ca",
            "-batch",
            "-notext",
            "-config",
            str(self.dir / "ca.cnf"),
            "-cert",
            str(self.root),
            "-keyfile",
            str(self.root_key),
            "-extensions",
            "leaf",
            "-startdate",
            start,
            "-enddate",
            end,
            "-in",
            str(csr),
            "-out",
            str(cert),
            cwd=self.dir,
            env={**os.environ, "SAN": san},
        )
        return OpensslLeaf(cert=cert, key=key)


@pytest.fixture(scope="module")
def openssl_pki(tmp_path_factory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("openssl-pki")
    mesh = OpensslPki(base, "mesh-root")
    other = OpensslPki(base, "other-root")
    expired = {"start": "20200101000000Z", "end": "20200102000000Z"}
    return {
        "mesh": mesh,
        "server": mesh.leaf("server", "URI:spiffe://cluster.local/ns/default/sa/server"),
        "client": mesh.leaf("client", "URI:spiffe://cluster.local/ns/default/sa/client"),
        "server_expired": mesh.leaf(
            "server-expired", "URI:spiffe://cluster.local/ns/default/sa/server", **expired
        ),
        "client_expired": mesh.leaf(
            "client-expired", "URI:spiffe://cluster.local/ns/default/sa/client", **expired
        ),
        "server_other_root": other.leaf(
            "server-other", "URI:spiffe://cluster.local/ns/default/sa/server"
        ),
        "client_other_root": other.leaf(
            "client-other", "URI:spiffe://cluster.local/ns/default/sa/client"
        ),
        "client_other_td": mesh.leaf(
            "client-other-td", "URI:spiffe://other.example/ns/default/sa/client"
        ),
        "server_no_uri": mesh.leaf("server-no-uri", "DNS:server.default.svc"),
        "client_no_uri": mesh.leaf("client-no-uri", "DNS:client.default.svc"),
    }
