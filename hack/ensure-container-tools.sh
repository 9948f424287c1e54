#!/usr/bin/env bash
# Ensure podman (with runc, fuse-overlayfs and the CNI plugins) and mmdebstrap are installed,
# write a project-local podman configuration, make sure the local Debian base image exists,
# and print the configuration directory as the last line of stdout (progress: stderr).
#
# Nothing global changes: podman reads the files in the printed directory through
#   CONTAINERS_CONF=<dir>/containers.conf  CONTAINERS_STORAGE_CONF=<dir>/storage.conf
# (scripts/test exports both), and its images and containers live under
#   ${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}/containers
# Why these choices (checked on this kind of machine, see issue 11):
# * runc, not crun: crun rejects this host's hybrid cgroup layout;
# * the host's hard nofile/nproc limits are lower than podman's defaults, so the default
#   ulimits are set to them, or every `podman run` fails;
# * no registry is reachable (python:3.11-slim cannot be pulled), so the base image is a
#   Debian root filesystem made by mmdebstrap (Python 3.11, venv, CA certificates) and
#   `podman import`ed as localhost/kubemr-debian-base:bookworm. Its tarball is kept in the
#   cache: a second run finds the image (or re-imports the tarball) and builds nothing.
#
# Usage: hack/ensure-container-tools.sh
# Overrides: KUBEMR_CACHE, KUBEMR_BASE_SUITE (default bookworm).
set -euo pipefail

log() { echo "ensure-container-tools: $*" >&2; }

CACHE="${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}"
DIR="$CACHE/containers"
SUITE="${KUBEMR_BASE_SUITE:-bookworm}"
BASE_IMAGE="localhost/kubemr-debian-base:$SUITE"
BASE_TAR="$DIR/base-$SUITE.tar"
PACKAGES=(podman runc fuse-overlayfs containernetworking-plugins mmdebstrap)

mkdir -p "$DIR"
exec 9>"$DIR/.lock"  # serialise concurrent callers: the second finds the finished work
flock 9

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || { log "need apt-get to install: ${missing[*]}"; exit 1; }
  log "installing ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2
fi

# Written every time (cheap), so a change here reaches existing caches. runc fails to start
# a container whose rlimits exceed what the host allows; the shell's hard nproc is not
# always reachable from the container's init (seen: 96363 reported, above 32768 refused).
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[[ "$nproc" == unlimited || "$nproc" -gt 32768 ]] && nproc=32768
[[ "$nofile" == unlimited || "$nofile" -gt 65536 ]] && nofile=65536
cat >"$DIR/containers.conf.tmp" <<EOF
# Written by hack/ensure-container-tools.sh: kubemr-async's own podman settings.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$DIR/events.log"
tmp_dir = "$DIR/tmp"
EOF
mv "$DIR/containers.conf.tmp" "$DIR/containers.conf"
cat >"$DIR/storage.conf.tmp" <<EOF
# Written by hack/ensure-container-tools.sh: images and containers under the cache dir.
[storage]
driver = "overlay"
graphroot = "$DIR/storage"
runroot = "$DIR/run"

[storage.options.overlay]
mount_program = "/usr/bin/fuse-overlayfs"
EOF
mv "$DIR/storage.conf.tmp" "$DIR/storage.conf"
export CONTAINERS_CONF="$DIR/containers.conf" CONTAINERS_STORAGE_CONF="$DIR/storage.conf"

if podman image exists "$BASE_IMAGE"; then
  log "reusing $BASE_IMAGE"
else
  if [[ ! -s "$BASE_TAR" ]]; then
    log "building the $SUITE root filesystem with mmdebstrap"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
      --format=tar "$SUITE" "$BASE_TAR.tmp" >&2
    mv "$BASE_TAR.tmp" "$BASE_TAR"
  fi
  log "importing $BASE_TAR as $BASE_IMAGE"
  podman import --quiet --change 'CMD ["python3"]' "$BASE_TAR" "$BASE_IMAGE" >&2
fi
echo "$DIR"
