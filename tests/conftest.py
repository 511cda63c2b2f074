"""Fixtures for the real stack: Docker daemon, Redis, `celery-nb worker` processes, test images.

Under CI=true a missing Docker daemon, Redis server or test image is a test failure,
never a silent skip. Every test that uses Docker (through the ``docker_client`` fixture, which
the fixtures that run jobs use) is marked ``docker``: ``pytest -m "not docker"`` is the fast
tier, which needs Redis only.
"""
from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
import redis

from celery_nb import Client
from celery_nb.jobstore import START
from celery_nb.worker import docker_api
from celery_nb.worker.docker_api import LABEL_WORKER
from celery_nb.worker.environments import list_environments, remove_environment
from tests.kernel import Kernel

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("CELERY_NB_TEST_IMAGE", "local/py311")  # python3 only
NUMPY_IMAGE = os.environ.get("CELERY_NB_TEST_NUMPY_IMAGE", "local/py311-numpy")  # + numpy, tqdm
SCIENCE_IMAGE = os.environ.get("CELERY_NB_TEST_SCIENCE_IMAGE", "local/py311-science")  # + pandas, matplotlib
OTHER_PYTHON_IMAGE = os.environ.get("CELERY_NB_TEST_OTHER_PYTHON_IMAGE", "local/py-other")
REDIS_URL = os.environ.get("CELERY_NB_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TEST_IMAGES = (IMAGE, NUMPY_IMAGE, SCIENCE_IMAGE, OTHER_PYTHON_IMAGE)
# the packages of notebooks/quickstart.ipynb's numpy cell: tests that need an environment with numpy
# use this one, so that a fresh machine builds one numpy environment for all of them
NUMPY_PIP = "numpy tqdm"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "docker_client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.docker)


def _unavailable(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: tests that need it must not be skipped; run scripts/setup.sh)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        _unavailable(f"no Docker daemon: {exc}")
    missing = [tag for tag in TEST_IMAGES if not client.images.list(name=tag)]
    if missing:
        _unavailable(f"test images missing: {', '.join(missing)} (built by scripts/setup.sh)")
    return client


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL).flushdb()
    except redis.RedisError as exc:
        _unavailable(f"no Redis at {REDIS_URL}: {exc}")
    return REDIS_URL


def start_worker(broker_url: str, queue: str, name: str, env: dict[str, str] | None = None,
                 concurrency: int = 4, node_name: str | None = None) -> subprocess.Popen:
    """A real `celery-nb worker` process, returned once it answers a ping. Its default node name
    carries this process's pid: a worker removes the containers of earlier workers of its name,
    so two test runs on one Docker host must not share names."""
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    log = open(ROOT / f".pytest_cache/worker-{name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery_nb.worker.cli", "worker", "--broker", broker_url, "-Q", queue,
         "-c", str(concurrency), "-n", node_name or f"{name}@%h.{os.getpid()}"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT)
    probe = Client(broker_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker {name} exited with {proc.returncode}; see {log.name}")
        replies = probe.app.control.ping(timeout=0.5)
        if any(name in host for reply in replies for host in reply):
            return proc
    proc.kill()
    raise RuntimeError(f"worker {name} did not answer a ping within 60 s; see {log.name}")


def free_port(ports: range) -> int:
    """A port of ``ports`` (picked at random) that is free now. Keep such ranges below the
    ephemeral ports (32768+ here), which outgoing connections take at any time."""
    for port in random.sample(ports, len(ports)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports}")


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a worker or server started by a test: SIGTERM, then SIGKILL after 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def celery_worker(redis_url: str, docker_client: docker.DockerClient) -> Iterator[subprocess.Popen]:
    proc = start_worker(redis_url, "celery_nb", "main")
    yield proc
    stop_process(proc)


@pytest.fixture(scope="session")
def redis_client(celery_worker: subprocess.Popen, redis_url: str) -> Client:
    """A client whose jobs go through Redis to the separate worker process."""
    return Client(redis_url)


@pytest.fixture(scope="session")
def embedded_client(docker_client: docker.DockerClient) -> Iterator[Client]:
    """A client with the embedded (in-process, memory transport) worker."""
    client = Client(None)
    yield client
    client.shutdown()


@pytest.fixture(params=["redis", "embedded"])
def client(request: pytest.FixtureRequest, docker_client: docker.DockerClient) -> Client:
    """Each test using this runs through both paths."""
    return request.getfixturevalue(f"{request.param}_client")


def kernel_with_celery_nb(request: pytest.FixtureRequest, env: dict[str, str]) -> Iterator[Kernel]:
    """For a module-scoped fixture parametrized "redis"/"embedded": a real kernel with ``env`` and
    celery_nb loaded, whose jobs go through the test Redis to the session's separate worker
    ("redis") or run on its embedded worker."""
    if request.param == "redis":
        env = {**env, "CELERY_NB_BROKER_URL": request.getfixturevalue("redis_url")}
        request.getfixturevalue("celery_worker")
    kernel = Kernel(env)
    assert kernel.run("%load_ext celery_nb").error() is None
    yield kernel
    kernel.shutdown()


def wait_for(condition: Callable[[], object], seconds: float, what: str) -> None:
    """Wait until ``condition()`` holds; fail saying ``what`` did not happen within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.05)


def job_statuses(client: Client, job_id: str) -> list[str]:
    """The statuses a job went through, from its event stream."""
    events, _cursor = client.store.read(job_id, START, timeout=0)
    return [e["status"] for e in events if e["type"] in ("status", "done")]


def assert_container_removed(docker_client: docker.DockerClient, container_id: str | None) -> None:
    """The worker removes a job's container (the one its events name, ``Job.container_id``)
    right after reporting the job's end."""
    assert container_id and re.fullmatch("[0-9a-f]{64}", container_id), f"not a container id: {container_id!r}"
    deadline = time.monotonic() + 5
    while docker_client.containers.list(all=True, sparse=True, filters={"id": container_id}):
        assert time.monotonic() < deadline, f"container {container_id} still exists after 5 s"
        time.sleep(0.05)


def remove_environments(docker_client: docker.DockerClient, requirements: str) -> None:
    """So that the next job of ``requirements`` builds its environment for real."""
    for info in list_environments(docker_client):
        if info.requirements == tuple(sorted(requirements.split())):
            # idle warm containers of an earlier run (their worker may be removing them too)
            docker_api.remove(docker_client.containers.list(all=True, filters={"ancestor": info.image}))
            assert remove_environment(docker_client, info)


def worker_containers(docker_client: docker.DockerClient, worker: str) -> list:
    """The containers (running or not) that carry worker node name ``worker``'s label."""
    return docker_client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL_WORKER}={worker}"})


def server_sockets(container: docker.models.containers.Container) -> list[str]:
    """The sockets the container's main process (its server) holds beyond stdin, stdout and
    stderr: its connection to its worker, if they talk directly."""
    container.reload()
    fds = f"/proc/{container.attrs['State']['Pid']}/fd"
    links = [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds) if int(fd) > 2]
    return [link for link in links if link.startswith("socket:")]
