#!/usr/bin/env bash
# Build the Istio lab's binaries from their pinned Go modules, once per version.
#
#   tools/lab/build.sh                 # every component (kubernetes+etcd beside istio)
#   tools/lab/build.sh istio           # just these (kubernetes, etcd, istio)
#
# Cache layout (override the root with ZTPY_LAB_CACHE):
#   $ZTPY_LAB_CACHE/kubernetes-<version>/{kube-apiserver,kubectl}
#   $ZTPY_LAB_CACHE/etcd-<version>/etcd
#   $ZTPY_LAB_CACHE/istio-<version>/{pilot-discovery,istioctl,crd-all.gen.yaml}
# A directory is complete when it holds a file named `.built`; a machine that has it skips
# that build. Versions: tools/lab/versions.env (istio) and tools/lab/gomod/go.mod
# (kubernetes, etcd). Nothing is vendored: the Go module proxy supplies the sources.
# Concurrent runs (CI and a demo) take a lock per component, so each is built once.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=tools/lab/versions.env
. ./versions.env

CACHE="${ZTPY_LAB_CACHE:-/var/cache/ztunnel-py/lab}"
if ! command -v go >/dev/null; then
  echo "tools/lab/build.sh: needs Go >= 1.26 on PATH (and the Go module proxy) to build the lab" >&2
  exit 1
fi
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
LDFLAGS="-s -w"

gomod_version() { (cd gomod && go list -m -f '{{.Version}}' "$1"); }

timed() {
  # timed <label> <command...>: run, print the wall time (cold builds are reported in CI logs).
  local label=$1 start
  shift
  start=$(date +%s)
  "$@"
  echo "== lab build: $label took $(($(date +%s) - start))s"
}

build_kubernetes() {
  local out=$1
  (cd gomod && go build -trimpath -ldflags "$LDFLAGS" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
  local out=$1
  (cd gomod && go build -trimpath -ldflags "$LDFLAGS" -o "$out/etcd" ./cmd/etcd)
}

build_istio() {
  local out=$1
  # istio's own go.mod (no replace directives) pins every dependency: `go install pkg@version`.
  GOBIN="$out" go install -trimpath -ldflags "$LDFLAGS" \
    "istio.io/istio/pilot/cmd/pilot-discovery@$ISTIO_VERSION" \
    "istio.io/istio/istioctl/cmd/istioctl@$ISTIO_VERSION"
  local src
  src=$(go mod download -json "istio.io/istio@$ISTIO_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  cp "$src/manifests/charts/base/files/crd-all.gen.yaml" "$out/"
  chmod 644 "$out/crd-all.gen.yaml"
}

ensure() {
  # ensure <component> <version> <builder>: build into the cache unless already there.
  local name=$1 version=$2 builder=$3 dir tmp lock
  dir="$CACHE/$name-$version"
  mkdir -p "$CACHE"
  exec {lock}>"$CACHE/.$name-$version.lock"
  flock "$lock"
  if [ -f "$dir/.built" ]; then
    echo "== lab build: $name $version cached in $dir"
    exec {lock}>&-
    return
  fi
  tmp=$(mktemp -d "$CACHE/.$name-$version.XXXXXX")
  chmod 755 "$tmp"
  echo "== lab build: building $name $version (cold; this takes minutes)"
  timed "$name $version" "$builder" "$tmp"
  touch "$tmp/.built"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  exec {lock}>&-
}

build() {
  local component
  for component in "$@"; do
    case "$component" in
      kubernetes) ensure kubernetes "$(gomod_version k8s.io/kubernetes)" build_kubernetes ;;
      etcd) ensure etcd "$(gomod_version go.etcd.io/etcd/server/v3)" build_etcd ;;
      istio) ensure istio "$ISTIO_VERSION" build_istio ;;
      *) echo "tools/lab/build.sh: unknown component $component (kubernetes, etcd, istio)" >&2; return 2 ;;
    esac
  done
}

if [ $# -gt 0 ]; then
  build "$@"
  exit
fi
# Everything: the two module graphs share little, so build them side by side (downloads and
# links of one overlap the compiles of the other); etcd reuses most of kubernetes' packages.
build kubernetes etcd &
kube=$!
build istio &
istio=$!
rc=0
wait "$kube" || rc=1
wait "$istio" || rc=1
exit $rc
