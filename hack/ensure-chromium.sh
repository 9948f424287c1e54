#!/usr/bin/env bash
# Ensure Debian's chromium exists and print its path as the last line of stdout (progress
# goes to stderr).
#
# Why: the timeline test opens the HTML that `kubemr run --timeline` writes in a real
# browser, headless, and checks what it drew on a screenshot. Installed from Debian's
# archive only when missing; a machine that has chromium pays nothing. The downloaded
# .debs are kept under ${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}/apt-archives (Debian's
# docker images delete /var/cache/apt/archives after every install), so installing again
# on this machine downloads only the package lists. Measured on a 2-core Debian 12 box:
# about 41 s for `apt-get update` and the install with nothing cached. Needs root (or
# sudo) for apt-get; without either, it says so and exits 1.
set -euo pipefail

for name in chromium chromium-browser; do
  if found=$(command -v "$name"); then
    echo "$found"
    exit 0
  fi
done
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || {
    echo "ensure-chromium: chromium is missing and installing it needs root or sudo" >&2
    exit 1
  }
  SUDO=(sudo -n)
fi
ARCHIVES="${KUBEMR_CACHE:-$HOME/.cache/kubemr-async}/apt-archives"
mkdir -p "$ARCHIVES/partial"
APT=(-o DPkg::Lock::Timeout=600 -o "Dir::Cache::Archives=$ARCHIVES/"
     -o APT::Keep-Downloaded-Packages=true)
echo "ensure-chromium: installing Debian's chromium (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
# Another apt-get (a second test run) holds the dpkg lock: wait for it, do not fail.
"${SUDO[@]}" apt-get "${APT[@]}" update -qq >&2
"${SUDO[@]}" apt-get "${APT[@]}" install -y -qq --no-install-recommends \
  chromium fonts-dejavu-core >&2
command -v chromium
