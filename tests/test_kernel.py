"""%%celery_docker in a real IPython kernel, driven over the Jupyter protocol as a frontend would:
the widget, the Cancel button, kernel interrupts, the namespace, help, and the terminal view."""
from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Iterator

import docker
import pytest

from tests.conftest import IMAGE, ROOT, SCIENCE_IMAGE, assert_container_removed
from tests.kernel import JOB_HTML, Kernel

LONG_CELL = "%%celery_docker\nimport time\nfor k in range(600):\n    print('tick', k, flush=True)\n    time.sleep(0.1)\n"


@pytest.fixture(scope="module", params=["embedded", "redis"])
def kernel(request: pytest.FixtureRequest, docker_client: docker.DockerClient) -> Iterator[Kernel]:
    env = {"CELERY_NB_DEFAULT_IMAGE": IMAGE}
    if request.param == "redis":
        env["CELERY_NB_BROKER_URL"] = request.getfixturevalue("redis_url")
        request.getfixturevalue("celery_worker")
    k = Kernel(env)
    assert k.run("%load_ext celery_nb").error() is None
    k.mode = request.param
    yield k
    k.shutdown()


def test_a_job_that_ends_at_once_is_shown_ended_without_a_widget(kernel: Kernel) -> None:
    kernel.run("%%celery_docker\nwarm = 1\n")  # a warm container for the cells below
    views = []
    for _ in range(3):  # (a busy machine may hold one of them up beyond the 0.2 s)
        ex = kernel.run("%%celery_docker\nprint('quick', 6 * 7)\nquick = True\n")
        assert ex.error() is None
        html = [m["content"]["data"] for m in ex.messages if m["msg_type"] == "display_data"
                and JOB_HTML in m["content"]["data"].get("text/html", "")]
        assert bool(html) != bool(ex.comm_opens("HTMLModel"))  # one view: ended, or the live widget
        views += html
    assert views, "no warm trivial job ended within 0.2 s"
    shown = views[-1]  # as the widget would draw it, and its text for nbconvert
    assert ">succeeded<" in shown["text/html"] and "quick 42\n" in shown["text/html"]
    assert "celery-nb-timings" in shown["text/html"]
    assert "succeeded" in shown["text/plain"] and "quick 42" in shown["text/plain"]
    # a job that runs longer gets the live widget, with its Cancel button
    ex = kernel.run("%%celery_docker\nimport time\ntime.sleep(0.5)\n")
    assert ex.comm_opens("ButtonModel") and not [m for m in ex.messages if m["msg_type"] == "display_data"
                                                  and JOB_HTML in m["content"]["data"].get("text/html", "")]
    assert kernel.run("print(quick)").stream_text() == "True\n"


def _container_of(kernel: Kernel, job_id: str) -> str:
    """The container id the kernel's Job learnt from its events."""
    out = kernel.run(f"import celery_nb\nprint([j.container_id for j in celery_nb.default_client().jobs "
                     f"if j.id == {job_id!r}][0])").stream_text()
    return out.strip()


def test_cell_runs_and_brings_variables_back(kernel: Kernel) -> None:
    kernel.run("x = 21")
    ex = kernel.run("%%celery_docker\nimport sys, time\nfrom celery_nb_runtime import progress\n"
                    "for i in progress(range(5), desc='work'): time.sleep(0.1)\n"
                    "print('hello from', sys.version)\ny = x * 2\n")
    assert ex.error() is None
    order = ["queued", "starting", "running", "succeeded"]
    shown = [next(s for s in order if f">{s}<" in v) for v in ex.html_values() if "celery-nb-status" in v]
    assert shown == sorted(shown, key=order.index) and shown[-1] == "succeeded" and "running" in shown
    progress = ex.comm_values(ex.comm_opens("FloatProgressModel")[0]["comm_id"])
    assert progress[-1] == 5
    assert any("hello from 3.11" in v for v in ex.html_values())
    assert any(" on <b>" in v for v in ex.html_values())  # the worker host is shown
    final_text = [m["content"]["data"]["text/plain"] for m in ex.messages if m["msg_type"] == "update_display_data"]
    assert final_text and "succeeded" in final_text[-1]  # what nbconvert/GitHub show
    assert kernel.run("print(y, i)").stream_text() == "42 4\n"


def test_failed_cell_leaves_the_namespace_untouched(kernel: Kernel) -> None:
    kernel.run("keep = 'before'")
    ex = kernel.run("%%celery_docker\nkeep = 'after'\nraise ValueError('boom')\n")
    error = ex.error()
    assert error["ename"] == "RemoteError"
    tb = "\n".join(error["traceback"])
    assert "ValueError: boom" in tb and 'File "<cell>", line 3' in tb
    assert kernel.run("print(keep)").stream_text() == "before\n"


def test_syntax_error_is_raised_before_submitting(kernel: Kernel) -> None:
    error = kernel.run("%%celery_docker\na = 1\nb = (\n").error()
    assert error["ename"] == "SyntaxError"


@pytest.mark.parametrize("sent_to", ["main shell", "frontend's subshell"])
def test_cancel_button_stops_a_blocking_cell(kernel: Kernel, docker_client: docker.DockerClient, sent_to: str) -> None:
    """A click reaches the busy kernel whether the frontend sends it to the main shell (whose
    thread the cell blocks) or, as JupyterLab 4.4+ does, on a subshell it opened for widgets."""
    subshell = kernel.create_subshell() if sent_to == "frontend's subshell" else None
    ex = kernel.collect(kernel.start(LONG_CELL),
                        until=lambda m: m["msg_type"] == "comm_msg" and "tick 3" in str(m["content"]))
    button = ex.comm_opens("ButtonModel")[0]["comm_id"]
    clicked = time.monotonic()
    kernel.click(button, subshell)
    kernel.collect(ex, timeout=10)
    assert time.monotonic() - clicked < 2.5
    assert ex.error()["ename"] == "JobCancelled"
    # the error alone, without celery_nb's own frames
    assert ex.error()["traceback"] == [f"JobCancelled: job {ex.job_id()} (import time) was cancelled; nothing came back"]
    assert "cancelled" in [v for v in ex.html_values() if "celery-nb-status" in v][-1]
    assert_container_removed(docker_client, _container_of(kernel, ex.job_id()))


def test_kernel_interrupt_cancels_the_job(kernel: Kernel, docker_client: docker.DockerClient) -> None:
    ex = kernel.collect(kernel.start(LONG_CELL),
                        until=lambda m: m["msg_type"] == "comm_msg" and "tick 3" in str(m["content"]))
    interrupted = time.monotonic()
    kernel.manager.interrupt_kernel()
    kernel.collect(ex, timeout=10)
    assert time.monotonic() - interrupted < 2.5
    assert ex.error()["ename"] == "KeyboardInterrupt"
    assert "cancelled" in [v for v in ex.html_values() if "celery-nb-status" in v][-1]
    assert_container_removed(docker_client, _container_of(kernel, ex.job_id()))


# a --no-wait cell whose output tells, when the kernel unpickles it, on which thread that was
NO_WAIT_CELL = """%%celery_docker --no-wait
import time
time.sleep({delay})
def _thread_name():
    import threading
    return threading.current_thread().name
class _Where:
    def __reduce__(self):
        return (_thread_name, ())
{name} = _Where()
"""
# a cell that runs across the end of the job ``_`` (blocking, or awaiting); prints whether the job's
# output has appeared meanwhile
ACROSS_THE_END = """job_{name} = _
deadline = time.monotonic() + 30
while not job_{name}.done() and time.monotonic() < deadline:
    {pause}
{pause}
print(job_{name}.status, '{name}' in globals())
"""


def test_no_wait_returns_a_job_and_outputs_land_between_cells(kernel: Kernel) -> None:
    ex = kernel.run(NO_WAIT_CELL.format(delay=1, name="later"))
    assert ex.error() is None
    shown, = [m["content"] for m in ex.messages if m["msg_type"] == "display_data"]  # the Job, as the cell's result
    assert "application/vnd.jupyter.widget-view+json" in shown["data"]
    assert shown["data"]["text/plain"].startswith("celery_nb job") and "HBox" not in shown["data"]["text/plain"]
    assert kernel.run("import asyncio, time\nprint('later' in globals())").stream_text() == "False\n"
    # the job ends while this cell runs: its variables must not appear in the middle of it ...
    across = kernel.run(ACROSS_THE_END.format(name="later", pause="time.sleep(0.3)"))
    assert across.stream_text() == "succeeded False\n", across.stream_text() + str(across.error())
    # ... but before the next one, and from the kernel's main thread
    assert kernel.run("print(later)").stream_text() == "MainThread\n"
    # when the job ended, the text that nbconvert and GitHub show was brought up to date
    updates = [m["content"] for m in across.messages if m["msg_type"] == "update_display_data"]
    assert [u["transient"]["display_id"] for u in updates] == [shown["transient"]["display_id"]]
    assert "succeeded" in updates[0]["data"]["text/plain"]

    # neither inside a cell that awaits (the kernel's event loop runs meanwhile)
    assert kernel.run(NO_WAIT_CELL.format(delay=1, name="awaited")).error() is None
    across = kernel.run(ACROSS_THE_END.format(name="awaited", pause="await asyncio.sleep(0.3)"))
    assert across.stream_text() == "succeeded False\n", across.stream_text() + str(across.error())
    assert kernel.run("print(awaited)").stream_text() == "MainThread\n"


def test_a_no_wait_job_that_ends_between_cells_has_its_widget_saved_by_the_next(kernel: Kernel) -> None:
    """nbclient (nbconvert, papermill) keeps only the messages of the cell it runs: the widget of
    a job that ended while no cell ran has its final state sent again in the next cell."""
    ex = kernel.run("%%celery_docker --no-wait\nimport time\ntime.sleep(0.5)\nprint('ended between cells')\n6 * 7\n")
    assert ex.error() is None
    widgets = {c["comm_id"]: c["data"]["state"]["_model_name"] for c in ex.comm_opens("OutputModel")
               + ex.comm_opens("HTMLModel")}
    time.sleep(5)  # the job ends meanwhile
    following = kernel.run("pass")
    own = [m["content"] for m in following.messages if m["parent_header"].get("msg_id") == following.msg_id
           and m["msg_type"] == "comm_msg" and m["content"]["comm_id"] in widgets]
    html = [c["data"]["state"].get("value", "") for c in own if widgets[c["comm_id"]] == "HTMLModel"]
    assert any(">succeeded<" in v for v in html) and any("ended between cells" in v for v in html), html
    outputs = [o for c in own if widgets[c["comm_id"]] == "OutputModel" for o in c["data"]["state"]["outputs"]]
    assert [o["data"]["text/plain"] for o in outputs] == ["42"], outputs
    texts = [m["content"]["data"]["text/plain"] for m in following.messages
             if m["msg_type"] == "update_display_data" and m["parent_header"].get("msg_id") == following.msg_id]
    assert len(texts) == 1 and "succeeded" in texts[0]


# a line of 3 MB (shown for a second), then 50 MB of lines: more than the log keeps (CELERY_NB_MAX_LOG_BYTES, 4 MiB)
FLOOD_CELL = ("%%celery_docker\nimport time\nprint('y' * 3_000_000, flush=True)\ntime.sleep(1)\npad = 'x' * 90\n"
              "for i in range(500_000):\n    print(f'step {i:8d} {pad}')\nprint('the end')\n")


def test_a_print_flood_leaves_the_kernel_and_the_widget_in_bounds(kernel: Kernel) -> None:
    ex = kernel.run(FLOOD_CELL, timeout=300)
    assert ex.error() is None
    boxes = [v for v in ex.html_values() if "celery-nb-logs" in v]  # what the log box drew
    assert "step   499999 " in boxes[-1] and "the end" in boxes[-1]
    assert any("y" * 1000 + " ... (" in box for box in boxes)  # the long line, clipped
    assert max(map(len, boxes)) < 64 * 1024
    kept = kernel.run("from celery_nb import default_client\nlogs = default_client().jobs[-1].logs\n"
                      "print(len(logs) < 4 * 2**20 + 1000, 'of output dropped here' in logs, i)")
    assert kept.stream_text() == "True True 499999\n"


RICH_CELL = f"""%%celery_docker --image {SCIENCE_IMAGE}
import matplotlib.pyplot as plt

class Table:
    def _repr_html_(self):
        return "<table><tr><td>made in the container</td></tr></table>"

print("before the table")
display(Table())
plt.plot([1, 2, 3], [1, 4, 9])
points = 3
"""


def test_rich_output_from_the_container_appears_in_the_cell(kernel: Kernel) -> None:
    ex = kernel.run(RICH_CELL)
    assert ex.error() is None
    shown = [m["content"]["data"] for m in ex.messages if m["msg_type"] == "display_data"]
    widget, table, figure = shown  # the widget first, then the displays in the order the cell made them
    assert "application/vnd.jupyter.widget-view+json" in widget
    assert table["text/html"] == "<table><tr><td>made in the container</td></tr></table>"
    assert "Table object" in table["text/plain"]
    assert base64.b64decode(figure["image/png"]).startswith(b"\x89PNG") and "Figure" in figure["text/plain"]
    assert any("before the table" in v for v in ex.html_values())  # logs stay in the widget
    assert kernel.run("print(points)").stream_text() == "3\n"


def test_magic_help(kernel: Kernel) -> None:
    reply = kernel.run("%%celery_docker?\n").reply
    help_text = str(reply["content"]["payload"])
    for flag in ("--image", "--in", "--out", "--timeout", "--memory", "--cpus", "--queue", "--env", "--no-wait"):
        assert flag in help_text


def test_terminal_ipython_shows_readable_text(docker_client: docker.DockerClient) -> None:
    cell = f"%%celery_docker --image {IMAGE}\nprint('inside', x)\ndisplay({{'shown': 'as text'}})\ny = x + 1\n"
    code = f"%load_ext celery_nb\nx = 20\nget_ipython().run_cell({cell!r})\nprint('y is', y)\n"
    out = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", "-c", code],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "inside 20" in out.stdout and "y is 21" in out.stdout, out.stdout + out.stderr
    assert "{'shown': 'as text'}" in out.stdout
    assert "succeeded" in out.stderr and "HBox" not in out.stdout + out.stderr
