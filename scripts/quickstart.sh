#!/usr/bin/env bash
# The main job: execute notebooks/quickstart.ipynb headless on the embedded default (no broker),
# save the executed copy and print what each cell showed.
# QUICKSTART_IMAGE / QUICKSTART_NUMPY_IMAGE / QUICKSTART_FUNCTION_IMAGE pick the images
# (default: the local ones scripts/setup.sh builds; e.g. python:3.12-slim where Docker Hub is reachable).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QUICKSTART_IMAGE=${QUICKSTART_IMAGE:-local/py311}
export QUICKSTART_NUMPY_IMAGE=${QUICKSTART_NUMPY_IMAGE:-local/py311-numpy}
export QUICKSTART_FUNCTION_IMAGE=${QUICKSTART_FUNCTION_IMAGE:-local/py311}
unset CELERY_NB_BROKER_URL
mkdir -p build
.venv/bin/jupyter execute --output="$PWD/build/quickstart.ipynb" notebooks/quickstart.ipynb
.venv/bin/python - build/quickstart.ipynb <<'PY'
import sys
import nbformat

for cell in nbformat.read(sys.argv[1], as_version=4).cells:
    if cell.cell_type != "code":
        continue
    print(f"\n>>> {cell.source.splitlines()[0]}")
    for out in cell.outputs:
        if out.output_type == "stream":
            print(out.text, end="")
        elif out.output_type == "error":
            print(f"{out.ename}: {out.evalue.splitlines()[0]}")
        elif "text/plain" in out.get("data", {}):
            print(out.data["text/plain"])
print(f"\nexecuted notebook saved to {sys.argv[1]}")
PY
