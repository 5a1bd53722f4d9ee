#!/usr/bin/env bash
# Set up this machine and run every check and test ztunnel-py has. CI runs exactly this.
# As root, privileged tests (network namespaces, iptables, BPF) run and must pass: a missing
# privilege or kernel feature fails them instead of skipping (ZT_REQUIRE_PRIVILEGED=1).
set -uo pipefail
cd "$(dirname "$0")/.."

tools/setup.sh || exit 1

step() { echo; echo "== $*"; }
fail=0
run() { "$@" || { echo "FAILED: $*"; fail=1; }; }

step "format and lint (ruff)"
run ruff format --check .
run ruff check .
step "types (mypy --strict)"
run mypy
step "layering (import-linter)"
run lint-imports
if [ -f tools/gen_protos.py ]; then
  step "generated protobuf code is current"
  run python3 tools/gen_protos.py --check
fi
if [ -f tools/gen_bpf_types.py ]; then
  step "generated BPF types are current"
  run python3 tools/gen_bpf_types.py --check
fi

step "manifests/plain are the current render of Istio's ztunnel chart"
run python3 tools/k8s/render.py --check

step "Istio lab binaries (tools/lab/build.sh: cached by version, cold build takes minutes)"
run tools/lab/build.sh

step "tests (pytest)"
if [ "$(id -u)" -eq 0 ]; then
  export ZT_REQUIRE_PRIVILEGED=1
fi
python3 -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "FAILED: pytest collected no tests"
  rc=1
fi
[ $rc -eq 0 ] || fail=1

echo
if [ $fail -ne 0 ]; then
  echo "== some checks FAILED"
  exit 1
fi
echo "== all checks passed"
