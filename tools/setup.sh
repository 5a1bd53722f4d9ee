#!/usr/bin/env bash
# Prepare this machine for ztunnel-py: Debian packages, Python packages, bpffs, BPF objects.
# Idempotent; run as root (it installs packages and mounts bpffs). Used by tools/test.sh,
# tools/demo.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(clang llvm libbpf-dev bpftool iproute2 iptables nginx-light wrk iperf3
              nghttp2-client openssl procps psmisc make chromium)

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
