#!/usr/bin/env bash
# Make a plug-in CA directory for ztunnel-py's embedded CA (LOCAL_CA_DIR), with the openssl CLI.
#
#   certs/gen.sh OUT_DIR [--trust-domain TD] [--root-cert FILE --root-key FILE]
#
# Writes, in Istio's plug-in layout (the same files istiod reads from its cacerts secret):
#   ca-cert.pem     an intermediate CA for this node or cluster
#   ca-key.pem      its private key (mode 0600)
#   root-cert.pem   the root that peers trust
#   cert-chain.pem  ca-cert.pem followed by root-cert.pem
# OUT_DIR is created with mode 0700. Without --root-cert/--root-key a new root is made too
# (root-key.pem is then left in OUT_DIR/root/, mode 0600: move it somewhere safe, ztunnel-py
# never needs it). Pass the same root to several runs to make CAs whose workloads trust each
# other. Environment: ROOT_DAYS (default 3650), CA_DAYS (default 730).
set -euo pipefail
umask 077

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

out=""
trust_domain="cluster.local"
root_cert=""
root_key=""
while [ $# -gt 0 ]; do
  case "$1" in
    --trust-domain) trust_domain="$2"; shift 2 ;;
    --root-cert) root_cert="$2"; shift 2 ;;
    --root-key) root_key="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "gen.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$out" ] || usage; out="$1"; shift ;;
  esac
done
[ -n "$out" ] || usage
if { [ -n "$root_cert" ] && [ -z "$root_key" ]; } || { [ -z "$root_cert" ] && [ -n "$root_key" ]; }; then
  echo "gen.sh: --root-cert and --root-key go together" >&2; exit 2
fi
for f in ca-cert.pem ca-key.pem root-cert.pem cert-chain.pem; do
  if [ -e "$out/$f" ]; then
    echo "gen.sh: $out/$f exists; refusing to overwrite a CA (remove it first)" >&2; exit 1
  fi
done

mkdir -p "$out"
chmod 700 "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat > "$work/ext.cnf" <<CNF
[ root ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ intermediate ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, digitalSignature, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF

if [ -z "$root_cert" ]; then
  mkdir -p "$out/root"
  chmod 700 "$out/root"
  root_cert="$out/root-cert.pem"
  root_key="$out/root/root-key.pem"
  openssl ecparam -name prime256v1 -genkey -noout -out "$work/root-key.pem"
  openssl pkcs8 -topk8 -nocrypt -in "$work/root-key.pem" -out "$root_key"
  openssl req -new -x509 -sha256 -key "$root_key" -days "${ROOT_DAYS:-3650}" \
    -subj "/O=$trust_domain/CN=Root CA" \
    -config "$work/ext.cnf" -extensions root -out "$root_cert"
else
  cp "$root_cert" "$out/root-cert.pem"
fi

openssl ecparam -name prime256v1 -genkey -noout -out "$work/ca-key.pem"
openssl pkcs8 -topk8 -nocrypt -in "$work/ca-key.pem" -out "$out/ca-key.pem"
chmod 600 "$out/ca-key.pem"
openssl req -new -sha256 -key "$out/ca-key.pem" \
  -subj "/O=$trust_domain/CN=Intermediate CA $(hostname -s 2>/dev/null || echo node)" \
  -out "$work/ca.csr"
openssl x509 -req -sha256 -in "$work/ca.csr" -CA "$root_cert" -CAkey "$root_key" \
  -CAcreateserial -CAserial "$work/root.srl" -days "${CA_DAYS:-730}" \
  -extfile "$work/ext.cnf" -extensions intermediate -out "$out/ca-cert.pem" 2>/dev/null
chmod 644 "$out/ca-cert.pem" "$out/root-cert.pem"
cat "$out/ca-cert.pem" "$out/root-cert.pem" > "$out/cert-chain.pem"
chmod 644 "$out/cert-chain.pem"

openssl verify -CAfile "$out/root-cert.pem" "$out/ca-cert.pem" >/dev/null
echo "plug-in CA written to $out (trust domain $trust_domain)"
echo "start ztunnel-py with LOCAL_CA_DIR=$out"
