"""The warm container pool through the real stack: reuse, isolation between warm jobs,
--fresh, max jobs per container (replaced in the background), reaping of idle containers,
cleanup at shutdown and start."""
from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import docker
import pytest

from celery_nb import Client
from celery_nb.worker.docker_api import LABEL_OWNER, LABEL_WORKER
from tests.conftest import IMAGE, assert_container_removed, start_worker, stop_process, worker_containers

WHOAMI = "import socket\nhost = socket.gethostname()\n"


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_warm_container_is_reused(client: Client, docker_client: docker.DockerClient) -> None:
    memory = "80m"  # a pool key of its own
    first = client.submit_cell(WHOAMI, {}, image=IMAGE, memory=memory)
    host = first.result(timeout=60)["host"]
    second = client.submit_cell(WHOAMI, {}, image=IMAGE, memory=memory)
    assert second.result(timeout=60)["host"] == host
    assert second.container == "warm"
    # the events name the container the job ran in (its hostname is its short id) ...
    assert second.container_id == first.container_id and second.container_id.startswith(host)
    # ... which carries no job's id: it serves every job of its pool key
    labels = docker_client.containers.get(second.container_id).labels
    assert not any(job.id in f"{key}={value}" for job in (first, second) for key, value in labels.items())


def test_warm_jobs_do_not_share_globals_env_or_processes(client: Client) -> None:
    memory = "88m"
    client.submit_cell("import os, json, subprocess\nleak = 1\nos.environ['LEAK'] = '1'\njson.leak = 1\n"
                       "subprocess.Popen(['sleep', '300'])\n", {}, image=IMAGE, memory=memory).result(timeout=60)
    time.sleep(0.5)  # the job is reported done at its result; its container returns to the pool once
    # the server has killed what the job left running
    job = client.submit_cell(
        "import os, json\nseen = ['leak' in globals(), 'LEAK' in os.environ, hasattr(json, 'leak')]\n"
        "sleeping = [p for p in os.listdir('/proc') if p.isdigit() and b'sleep' in open(f'/proc/{p}/cmdline', 'rb').read()]\n",
        {}, image=IMAGE, memory=memory)
    assert job.result(timeout=60) == {"seen": [False, False, False], "sleeping": []}
    assert job.container == "warm"


def test_a_job_cannot_read_the_next_jobs_request(client: Client) -> None:
    """A warm container's requests arrive on its stdin: a job (or a process it leaves behind)
    reading stdin gets end of file, not the next job's request."""
    memory = "112m"
    first = client.submit_cell("import subprocess, sys\nsubprocess.Popen(['sh', '-c', 'cat > /tmp/stolen'])\n"
                               "data = sys.stdin.read()\n", {}, image=IMAGE, memory=memory)
    assert first.result(timeout=30) == {"data": ""}
    time.sleep(0.5)  # back in the pool
    second = client.submit_cell("stolen = open('/tmp/stolen', 'rb').read()\n", {}, image=IMAGE, memory=memory)
    assert second.result(timeout=30) == {"stolen": b""}
    assert second.container == "warm"


def test_fresh_gets_a_new_container_and_removes_it(client: Client, docker_client: docker.DockerClient) -> None:
    memory = "96m"
    host = client.submit_cell(WHOAMI, {}, image=IMAGE, memory=memory).result(timeout=60)["host"]
    job = client.submit_cell(WHOAMI, {}, image=IMAGE, memory=memory, fresh=True)
    assert job.result(timeout=60)["host"] != host
    assert job.container == "cold"
    assert_container_removed(docker_client, job.container_id)


def test_fresh_container_brings_back_big_results_and_what_the_cell_defined(
        redis_client: Client, docker_client: docker.DockerClient) -> None:
    """A --fresh container runs its one job in a lean runtime (cloudpickle is not loaded up
    front): a big result still comes through the container's /dev/shm, and functions and
    classes the cell defined still travel (by value, with cloudpickle)."""
    cell = ("def double(x):\n    return 2 * x\n"
            "class Box:\n    pass\n"
            "box = Box()\nbox.v = 3\nbig = bytes(3 * 2**20)\nn = double(21)\n")
    job = redis_client.submit_cell(cell, {}, image=IMAGE, memory="256m", fresh=True)
    out = job.result(timeout=60)
    assert out["n"] == 42 and out["double"](4) == 8 and out["box"].v == 3 and type(out["box"]).__name__ == "Box"
    assert out["big"] == bytes(3 * 2**20)
    assert job.container == "cold"
    assert_container_removed(docker_client, job.container_id)


@pytest.fixture
def pool_worker(redis_url: str, docker_client: docker.DockerClient) -> Iterator[tuple[subprocess.Popen, str]]:
    name = "pool"
    leftover = docker_client.containers.create(  # as a worker of this name, killed on another host, left it
        IMAGE, ["sleep", "300"], labels={LABEL_WORKER: f"{name}@vm-test", LABEL_OWNER: "elsewhere:1"})
    proc = start_worker(redis_url, "poolq", name, env={"CELERY_NB_POOL_IDLE_TIMEOUT": "2", "CELERY_NB_POOL_MAX_JOBS": "2"},
                        node_name=f"{name}@vm-test")
    try:
        yield proc, f"{name}@vm-test", leftover.id
    finally:
        stop_process(proc)


def test_pool_limits_reaping_and_cleanup(pool_worker, redis_client: Client, docker_client: docker.DockerClient) -> None:
    proc, worker, leftover_id = pool_worker
    # a container left by an earlier run of a worker with this name is removed at start
    _wait_until(lambda: leftover_id not in {c.id for c in worker_containers(docker_client, worker)}, 10,
                "leftover container not removed at worker start")
    jobs = [redis_client.submit_cell(WHOAMI, {}, image=IMAGE, queue="poolq")]
    jobs[0].result(timeout=60)
    worn = {c.id for c in worker_containers(docker_client, worker)}
    time.sleep(0.2)  # back in the pool once the job's process has exited
    jobs.append(redis_client.submit_cell(WHOAMI, {}, image=IMAGE, queue="poolq"))  # in the same container
    jobs[-1].result(timeout=60)
    # it has run its max jobs (2): a replacement starts in the background and takes its place
    containers = lambda: {c.id for c in worker_containers(docker_client, worker)}  # noqa: E731
    _wait_until(lambda: containers() and not containers() & worn, 30, "worn-out container not replaced")
    jobs.append(redis_client.submit_cell(WHOAMI, {}, image=IMAGE, queue="poolq"))
    hosts = [job.result(timeout=60)["host"] for job in jobs]
    assert hosts[0] == hosts[1] != hosts[2]
    assert [job.container for job in jobs] == ["cold", "warm", "warm"]  # no job waited for the replacement
    assert len(worker_containers(docker_client, worker)) == 1
    # idle for longer than CELERY_NB_POOL_IDLE_TIMEOUT=2: reaped
    _wait_until(lambda: not worker_containers(docker_client, worker), 10, "idle container not reaped")
    redis_client.submit_cell(WHOAMI, {}, image=IMAGE, queue="poolq").result(timeout=60)
    assert len(worker_containers(docker_client, worker)) == 1
    stop_process(proc)  # a worker that stops removes its idle containers
    assert not worker_containers(docker_client, worker)


def test_a_warm_container_that_died_while_idle_is_replaced(redis_client: Client,
                                                           docker_client: docker.DockerClient) -> None:
    memory = "104m"
    first = redis_client.submit_cell(WHOAMI, {}, image=IMAGE, memory=memory)
    host = first.result(timeout=60)["host"]
    time.sleep(0.3)  # back in the pool
    docker_client.containers.get(host).kill()  # the hostname is the container's short id
    job = redis_client.submit_cell(WHOAMI, {}, image=IMAGE, memory=memory)
    assert job.result(timeout=60)["host"] != host
    assert job.container == "cold"


def test_containers_of_a_killed_kernel_are_removed_by_the_next_one(docker_client: docker.DockerClient) -> None:
    import signal
    import sys

    kernel = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\nfrom celery_nb import Client\nc = Client(None)\n"
                               f"print(c.submit_cell('a = 1', {{}}, image={IMAGE!r}).result(60), flush=True)\n"
                               "time.sleep(300)\n"], stdout=subprocess.PIPE, text=True)
    assert kernel.stdout.readline().strip() == "{'a': 1}"
    owner = f"{__import__('socket').gethostname()}:{kernel.pid}"
    idle = docker_client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL_OWNER}={owner}"})
    assert len(idle) == 1  # its warm container
    kernel.send_signal(signal.SIGKILL)  # no chance to clean up
    kernel.wait()
    # the next kernel's embedded worker starts (in a process of its own, as kernels are)
    subprocess.run([sys.executable, "-c", "from celery_nb import Client\nClient(None).shutdown()"], check=True,
                   timeout=60)
    assert not docker_client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL_OWNER}={owner}"})


def test_a_big_payload_reaches_a_warm_container(client: Client) -> None:
    memory = "112m"
    client.submit_cell(WHOAMI, {}, image=IMAGE, memory=memory).result(timeout=60)
    time.sleep(0.3)  # back in the pool
    job = client.submit_cell("n = len(blob)\n", {"blob": b"z" * (3 << 20)}, image=IMAGE, memory=memory)
    assert job.result(timeout=60) == {"n": 3 << 20}
    assert job.container == "warm"
