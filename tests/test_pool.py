"""The warm container pool through the real stack: reuse, isolation between warm jobs,
--fresh, max jobs per container (replaced in the background), reaping of idle containers,
cleanup at shutdown and start; and its book-keeping on its own (no Docker)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import docker
import pytest

from celery_nb import Client
from celery_nb.worker.channel import RuntimeContainer
from celery_nb.worker.docker_api import LABEL_OWNER, LABEL_WORKER
from celery_nb.worker.policy import ContainerSpec
from celery_nb.worker.pool import PoolBook
from celery_nb.worker.settings import WorkerSettings
from celery_nb_runtime import protocol
from tests.conftest import (IMAGE, ROOT, assert_container_removed, server_sockets, start_worker, stop_process, wait_for,
                            worker_containers)

WHOAMI = "import socket\nhost = socket.gethostname()\n"


def _namespace_pids(container: docker.models.containers.Container) -> set[int]:
    """The pids of the container's processes, as the container sees them (from the host's /proc)."""
    pids = set()
    for host_pid, in container.top(ps_args="-o pid")["Processes"]:
        try:
            with open(f"/proc/{host_pid}/status") as status:
                pids.add(int(next(line for line in status if line.startswith("NSpid:")).split()[-1]))
        except FileNotFoundError:  # it exited meanwhile
            continue
    return pids


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
    # the job is reported done at its result; the next one waits for its container, which returns
    # to the pool once the server has killed what the job left running
    job = client.submit_cell(
        "import os, json\nseen = ['leak' in globals(), 'LEAK' in os.environ, hasattr(json, 'leak')]\n"
        "sleeping = [p for p in os.listdir('/proc') if p.isdigit() and b'sleep' in open(f'/proc/{p}/cmdline', 'rb').read()]\n",
        {}, image=IMAGE, memory=memory)
    assert job.result(timeout=60) == {"seen": [False, False, False], "sleeping": []}
    assert job.container == "warm"


PROCESS = "import os, sys\npid = os.getpid()\ncwd = os.getcwd()\nloaded = 'wave' in sys.modules\n"


def test_a_kernels_next_job_runs_in_the_process_its_job_left_as_it_found_it(client: Client) -> None:
    memory = "72m"
    first = client.submit_cell(PROCESS + "import wave\nleak = 1\nopen('mine.txt', 'w').close()\n", {}, image=IMAGE,
                               memory=memory).result(timeout=60)
    job = client.submit_cell(PROCESS + "seen = 'leak' in globals()\nfiles = os.listdir()\n", {}, image=IMAGE,
                             memory=memory)
    second = job.result(timeout=60)
    assert job.container == "warm"
    # the same process, its modules still imported; the cell's globals and directory are its own
    assert (second["pid"], second["loaded"], second["seen"], second["files"]) == (first["pid"], True, False, [])
    assert second["cwd"] != first["cwd"]  # (the first job left a file in its directory)
    third = client.submit_cell(PROCESS + "files = os.listdir()\n", {}, image=IMAGE, memory=memory).result(timeout=60)
    assert (third["pid"], third["cwd"], third["files"]) == (first["pid"], second["cwd"], [])  # left empty: kept
    own = client.submit_cell(PROCESS, {}, image=IMAGE, memory=memory, new_process=True).result(timeout=60)
    assert own["pid"] != first["pid"] and not own["loaded"]
    after = client.submit_cell(PROCESS, {}, image=IMAGE, memory=memory).result(timeout=60)
    assert after["pid"] not in (first["pid"], own["pid"])  # --new-process's process did not stay
    assert client.submit(os.getpid, image=IMAGE, memory=memory).result(timeout=60) == after["pid"]  # functions too


def test_a_cell_that_awaited_leaves_no_closed_event_loop_to_the_next(client: Client) -> None:
    memory = "80m"
    awaited = client.submit_cell(PROCESS + "import asyncio\nawait asyncio.sleep(0)\n", {}, image=IMAGE, memory=memory)
    first = awaited.result(timeout=60)
    job = client.submit_cell(PROCESS + "import asyncio\nasync def one():\n    return 1\n"
                             "value = asyncio.get_event_loop().run_until_complete(one())\n", {}, image=IMAGE,
                             memory=memory)
    assert (job.result(timeout=60)["value"], job.result()["pid"]) == (1, first["pid"])


@pytest.mark.parametrize("left_behind", [
    "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n",
    "import subprocess\nsubprocess.Popen(['sleep', '30'])\n",
    "os.environ['LEFT'] = '1'\n",
    "sys.path.append('/left')\n",
    "import signal\nsignal.setitimer(signal.ITIMER_REAL, 30)\n",
    "sys.setprofile(lambda *args: None)\n",
    "raise ValueError('failed')\n"])
def test_a_job_that_leaves_its_process_changed_ends_it(redis_client: Client, left_behind: str) -> None:
    memory = "76m"
    first = redis_client.submit_cell(PROCESS, {}, image=IMAGE, memory=memory).result(timeout=60)
    changing = redis_client.submit_cell(PROCESS + left_behind, {}, image=IMAGE, memory=memory)
    try:
        assert changing.result(timeout=60)["pid"] == first["pid"]
    except ValueError:
        pass  # (the failing job's)
    after = redis_client.submit_cell(PROCESS, {}, image=IMAGE, memory=memory)
    assert after.result(timeout=60)["pid"] != first["pid"]
    assert after.container == "warm"


def test_jobs_of_two_kernels_never_share_a_process(redis_client: Client, redis_url: str) -> None:
    other = Client(redis_url)
    memory = "84m"
    ran = [(client.submit_cell(PROCESS + "host = __import__('socket').gethostname()\n", {}, image=IMAGE, memory=memory)
            .result(timeout=60)) for client in (redis_client, other, redis_client)]
    assert len({out["host"] for out in ran}) == 1  # one warm container ...
    assert len({out["pid"] for out in ran}) == 3  # ... whose kept process is retired for the other kernel's job


def test_a_job_cannot_read_the_next_jobs_request(client: Client) -> None:
    """A warm container's requests arrive on its stdin: a job (or a process it leaves behind)
    reading stdin gets end of file, not the next job's request."""
    memory = "112m"
    first = client.submit_cell("import os, subprocess, sys, time\nsubprocess.Popen(['sh', '-c', 'cat > /tmp/stolen'])\n"
                               "while not os.path.exists('/tmp/stolen'):  # cat runs (the job's end kills it)\n"
                               "    time.sleep(0.01)\n"
                               "data = sys.stdin.read()\n", {}, image=IMAGE, memory=memory)
    assert first.result(timeout=30) == {"data": ""}
    second = client.submit_cell("stolen = open('/tmp/stolen', 'rb').read()\n", {}, image=IMAGE, memory=memory)
    assert second.result(timeout=30) == {"stolen": b""}
    assert second.container == "warm"


# what a job sees of its server's channel: the sockets it holds, and whether the server's socket is there
SEES_CHANNEL = ("import os\nsockets = []\n"
                "for fd in os.listdir('/proc/self/fd'):\n"
                "    try:\n        link = os.readlink(f'/proc/self/fd/{fd}')\n"
                "    except FileNotFoundError:\n        continue  # (the listing's own)\n"
                "    if link.startswith('socket:'):\n        sockets.append(link)\n"
                "listening = os.path.exists('/dev/shm/celery_nb-server.sock')\n")
SEEN = ["sockets", "listening"]
# the pipes a job's process holds besides its stdout and stderr: its own frames to its server, only
PIPES = ("import os\npipes = []\n"
         "for fd in os.listdir('/proc/self/fd'):\n"
         "    try:\n        link = os.readlink(f'/proc/self/fd/{fd}')\n"
         "    except FileNotFoundError:\n        continue\n"
         "    if int(fd) > 2 and link.startswith('pipe:'):\n        pipes.append(link)\n"
         "server = {os.readlink(f'/proc/1/fd/{fd}') for fd in (0, 1)}\n")


def test_a_job_holds_no_pipe_of_its_server(client: Client) -> None:
    """Its server's frames to the worker (stdout, one-shot or over Docker's stream) are not the
    job's to write, nor its requests (stdin) the job's to read: the job's process holds its own
    frames, status and next-job pipes to the server only."""
    for fresh in (True, False):
        job = client.submit_cell(PIPES, {}, outputs=["pipes", "server"], image=IMAGE, fresh=fresh)
        out = job.result(timeout=60)
        assert len(out["pipes"]) == 3 and len(out["server"]) == 2 and not set(out["pipes"]) & out["server"], (fresh, out)


def test_a_worker_on_the_containers_host_talks_to_a_warm_container_over_its_own_socket(
        client: Client, docker_client: docker.DockerClient) -> None:
    """Requests and frames bypass Docker's attach stream (dockerd's copying): the server's own
    socket, reached through /proc. A job holds no socket of its server's, and finds none to connect to."""
    memory = "120m"
    jobs = [client.submit_cell(SEES_CHANNEL, {}, outputs=SEEN, image=IMAGE, memory=memory) for _ in range(2)]
    assert [job.result(timeout=60) for job in jobs] == [{"sockets": [], "listening": False}] * 2
    assert len(server_sockets(docker_client.containers.get(jobs[-1].container_id))) == 1
    fresh = client.submit_cell(SEES_CHANNEL, {}, outputs=SEEN, image=IMAGE, memory=memory, fresh=True)
    assert fresh.result(timeout=60) == {"sockets": [], "listening": False}  # (one-shot: stdin, as ever)


def test_a_worker_that_cannot_see_the_containers_processes_talks_through_docker(
        redis_url: str, docker_client: docker.DockerClient) -> None:
    """A worker in a pid namespace of its own (as in a container of the compose stack) cannot
    reach the servers' sockets: its warm containers serve it over the attach stream, big data too."""
    queue, name = "attach-only", f"attach-only-{os.getpid()}"
    # its own hostname too: its containers' owner label names a pid of its namespace
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--uts", "sh", "-c",
         f'hostname {name} && exec "$@"', "sh", sys.executable, "-m", "celery_nb.worker.cli", "worker", "--broker",
         redis_url, "-Q", queue, "-c", "2", "-n", f"{name}@%h"],
        stdout=open(ROOT / f".pytest_cache/worker-{name}.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        client = Client(redis_url)
        wait_for(lambda: client.app.control.ping(timeout=0.5, destination=[f"{name}@{name}"]), 60,
                    "the worker in a namespace of its own did not answer")
        jobs = [client.submit_cell(SEES_CHANNEL, {}, outputs=SEEN, image=IMAGE, queue=queue) for _ in range(3)]
        assert [job.result(timeout=60) for job in jobs] == [{"sockets": [], "listening": False}] * 3
        assert {job.container for job in jobs} == {"cold", "warm"}
        assert server_sockets(docker_client.containers.get(jobs[-1].container_id)) == []
        # nor can it hand files to jobs' processes: big data goes through the attach stream, both ways
        big = bytes(range(256)) * (3 << 12)  # 3 MiB
        assert client.submit_cell("out = data[::-1]\n", {"data": big}, image=IMAGE, queue=queue).result(60) == {
            "out": big[::-1]}
    finally:  # the worker is unshare's child, which does not pass signals on: stopped itself (warm shutdown)
        for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(child), signal.SIGTERM)
        stop_process(proc)
    assert not worker_containers(docker_client, f"{name}@{name}")


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
    front): a big result is still handed over as a file, and functions and classes the cell
    defined still travel (by value, with cloudpickle)."""
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
    wait_for(lambda: leftover_id not in {c.id for c in worker_containers(docker_client, worker)}, 10,
                "leftover container not removed at worker start")
    jobs = [redis_client.submit_cell(WHOAMI, {}, image=IMAGE, queue="poolq")]
    jobs[0].result(timeout=60)
    worn = {c.id for c in worker_containers(docker_client, worker)}
    jobs.append(redis_client.submit_cell(WHOAMI, {}, image=IMAGE, queue="poolq"))  # in the same container
    jobs[-1].result(timeout=60)
    # it has run its max jobs (2): a replacement starts in the background and takes its place
    containers = lambda: {c.id for c in worker_containers(docker_client, worker)}  # noqa: E731
    wait_for(lambda: containers() and not containers() & worn, 30, "worn-out container not replaced")
    jobs.append(redis_client.submit_cell(WHOAMI, {}, image=IMAGE, queue="poolq"))
    hosts = [job.result(timeout=60)["host"] for job in jobs]
    assert hosts[0] == hosts[1] != hosts[2]
    assert [job.container for job in jobs] == ["cold", "warm", "warm"]  # no job waited for the replacement
    assert len(worker_containers(docker_client, worker)) == 1
    # idle for longer than CELERY_NB_POOL_IDLE_TIMEOUT=2: reaped
    wait_for(lambda: not worker_containers(docker_client, worker), 10, "idle container not reaped")
    redis_client.submit_cell(WHOAMI, {}, image=IMAGE, queue="poolq").result(timeout=60)
    assert len(worker_containers(docker_client, worker)) == 1
    stop_process(proc)  # a worker that stops removes its idle containers
    assert not worker_containers(docker_client, worker)


def test_a_warm_container_that_died_while_idle_is_replaced(redis_client: Client,
                                                           docker_client: docker.DockerClient) -> None:
    memory = "104m"
    first = redis_client.submit_cell(WHOAMI + "import os\npid = os.getpid()\n", {}, image=IMAGE, memory=memory)
    out = first.result(timeout=60)
    host = out["host"]
    idle = docker_client.containers.get(first.container_id)
    # idle: the server (pid 1) and the process kept for the kernel's next job wait
    wait_for(lambda: _namespace_pids(idle) == {1, out["pid"]}, 10, "the container did not go idle")
    idle.kill()
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
    job = client.submit_cell("n = len(blob)\n", {"blob": b"z" * (3 << 20)}, image=IMAGE, memory=memory)
    assert job.result(timeout=60) == {"n": 3 << 20}
    assert job.container == "warm"


# -- the pool's book-keeping, without Docker -------------------------------------------------

def _book(pool_size: int = 2, max_jobs: int = 3) -> PoolBook:
    return PoolBook(WorkerSettings(pool_size=pool_size, pool_max_jobs=max_jobs))


def _runtime(memory: int = 64 << 20) -> RuntimeContainer:
    """The book reads a container's spec and counters only: here, of no container."""
    spec = ContainerSpec(image=IMAGE, memory=memory, nano_cpus=None, pids=512, network="none", read_only=False,
                         user=None, gpus=None)
    return RuntimeContainer(container=None, sock=None, spec=spec)


def test_the_book_keeps_idle_containers_per_key_most_recent_first_up_to_the_pool_size() -> None:
    book = _book(pool_size=2)
    a, b, c, other = _runtime(), _runtime(), _runtime(), _runtime(memory=128 << 20)
    assert [book.check_in(r, ran=True, stopped=False) for r in (a, b, c, other)] == [
        (True, False), (True, False), (False, False), (True, False)]  # c: no room, removed
    key = a.spec.pool_key
    assert [book.take(key), book.take(key), book.take(key)] == [b, a, None]
    assert book.take(other.spec.pool_key) is other
    assert a.jobs_run == 1 and book.check_in(a, ran=False, stopped=False) == (True, False) and a.jobs_run == 1


def test_a_job_gets_the_container_that_keeps_its_kernels_process_else_one_that_keeps_none() -> None:
    book = _book(pool_size=4)
    theirs, ours, none, newest = _runtime(), _runtime(), _runtime(), _runtime()
    theirs.process, ours.process, newest.process = "theirs", "ours", "newest"
    for runtime in (theirs, ours, none, newest):
        book.check_in(runtime, ran=True, stopped=False)
    key = ours.spec.pool_key
    assert [book.take(key, "ours"), book.take(key, "ours"), book.take(key, "ours"), book.take(key, "ours")] == [
        ours, none, newest, theirs]


def test_a_request_retires_a_process_kept_for_another_key_first() -> None:
    """The frames a worker writes: a RETIRE before a job of another key (or of none) than the
    process the container keeps, and the REQUEST naming the job's key; the END of a job whose
    process stays makes it the kept one."""
    import socket

    worker_side, container_side = socket.socketpair()
    runtime = _runtime()
    runtime.sock = worker_side
    decoder = protocol.FrameDecoder()

    def sent(process: str | None, kept: bool) -> list[int]:
        runtime.send(b"job", {}, process=process)
        runtime.ended({"kept": True, "oom_kills": 0} if kept else {"exit": 0})
        frames = decoder.feed(container_side.recv(1 << 16))
        header, (payload, *_code) = protocol.unpack_bundle(frames[-1][1])
        assert header["process"] == process and bytes(payload) == b"job"
        return [kind for kind, _body in frames]

    request, retire = protocol.FRAME_REQUEST, protocol.FRAME_RETIRE
    assert sent("a", kept=True) == [request] and runtime.process == "a"
    assert sent("a", kept=True) == [request]
    assert sent("b", kept=False) == [retire, request] and runtime.process is None
    assert sent("b", kept=True) == [request]
    assert sent(None, kept=False) == [retire, request]
    assert sent(None, kept=False) == [request]


def test_a_worn_out_container_serves_on_until_its_replacement_is_in() -> None:
    book = _book(pool_size=2, max_jobs=2)
    worn = _runtime()
    assert book.check_in(worn, ran=True, stopped=False) == (True, False)
    assert book.take(worn.spec.pool_key) is worn
    assert book.check_in(worn, ran=True, stopped=False) == (True, True)  # its 2nd job: replace it, keep it meanwhile
    assert book.take(worn.spec.pool_key) is worn
    assert book.check_in(worn, ran=True, stopped=False) == (True, False)  # a replacement is already starting
    fresh = _runtime()
    assert book.replace(worn, fresh, stopped=False) == (True, True)  # idle: out now, the fresh one in
    assert book.take(worn.spec.pool_key) is fresh and book.take(worn.spec.pool_key) is None


def test_a_worn_out_container_running_a_job_is_retired_when_its_replacement_is_in() -> None:
    book = _book(pool_size=2, max_jobs=1)
    worn = _runtime()
    assert book.check_in(worn, ran=True, stopped=False) == (True, True)
    assert book.take(worn.spec.pool_key) is worn  # running a job as its replacement comes in
    fresh = _runtime()
    assert book.replace(worn, fresh, stopped=False) == (False, True)
    assert worn.retired and book.check_in(worn, ran=True, stopped=False) == (False, False)  # removed at its end
    assert book.replace(_runtime(), None, stopped=False)[1] is False  # a replacement that did not start


def test_containers_coming_back_are_waited_for_and_a_stopped_pool_keeps_none() -> None:
    book = _book()
    runtime = _runtime()
    key = runtime.spec.pool_key
    assert not book.coming_back(key)
    book.returning(runtime)  # its job is reported done, its process still exiting
    assert book.coming_back(key)
    book.check_in(runtime, ran=True, stopped=False)
    book.returned(runtime)
    assert not book.coming_back(key) and book.take(key) is runtime
    assert book.check_in(runtime, ran=True, stopped=True) == (False, False)
    assert book.empty() == []


def test_idle_containers_are_reaped_by_their_last_use() -> None:
    book = _book(pool_size=3)
    old, recent = _runtime(), _runtime()
    book.check_in(old, ran=True, stopped=False)
    cutoff = time.monotonic()
    book.check_in(recent, ran=True, stopped=False)
    assert book.stale(cutoff) == [old] and book.stale(cutoff) == []
    assert book.empty() == [recent] and book.take(recent.spec.pool_key) is None
