#!/usr/bin/env bash
# Ensure an S3-compatible server executable exists and print its path as the last line of
# stdout (progress goes to stderr).
#
# Why: tests and benchmarks talk to a real S3 server on loopback rather than a mock. The
# preferred server is Versity's versitygw (posix backend): a real, single-binary S3 gateway
# that `go install` can build from the Go module proxy (its go.mod has no replace
# directives) and that stores objects as plain files, so throughput figures mean something.
# If it cannot be built (no Go, no proxy), fall back to moto's server mode, which ships
# with the project's test extras (moto[server]) and speaks the same protocol.
#
# Lookup order: cache ${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}/s3/bin/versitygw (built
# here on first use), then moto_server from the active/project venv or PATH.
set -euo pipefail

VERSITYGW_VERSION="${KUBEMR_VERSITYGW_VERSION:-v1.8.0}"
CACHE="${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}"
BIN_DIR="$CACHE/s3/$VERSITYGW_VERSION/bin"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "ensure-s3-server: $*" >&2; }

build_versitygw() {
  command -v go >/dev/null || { log "no 'go' toolchain"; return 1; }
  mkdir -p "$CACHE/s3/$VERSITYGW_VERSION"
  # Serialise concurrent callers; the loser finds the finished binary.
  exec 9>"$CACHE/s3/$VERSITYGW_VERSION/.lock"
  flock 9
  [[ -x "$BIN_DIR/versitygw" ]] && return 0
  local stage ldflags
  rm -rf "$CACHE/s3/$VERSITYGW_VERSION"/bin.partial.*  # leftovers of killed builds
  stage=$(mktemp -d "$CACHE/s3/$VERSITYGW_VERSION/bin.partial.XXXXXX")
  log "building versitygw $VERSITYGW_VERSION from the Go module proxy"
  local start=$SECONDS
  ldflags="-s -w -X main.Version=$VERSITYGW_VERSION -X main.BuildTime=$(date -u +%FT%TZ)"
  if ! CGO_ENABLED=0 GOBIN="$stage" go install -trimpath -ldflags "$ldflags" \
    "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION" >&2; then
    rm -rf "$stage"
    return 1
  fi
  log "built versitygw in $((SECONDS - start))s"
  # Publish atomically so an interrupted build never looks like a cached one.
  rm -rf "$BIN_DIR"
  mv -T "$stage" "$BIN_DIR"
}

if [[ -x "$BIN_DIR/versitygw" ]] || build_versitygw; then
  echo "$BIN_DIR/versitygw"
  exit 0
fi

log "versitygw unavailable; falling back to moto_server"
for candidate in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/moto_server}" \
  "$REPO_ROOT/.venv/bin/moto_server" "$(command -v moto_server || true)"; do
  if [[ -n "$candidate" && -x "$candidate" ]]; then
    echo "$candidate"
    exit 0
  fi
done
log "no S3 server: install Go (for versitygw) or 'pip install moto[server]'"
exit 1
