#!/usr/bin/env bash
# Set up this machine and run the ztunnel-py demo (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
exec python3 -m tools.demo "$@"
