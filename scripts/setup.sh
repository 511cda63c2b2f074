#!/usr/bin/env bash
# Prepare a Debian machine (as root) for celery_nb: Docker, Redis, the local images, a venv.
# Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
fi

if ! docker info > /dev/null 2>&1; then
  echo "starting dockerd"
  nohup dockerd > /var/log/dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
  docker info > /dev/null 2>&1 || { tail -20 /var/log/dockerd.log >&2; exit 1; }
fi

if ! redis-cli ping > /dev/null 2>&1; then
  echo "starting redis-server"
  redis-server --daemonize yes --port 6379 --bind 127.0.0.1 --save '' --appendonly no > /dev/null
  for _ in $(seq 20); do redis-cli ping > /dev/null 2>&1 && break; sleep 0.5; done
fi

bash images/build.sh

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  python3 -m venv .venv
fi
.venv/bin/pip install -q -e '.[test]'
echo "setup done"
