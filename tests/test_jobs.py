"""Cells and functions through the real stack: Redis + a separate `celery-nb worker` process,
and the embedded worker; every job in a real container of a real image."""
from __future__ import annotations

import importlib.metadata
import sys
import time

import docker
import numpy as np
import pytest

from celery_nb import Client, InputError, RemoteError
from tests.conftest import IMAGE, NUMPY_IMAGE, assert_container_removed

CELL = """\
import os, sys, time
from celery_nb_runtime import progress
for i in progress(range(5), desc="work"):
    time.sleep(0.05)
print("hello from", sys.version)
os.system("echo from a subprocess")
sys.stderr.write("a warning\\n")
y = x * 2
"""


def test_cell_round_trip(client: Client) -> None:
    job = client.submit_cell(CELL, {"x": 21, "unused": object()}, image=IMAGE)
    outputs = job.result(timeout=60)
    assert outputs == {"i": 4, "y": 42}
    assert "hello from 3.11" in job.logs
    assert "from a subprocess\n" in job.logs
    assert ("stderr", "a warning\n") in job.log_chunks()
    assert job.progress == {"n": 5, "total": 5, "desc": "work"}
    assert job.status == "succeeded" and job.worker
    assert set(job.timing_breakdown()) == {"queued", "start", "run", "transfer"}


def test_event_stream_is_ordered_and_replayable(client: Client) -> None:
    job = client.submit_cell("for k in range(200):\n    print(k)\n", {}, image=IMAGE)
    job.result(timeout=60)
    assert job.logs == "".join(f"{k}\n" for k in range(200))  # lossless, in order
    events, _ = client.store.read(job.id, "0", timeout=1)
    statuses = [e["status"] for e in events if e["type"] in ("status", "done")]
    assert statuses == ["queued", "starting", "running", "succeeded"]


def test_logs_arrive_while_the_cell_runs(client: Client) -> None:
    job = client.submit_cell("import time\nprint('early', flush=True)\ntime.sleep(3)\nlate = 1\n", {}, image=IMAGE)
    deadline = time.monotonic() + 30
    while "early" not in job.logs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "early" in job.logs and not job.done()
    assert job.status == "running"
    assert job.result(timeout=30) == {"late": 1}


def test_tqdm_in_the_container_drives_progress(redis_client: Client) -> None:
    job = redis_client.submit_cell(
        "from tqdm import tqdm\nimport time\nfor _ in tqdm(range(30), desc='tq', mininterval=0):\n"
        "    time.sleep(0.01)\n", {}, image=NUMPY_IMAGE)
    job.result(timeout=60)
    assert job.progress == {"n": 30, "total": 30, "desc": "tq"}


def test_the_image_choice_is_real(redis_client: Client) -> None:
    cell = "import numpy as np\ntotal = float(np.arange(10).sum())\n"
    assert redis_client.submit_cell(cell, {}, image=NUMPY_IMAGE).result(timeout=60) == {"total": 45.0}
    with pytest.raises(RemoteError) as info:
        redis_client.submit_cell(cell, {}, image=IMAGE).result(timeout=60)
    assert info.value.exc_type == "ModuleNotFoundError"
    assert "No module named 'numpy'" in str(info.value)
    numpy = importlib.metadata.version("numpy")  # what to do: the kernel's numpy, as --pip takes it
    assert f"the image {IMAGE} has no module 'numpy'" in str(info.value)
    assert '--pip auto' in str(info.value) and f'--pip "numpy=={numpy}"' in str(info.value)


def test_numpy_results_come_back_to_the_kernel(redis_client: Client) -> None:
    rows = np.random.default_rng(0).random((200, 50))
    out = redis_client.submit_cell("import numpy as np\nu, s, vt = np.linalg.svd(np.array(rows), full_matrices=False)\n",
                                   {"rows": rows.tolist()}, image=NUMPY_IMAGE).result(timeout=60)
    assert isinstance(out["s"], np.ndarray)
    assert np.allclose(out["s"], np.linalg.svd(rows, compute_uv=False))


def test_arrays_are_writable_in_the_job_and_back_in_the_kernel(redis_client: Client) -> None:
    grid = np.zeros(100_000)  # 800 kB: its data travels out of band, in the request and in the result event
    out = redis_client.submit_cell("writable = grid.flags.writeable\ngrid += 1\ntotal = float(grid.sum())\n",
                                   {"grid": grid}, image=IMAGE, pip=f"numpy=={np.__version__}").result(timeout=300)
    assert out["writable"] is True and out["total"] == 100_000.0 and out["grid"][0] == 1.0
    out["grid"] += 1  # as an array the kernel made itself
    assert out["grid"][0] == 2.0


def test_input_the_image_cannot_load_names_the_variable(redis_client: Client) -> None:
    # the kernel's numpy 2 pickles arrays as numpy._core, which Debian's numpy 1.24 lacks
    job = redis_client.submit_cell("total = m.sum()\n", {"m": np.ones(3)}, image=NUMPY_IMAGE)
    with pytest.raises(InputError, match="input variable 'm' could not be loaded in the container"):
        job.result(timeout=60)


def test_explicit_in_and_out(client: Client) -> None:
    job = client.submit_cell("a = p + q\nb = 2\n", {"p": 1, "q": 2}, image=IMAGE, inputs=["p", "q"], outputs=["a"])
    assert job.result(timeout=60) == {"a": 3}


def test_env_and_limits_reach_the_container(redis_client: Client) -> None:
    job = redis_client.submit_cell(
        "import os\nval = os.environ['GREETING']\n"
        "v1, v2 = '/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory.max'\n"
        "mem = int(open(v1 if os.path.exists(v1) else v2).read())\n",
        {}, image=IMAGE, env={"GREETING": "hi"}, memory="96m", outputs=["val", "mem"])
    assert job.result(timeout=60) == {"val": "hi", "mem": 96 * 1024**2}


def test_variables_that_act_at_start_reach_the_interpreters_start(redis_client: Client) -> None:
    """PYTHONPATH, PYTHONHASHSEED, OMP_NUM_THREADS... are the container's environment, there when
    its Python starts (and numpy's thread pool loads); others are the job's process's only."""
    cell = ("import os, sys\n"
            "at_start = sorted(v.split('=')[0] for v in open('/proc/1/environ').read().split('\\0') if '=' in v)\n"
            "seen = [sys.flags.hash_randomization, '/opt/extra' in sys.path, os.environ['GREETING'], hash('celery')]\n")
    start = {"PYTHONHASHSEED": "0", "PYTHONPATH": "/opt/extra", "OMP_NUM_THREADS": "3"}
    jobs, outputs = [], []
    for greeting in ("hi", "hello"):  # one after the other: the second gets the first's container
        jobs.append(redis_client.submit_cell(cell, {}, image=IMAGE, memory="72m", env={**start, "GREETING": greeting}))
        outputs.append(jobs[-1].result(timeout=60))
    assert {"OMP_NUM_THREADS", "PYTHONHASHSEED", "PYTHONPATH"} <= set(outputs[0]["at_start"])
    assert "GREETING" not in outputs[0]["at_start"]
    assert [out["seen"][:3] for out in outputs] == [[0, True, "hi"], [0, True, "hello"]]
    assert outputs[0]["seen"][3] == outputs[1]["seen"][3]  # one fixed hash seed
    assert jobs[1].container == "warm" and jobs[1].container_id == jobs[0].container_id  # one pool key
    other = redis_client.submit_cell(cell, {}, image=IMAGE, memory="72m", env={"GREETING": "hey"})
    assert other.result(timeout=60)["seen"][:3] == [1, False, "hey"]
    assert other.container_id != jobs[0].container_id


def test_function_submit_and_remote_map(client: Client) -> None:
    def scaled(a: int, factor: int = 1) -> dict:
        import sys
        return {"value": a * factor, "python": sys.version_info[:2]}

    result = client.submit(scaled, 3, kwargs={"factor": 5}, image=IMAGE).result(timeout=60)
    assert result == {"value": 15, "python": sys.version_info[:2]}

    @client.remote(image=IMAGE)
    def square(v: int) -> int:
        return v * v

    assert square(7) == 49
    assert square.map(range(6)) == [0, 1, 4, 9, 16, 25]


def test_cancel_stops_the_container_within_two_seconds(client: Client, docker_client: docker.DockerClient) -> None:
    job = client.submit_cell("import time\nfor k in range(600):\n    print(k, flush=True)\n    time.sleep(0.1)\n",
                             {}, image=IMAGE)
    while "3\n" not in job.logs:
        assert job.wait(0.05) is False
    started = time.monotonic()
    job.cancel()
    assert job.wait(2), "not cancelled within 2 s"
    assert time.monotonic() - started < 2
    assert job.status == "cancelled"
    assert_container_removed(docker_client, job.container_id)


def test_map_batches_items_streams_results_in_order_and_counts_items(client: Client) -> None:
    @client.remote(image=IMAGE)
    def slow_square(v: int) -> int:
        import time
        time.sleep(0.01 if v < 50 else 0)  # early chunks finish last
        return v * v

    jobs = slow_square.map_jobs(range(200), chunksize=50)
    assert len(jobs) == 4
    for job in jobs:
        job.result(timeout=60)
    assert [job.progress["n"] for job in jobs] == [50, 50, 50, 50]  # items, not chunks
    assert list(slow_square.imap(range(200), chunksize=50)) == [v * v for v in range(200)]
    assert slow_square.map(range(1000)) == [v * v for v in range(1000)]


def test_cancelling_a_queued_job_reports_it_cancelled_and_never_runs_it(redis_client: Client) -> None:
    # the worker runs 4 at a time; the 4 busy jobs run long enough to all be running at once, also
    # when some of them wait for a container to start on a loaded machine
    busy = [redis_client.submit_cell("import time\ntime.sleep(5)\n", {}, image=IMAGE) for _ in range(4)]
    queued = redis_client.submit_cell("print('ran')\n", {}, image=IMAGE)
    while not all(job.status == "running" for job in busy):
        assert not queued.wait(0.05)
    assert queued.status == "queued"
    queued.cancel()
    assert queued.wait(30) and queued.status == "cancelled"
    assert "ran" not in queued.logs
    for job in busy:
        job.result(timeout=30)


def test_the_embedded_worker_leaves_other_celery_apps_usable(embedded_client: Client) -> None:
    from celery.result import assert_will_not_block

    assert_will_not_block()  # a kernel that also uses Celery itself can still wait on results


def test_a_process_runs_one_embedded_worker(embedded_client: Client) -> None:
    with pytest.raises(RuntimeError, match="already runs an embedded celery_nb worker"):
        Client(None)
