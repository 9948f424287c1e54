#!/usr/bin/env bash
# Ensure helm (v3) and kubeconform exist and print the directory holding them as the last
# line of stdout (progress goes to stderr).
#
# Both are Go programs, and the Go module proxy is a registry we can count on, so they are
# built with `go install` (CGO off, static) into a cache outside the repository:
#   ${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}/tools/bin
# A binary is reused when it reports the pinned version; otherwise it is rebuilt. Builds go
# to a scratch GOBIN and are moved into place (rename within one filesystem), so the bin dir
# never holds a half-written binary, and a lock serialises concurrent callers.
#
# kubeconform ships no schemas (its default schema location is a GitHub URL, which it
# must never use here: always pass -schema-location); tests/test_chart.py generates
# JSON schemas from the test kube-apiserver's /openapi/v2.
#
# Usage: hack/ensure-helm-tools.sh [--print-versions]
#   --print-versions  print HELM_VERSION=... and KUBECONFORM_VERSION=... lines and exit.
# Overrides: KUBEMR_HELM_VERSION, KUBEMR_KUBECONFORM_VERSION.
set -euo pipefail

HELM_VERSION="${KUBEMR_HELM_VERSION:-v3.22.0}"
KUBECONFORM_VERSION="${KUBEMR_KUBECONFORM_VERSION:-v0.8.0}"

if [[ "${1:-}" == "--print-versions" ]]; then
  echo "HELM_VERSION=${HELM_VERSION}"
  echo "KUBECONFORM_VERSION=${KUBECONFORM_VERSION}"
  exit 0
fi

log() { echo "ensure-helm-tools: $*" >&2; }

CACHE="${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}"
TOOLS_DIR="$CACHE/tools"
BIN_DIR="$TOOLS_DIR/bin"

# The version a cached binary reports ("" if it is missing or broken).
helm_version() {
  [[ -x "$BIN_DIR/helm" ]] || return 0
  "$BIN_DIR/helm" version --template '{{.Version}}' 2>/dev/null || true
}
kubeconform_version() {
  [[ -x "$BIN_DIR/kubeconform" ]] || return 0
  "$BIN_DIR/kubeconform" -v 2>/dev/null || true
}
up_to_date() {
  [[ "$(helm_version)" == "$HELM_VERSION" && "$(kubeconform_version)" == "$KUBECONFORM_VERSION" ]]
}

if up_to_date; then
  echo "$BIN_DIR"
  exit 0
fi

command -v go >/dev/null || { log "need the 'go' toolchain to build helm and kubeconform"; exit 1; }
mkdir -p "$BIN_DIR"

# Serialise concurrent callers: the second waits, then finds the finished binaries.
exec 9>"$TOOLS_DIR/.lock"
log "waiting for lock $TOOLS_DIR/.lock"
flock 9
if up_to_date; then
  echo "$BIN_DIR"
  exit 0
fi

rm -rf "$TOOLS_DIR"/gobin.partial.*  # leftovers of killed builds; we hold the lock
STAGE_DIR=$(mktemp -d "$TOOLS_DIR/gobin.partial.XXXXXX")
trap 'rm -rf "$STAGE_DIR"' EXIT

export CGO_ENABLED=0 GOBIN="$STAGE_DIR" GOFLAGS="${GOFLAGS:-} -trimpath"
# Module mode outside any module, whatever the caller's directory holds.
cd "$STAGE_DIR"

if [[ "$(helm_version)" != "$HELM_VERSION" ]]; then
  # The ldflags helm's Makefile sets: its version, and the Kubernetes version that
  # `helm lint`/`helm template` assume (Capabilities.KubeVersion), from its client-go.
  gomod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  client_go=$(go mod edit -json "$gomod" | python3 -c '
import json, sys
print(next(r["Version"] for r in json.load(sys.stdin)["Require"] if r["Path"] == "k8s.io/client-go"))')
  k8s_minor=$(echo "$client_go" | cut -d. -f2)  # v0.37.0 -> 37 (Kubernetes 1.37)
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
  done
  log "building helm $HELM_VERSION (a few minutes the first time)"
  start=$SECONDS
  go install -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  log "built helm in $((SECONDS - start))s"
  mv -f "$STAGE_DIR/helm" "$BIN_DIR/helm"
fi

if [[ "$(kubeconform_version)" != "$KUBECONFORM_VERSION" ]]; then
  log "building kubeconform $KUBECONFORM_VERSION"
  start=$SECONDS
  go install -ldflags "-s -w -X main.version=$KUBECONFORM_VERSION" \
    "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
  log "built kubeconform in $((SECONDS - start))s"
  mv -f "$STAGE_DIR/kubeconform" "$BIN_DIR/kubeconform"
fi

if ! up_to_date; then
  log "built tools do not report the pinned versions: helm '$(helm_version)'," \
    "kubeconform '$(kubeconform_version)'"
  exit 1
fi
log "tools ready in $BIN_DIR"
echo "$BIN_DIR"
