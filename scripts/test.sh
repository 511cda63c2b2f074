#!/usr/bin/env bash
# The test suite through the real stack (Docker, Redis, celery workers, real images).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
