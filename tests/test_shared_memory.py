"""Big payloads and results. With a worker on the kernel's host (the embedded worker, a separate
`celery-nb worker`): shared memory files in the kernel's folder of /dev/shm, handed to the job's
process in its container as file descriptors, mapped on both sides, nothing through Redis. With a
worker elsewhere (another host, emulated by CELERY_NB_KERNEL_SHARED_MEMORY=0): through Redis,
and the container still gets them as files. The values byte for byte, the path each took, and
the files gone once their job has ended and its result has been collected."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator

import docker
import pytest
import redis as redis_lib

from celery_nb import Client, InputError, shm
from celery_nb.job import Job
from celery_nb.worker import docker_api, handover
from celery_nb.worker.channel import RuntimeContainer
from celery_nb.worker.docker_api import LABEL_WORKER
from celery_nb.worker.policy import ContainerSpec
from tests.conftest import (IMAGE, NUMPY_IMAGE, ROOT, assert_container_removed, server_sockets, start_worker,
                            stop_process)

BLOB = bytes(range(256)) * (12 * 4096)  # 12 MiB
ELSEWHERE = "elsewhere"  # the queue of the worker that does not share the kernel's /dev/shm


@pytest.fixture(scope="module")
def worker_elsewhere(redis_url: str, docker_client: docker.DockerClient) -> Iterator[subprocess.Popen]:
    """A worker as on another host: it does not share the kernel's shared memory."""
    proc = start_worker(redis_url, ELSEWHERE, ELSEWHERE, env={"CELERY_NB_KERNEL_SHARED_MEMORY": "0"})
    yield proc
    stop_process(proc)


def _done(client: Client, job: Job) -> dict:
    return next(event for event in client.store.read(job.id, "0", 1)[0] if event["type"] == "done")


def _files(client: Client) -> set[str]:
    """The files in the kernel's shared memory folder."""
    return set(os.listdir(client.kernel_files.folder))


def _blob_keys(redis_url: str) -> set[bytes]:
    return set(redis_lib.Redis.from_url(redis_url).keys("celery_nb:blob:*"))


def test_big_data_with_a_worker_of_the_kernels_host_goes_through_shared_memory(
        client: Client, redis_url: str, docker_client: docker.DockerClient) -> None:
    """Files handed to the job's process while its worker talks to the container's server over
    the server's own socket (not Docker's stream)."""
    assert client.kernel_files is not None and client.kernel_files.host == shm.host_id()
    files, keys = _files(client), _blob_keys(redis_url)
    job = client.submit_cell("import time\ntime.sleep(1)\ndoubled = data * 2\n", {"data": BLOB}, image=IMAGE,
                             memory="512m")
    payload = _files(client) - files
    assert len(payload) == 1 and next(iter(payload)).startswith("in-")
    assert os.stat(os.path.join(client.kernel_files.folder, *payload)).st_size > len(BLOB)  # the bundle
    assert job.wait(60) and job.status == "succeeded"
    result = _done(client, job)["result_ref"]
    assert set(result) == {"shm", "size"} and result["size"] > 2 * len(BLOB)
    info = os.stat(result["shm"])  # left in the kernel's folder, owned by its user, private
    assert os.path.dirname(result["shm"]) == client.kernel_files.folder
    assert info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) == 0o600
    assert _files(client) == files | {os.path.basename(result["shm"])}  # the payload went with its job
    assert job.result(timeout=60)["doubled"] == BLOB * 2
    assert _files(client) == files  # the result went once collected
    assert _blob_keys(redis_url) == keys  # nothing through Redis
    assert len(server_sockets(docker_client.containers.get(job.container_id))) == 1


def test_a_numpy_result_is_used_where_the_job_wrote_it(client: Client) -> None:
    """The kernel maps the file the job's process wrote the result into: the array's memory is
    that file's (deleted once mapped), not a copy; it is aligned, and writable."""
    job = client.submit_cell("import numpy as np\nbig = np.arange(3 << 20, dtype=np.float64)\n", {},
                             image=NUMPY_IMAGE, memory="512m")
    big = job.result(timeout=60)["big"]
    assert big.shape == (3 << 20,) and big[-1] == (3 << 20) - 1 and (big[:1000] == range(1000)).all()
    assert big.flags.aligned
    address = big.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        mapped = next((line.split(maxsplit=5) + [""])[5] for line in maps
                      if int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16))
    assert mapped.startswith(f"{client.kernel_files.folder}/out-") and mapped.strip().endswith("(deleted)")
    big[0] = 7.0  # its own copy of that page, not the file's
    assert big[0] == 7.0


def test_big_data_with_a_worker_elsewhere_goes_through_redis(worker_elsewhere: subprocess.Popen,
                                                             redis_url: str) -> None:
    client = Client(redis_url)
    files, keys = _files(client), _blob_keys(redis_url)
    job = client.submit_cell("import time\ntime.sleep(1)\ndoubled = data * 2\n", {"data": BLOB}, image=IMAGE,
                             memory="512m", queue=ELSEWHERE)
    payload = _blob_keys(redis_url) - keys
    assert payload and all(0 < redis_lib.Redis.from_url(redis_url).ttl(key) <= 24 * 3600 for key in payload)
    assert job.wait(60) and job.status == "succeeded"
    assert "key" in _done(client, job)["result_ref"]  # a blob
    assert job.result(timeout=60)["doubled"] == BLOB * 2
    assert _blob_keys(redis_url) == keys  # the payload deleted by the worker, the result by the kernel
    assert _files(client) == files  # nothing through the kernel's shared memory


def test_workers_tell_kernels_whose_shared_memory_they_see(redis_client: Client,
                                                           worker_elsewhere: subprocess.Popen) -> None:
    facts = {name.split("@")[0]: value for name, value in redis_client.store.live_workers().items()}
    assert facts["main"]["host"] == shm.host_id() and "celery_nb" in facts["main"]["queues"]
    assert facts[ELSEWHERE] == {"queues": [ELSEWHERE], "host": None, "uid": os.geteuid()}
    assert redis_client.kernel_files.shared_with(facts["main"])
    assert not redis_client.kernel_files.shared_with(facts[ELSEWHERE])


def test_a_payload_left_in_shared_memory_fails_clearly_on_a_worker_elsewhere(
        worker_elsewhere: subprocess.Popen, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As when the kernel's host had the queue's only worker when it sent the job, and that
    worker stopped before the job ran (the job runs elsewhere)."""
    client = Client(redis_url)
    files = _files(client)
    monkeypatch.setattr(client, "_payload_files_for", lambda queue: client.kernel_files)
    job = client.submit_cell("n = len(data)\n", {"data": BLOB}, image=IMAGE, queue=ELSEWHERE)
    with pytest.raises(InputError, match="in shared memory on its kernel's host, which worker elsewhere@.* does "
                                         "not share .* send the job again"):
        job.result(timeout=60)
    for name in _files(client) - files:  # left for its expiry: the worker does not see it
        client.kernel_files.delete({"shm": os.path.join(client.kernel_files.folder, name)})


def test_a_cancelled_job_leaves_no_shared_files(client: Client, docker_client: docker.DockerClient) -> None:
    files = _files(client)
    job = client.submit_cell("import time\nn = len(data)\nprint('started', flush=True)\ntime.sleep(60)\n",
                             {"data": BLOB}, image=IMAGE, memory="512m")
    deadline = time.monotonic() + 60
    while "started" not in job.logs:
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.05)
    cancelled = time.monotonic()
    job.cancel()
    assert job.wait(10) and job.status == "cancelled" and time.monotonic() - cancelled < 2
    assert_container_removed(docker_client, job.container_id)
    assert _files(client) == files


def test_a_detached_process_of_an_earlier_job_gets_none_of_the_next_jobs_files(
        client: Client, docker_client: docker.DockerClient) -> None:
    """A warm container's later jobs share it with what an earlier job left running. Such a
    process connects to every socket a job's process listens on for its files, offering a file of
    its own: the job's process takes files from the worker only, so its result still reaches
    the kernel whole, and nothing is written into that process's file."""
    memory = "114m"  # a warm container of this test's own
    thief = ("import os, socket, time\n"
             "fd = os.open('/tmp/offered', os.O_RDWR | os.O_CREAT, 0o600)\n"
             "os.ftruncate(fd, 64 << 20)\n"
             "open('/tmp/looking', 'w').close()\n"
             "tried, end = set(), time.time() + 30\n"
             "while time.time() < end:\n"
             "    for name in set(os.listdir('/dev/shm')) - tried:\n"
             "        tried.add(name)\n"
             "        try:\n"
             "            with socket.socket(socket.AF_UNIX) as s:\n"
             "                s.connect('/dev/shm/' + name)\n"
             "                open('/tmp/tried', 'a').write(name + chr(10))\n"
             "                socket.send_fds(s, [b'f'], [fd])\n"
             "        except OSError:\n"
             "            pass\n"
             "    time.sleep(0.0002)\n")
    first = client.submit_cell(f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {thief!r}], "
                               f"start_new_session=True)\n", {}, image=IMAGE, memory=memory)
    first.result(timeout=60)
    client.submit_cell("import os, time\nwhile not os.path.exists('/tmp/looking'):\n    time.sleep(0.01)\n", {},
                       image=IMAGE, memory=memory).result(timeout=60)  # it is looking
    job = client.submit_cell("out = data[::-1]\n", {"data": BLOB}, image=IMAGE, memory=memory)
    assert job.result(timeout=60)["out"] == BLOB[::-1]
    assert job.container == "warm" and job.container_id == first.container_id
    check = client.submit_cell("tried = open('/tmp/tried').read().split()\n"
                               "untouched = open('/tmp/offered', 'rb').read() == bytes(64 << 20)\n",
                               {}, image=IMAGE, memory=memory).result(timeout=60)
    assert check["tried"] and check["untouched"]  # it got in (to the payload's socket, the result's, or both)


@pytest.fixture
def runtime(docker_client: docker.DockerClient) -> Iterator[RuntimeContainer]:
    spec = ContainerSpec(image=IMAGE, memory=128 << 20, nano_cpus=None, pids=64, network="none", read_only=False,
                         user=None, gpus=None)
    container = docker_api.start_container(docker_api.connect(), spec, {LABEL_WORKER: f"handover-{os.getpid()}"},
                                           "never", one_shot=True)
    yield container
    container.remove()


def _listen(runtime: RuntimeContainer, path: str) -> int:
    """A process in the container listening on ``path``; its pid there."""
    listener = ("import os, socket, time\ns = socket.socket(socket.AF_UNIX)\n"
                f"s.bind({path!r})\ns.listen(1)\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n")
    started = runtime.container.exec_run(["python3", "-c", listener], stream=True)
    return int(next(started.output).split()[0])


def test_the_worker_hands_a_file_only_to_the_process_that_asked(runtime: RuntimeContainer) -> None:
    path = f"/dev/shm/celery_nb-{os.urandom(16).hex()}.sock"
    listening = _listen(runtime, path)
    fd = handover.memory_file_of(b"secret")
    try:
        with pytest.raises(handover.HandoverError, match="held by another process"):
            handover.hand_over(runtime, {"for": "payload", "socket": path, "pid": listening + 1}, fd)
        handover.hand_over(runtime, {"for": "payload", "socket": path, "pid": listening}, fd)
        for wanted in ({"socket": "/dev/shm/../run/x.sock", "pid": listening},
                       {"socket": "/tmp/celery_nb-" + "0" * 32 + ".sock", "pid": listening}):
            with pytest.raises(handover.HandoverError, match="not a socket of celery_nb's"):
                handover.hand_over(runtime, {"for": "payload", **wanted}, fd)
    finally:
        os.close(fd)


def test_the_worker_follows_no_link_in_the_container(runtime: RuntimeContainer, tmp_path) -> None:
    """A job that puts a link where its socket should be does not make the worker connect to
    anything outside the container (a link's target would be resolved on the worker's host)."""
    outside = socket.socket(socket.AF_UNIX)
    outside.bind(str(tmp_path / "outside.sock"))
    outside.listen(1)
    outside.settimeout(0.5)
    path = f"/dev/shm/celery_nb-{os.urandom(16).hex()}.sock"
    assert runtime.container.exec_run(["ln", "-s", str(tmp_path / "outside.sock"), path]).exit_code == 0
    fd = handover.memory_file_of(b"secret")
    try:
        with pytest.raises(handover.HandoverError, match="is not a socket"):
            handover.hand_over(runtime, {"for": "payload", "socket": path, "pid": 1}, fd)
        with pytest.raises(TimeoutError):
            outside.accept()
    finally:
        os.close(fd)
        outside.close()


def test_shared_files_never_collected_expire() -> None:
    folder = shm.Exchange.own()
    old, new = folder.put([b"old"]), folder.put([b"new"])
    day_ago = time.time() - 24 * 3600 - 60
    os.utime(old["shm"], (day_ago, day_ago))
    folder.sweep()
    assert not os.path.exists(old["shm"]) and os.path.exists(new["shm"])
    folder.delete(new)
    assert not os.path.exists(new["shm"])


def test_a_folder_that_is_not_a_kernels_own_is_not_used(tmp_path) -> None:
    """The folder a request names must be a private folder of /dev/shm owned by the user its
    name says, on this host."""
    own = shm.Exchange.own()
    assert shm.Exchange.of(own.where()).folder == own.folder
    assert shm.Exchange.of({**own.where(), "host": "0" * 32}) is None  # another host's
    assert shm.Exchange.of({**own.where(), "dir": str(tmp_path)}) is None
    link = f"{shm.SHM_DIR}/celery_nb-{os.geteuid() + 1}"
    os.symlink(own.folder, link)
    try:
        assert shm.Exchange.of({**own.where(), "dir": link}) is None
    finally:
        os.unlink(link)


def test_big_blocks_a_job_allocates_are_in_huge_pages(client: Client) -> None:
    """glibc's malloc asks for transparent huge pages for big blocks in jobs (GLIBC_TUNABLES, a
    variable that acts at start: a job's own value replaces it)."""
    cell = ("import os\nblock = b'x' * (64 << 20)\ntunables = os.environ.get('GLIBC_TUNABLES')\n"
            "huge = next(int(line.split()[1]) << 10 for line in open('/proc/self/smaps_rollup') "
            "if line.startswith('AnonHugePages:'))\ndel block\n")
    default = client.submit_cell(cell, {}, image=IMAGE, memory="512m").result(timeout=60)
    assert default["tunables"] == "glibc.malloc.hugetlb=1"
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        if "[never]" not in f.read():
            assert default["huge"] >= 60 << 20
    own = client.submit_cell(cell, {}, image=IMAGE, memory="512m", env={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert own.result(timeout=60)["tunables"] == "glibc.malloc.hugetlb=0"


def test_an_embedded_kernels_files_go_with_it(docker_client: docker.DockerClient) -> None:
    """Its jobs end with it: at its shutdown its folder goes, results never collected included;
    a kernel killed leaves its folder to the next such kernel of its user, which removes it."""
    kernel = f"""\
import os
from celery_nb import Client
client = Client(None)
job = client.submit_cell("out = data[::-1]\\n", {{"data": bytes(3 << 20)}}, image={IMAGE!r})
assert job.wait(60) and job.status == "succeeded"
print(client.kernel_files.folder, sorted(name[:4] for name in os.listdir(client.kernel_files.folder)), flush=True)
client.shutdown()
print(os.path.exists(client.kernel_files.folder), flush=True)
os._exit(0)  # as if killed: what it made since is not cleaned up
"""
    run = subprocess.run([sys.executable, "-c", kernel], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = run.stdout.split("\n")
    assert lines[0].split(" ", 1)[1] == "['out-']" and lines[1] == "False", run.stdout + run.stderr
    killed = subprocess.run([sys.executable, "-c", "import os\nfrom celery_nb import shm\n"
                             "folder = shm.Exchange.own(this_process=True)\nfolder.put([b'x'])\n"
                             "print(folder.folder)\nos._exit(0)"], capture_output=True, text=True, check=True)
    left = killed.stdout.strip()
    assert os.listdir(left)
    alive = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom celery_nb import shm\n"
                              "print(shm.Exchange.own(this_process=True).folder, flush=True)\ntime.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    living = alive.stdout.readline().strip()
    try:  # the next such kernel (not this process: its folder is the session's embedded client's)
        subprocess.run([sys.executable, "-c", "from celery_nb import shm\nshm.Exchange.own(this_process=True).remove()"],
                       check=True, timeout=60)
        assert not os.path.exists(left) and os.path.exists(living)
    finally:
        alive.kill()
        alive.wait()
        shutil.rmtree(living, ignore_errors=True)


def test_files_are_handed_to_jobs_that_run_as_another_user(redis_url: str, docker_client: docker.DockerClient) -> None:
    """The job's process gets the descriptors whatever its user: neither the kernel's folder nor
    the files need be open to it."""
    worker = start_worker(redis_url, "nobody", "nobody", env={"CELERY_NB_USER": "65534:65534"})
    try:
        client = Client(redis_url)
        files = _files(client)
        job = client.submit_cell("import os\nuid = os.getuid()\nout = data[::-1]\n", {"data": BLOB}, image=IMAGE,
                                 queue="nobody", memory="512m")
        assert job.wait(60) and "shm" in _done(client, job)["result_ref"]
        outputs = job.result(timeout=60)
        assert outputs["uid"] == 65534 and outputs["out"] == BLOB[::-1]
        assert _files(client) == files
    finally:
        stop_process(worker)
