#!/usr/bin/env bash
# Ensure a Prometheus exposition linter exists and print its path as the last line of
# stdout (progress goes to stderr).
#
# Why: the metrics tests check what /metrics serves with Prometheus's own linter, not with
# rules of ours. `promtool check metrics` is a thin wrapper around client_golang's
# prometheus/testutil/promlint; promtool itself drags in the whole Prometheus server
# (cloud SDKs, Kubernetes client) and takes many minutes to build, so this builds a
# ten-line main around the same promlint package instead: it reads the text exposition on
# stdin, prints one "metric: problem" line per problem, and exits 1 if there is any (0
# when clean, 3 on unparsable input), exactly as `promtool check metrics` does.
#
# Built with `go` from the Go module proxy on first use, cached under
# ${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}/promlint/<client_golang version>/promlint.
set -euo pipefail

CLIENT_GOLANG_VERSION="${KUBEMR_CLIENT_GOLANG_VERSION:-v1.23.2}"
CACHE="${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}"
HOME_DIR="$CACHE/promlint/$CLIENT_GOLANG_VERSION"
PROMLINT="$HOME_DIR/promlint"

if [[ -x "$PROMLINT" ]]; then
  echo "$PROMLINT"
  exit 0
fi
command -v go >/dev/null || {
  echo "ensure-promtool: need the 'go' toolchain to build promlint" >&2
  exit 1
}
mkdir -p "$HOME_DIR"
# Concurrent callers wait here, then find the binary the first one built.
exec 9>"$HOME_DIR/.lock"
flock 9
if [[ ! -x "$PROMLINT" ]]; then
  # Built inside the cache (same filesystem), then renamed into place: an interrupted
  # build never looks like a cached one.
  BUILD=$(mktemp -d "$HOME_DIR/build.XXXXXX")
  trap 'rm -rf "$BUILD"' EXIT
  cat >"$BUILD/main.go" <<'GO'
// promlint: `promtool check metrics` without the Prometheus server around it.
package main

import (
	"fmt"
	"os"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
)

func main() {
	problems, err := promlint.New(os.Stdin).Lint()
	if err != nil {
		fmt.Fprintln(os.Stderr, "error while linting:", err)
		os.Exit(3)
	}
	for _, p := range problems {
		fmt.Printf("%s: %s\n", p.Metric, p.Text)
	}
	if len(problems) > 0 {
		os.Exit(1)
	}
}
GO
  echo "ensure-promtool: building promlint (client_golang $CLIENT_GOLANG_VERSION)" >&2
  (
    cd "$BUILD"
    go mod init kubemr-promlint 2>/dev/null
    go get "github.com/prometheus/client_golang@$CLIENT_GOLANG_VERSION"
    go mod tidy
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o promlint .
  ) >&2
  mv "$BUILD/promlint" "$PROMLINT"
fi
echo "$PROMLINT"
