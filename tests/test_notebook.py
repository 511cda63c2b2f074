"""notebooks/quickstart.ipynb executed headless in a real kernel (embedded default), as the
README's first command does; asserts on the saved outputs and widget states."""
from __future__ import annotations

import os

import docker
import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import IMAGE, NUMPY_IMAGE, ROOT


@pytest.fixture(scope="module")
def quickstart(docker_client: docker.DockerClient) -> dict:
    nb = nbformat.read(ROOT / "notebooks/quickstart.ipynb", as_version=4)
    env = {"QUICKSTART_IMAGE": IMAGE, "QUICKSTART_NUMPY_IMAGE": NUMPY_IMAGE, "QUICKSTART_FUNCTION_IMAGE": IMAGE}
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


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


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


def test_widget_states_are_saved(quickstart: dict) -> None:
    states = quickstart["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    values = [m["state"].get("value") for m in states.values()]
    html = [v for v in values if isinstance(v, str)]
    for status in ("succeeded", "failed"):
        assert any(f">{status}<" in v for v in html), status
    assert any("output of a subprocess is captured too" in v for v in html)
    assert 5 in values and 50 in values  # the progress bars of progress() and tqdm ended full
