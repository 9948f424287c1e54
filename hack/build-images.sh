#!/usr/bin/env bash
# Build the project image and the word-count example image from this repository's own
# Dockerfiles with podman, on the local Debian base image (no registry is reachable here),
# and print their names as the last line of stdout: "<project image> <examples image>".
#
# Run after hack/ensure-container-tools.sh, with CONTAINERS_CONF and CONTAINERS_STORAGE_CONF
# set from the directory it printed. podman's layer cache lives in that storage, so a second
# build reuses every layer whose inputs did not change (pip downloads included), and the
# images a build replaces are pruned.
#
# The host's CA bundle is mounted read-only into the build's RUN steps so pip can reach PyPI
# through this network's TLS proxy; it is not copied into the images.
#
# Usage: hack/build-images.sh
# Overrides: KUBEMR_BASE_IMAGE (default localhost/kubemr-debian-base:bookworm),
#            KUBEMR_IMAGE_TAG (default: the package version), KUBEMR_CA_BUNDLE.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "build-images: $*" >&2; }

[[ -n "${CONTAINERS_CONF:-}" && -n "${CONTAINERS_STORAGE_CONF:-}" ]] || {
  log "CONTAINERS_CONF and CONTAINERS_STORAGE_CONF must be set (hack/ensure-container-tools.sh)"
  exit 1
}
BASE="${KUBEMR_BASE_IMAGE:-localhost/kubemr-debian-base:bookworm}"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
TAG="${KUBEMR_IMAGE_TAG:-$VERSION}"
CA="${KUBEMR_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
PROJECT="localhost/kubemr-async:$TAG"
EXAMPLES="localhost/kubemr-wordcount:$TAG"

volumes=()
[[ -r "$CA" ]] && volumes=(-v "$CA:/etc/ssl/certs/ca-certificates.crt:ro")

SECONDS=0
log "building $PROJECT on $BASE"
project_build=(--quiet --layers --build-arg "BASE_IMAGE=$BASE" --build-arg "VERSION=$VERSION"
               "${volumes[@]}" -f Dockerfile .)
# The build stages are tagged too: an untagged stage is dangling once the build ends, and
# the prune below would take the dependencies' virtualenv (the layer a code change reuses)
# with it. Each is cached, so the full build that follows reuses them all.
for stage in requirements dependencies project; do
  podman build --target "$stage" -t "localhost/kubemr-async-build:$stage" \
    "${project_build[@]}" >&2
done
podman build -t "$PROJECT" "${project_build[@]}" >&2
log "building $EXAMPLES on $PROJECT"
podman build --quiet --layers --build-arg "BASE_IMAGE=$PROJECT" \
  -t "$EXAMPLES" -f examples/Dockerfile . >&2
log "built in ${SECONDS}s: $(podman image inspect --format '{{.Size}}' "$PROJECT") and" \
    "$(podman image inspect --format '{{.Size}}' "$EXAMPLES") bytes"
# The images and stages these replaced are left untagged: a few MB for a change to the code,
# about 1 GB for one to the dependencies. Remove those from before this build; the layers
# this build reused stay, being in use by the tags.
podman image prune --force --filter "until=$((SECONDS + 1))s" >/dev/null
echo "$PROJECT $EXAMPLES"
