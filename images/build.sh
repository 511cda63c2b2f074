#!/usr/bin/env bash
# Build the local images the tests and the example notebook use. There is no image
# registry on the test machines, so base images come from debootstrap; each tag is built
# only if missing.
#   local/py311        Debian bookworm minbase + python3 (nothing else: "any image with python3")
#   local/py311-numpy  + Debian's python3-numpy and python3-tqdm
#   local/py-other     Debian bullseye minbase + python3: Python 3.9, the oldest celery_nb supports
#                      in images, and another minor version than the kernel's (trixie's 3.13 if the
#                      mirror no longer serves bullseye)
set -euo pipefail
cd "$(dirname "$0")"

# The Debian mirror apt already uses on this machine (never hard-coded here).
debian_mirror() {
  local uri
  uri=$(grep -hE '^\s*(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
        | grep -oE 'https?://[^ ]+' | grep -E '/debian/?$' | head -n1)
  [ -n "$uri" ] || { echo "no Debian mirror found in /etc/apt/sources*" >&2; exit 1; }
  echo "$uri"
}

have() { [ -n "$(docker images -q "$1")" ]; }

debootstrap_image() {  # TAG SUITE...: the first suite that builds
  local tag=$1 suite root
  shift
  have "$tag" && return
  for suite in "$@"; do
    echo "building $tag (debootstrap $suite)"
    root=$(mktemp -d)
    if debootstrap --variant=minbase --include=python3 "$suite" "$root" "$(debian_mirror)" > "$root.log" 2>&1; then
      tar -C "$root" -c . | docker import - "$tag" > /dev/null
      rm -rf "$root" "$root.log"
      return
    fi
    tail -5 "$root.log" >&2
    rm -rf "$root" "$root.log"
  done
  echo "could not build $tag" >&2
  exit 1
}

debootstrap_image local/py311 bookworm
debootstrap_image local/py-other bullseye trixie
have local/py311-numpy || docker build -q -t local/py311-numpy --build-arg BASE_IMAGE=local/py311 -f numpy.Dockerfile . > /dev/null
echo "images ready: local/py311 local/py311-numpy local/py-other"
