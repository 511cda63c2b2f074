"""notebooks/quickstart.ipynb executed headless and what its outputs must show, shared by
tests/test_notebook.py (embedded default, on this host) and tests/test_compose.py (inside the
compose stack's jupyterlab container, against its workers)."""
from __future__ import annotations

import subprocess

import nbformat

# Run by a Python that has nbclient: executes argv[1] in a python3 kernel (with the widget
# states saved, as JupyterLab does) and writes the executed notebook to argv[2]. Not to stdout:
# the kernel inherits it.
EXECUTE = """\
import os, sys
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=180, kernel_name="python3", store_widget_state=True,
               resources={"metadata": {"path": os.path.dirname(sys.argv[1])}}).execute()
nbformat.write(nb, sys.argv[2])
"""


def execute(python: list[str], notebook: str, output: str, read: list[str] | None = None,
            env: dict[str, str] | None = None) -> dict:
    """Execute ``notebook`` with the command ``python`` (e.g. [sys.executable] or a `compose exec`
    of one); ``read`` prints the executed notebook where it is not a local file (e.g. `cat`).
    Returns its code cells by id and its metadata."""
    run = subprocess.run([*python, "-c", EXECUTE, notebook, output], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"executing {notebook} failed:\n{run.stdout}\n{run.stderr}"
    text = subprocess.run(read, check=True, capture_output=True, text=True).stdout if read else open(output).read()
    nb = nbformat.reads(text, as_version=4)
    return {"cells": {c.id: c for c in nb.cells if c.cell_type == "code"}, "metadata": nb.metadata}


def text_of(cell) -> str:
    """What a cell printed."""
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _error(cell) -> tuple[str, str]:
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert errors, f"cell {cell.id} did not fail"
    return errors[0].ename, "\n".join(errors[0].traceback)


def assert_values_come_back(quickstart: dict) -> None:
    cells = quickstart["cells"]
    assert text_of(cells["print-y"]) == "42\n"
    assert text_of(cells["print-total"]).strip().replace(".", "").isdigit()
    assert text_of(cells["print-message"]) == "hello, x is 21 False\n"
    # a --no-wait job's variables land between cells: after the cell that waited for it, before the next
    assert text_of(cells["no-wait-result"]) == "succeeded False\n"
    assert text_of(cells["no-wait-landed"]) == "done\n"
    assert text_of(cells["submit"]) == "60\n"
    assert text_of(cells["remote"]) == "144 [0, 1, 4, 9, 16, 25]\n"


def assert_failures_are_clear(quickstart: dict) -> None:
    cells = quickstart["cells"]
    ename, tb = _error(cells["no-numpy"])
    assert ename == "RemoteError" and "No module named 'numpy'" in tb and "--pip auto" in tb  # and what to do
    ename, tb = _error(cells["remote-error"])
    assert ename == "RemoteError" and 'File "<cell>", line 4' in tb and "ZeroDivisionError" in tb
    assert text_of(cells["y-unchanged"]) == "42\n"
    assert _error(cells["timeout"])[0] == "JobTimeoutError"
    assert _error(cells["oom"])[0] == "OutOfMemoryError"


def assert_outputs_readable_without_widgets(quickstart: dict) -> None:
    first = quickstart["cells"]["first-cell"]
    plain = [o.data["text/plain"] for o in first.outputs if o.output_type == "display_data"]
    assert plain and "succeeded" in plain[-1] and "work: 5/5" in plain[-1] and "hello from 3.11" in plain[-1]
    assert "HBox(" not in plain[-1]
    numpy_cell, = [o.data["text/plain"] for o in quickstart["cells"]["numpy-image"].outputs
                   if o.output_type == "display_data"]
    # --pip "numpy tqdm" on the default image: its environment built, or found on the worker host
    assert "succeeded" in numpy_cell and ("| environment built" in numpy_cell or "| environment cached" in numpy_cell)
    no_wait, = [o.data["text/plain"] for o in quickstart["cells"]["no-wait"].outputs]
    assert "succeeded" in no_wait  # updated when the job ended, after its cell


def assert_widget_states_saved(quickstart: dict) -> None:
    states = quickstart["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    values = [m["state"].get("value") for m in states.values()]
    html = [v for v in values if isinstance(v, str)]
    for status in ("succeeded", "failed"):
        assert any(f">{status}<" in v for v in html), status
    assert any("output of a subprocess is captured too" in v for v in html)
    assert 5 in values and 50 in values  # the progress bars of progress() and tqdm ended full


def assert_jobs_table(quickstart: dict) -> None:
    table = "".join(o.data["text/plain"] for o in quickstart["cells"]["jobs"].outputs if o.output_type == "execute_result")
    header, *rows = table.splitlines()
    assert header.split()[:4] == ["job", "what", "image", "status"]
    assert len(rows) >= 12, table  # every job of the notebook, oldest first
    assert any("succeeded" in row for row in rows) and any("failed" in row for row in rows), table


def assert_all(quickstart: dict) -> None:
    assert_values_come_back(quickstart)
    assert_failures_are_clear(quickstart)
    assert_outputs_readable_without_widgets(quickstart)
    assert_widget_states_saved(quickstart)
    assert_jobs_table(quickstart)
