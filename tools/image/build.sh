#!/usr/bin/env bash
# Build ztunnel-py's container image with podman: the cached Debian base (base-rootfs.sh), the
# BPF objects (make -C bpf), then the Containerfile. Prints the image name on stdout.
#   tools/image/build.sh [IMAGE]        default IMAGE: localhost/ztunnel-py:<version>
# Run as root. No registry is involved: the base is imported, the result stays local.
set -euo pipefail
cd "$(dirname "$0")/../.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image=${1:-localhost/ztunnel-py:$version}
base=$(tools/image/base-rootfs.sh)
make -s -C bpf
# runc, not crun: crun refuses hybrid cgroup hosts. Explicit ulimits: podman's defaults
# exceed what an unprivileged-rlimit host grants.
podman build --quiet --runtime runc --network host \
  --ulimit nofile=16384:16384 --ulimit nproc=4096:4096 \
  --secret "id=ca-bundle,src=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" \
  --build-arg "BASE=$base" -t "$image" -f Containerfile . >&2
# Each code change leaves the previous build's untagged layers (~0.5 GB) behind: drop those older
# than a day, keeping the recent ones that make the next build a cache hit.
podman image prune -f --filter until=24h >/dev/null
echo "$image"
