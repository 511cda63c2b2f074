"""The notebooks in notebooks/ executed headless in a real kernel (embedded default), as the
README's first command does for the quickstart; asserts on the saved outputs and widget states."""
from __future__ import annotations

import base64
import os

import docker
import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import NOTEBOOK_IMAGES, ROOT



def execute_notebook(name: str) -> dict:
    """Run notebooks/<name>.ipynb on the embedded default; its code cells by id, and its metadata."""
    nb = nbformat.read(ROOT / f"notebooks/{name}.ipynb", as_version=4)
    env = NOTEBOOK_IMAGES[name]
    saved = {k: os.environ.get(k) for k in (*env, "CELERY_NB_BROKER_URL")}
    os.environ.update(env)
    os.environ.pop("CELERY_NB_BROKER_URL", None)  # the embedded default
    try:
        NotebookClient(nb, timeout=180, kernel_name="python3", store_widget_state=True,
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"cells": {c.id: c for c in nb.cells if c.cell_type == "code"}, "metadata": nb.metadata}


@pytest.fixture(scope="module")
def quickstart(docker_client: docker.DockerClient) -> dict:
    return execute_notebook("quickstart")


@pytest.fixture(scope="module")
def data_science(docker_client: docker.DockerClient) -> dict:
    return execute_notebook("data_science")


@pytest.fixture(scope="module")
def fan_out(docker_client: docker.DockerClient) -> dict:
    return execute_notebook("fan_out")


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _displayed(cell, mime: str) -> list:
    return [o.data[mime] for o in cell.outputs if o.output_type == "display_data" and mime in o.data]


def _error(cell) -> tuple[str, str]:
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert errors, f"cell {cell.id} did not fail"
    return errors[0].ename, "\n".join(errors[0].traceback)


def test_values_come_back_to_the_kernel(quickstart: dict) -> None:
    cells = quickstart["cells"]
    assert _text(cells["print-y"]) == "42\n"
    assert _text(cells["print-total"]).strip().replace(".", "").isdigit()
    assert _text(cells["print-message"]) == "hello, x is 21 False\n"
    assert _text(cells["no-wait-result"]) == "succeeded done\n"
    assert _text(cells["submit"]) == "60\n"
    assert _text(cells["remote"]) == "144 [0, 1, 4, 9, 16, 25]\n"


def test_failures_are_clear_and_leave_the_namespace_alone(quickstart: dict) -> None:
    cells = quickstart["cells"]
    ename, tb = _error(cells["no-numpy"])
    assert ename == "RemoteError" and "No module named 'numpy'" in tb
    ename, tb = _error(cells["remote-error"])
    assert ename == "RemoteError" and 'File "<cell>", line 4' in tb and "ZeroDivisionError" in tb
    assert _text(cells["y-unchanged"]) == "42\n"
    assert _error(cells["timeout"])[0] == "JobTimeoutError"
    assert _error(cells["oom"])[0] == "OutOfMemoryError"


def test_saved_outputs_are_readable_without_widgets(quickstart: dict) -> None:
    first = quickstart["cells"]["first-cell"]
    plain = [o.data["text/plain"] for o in first.outputs if o.output_type == "display_data"]
    assert plain and "succeeded" in plain[-1] and "work: 5/5" in plain[-1] and "hello from 3.11" in plain[-1]
    assert "HBox(" not in plain[-1]
    no_wait, = [o.data["text/plain"] for o in quickstart["cells"]["no-wait"].outputs]
    assert "succeeded" in no_wait  # updated when the job ended, after its cell


def test_widget_states_are_saved(quickstart: dict) -> None:
    states = quickstart["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    values = [m["state"].get("value") for m in states.values()]
    html = [v for v in values if isinstance(v, str)]
    for status in ("succeeded", "failed"):
        assert any(f">{status}<" in v for v in html), status
    assert any("output of a subprocess is captured too" in v for v in html)
    assert 5 in values and 50 in values  # the progress bars of progress() and tqdm ended full


def test_data_science_runs_pandas_in_the_container_and_plots_in_the_kernel(data_science: dict) -> None:
    cells = data_science["cells"]
    simulate = cells["simulate"]
    assert not [o for o in simulate.outputs if o.output_type == "error"]
    assert "35,136 readings simulated with pandas" in _displayed(simulate, "text/plain")[0]  # the job's text view
    table, = _displayed(simulate, "text/html")  # the DataFrame display()ed in the container, as HTML
    assert "<table" in table and "north" in table and "south" in table
    figure, = _displayed(simulate, "image/png")  # the pyplot figure drawn in the container
    assert base64.b64decode(figure).startswith(b"\x89PNG")
    kernel_plot, = _displayed(cells["plot"], "image/png")  # plotted by the kernel's matplotlib
    assert base64.b64decode(kernel_plot).startswith(b"\x89PNG")
    assert _text(cells["warmest"]).startswith("warmest station: south, ")


def _collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n, steps = (n // 2 if n % 2 == 0 else 3 * n + 1), steps + 1
    return steps


def test_fan_out_maps_in_chunks_with_results_in_order(fan_out: dict) -> None:
    cells = fan_out["cells"]
    steps = [_collatz_steps(n) for n in range(1, 10_001)]
    longest = steps.index(max(steps)) + 1
    assert _text(cells["map"]) == (f"10000 results; the longest chain below 10,001 starts at {longest}: "
                                   f"{max(steps)} steps\n")
    widgets = [o for o in cells["chunks"].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) == 4  # one live widget per chunk job, whose saved text tells how it ended
    assert all("succeeded" in w.data["text/plain"] and "50000/50000" in w.data["text/plain"] for w in widgets)
    maxima = [max(_collatz_steps(n) for n in range(start, start + 50_000)) for start in range(1, 200_001, 50_000)]
    assert _text(cells["chunks-result"]) == (f"longest chain per chunk: {maxima}\n"
                                             f"items per chunk: [50000, 50000, 50000, 50000]\n")
    mean = sum(_collatz_steps(n) for n in range(1, 1_001)) / 1000
    assert _text(cells["imap"]) == f"mean chain length for 1..1000: {mean:.2f}\n"
