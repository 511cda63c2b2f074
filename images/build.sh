#!/usr/bin/env bash
# Build the local images the tests and the example notebook use. There is no image
# registry on the test machines, so base images come from debootstrap; each tag is built
# only if missing.
#   local/py311        Debian bookworm minbase + python3 (nothing else: "any image with python3")
#   local/py311-numpy  + Debian's python3-numpy and python3-tqdm
#   local/py-other     Debian trixie minbase + python3 (another Python minor version)
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

debootstrap_image() {  # TAG SUITE
  local tag=$1 suite=$2 root
  have "$tag" && return
  echo "building $tag (debootstrap $suite)"
  root=$(mktemp -d)
  debootstrap --variant=minbase --include=python3 "$suite" "$root" "$(debian_mirror)" > "$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; exit 1; }
  tar -C "$root" -c . | docker import - "$tag" > /dev/null
  rm -rf "$root" "$root.log"
}

debootstrap_image local/py311 bookworm
debootstrap_image local/py-other trixie
have local/py311-numpy || docker build -q -t local/py311-numpy --build-arg BASE_IMAGE=local/py311 -f numpy.Dockerfile . > /dev/null
echo "images ready: local/py311 local/py311-numpy local/py-other"
