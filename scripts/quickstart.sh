#!/usr/bin/env bash
# The main job: execute notebooks/quickstart.ipynb headless on the embedded default (no broker),
# save the executed copy and print what each cell showed. Its jobs run in CeleryNB.default_image
# and default_function_image (scripts/setup.sh keeps the local images there where no registry
# is reachable); its numpy cell's packages are installed on top of it (--pip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
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
