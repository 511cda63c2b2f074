"""A %%celery_docker cell behaves like a normal IPython cell, and a remote function like a local
one (issue 16): each through the magic in a real kernel (jupyter_client, or nbclient for the
saved notebook), every job in a real container."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import nbformat
import pytest

from tests import quickstart
from tests.conftest import IMAGE, SCIENCE_IMAGE
from tests.kernel import JOB_HTML, Execution, Kernel

WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module", params=["embedded", "redis"])
def kernel(request: pytest.FixtureRequest, docker_client: docker.DockerClient) -> Iterator[Kernel]:
    env = {"CELERY_NB_DEFAULT_IMAGE": IMAGE, "CELERY_NB_DEFAULT_FUNCTION_IMAGE": IMAGE}
    if request.param == "redis":
        env["CELERY_NB_BROKER_URL"] = request.getfixturevalue("redis_url")
        request.getfixturevalue("celery_worker")
    k = Kernel(env)
    assert k.run("%load_ext celery_nb\nimport celery_nb").error() is None
    yield k
    k.shutdown()


def displayed(ex: Execution) -> list[dict]:
    """The cell's display outputs other than the job's view (its widget, or its HTML)."""
    return [m["content"]["data"] for m in ex.messages if m["msg_type"] == "display_data"
            and WIDGET not in m["content"]["data"] and JOB_HTML not in m["content"]["data"].get("text/html", "")]


def stderr(ex: Execution) -> str:
    return "".join(m["content"]["text"] for m in ex.messages
                   if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")


def shown_logs(ex: Execution) -> str:
    """The text of the job view's log box, as it was last drawn."""
    boxes = [v for v in ex.html_values() if "celery-nb-logs" in v]
    assert boxes, "the widget showed no logs"
    return boxes[-1].split('font-size:12px;line-height:1.3">')[1].split("</pre>")[0]


def value_of(kernel: Kernel, expression: str) -> str:
    ex = kernel.run(f"print(repr({expression}))")
    assert ex.error() is None, ex.error()
    return ex.stream_text().strip()


# -- the rows of issue 16's table -------------------------------------------------------------

def test_the_last_expression_is_shown_and_a_semicolon_hides_it(kernel: Kernel) -> None:
    kernel.run("xs = [1, 2, 3]")
    ex = kernel.run("%%celery_docker\ntotal = sum(xs)\ntotal * 1000 + 7\n")
    assert ex.error() is None
    assert displayed(ex) == [{"text/plain": "6007"}]
    assert value_of(kernel, "total") == "6"
    # the value itself did not travel back: only what the cell assigned
    assert value_of(kernel, "[k for k, v in globals().items() if v == 6007]") == "[]"
    quiet = kernel.run("%%celery_docker\ntotal = sum(xs) + 1\ntotal * 1000 + 7;  # hidden\n")
    assert quiet.error() is None and displayed(quiet) == []
    assert value_of(kernel, "total") == "7"


def test_with_open_keeps_what_was_read(kernel: Kernel) -> None:
    ex = kernel.run("%%celery_docker\nwith open('/etc/os-release') as fh:\n    text = fh.read()\n")
    assert ex.error() is None
    assert "PRETTY_NAME" in value_of(kernel, "text")
    assert value_of(kernel, "'fh' in globals()") == "False"
    note, = stderr(ex).splitlines()
    assert note.startswith("[celery_nb] not brought back to the kernel: fh (TextIOWrapper: ")
    assert "closed" in note


def test_unpicklable_names_are_skipped_on_one_line_and_the_rest_lands(kernel: Kernel) -> None:
    cell = ("%%celery_docker\nimport socket, sqlite3, threading\nnumbers = [1, 2]\ngen = (n for n in numbers)\n"
            "lock = threading.Lock()\nconn = sqlite3.connect(':memory:')\nsock = socket.socket()\nlabel = 'kept'\n")
    ex = kernel.run(cell)
    assert ex.error() is None
    assert value_of(kernel, "(numbers, label)") == "([1, 2], 'kept')"
    assert value_of(kernel, "[n for n in ('gen', 'lock', 'conn', 'sock') if n in globals()]") == "[]"
    note, = stderr(ex).splitlines()  # one line names each, with its type and why
    for name, kind in (("gen", "generator"), ("lock", "lock"), ("conn", "Connection"), ("sock", "socket")):
        assert f"{name} ({kind}: cannot pickle" in note, note
    # a name given with --out must travel: the cell fails, and nothing lands
    kernel.run("label = 'before'")
    failed = kernel.run("%%celery_docker --out gen,label\nlabel = 'after'\ngen = (n for n in range(3))\n")
    assert failed.error()["ename"] == "OutputError"
    assert "output variable 'gen' (generator) cannot be pickled" in failed.error()["evalue"]
    assert value_of(kernel, "label") == "'before'"


def test_an_output_the_kernel_cannot_load_is_skipped_too(kernel: Kernel) -> None:
    cell = ("%%celery_docker\nimport pathlib, sys\npathlib.Path('/tmp/only_in_the_container.py').write_text("
            "'class Thing:\\n    pass\\n')\nsys.path.insert(0, '/tmp')\nimport only_in_the_container\n"
            "thing = only_in_the_container.Thing()\ncount = 3\n")
    ex = kernel.run(cell)
    assert ex.error() is None
    assert value_of(kernel, "count") == "3"
    note, = stderr(ex).splitlines()
    assert "thing (Thing: cannot be loaded in the kernel, ModuleNotFoundError: No module named " \
           "'only_in_the_container')" in note


def test_top_level_await(kernel: Kernel) -> None:
    ex = kernel.run("%%celery_docker\nimport asyncio\n\nasync def fetch(n):\n    await asyncio.sleep(0.01)\n"
                    "    return n * 2\n\nresult = await fetch(21)\nasync with asyncio.timeout(5):\n"
                    "    pairs = await asyncio.gather(fetch(1), fetch(2))\nawait fetch(50)\n")
    assert ex.error() is None, ex.error()
    assert value_of(kernel, "(result, pairs)") == "(42, [2, 4])"
    assert displayed(ex) == [{"text/plain": "100"}]
    failed = kernel.run("%%celery_docker\nimport asyncio\n\nasync def fail():\n    await asyncio.sleep(0)\n"
                        "    raise LookupError('gone')\n\nawait fail()\n")
    tb = "\n".join(failed.error()["traceback"])
    assert 'File "<cell>", line 8, in <module>' in tb and 'File "<cell>", line 6, in fail' in tb
    assert "/asyncio/" not in tb and "celery_nb_runtime" not in tb  # only the cell's frames


def test_shell_commands_and_time_magics(kernel: Kernel) -> None:
    kernel.run("greeting = 'hello'")
    ex = kernel.run("%%celery_docker\n!echo {greeting.upper()} from $(cat /etc/hostname | wc -c) bytes\n"
                    "files = !ls /etc/apt\n%time y = sum(range(1000))\n%timeit -n 5 -r 2 sorted(files)\n"
                    "t = %timeit -o -q -n 3 -r 2 len(files)\n%time y + 1\n")
    assert ex.error() is None, ex.error()
    logs = shown_logs(ex)
    assert "HELLO from" in logs  # the kernel's variable, expanded in the container as IPython does
    assert "sources.list" in value_of(kernel, "files") and value_of(kernel, "y") == "499500"
    assert logs.count("CPU times: user") == 2 and logs.count("Wall time: ") == 2
    assert "per loop (mean \u00b1 std. dev. of 2 runs, 5 loops each)" in logs
    assert value_of(kernel, "(t.loops, t.repeat, len(t.all_runs))") == "(3, 2, 2)"
    assert displayed(ex) == [{"text/plain": "499501"}]  # %time of an expression returns its value
    timed = kernel.run("%%celery_docker\n%%time\nimport time\ntime.sleep(0.3)\nslept = 0.3\nslept * 2\n")
    assert timed.error() is None, timed.error()
    wall = shown_logs(timed).split("Wall time: ")[1]
    assert wall.endswith(" ms\n") and float(wall.split()[0]) >= 300
    assert displayed(timed) == [{"text/plain": "0.6"}] and value_of(kernel, "slept") == "0.3"


def test_a_failing_shell_command_sets_the_exit_code_and_the_line_numbers_stay(kernel: Kernel) -> None:
    ex = kernel.run("%%celery_docker\n!ls /no/such/dir \\\n  /etc/hostname\ncode = _exit_code\nraise ValueError(code)\n")
    error = ex.error()
    assert error["ename"] == "RemoteError"
    tb = "\n".join(error["traceback"])
    assert 'File "<cell>", line 5' in tb and "ValueError: 2" in tb  # a continued command keeps its lines
    assert "No such file or directory" in shown_logs(ex)


def test_other_magics_fail_locally_and_nothing_is_submitted(kernel: Kernel) -> None:
    count = "len(celery_nb.default_client().jobs)"
    before = value_of(kernel, count)
    for cell, magic in (("x = 1\n%pip install requests\n", "%pip"), ("%%capture\nx = 1\n", "%%capture"),
                        ("x = 1\nx?\n", "%pinfo")):
        ex = kernel.run(f"%%celery_docker\n{cell}")
        error = ex.error()
        assert error["ename"] == "UnsupportedMagicError", error
        assert f"{magic} would run inside the container, where IPython is not loaded" in error["evalue"]
        assert error["evalue"].startswith("line 3: " if magic != "%%capture" else "line 2: ")
        assert not ex.comm_opens("HTMLModel")  # no job widget
    assert value_of(kernel, count) == before


def test_globals_set_by_functions_come_back(kernel: Kernel) -> None:
    ex = kernel.run("%%celery_docker\ndef setup(size):\n    global model, ready\n    model = {'size': size}\n"
                    "    ready = True\n\nsetup(3)\n")
    assert ex.error() is None
    assert value_of(kernel, "(model, ready)") == "({'size': 3}, True)"


def test_carriage_returns_redraw_the_line(kernel: Kernel) -> None:
    ex = kernel.run("%%celery_docker\nimport time\nfor p in range(0, 101, 20):\n"
                    "    print(f'progress {p:3d}%', end='\\r', flush=True)\n    time.sleep(0.05)\nprint()\n"
                    "print('done')\n")
    assert ex.error() is None
    assert shown_logs(ex) == "progress 100%\ndone\n"
    assert value_of(kernel, "celery_nb.default_client().jobs[-1].logs") == "'progress 100%\\ndone\\n'"


# -- exceptions and functions -----------------------------------------------------------------

def test_a_cells_exception_keeps_its_type(kernel: Kernel) -> None:
    ex = kernel.run("try:\n    get_ipython().run_cell_magic('celery_docker', '', 'prices = {}\\nprices[\"ACME\"]\\n')\n"
                    "except KeyError as exc:\n    print('caught', type(exc).__name__, isinstance(exc, celery_nb.RemoteError),"
                    " exc.exc_type)\n")
    assert ex.stream_text() == "caught RemoteError True KeyError\n"
    shown = kernel.run("%%celery_docker\nprices = {}\n\nprices['ACME']\n").error()
    assert shown["ename"] == "RemoteError"  # as IPython shows it: the remote traceback, cell line numbers
    tb = "\n".join(shown["traceback"])
    assert tb.startswith("RemoteError: the cell failed in its container")
    assert 'File "<cell>", line 4, in <module>' in tb and "KeyError: 'ACME'" in tb


def test_a_functions_exception_keeps_its_type(kernel: Kernel) -> None:
    ex = kernel.run(
        "class PriceError(Exception):\n    pass\n\n"
        "def check(v):\n    if v > 3:\n        raise ValueError(f'{v} is too big')\n    raise PriceError(v)\n\n"
        "def nested():\n    class Hidden(Exception):\n        pass\n    raise Hidden('not importable')\n\n"
        "try:\n    celery_nb.submit(check, 5).result()\nexcept ValueError as exc:\n"
        "    print('ValueError', isinstance(exc, celery_nb.RemoteError), exc.exc_type)\n"
        "try:\n    celery_nb.remote(check)(1)\nexcept PriceError as exc:\n    print('PriceError', exc.exc_type)\n"
        "try:\n    celery_nb.submit(nested).result()\nexcept celery_nb.RemoteError as exc:\n"
        "    print('fallback', type(exc).__mro__[1].__name__, exc.exc_type)\n")
    assert ex.error() is None, ex.error()
    assert ex.stream_text() == "ValueError True ValueError\nPriceError PriceError\nfallback CeleryNBError Hidden\n"
    shown = kernel.run("celery_nb.submit(check, 7).result()").error()
    tb = "\n".join(shown["traceback"])
    assert tb.startswith("RemoteError: check() failed in its container") and "ValueError: 7 is too big" in tb


def test_a_function_returning_a_generator_is_told_so(kernel: Kernel) -> None:
    error = kernel.run("def numbers():\n    return (n for n in range(3))\n\ncelery_nb.submit(numbers).result()\n").error()
    assert error["ename"] == "OutputError"
    assert error["evalue"].startswith("the function's return value (generator) cannot be pickled to send it back")
    assert "output variable" not in error["evalue"]


# -- the saved notebook ---------------------------------------------------------------------------

def test_the_saved_notebook_shows_a_dataframe_as_a_table(docker_client: docker.DockerClient,
                                                         tmp_path: Path) -> None:
    cells = {
        "setup": "%load_ext celery_nb",
        "table": f"%%celery_docker --image {SCIENCE_IMAGE}\nimport pandas as pd\n"
                 "df = pd.DataFrame({'station': ['north', 'south'], 'temperature': [12.5, 17.25]})\ndf.describe()",
        "quiet": f"%%celery_docker --image {SCIENCE_IMAGE}\nimport pandas as pd\n"
                 "pd.DataFrame({'a': [1]});",
        "no-wait": f"%%celery_docker --image {SCIENCE_IMAGE} --no-wait\nimport pandas as pd\n"
                   "pd.DataFrame({'later': [7]})",
        "wait": "_.wait(60)",
    }
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source, id=cell_id)
                                               for cell_id, source in cells.items()])
    path = tmp_path / "cells.ipynb"
    nbformat.write(notebook, path)
    env = {k: v for k, v in os.environ.items() if k != "CELERY_NB_BROKER_URL"}  # the embedded default
    executed = quickstart.execute([sys.executable], str(path), str(tmp_path / "executed.ipynb"),
                                  env={**env, "CELERY_NB_DEFAULT_IMAGE": IMAGE})
    outputs = executed["cells"]["table"].outputs
    assert not [o for o in outputs if o.output_type == "error"], outputs
    # (a job that ends within 0.2 s is also shown as HTML: its summary)
    table, = [o.data for o in outputs if o.output_type == "display_data" and "dataframe" in o.data.get("text/html", "")]
    assert '<table border="1" class="dataframe">' in table["text/html"] and "<th>temperature</th>" in table["text/html"]
    assert "temperature" in table["text/plain"] and "mean" in table["text/plain"]  # describe()'s rows
    assert [o for o in executed["cells"]["quiet"].outputs if o.output_type == "display_data"
            and "dataframe" in o.data.get("text/html", "")] == []
    # --no-wait: the value is shown in the widget (its Output widget's state is saved)
    states = executed["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    shown = [output["data"] for model in states.values() if model["model_name"] == "OutputModel"
             for output in model["state"].get("outputs", [])]
    assert any("<th>later</th>" in data.get("text/html", "") for data in shown), shown
