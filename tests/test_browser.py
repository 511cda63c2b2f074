"""What a person sees in JupyterLab: the notebooks run cell by cell in a real browser (Debian's
chromium, headless, driven by Playwright) against a real JupyterLab server on the embedded default.

Screenshots go to build/screenshots/ (see SCREENSHOTS below for what each shows).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import nbformat
import pytest

from tests.conftest import IMAGE, ROOT, SCIENCE_IMAGE, _unavailable, free_port, stop_process

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
PORTS = range(18900, 19000)
SCREENSHOTS = ROOT / "build/screenshots"
# typed into a new cell as a person would: prints a line every 0.1 s for a minute
LONG_CELL = "%%celery_docker\nimport time\nfor k in range(600): print('tick', k, flush=True); time.sleep(0.1)"
# the state of one cell as shown: run prompt, widget status, progress bar width, log box, other output text
CELL_STATE_JS = """cell => {
    const text = sel => { const e = cell.querySelector(sel); return e ? e.textContent : null; };
    const bar = cell.querySelector('.widget-hprogress .progress-bar');
    return {prompt: text('.jp-InputPrompt'), status: text('.celery-nb-status'), logs: text('.celery-nb-logs'),
            bar: bar ? parseFloat(bar.style.width) : null, timings: text('.celery-nb-timings'),
            title: text('.celery-nb-title'), downloads: text('.celery-nb-downloads'),
            output: text('.jp-OutputArea') || ''};
}"""


def _api(url: str, token: str, path: str, method: str = "GET") -> object:
    request = urllib.request.Request(f"{url}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def jupyter_lab(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A JupyterLab server on a copy of notebooks/, kernels on the embedded default; (url, token)."""
    root = tmp_path_factory.mktemp("lab")
    # the notebooks with the files next to them (local_code_and_files.ipynb's module and data)
    shutil.copytree(ROOT / "notebooks", root, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("output", "__pycache__", ".ipynb_checkpoints"))
    settings = root / ".settings"
    for name, values in {"apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
                         "notebook-extension/tracker": {"windowingMode": "none"}}.items():
        path = settings / f"@jupyterlab/{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {**os.environ, "CELERY_NB_DEFAULT_IMAGE": IMAGE, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime")}
    env.pop("CELERY_NB_BROKER_URL", None)  # the embedded default
    port, token = free_port(PORTS), secrets.token_hex(16)
    log = open(root / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--port-retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            _api(url, token, "/api/status")
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start; see {log.name}:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(0.2)
    yield url, token
    for kernel in _api(url, token, "/api/kernels"):  # a clean kernel exit removes its warm containers
        _api(url, token, f"/api/kernels/{kernel['id']}", method="DELETE")
    stop_process(proc)


@pytest.fixture(scope="module")
def page(jupyter_lab: tuple[str, str]) -> Iterator[object]:
    if not CHROMIUM.exists():
        _unavailable(f"no {CHROMIUM} (Debian's chromium package; scripts/setup.sh installs it)")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1200})
        yield page
        browser.close()


class Notebook:
    """One notebook open in JupyterLab, run the way a person does: Shift+Enter, cell after cell."""

    def __init__(self, page, lab: tuple[str, str], name: str) -> None:  # noqa: ANN001 - playwright Page
        url, token = lab
        self.page = page
        self.ids = [cell.id for cell in nbformat.read(ROOT / f"notebooks/{name}.ipynb", as_version=4).cells]
        self.next = 0  # the index of the active cell
        # a workspace of its own: JupyterLab would restore the tabs earlier tests left open, and
        # the notebook may then open in a hidden or half-laid-out dock panel
        page.goto(f"{url}/lab/workspaces/{name}-{uuid.uuid4().hex[:8]}/tree/{name}.ipynb?token={token}")
        panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        try:
            panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=60_000)
        except Exception:
            page.screenshot(path=SCREENSHOTS / f"failed-open-{name}.png")
            raise
        deadline = time.monotonic() + 60
        while not any(s["path"].endswith(f"{name}.ipynb") and s["kernel"]["connections"] and
                      s["kernel"]["execution_state"] == "idle" for s in _api(url, token, "/api/sessions")):
            assert time.monotonic() < deadline, f"the kernel of {name}.ipynb is not ready after 60 s"
            time.sleep(0.2)
        if page.locator("#jp-left-stack").is_visible():
            page.keyboard.press("Control+b")  # more room for the notebook
        self.notebook = panel.locator(".jp-Notebook")
        self.cells = self.notebook.locator(".jp-Cell")
        # opened before (by an earlier test) it may be scrolled down, its first cell out of the windowed list
        self.notebook.evaluate("notebook => notebook.scrollTo(0, 0)")
        self.cells.first.click()
        page.keyboard.press("Escape")  # command mode, first cell active

    def cell(self, cell_id: str):  # noqa: ANN201 - playwright Locator
        return self.cells.nth(self.ids.index(cell_id))

    def state(self, cell_id: str) -> dict:
        return self.cell(cell_id).evaluate(CELL_STATE_JS)

    def run_until(self, cell_id: str) -> None:
        """Shift+Enter from the active cell up to and including ``cell_id``, without waiting."""
        while self.next <= self.ids.index(cell_id):
            cell = self.cells.nth(self.next)
            if "jp-mod-active" not in cell.get_attribute("class"):  # the focus went elsewhere: click the cell
                cell.locator(".jp-InputPrompt").click()
            prompt = cell.locator(".jp-InputPrompt").text_content()
            self.page.keyboard.press("Shift+Enter")
            if "jp-CodeCell" in cell.get_attribute("class"):  # it runs: its prompt becomes [*] or a number
                deadline = time.monotonic() + 10
                while cell.locator(".jp-InputPrompt").text_content() == prompt:
                    assert time.monotonic() < deadline, f"Shift+Enter did not run cell {self.ids[self.next]}"
                    time.sleep(0.05)
            self.next += 1

    def wait(self, cell_id: str, timeout: float = 120) -> dict:
        """Wait until the cell has run (its prompt shows a number); its final state."""
        deadline = time.monotonic() + timeout
        while not re.fullmatch(r"\[\d+\]:", (state := self.state(cell_id))["prompt"]):
            if time.monotonic() > deadline:
                self.page.screenshot(path=SCREENSHOTS / f"failed-{cell_id}.png")
                pytest.fail(f"cell {cell_id} still running after {timeout} s (see failed-{cell_id}.png): {state}")
            time.sleep(0.1)
        return state

    def run(self, cell_id: str, timeout: float = 120) -> dict:
        self.run_until(cell_id)
        return self.wait(cell_id, timeout)

    def screenshot(self, name: str, first: str, last: str | None = None, outputs_only: bool = False) -> None:
        """A screenshot of cells ``first`` to ``last`` (default: just ``first``), or of their outputs,
        as far as the notebook's visible area goes."""
        top = self.cell(first).locator(".jp-Cell-outputWrapper" if outputs_only else ".jp-Cell-inputWrapper")
        top.evaluate("e => e.scrollIntoView({block: 'start'})")
        box, bottom, area = top.bounding_box(), self.cell(last or first).bounding_box(), self.notebook.bounding_box()
        self.page.screenshot(path=SCREENSHOTS / name, clip={
            "x": box["x"], "y": box["y"], "width": bottom["width"],
            "height": min(bottom["y"] + bottom["height"], area["y"] + area["height"]) - box["y"]})


def test_quickstart_as_a_person_sees_it(page, jupyter_lab: tuple[str, str]) -> None:  # noqa: ANN001
    nb = Notebook(page, jupyter_lab, "quickstart")
    assert nb.run("setup")["output"] == ""  # %load_ext celery_nb started the embedded worker
    nb.run("define-x")
    nb.run_until("first-cell")
    seen = []  # what the widget showed while the cell ran
    shot_running = False
    while not re.fullmatch(r"\[\d+\]:", (state := nb.state("first-cell"))["prompt"]):
        seen.append(state)
        if not shot_running and state["status"] == "running" and state["bar"] and 0 < state["bar"] < 100:
            nb.screenshot("quickstart-1-running.png", "first-cell")
            shot_running = True
        assert len(seen) < 2000, f"first cell still running: {state}"
        time.sleep(0.03)
    statuses = [s["status"] for s in seen if s["status"]]
    assert "running" in statuses, seen[-3:]
    bars = sorted({s["bar"] for s in seen if s["bar"] is not None and s["status"] == "running"})
    assert len(bars) >= 2 and 0 < bars[-2] < 100, f"the progress bar did not advance: {bars}"
    final = nb.state("first-cell")
    assert final["status"] == "succeeded" and final["bar"] == 100
    assert "hello from 3.11" in final["logs"] and "output of a subprocess is captured too" in final["logs"]
    assert " on embedded-" in final["title"]  # the worker host
    assert all(part in final["timings"] for part in ("queued", "start", "run", "transfer"))
    assert "HBox(" not in final["output"]
    assert nb.run("print-y")["output"].strip() == "42"
    nb.screenshot("quickstart-2-succeeded.png", "first-cell", "print-y")

    failed = nb.run("remote-error")
    assert failed["status"] == "failed"
    assert 'File "<cell>", line 4' in failed["output"] and "ZeroDivisionError: division by zero" in failed["output"]
    nb.screenshot("quickstart-3-remote-traceback.png", "remote-error")
    assert nb.run("y-unchanged")["output"].strip() == "42"


def test_logs_stream_and_cancel_stops_a_cell(page, jupyter_lab: tuple[str, str]) -> None:  # noqa: ANN001
    nb = Notebook(page, jupyter_lab, "quickstart")  # the same kernel: its variables are still there
    cells = nb.cells
    last = cells.count() - 1
    cells.nth(last).click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")  # a new cell below the last one
    page.keyboard.press("Enter")  # edit it
    page.keyboard.type(LONG_CELL)
    page.keyboard.press("Shift+Enter")
    cell = cells.nth(last + 1)
    deadline = time.monotonic() + 60
    while "tick 3" not in ((state := cell.evaluate(CELL_STATE_JS))["logs"] or ""):
        assert time.monotonic() < deadline, f"no streamed log lines after 60 s: {state}"
        time.sleep(0.05)
    assert state["status"] == "running" and state["prompt"] == "[*]:"  # the lines came while it runs
    cell.screenshot(path=SCREENSHOTS / "quickstart-4-streaming-logs.png")
    cell.get_by_role("button", name="Cancel").click()
    clicked = time.monotonic()
    while (state := cell.evaluate(CELL_STATE_JS))["status"] != "cancelled":
        assert time.monotonic() - clicked < 2, f"not cancelled 2 s after the click: {state}"
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while "JobCancelled" not in (state := cell.evaluate(CELL_STATE_JS))["output"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    cell.screenshot(path=SCREENSHOTS / "quickstart-5-cancelled.png")


def test_the_jobs_table(page, jupyter_lab: tuple[str, str]) -> None:  # noqa: ANN001
    nb = Notebook(page, jupyter_lab, "quickstart")  # the same kernel: the jobs of the tests above
    table = nb.cell("jobs")
    nb.run("jobs")
    statuses = table.locator(".celery-nb-status").all_text_contents()
    assert {"succeeded", "failed", "cancelled"} <= set(statuses), statuses
    nb.screenshot("quickstart-6-jobs-table.png", "jobs", outputs_only=True)


def test_rich_output_from_the_container(page, jupyter_lab: tuple[str, str]) -> None:  # noqa: ANN001
    nb = Notebook(page, jupyter_lab, "data_science")
    nb.run("simulate")
    simulate = nb.cell("simulate")
    state = nb.wait("simulate")
    assert state["status"] == "succeeded" and "readings simulated with pandas" in state["logs"]
    assert simulate.locator(".jp-OutputArea table.dataframe").count() == 1  # display(DataFrame) in the container
    assert simulate.locator(".jp-OutputArea img[src^='data:image/png']").count() == 1  # its pyplot figure
    nb.screenshot("data-science-1-container-output.png", "simulate", outputs_only=True)
    nb.run("warmest")
    assert nb.cell("plot").locator(".jp-OutputArea img[src^='data:image/png']").count() == 1
    assert nb.state("warmest")["output"].startswith("warmest station: south")
    nb.screenshot("data-science-2-kernel-plot.png", "plot", "warmest")


def test_fan_out_chunks_each_show_their_progress(page, jupyter_lab: tuple[str, str]) -> None:  # noqa: ANN001
    nb = Notebook(page, jupyter_lab, "fan_out")
    assert nb.run("map")["output"].startswith("10000 results")
    nb.run("chunks")
    chunks = nb.cell("chunks")
    assert chunks.locator(".celery-nb-status").all_text_contents() == ["succeeded"] * 4
    assert chunks.locator(".celery-nb-progress").all_text_contents() == ["50000/50000"] * 4
    nb.screenshot("fan-out-chunks.png", "chunks")


# typed into a new cell: its last line is a DataFrame, shown as a table as a normal cell shows it
DATAFRAME_CELL = (f"%%celery_docker --image {SCIENCE_IMAGE}\nimport pandas as pd\n"
                  "readings = pd.DataFrame({'station': ['north', 'south', 'east'], 'temperature': [12.5, 17.25, 9.75]})\n"
                  "readings.sort_values('temperature', ascending=False)")


def test_a_cells_last_expression_shows_a_dataframe(page, jupyter_lab: tuple[str, str]) -> None:  # noqa: ANN001
    nb = Notebook(page, jupyter_lab, "data_science")
    nb.run("setup")  # %load_ext celery_nb
    cells = nb.cells
    last = cells.count() - 1
    cells.nth(last).click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")  # a new cell below the last one
    page.keyboard.press("Enter")
    page.keyboard.type(DATAFRAME_CELL)
    page.keyboard.press("Shift+Enter")
    cell = cells.nth(last + 1)
    deadline = time.monotonic() + 120
    while not re.fullmatch(r"\[\d+\]:", (state := cell.evaluate(CELL_STATE_JS))["prompt"]):
        assert time.monotonic() < deadline, f"the cell is still running after 120 s: {state}"
        time.sleep(0.1)
    assert state["status"] == "succeeded", state
    table = cell.locator(".jp-OutputArea table.dataframe")
    assert table.count() == 1, state["output"]
    rows = table.locator("tbody tr").all_inner_texts()
    assert [row.split("\t")[1:] for row in rows] == [["south", "17.25"], ["north", "12.50"], ["east", "9.75"]], rows
    assert table.is_visible()
    cell.screenshot(path=SCREENSHOTS / "cell-last-expression-dataframe.png")


# the colours of a cell's widget and jobs table: their contrast (WCAG) on what is behind them
COLOURS_JS = """cell => {
    const rgb = c => c.match(/[\\d.]+/g).map(Number);
    const luminance = c => rgb(c).slice(0, 3).map(v => v / 255)
        .map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4)
        .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
    const contrast = (a, b) => { const [x, y] = [luminance(a), luminance(b)].sort((p, q) => q - p);
                                 return (x + 0.05) / (y + 0.05); };
    const behind = e => { for (; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor;
                                                           if (rgb(c).length < 4 || rgb(c)[3] > 0) return c; }
                          return 'rgb(255, 255, 255)'; };
    const on = e => contrast(getComputedStyle(e).color, behind(e));
    const logs = cell.querySelector('.celery-nb-logs');
    return {boxBackground: luminance(behind(logs)), logs: on(logs), stderr: on(logs.querySelector('span')),
            badge: on(cell.querySelector('.celery-nb-status'))};
}"""
# the contrast of each status in a jobs table on what is behind it
TABLE_JS = COLOURS_JS.split("const logs")[0] + "return [...cell.querySelectorAll('.celery-nb-status')].map(on);}"
THEMED_CELL = ("%%celery_docker\nimport sys\nfor k in range(6): print('a line of output', k)\n"
               "print('a warning on stderr', file=sys.stderr)")


def _theme(page, name: str) -> None:  # noqa: ANN001 - playwright Page
    """Pick a theme in the Settings menu, as a person does, and wait until it is applied."""
    page.locator(".lm-MenuBar-itemLabel").get_by_text("Settings", exact=True).click()
    page.locator(".lm-Menu-itemLabel").get_by_text("Theme", exact=True).click()
    page.locator(".lm-Menu-itemLabel").get_by_text(name, exact=True).click()
    light = "false" if "Dark" in name else "true"
    page.wait_for_function(f"document.body.dataset.jpThemeLight === '{light}'", timeout=30_000)


def test_the_widget_and_the_jobs_table_in_the_dark_theme(page, jupyter_lab: tuple[str, str]) -> None:  # noqa: ANN001
    nb = Notebook(page, jupyter_lab, "quickstart")  # the same kernel: the jobs table lists the tests' jobs
    nb.run("setup")  # %load_ext celery_nb (again, when the tests above ran)
    _theme(page, "JupyterLab Dark")
    try:
        cells = nb.cells
        last = cells.count() - 1
        cells.nth(last).click()
        page.keyboard.press("Escape")
        page.keyboard.press("b")  # a new cell below the last one
        for code in (THEMED_CELL, "%celery_jobs"):
            cells.nth(cells.count() - 1).locator(".jp-InputArea-editor").click()
            page.keyboard.type(code)
            page.keyboard.press("Shift+Enter")  # runs it, and adds a cell below
        cell, table = cells.nth(last + 1), cells.nth(last + 2)
        deadline = time.monotonic() + 60
        while (state := cell.evaluate(CELL_STATE_JS))["status"] != "succeeded" or not table.locator(
                ".celery-nb-status").count():
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        colours = cell.evaluate(COLOURS_JS)
        # a dark log box with light text: readable (in the light theme's fixed colours it was light on light)
        assert colours["boxBackground"] < 0.05 and colours["logs"] >= 7 and colours["stderr"] >= 3, colours
        assert colours["badge"] >= 3, colours
        statuses = table.evaluate(TABLE_JS)
        assert statuses and min(statuses) >= 3, statuses
        top = cell.locator(".jp-Cell-inputWrapper")
        top.evaluate("e => e.scrollIntoView({block: 'start'})")
        box, bottom = top.bounding_box(), table.bounding_box()
        page.screenshot(path=SCREENSHOTS / "dark-theme-widget-and-jobs-table.png", clip={
            "x": box["x"], "y": box["y"], "width": bottom["width"],
            "height": min(bottom["y"] + bottom["height"] - box["y"], 1100)})
    finally:
        _theme(page, "JupyterLab Light")


def test_local_code_and_files_as_a_person_sees_them(page, jupyter_lab: tuple[str, str]) -> None:  # noqa: ANN001
    nb = Notebook(page, jupyter_lab, "local_code_and_files")
    nb.run("setup")
    state = nb.run("summarize")
    assert state["status"] == "succeeded", state
    assert "the job's working directory holds ['data'] and data/ holds ['measurements.csv']" in state["logs"]
    assert re.fullmatch(r"files back: output/summary\.json \(\d+ B\); no file matched --download plots/\*\.png",
                        state["downloads"]), state["downloads"]
    nb.screenshot("local-code-and-files-1-downloads.png", "summarize")
    assert nb.run("read-back")["output"].startswith("output/summary.json: True")
    assert nb.run("functions")["output"].startswith("submit: True")
