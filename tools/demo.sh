#!/usr/bin/env bash
# Set up this machine and run the ztunnel-py demo (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
for arg in "$@"; do
  # The real control plane: build (or find in the cache) istiod, kube-apiserver and etcd.
  if [ "$arg" = "--istiod" ]; then tools/lab/build.sh; fi
done
exec python3 -m tools.demo "$@"
