#!/usr/bin/env bash
# Prepare a Debian machine (as root) for celery_nb and its tests: Docker (and Compose), Redis,
# the local images, a venv. Idempotent: when everything is there, a rerun takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v dockerd > /dev/null && command -v docker > /dev/null || missing+=(docker.io)
command -v redis-server > /dev/null && command -v redis-cli > /dev/null || missing+=(redis-server)
command -v debootstrap > /dev/null || missing+=(debootstrap)
# compose.yaml's test: Debian's docker-compose 1.29 unless the Compose v2 plugin is there.
command -v docker-compose > /dev/null || docker compose version > /dev/null 2>&1 || missing+=(docker-compose)
# The browser test drives JupyterLab in Debian's chromium (Playwright's own browser download is not used).
command -v chromium > /dev/null || missing+=(chromium)
# Debian's python3 needs python3-venv to create a venv (a pyenv Python has it built in).
[ -x .venv/bin/python ] || python3 -c 'import ensurepip' 2> /dev/null || missing+=(python3 python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
fi

# No init system on these machines: start the daemons by hand unless already up.
if ! docker info > /dev/null 2>&1; then
  # A dockerd that is still starting (e.g. started by the package's install) owns the pid file.
  if ! kill -0 "$(cat /var/run/docker.pid 2> /dev/null)" 2> /dev/null; then
    echo "starting dockerd (log: /var/log/dockerd.log)"
    # setsid: a new session, so the daemon outlives this script's process group.
    setsid dockerd > /var/log/dockerd.log 2>&1 < /dev/null &
  fi
  for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
  docker info > /dev/null 2>&1 || { echo "dockerd did not come up:" >&2; tail -20 /var/log/dockerd.log >&2; exit 1; }
fi

if ! redis-cli ping > /dev/null 2>&1; then
  echo "starting redis-server"
  # --save '': no dump.rdb in the current directory, the data is throwaway.
  redis-server --daemonize yes --port 6379 --bind 127.0.0.1 --save '' --appendonly no > /dev/null
  for _ in $(seq 20); do redis-cli ping > /dev/null 2>&1 && break; sleep 0.5; done
  redis-cli ping > /dev/null 2>&1 || { echo "redis-server did not come up" >&2; exit 1; }
fi

bash images/build.sh

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $(command -v python3)"
  python3 -m venv .venv
fi
echo "installing celery_nb[test] into .venv"
.venv/bin/pip install -q -e '.[test]'

# Where python:3.12-slim (the default image) cannot be had - no image registry - this machine's
# jobs default to the local images instead, kept in celery_nb's settings file (`celery-nb config`)
# so that the notebooks run as they are. Defaults someone chose already are left alone.
if ! docker image inspect python:3.12-slim > /dev/null 2>&1 && ! docker pull -q python:3.12-slim > /dev/null 2>&1; then
  .venv/bin/python - <<'PY'
import subprocess, sys
from celery_nb.config import read_settings_file
chosen = read_settings_file().get("CeleryNB", {})
wanted = {"default_image": "local/py311"}
if sys.version_info[:2] == (3, 11):  # local/py311 has the kernel's Python: functions can run there too
    wanted["default_function_image"] = "local/py311"
new = [f"CeleryNB.{name}={value}" for name, value in wanted.items() if name not in chosen]
if new:
    print("no image registry: jobs default to local images (" + ", ".join(new) + ")")
    subprocess.run([sys.prefix + "/bin/celery-nb", "config", *new], check=True, stdout=subprocess.DEVNULL)
PY
fi
echo "setup done"
