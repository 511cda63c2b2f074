#!/usr/bin/env bash
# Build the local images the tests and the example notebook use. No image registry is
# reachable on the test machines, so the base images come from debootstrap. A tag that
# already exists is kept as it is, so reruns take a second.
#   local/py311        Debian bookworm minbase + python3, nothing else ("any image with python3 works")
#   local/py311-numpy  local/py311 + Debian's python3-numpy and python3-tqdm (numpy.Dockerfile)
#   local/py311-science  local/py311-numpy + Debian's pandas and matplotlib (science.Dockerfile)
#   local/py-other     Debian bullseye minbase + python3 (3.9): another minor version than 3.11 and
#                      the oldest Python the runtime supports; trixie (3.13) if bullseye fails
# and for compose.yaml's stack (tests/test_compose.py):
#   local/py311-pip    local/py311 + python3-venv and the host's CA bundle for pip (python-pip.Dockerfile),
#                      the stand-in for python:3.12-slim
#   local/redis        local/py311 + Debian's redis-server (redis.Dockerfile), the stand-in for redis:7
#   local/celery-nb    ../Dockerfile on local/py311-pip: celery_nb, JupyterLab, Flower (the test rebuilds
#                      it through compose from Docker's layer cache, so only changed sources cost time)
# Environment:
#   DEBIAN_MIRROR    mirror for debootstrap (default: the Debian mirror apt uses on this machine)
#   PY_OTHER_SUITES  suites tried in order for local/py-other (default: "bullseye trixie")
#   CA_BUNDLE        CA certificates pip trusts in local/py311-pip (default: /etc/ssl/certs/ca-certificates.crt)
set -euo pipefail
cd "$(dirname "$0")"

# Print the "URI SUITE" pairs of apt's sources, one-line ("deb [opts] URI SUITE ...") and
# deb822 ("URIs:" / "Suites:" stanzas separated by blank lines) formats alike.
apt_sources() {
  local files=() f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] || return 0
  awk '
    function flush(  u, s, nu, ns, i, j) {
      nu = split(uris, u); ns = split(suites, s)
      for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) print u[i], s[j]
      uris = suites = ""
    }
    FNR == 1 { flush() }
    /^[ \t]*$/ { flush(); next }
    /^[ \t]*deb[ \t]/ { sub(/\[[^]]*\]/, ""); print $2, $3; next }
    /^URIs:/ { sub(/^URIs:/, ""); uris = $0 }
    /^Suites:/ { sub(/^Suites:/, ""); suites = $0 }
    END { flush() }
  ' "${files[@]}"
}

# The Debian mirror (never hard-coded here): the source serving bookworm whose path ends in
# /debian, which skips debian-security and third-party repositories.
debian_mirror() {
  local uri
  uri=$(apt_sources | awk '$1 ~ /\/debian\/?$/ && $2 == "bookworm" { print $1; exit }')
  [ -n "$uri" ] || { echo "no Debian bookworm mirror in /etc/apt/sources*; set DEBIAN_MIRROR" >&2; return 1; }
  echo "$uri"
}

have() { docker image inspect "$1" > /dev/null 2>&1; }

# build TAG DOCKERFILE CONTEXT [docker build options]: quiet unless it fails (newer docker clients
# also warn that the legacy builder is deprecated).
build() {
  local tag=$1 dockerfile=$2 context=$3 out
  shift 3
  echo "building $tag (docker build)"
  out=$(docker build -q -t "$tag" -f "$dockerfile" "$@" "$context" 2>&1) || { echo "$out" >&2; exit 1; }
}

# debootstrap_image TAG SUITE...: minbase + python3 from the first SUITE that builds.
debootstrap_image() {
  local tag=$1 suite root
  shift
  for suite in "$@"; do
    echo "building $tag (debootstrap $suite)"
    root=$(mktemp -d)
    if debootstrap --variant=minbase --include=python3 "$suite" "$root" "$MIRROR" > "$root.log" 2>&1; then
      # apt's package lists and caches are ~90 MB; apt-get update brings them back when needed.
      find "$root/var/lib/apt/lists" "$root/var/cache/apt" -type f -delete
      chmod 1777 "$root/tmp"
      tar -C "$root" -c . | docker import - "$tag" > /dev/null
      rm -rf "$root" "$root.log"
      return
    fi
    tail -5 "$root.log" >&2
    rm -rf "$root" "$root.log"
  done
  echo "could not build $tag from any of: $*" >&2
  return 1
}

if ! { have local/py311 && have local/py311-numpy && have local/py311-science && have local/py-other; }; then
  MIRROR=${DEBIAN_MIRROR:-$(debian_mirror)}

  # The two debootstraps are mostly download and unpack waits: run local/py-other alongside.
  other_pid=
  if ! have local/py-other; then
    # shellcheck disable=SC2086  # PY_OTHER_SUITES is a word list
    debootstrap_image local/py-other ${PY_OTHER_SUITES:-bullseye trixie} &
    other_pid=$!
  fi
  if ! have local/py311; then
    debootstrap_image local/py311 bookworm
  fi
  if ! have local/py311-numpy; then
    build local/py311-numpy numpy.Dockerfile . --build-arg BASE_IMAGE=local/py311
  fi
  if ! have local/py311-science; then
    build local/py311-science science.Dockerfile . --build-arg BASE_IMAGE=local/py311-numpy
  fi
  [ -z "$other_pid" ] || wait "$other_pid"
fi

if ! have local/py311-pip; then
  context=$(mktemp -d)
  cp "${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$context/ca-bundle.crt"
  build local/py311-pip python-pip.Dockerfile "$context"
  rm -rf "$context"
fi
have local/redis || build local/redis redis.Dockerfile .
have local/celery-nb || build local/celery-nb ../Dockerfile .. --build-arg BASE_IMAGE=local/py311-pip
echo "images ready: local/py311 local/py311-numpy local/py311-science local/py-other local/py311-pip local/redis local/celery-nb"
