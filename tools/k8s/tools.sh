#!/usr/bin/env bash
# Build helm and fetch Istio's ztunnel chart, once per pinned version (tools/k8s/versions.env; Istio's pin is the lab's),
# cached outside the tree. Prints `HELM=<binary>` and `ZTUNNEL_CHART=<dir>` for the callers
# (tools/k8s/render.py, the manifest tests). Cold: ~7 min on 2 cores; cached: well under 1 s.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/k8s/versions.env
. "$here/versions.env"
# shellcheck source=tools/lab/versions.env
. "$here/../lab/versions.env"
CACHE=${ZTPY_CACHE:-/var/cache/ztunnel-py}
helm_dir="$CACHE/helm-$HELM_VERSION"

if [ ! -x "$helm_dir/helm" ]; then
  start=$(date +%s)
  mkdir -p "$CACHE"
  tmp=$(mktemp -d "$CACHE/.helm-$HELM_VERSION.XXXXXX")
  (cd "$tmp" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN="$tmp" \
    go install -trimpath -ldflags "-s -w" "helm.sh/helm/v4/cmd/helm@$HELM_VERSION") >&2
  rm -rf "$helm_dir" && mv "$tmp" "$helm_dir"
  echo "== helm $HELM_VERSION built in $(($(date +%s) - start))s" >&2
fi
istio_dir=$(cd /tmp && go mod download -json "istio.io/istio@$ISTIO_VERSION" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
echo "HELM=$helm_dir/helm"
echo "ZTUNNEL_CHART=$istio_dir/manifests/charts/ztunnel"
