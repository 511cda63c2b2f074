"""The notebooks in notebooks/ executed headless in a real kernel (embedded default, no celery_nb
environment variables: the settings file scripts/setup.sh writes), as the README's first command
does for the quickstart; asserts on the saved outputs and widget states. The quickstart's checks
are shared with tests/test_compose.py (tests/quickstart.py)."""
from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import re
import sys

import docker
import pytest

from tests import quickstart as checks
from tests.conftest import ROOT
from tests.kernel import JOB_HTML


def execute_notebook(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run notebooks/<name>.ipynb on the embedded default; its code cells by id, and its metadata."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_NB_")}  # as right after setup.sh
    output = tmp_path_factory.mktemp(name) / f"{name}.ipynb"
    return checks.execute([sys.executable], str(ROOT / f"notebooks/{name}.ipynb"), str(output), env=env)


@pytest.fixture(scope="module")
def quickstart(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return execute_notebook("quickstart", tmp_path_factory)


@pytest.fixture(scope="module")
def data_science(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return execute_notebook("data_science", tmp_path_factory)


@pytest.fixture(scope="module")
def fan_out(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return execute_notebook("fan_out", tmp_path_factory)


@pytest.fixture(scope="module")
def local_code_and_files(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> dict:
    summary = ROOT / "notebooks/output/summary.json"
    summary.unlink(missing_ok=True)  # left by an earlier run: this one must write it
    return execute_notebook("local_code_and_files", tmp_path_factory)


@pytest.fixture(scope="module")
def grid_search(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return execute_notebook("grid_search", tmp_path_factory)


def _displayed(cell, mime: str) -> list:
    return [o.data[mime] for o in cell.outputs if o.output_type == "display_data" and mime in o.data]


def _job_views(notebook: dict, cell) -> list[str]:  # noqa: ANN001
    """The HTML of the jobs' views: the saved widget states' values, and ``cell``'s job shown
    ended in HTML (a job that ended at once has no widget)."""
    states = notebook["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return [str(m["state"].get("value")) for m in states.values()] + [
        html for html in _displayed(cell, "text/html") if JOB_HTML in html]


def test_values_come_back_to_the_kernel(quickstart: dict) -> None:
    checks.assert_values_come_back(quickstart)


def test_failures_are_clear_and_leave_the_namespace_alone(quickstart: dict) -> None:
    checks.assert_failures_are_clear(quickstart)


def test_saved_outputs_are_readable_without_widgets(quickstart: dict) -> None:
    checks.assert_outputs_readable_without_widgets(quickstart)


def test_widget_states_are_saved(quickstart: dict) -> None:
    checks.assert_widget_states_saved(quickstart)


def test_the_jobs_table_lists_every_job(quickstart: dict) -> None:
    checks.assert_jobs_table(quickstart)


def test_data_science_runs_pandas_in_the_container_and_plots_in_the_kernel(data_science: dict) -> None:
    cells = data_science["cells"]
    simulate = cells["simulate"]
    assert not [o for o in simulate.outputs if o.output_type == "error"]
    summary = _displayed(simulate, "text/plain")[0]  # the job's text view
    # --pip auto: a plain image, given the kernel's pandas (the DataFrame that came back loaded)
    assert f"35,136 readings simulated with pandas {importlib.metadata.version('pandas')}" in summary
    assert "| environment built" in summary or "| environment cached" in summary
    table, = _displayed(simulate, "text/html")  # the DataFrame display()ed in the container, as HTML
    assert "<table" in table and "north" in table and "south" in table
    figure, = _displayed(simulate, "image/png")  # the pyplot figure drawn in the container
    assert base64.b64decode(figure).startswith(b"\x89PNG")
    kernel_plot, = _displayed(cells["plot"], "image/png")  # plotted by the kernel's matplotlib
    assert base64.b64decode(kernel_plot).startswith(b"\x89PNG")
    assert checks.text_of(cells["warmest"]).startswith("warmest station: south, ")


def _collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n, steps = (n // 2 if n % 2 == 0 else 3 * n + 1), steps + 1
    return steps


def test_fan_out_maps_in_chunks_with_results_in_order(fan_out: dict) -> None:
    cells = fan_out["cells"]
    steps = [_collatz_steps(n) for n in range(1, 10_001)]
    longest = steps.index(max(steps)) + 1
    assert checks.text_of(cells["map"]) == (f"10000 results; the longest chain below 10,001 starts at {longest}: "
                                   f"{max(steps)} steps\n")
    widgets = [o for o in cells["chunks"].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) == 4  # one live widget per chunk job, whose saved text tells how it ended
    assert all("succeeded" in w.data["text/plain"] and "50000/50000" in w.data["text/plain"] for w in widgets)
    maxima = [max(_collatz_steps(n) for n in range(start, start + 50_000)) for start in range(1, 200_001, 50_000)]
    assert checks.text_of(cells["chunks-result"]) == (f"longest chain per chunk: {maxima}\n"
                                             f"items per chunk: [50000, 50000, 50000, 50000]\n")
    mean = sum(_collatz_steps(n) for n in range(1, 1_001)) / 1000
    assert checks.text_of(cells["imap"]) == f"mean chain length for 1..1000: {mean:.2f}\n"


def test_local_code_and_files_reach_the_job_and_come_back(local_code_and_files: dict) -> None:
    cells = local_code_and_files["cells"]
    summarize, = _displayed(cells["summarize"], "text/plain")  # the job's text view: it imported features.py
    assert "succeeded" in summarize
    assert "the job's working directory holds ['data'] and data/ holds ['measurements.csv']" in summarize
    summary = json.loads((ROOT / "notebooks/output/summary.json").read_text())  # downloaded next to the notebook
    assert sorted(summary) == ["east", "north", "south"] and all(s["readings"] == 30 for s in summary.values())
    size = (ROOT / "notebooks/output/summary.json").stat().st_size
    listed = f"files back: output/summary.json ({size} B); no file matched --download plots/*.png"
    assert listed in summarize
    views = _job_views(local_code_and_files, cells["summarize"])
    assert any(listed in view and "celery-nb-downloads" in view for view in views)  # the job's view lists them too
    assert checks.text_of(cells["read-back"]) == f"output/summary.json: True - south: {summary['south']}\n"
    means = [summary[station]["mean"] for station in ("east", "north", "south")]
    assert checks.text_of(cells["functions"]) == f"submit: True\nmap: {means}\n"
    workdir, = _displayed(cells["workdir"], "text/plain")
    assert "files earlier jobs left here: []" in workdir


def test_grid_search_fits_in_containers_with_its_progress_and_the_kernels_scores(grid_search: dict) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    cells = grid_search["cells"]
    search = cells["search"]
    assert not [o for o in search.outputs if o.output_type == "error"]
    X, y = load_digits(return_X_y=True)
    here = GridSearchCV(SVC(), {"C": [1, 10, 100], "gamma": [0.0005, 0.001]}, cv=3).fit(X, y)
    assert checks.text_of(search) == ("Fitting 3 folds for each of 6 candidates, totalling 18 fits\n"
                                      f"best: {here.best_params_}, accuracy {here.best_score_:.3f}\n")
    view, = [o for o in search.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    summary = view.data["text/plain"]  # the live view's last text, saved with the notebook
    assert summary.startswith("celery_nb joblib call: succeeded after ") and "| 18/18 tasks in " in summary
    assert "0 waiting, 0 running" in summary and re.search(r"\| CPU [0-9.]+ s in all, largest peak [0-9.]+ MiB of "
                                                           r"1\.0 GiB$", summary)  # memory="1g"
    states = grid_search["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any("joblib: 18/18 tasks" in str(m["state"].get("value")) for m in states.values())  # the live line
    scores = checks.text_of(cells["results"]).splitlines()
    assert scores[:-1] == [f"C={p['C']:<4} gamma={p['gamma']:<7} accuracy {s:.3f}"
                           for p, s in zip(here.cv_results_["params"], here.cv_results_["mean_test_score"])]
    assert scores[-1] == "the same scores in the kernel: True"
