#!/usr/bin/env bash
# Build (once) the image's base root filesystem with Debian's debootstrap, cached outside the
# tree, and import it into podman as localhost/ztunnel-py-base:<key>. Prints the image name.
#
# The key is the suite, the month and a hash of this script (package list, trimming): a cache
# is rebuilt once a month, or when this script changes. Run as root.
set -euo pipefail

SUITE=${ZTPY_BASE_SUITE:-bookworm}
MIRROR=${ZTPY_BASE_MIRROR:-http://deb.debian.org/debian}
CACHE=${ZTPY_CACHE:-/var/cache/ztunnel-py}/rootfs
# python3-venv only for the build stage's `python -m venv` (its pip wheel is removed at the end);
# libbpf1 for eBPF mode; iproute2 and procps (ip, sysctl) for ENABLE_ORIG_SRC in eBPF mode,
# whose reply routing the daemon sets in each pod (redirect/origsrc.py). No iptables: istio-cni
# installs the in-pod rules.
PACKAGES=python3,python3-venv,libbpf1,iproute2,procps

here=$(cd "$(dirname "$0")" && pwd)
hash=$(sha256sum "$here/base-rootfs.sh" | cut -c1-10)
key="debian-$SUITE-$(date -u +%Y%m)-$hash"
tarball="$CACHE/$key.tar"
image="localhost/ztunnel-py-base:$key"

if [ ! -f "$tarball" ]; then
  mkdir -p "$CACHE"
  work=$(mktemp -d "$CACHE/.build-XXXXXX")
  trap 'rm -rf "$work"' EXIT
  echo "== debootstrap $SUITE (minbase + $PACKAGES) into $work" >&2
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work/root" "$MIRROR" >&2
  # What a container never needs: documentation, locales, package caches and lists, logs.
  rm -rf "$work"/root/usr/share/{doc,man,info,locale,lintian,bash-completion}/* \
    "$work"/root/var/lib/apt/lists/* "$work"/root/var/cache/apt/* "$work"/root/var/cache/debconf/*-old \
    "$work"/root/var/log/* "$work"/root/usr/share/python-wheels/setuptools-*
  find "$work/root/usr/lib/python3" "$work/root/usr/lib/python3.11" -name __pycache__ -prune \
    -exec rm -rf {} + 2>/dev/null || true
  tar --numeric-owner -C "$work/root" -cf "$work/rootfs.tar" .
  mv "$work/rootfs.tar" "$tarball"
  echo "== cached $tarball ($(du -h "$tarball" | cut -f1))" >&2
fi
if ! podman image exists "$image"; then
  podman import --quiet "$tarball" "$image" >/dev/null
fi
echo "$image"
