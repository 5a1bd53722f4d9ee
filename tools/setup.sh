#!/usr/bin/env bash
# Prepare this machine for ztunnel-py: Debian packages, Python packages, bpffs, BPF objects.
# Idempotent; run as root (it installs packages and mounts bpffs). Used by tools/test.sh,
# tools/demo.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(clang llvm libbpf-dev bpftool iproute2 iptables nginx-light wrk iperf3
              nghttp2-client openssl procps psmisc make podman runc debootstrap chromium)

if [ "$(id -u)" -ne 0 ]; then
  echo "tools/setup.sh: run as root (it installs Debian packages and mounts bpffs)" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "== installing ztunnel-py and its Python dependencies"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[dev]'

if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
  echo "== mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

if [ -f bpf/Makefile ]; then
  echo "== building BPF objects"
  make -s -C bpf
fi

# Kubernetes deployment (manifests/, Containerfile): helm and Istio's ztunnel chart, then the
# image (its Debian base from debootstrap). All cached outside the tree by version
# (/var/cache/ztunnel-py): cold, helm ~7 min, base ~4 min, image ~1.5 min; cached, ~15 s.
if ! command -v go >/dev/null; then
  echo "tools/setup.sh: go is needed to build helm (tools/k8s/tools.sh)" >&2
  exit 1
fi
echo "== helm and Istio's ztunnel chart (tools/k8s/tools.sh)"
start=$(date +%s)
tools/k8s/tools.sh >/dev/null
echo "   took $(($(date +%s) - start))s"
echo "== container image (tools/image/build.sh)"
start=$(date +%s)
tools/image/build.sh >/dev/null
echo "   took $(($(date +%s) - start))s"
