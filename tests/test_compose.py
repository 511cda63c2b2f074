"""compose.yaml brought up for real (`--scale worker=2`, on the local stand-in images that
images/build.sh builds): notebooks/quickstart.ipynb executed inside the jupyterlab container
against the compose workers, Flower listing its jobs by name, the stack's access controls,
and a teardown that leaves nothing behind."""
from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import pytest
import redis

from celery_nb import Client
from celery_nb.worker.docker_api import LABEL_WORKER
from tests import quickstart as checks
from tests.conftest import IMAGE, ROOT, _unavailable, free_port, remove_environments

# Stand-ins for python:3.12-slim and redis:7 (no registry here).
STACK_IMAGES = {"BASE_IMAGE": os.environ.get("CELERY_NB_TEST_STACK_BASE_IMAGE", "local/py311-pip"),
                "REDIS_IMAGE": os.environ.get("CELERY_NB_TEST_REDIS_IMAGE", "local/redis")}
SERVICES = {"redis", "worker", "jupyterlab", "flower"}
PROJECT_LABEL = "com.docker.compose.project"
PORTS = range(20000, 32000)  # for the stack's published ports
PIP = "iniconfig==1.1.1"  # a small environment the stack's workers build


def _compose_command() -> list[str]:
    """Docker Compose v2 (`docker compose`) where installed, else Debian's docker-compose 1.29."""
    for command in (["docker", "compose"], ["docker-compose"]):
        try:
            if subprocess.run([*command, "version"], capture_output=True).returncode == 0:
                return command
        except FileNotFoundError:
            pass
    _unavailable("neither `docker compose` nor `docker-compose` is installed (scripts/setup.sh installs it)")


@dataclass
class Stack:
    compose: list[str]  # the compose command for this project, up to the subcommand
    env: dict[str, str]
    docker: docker.DockerClient

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*self.compose, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def check(self, *args: str, timeout: float = 300) -> str:
        done = self.run(*args, timeout=timeout)
        assert done.returncode == 0, f"compose {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def containers(self, service: str | None = None) -> list:
        labels = [f"{PROJECT_LABEL}={self.compose[-1]}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        return self.docker.containers.list(all=True, filters={"label": labels})

    def workers(self) -> set[str]:
        """The Celery node names of the stack's workers (their containers' hostnames)."""
        return {f"celery@{c.attrs['Config']['Hostname']}" for c in self.containers("worker")}

    def broker_url(self) -> str:
        return f"redis://:{self.env['REDIS_PASSWORD']}@127.0.0.1:{self.env['REDIS_PORT']}/0"

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.env[f'{service.upper()}_PORT']}{path}"


def _wait_healthy(stack: Stack, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        containers = stack.containers()
        health = {c.name: c.attrs["State"].get("Health", {}).get("Status") for c in containers}
        if len(containers) == len(SERVICES) + 1 and set(health.values()) == {"healthy"}:
            return
        if time.monotonic() > deadline:
            logs = stack.run("logs", "--tail", "30").stdout
            pytest.fail(f"the stack did not become healthy within {timeout:.0f} s: {health}\n{logs}")
        time.sleep(1)


@pytest.fixture(scope="module")
def stack(docker_client: docker.DockerClient) -> Iterator[Stack]:
    missing = [tag for tag in STACK_IMAGES.values() if not docker_client.images.list(name=tag)]
    if missing:
        _unavailable(f"stack images missing: {', '.join(missing)} (built by scripts/setup.sh)")
    project = f"celery-nb-test-{os.getpid()}"
    # A tag of this run's own: a concurrent run from other sources cannot swap the image under it.
    # Built from the layers images/build.sh cached as local/celery-nb.
    image = f"local/celery-nb:{project}"
    env = {**os.environ, **STACK_IMAGES, "CELERY_NB_IMAGE": image,
           "REDIS_PORT": str(free_port(PORTS)), "JUPYTER_PORT": str(free_port(PORTS)), "FLOWER_PORT": str(free_port(PORTS)),
           "REDIS_PASSWORD": secrets.token_hex(8), "JUPYTER_TOKEN": secrets.token_hex(8),
           "FLOWER_PASSWORD": secrets.token_hex(8)}
    stack = Stack([*_compose_command(), "-f", str(ROOT / "compose.yaml"), "-p", project], env, docker_client)
    stack.check("build", timeout=900)  # from Docker's layer cache: only changed sources are reinstalled
    workers: set[str] = set()
    try:
        stack.check("up", "-d", "--scale", "worker=2")
        _wait_healthy(stack)
        workers = stack.workers()
        yield stack
    finally:
        stack.check("down", "-v", "--remove-orphans", "--timeout", "30")
        docker_client.images.remove(image)  # the tag; the layers stay cached
    assert not stack.containers(), "compose down left containers of the stack"
    # the workers removed their warm job containers when they stopped
    leftovers = [c.name for w in workers for c in docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_WORKER}={w}"})]
    assert not leftovers, f"job containers left behind by the stack's workers: {leftovers}"


@pytest.fixture(scope="module")
def quickstart(stack: Stack) -> dict:
    """The quickstart executed by the jupyterlab container's own Python and kernel."""
    exec_ = ["exec", "-T", "-e", f"CELERY_NB_DEFAULT_IMAGE={IMAGE}", "-e", f"CELERY_NB_DEFAULT_FUNCTION_IMAGE={IMAGE}",
             "jupyterlab", "python"]
    output = "/tmp/quickstart.ipynb"
    return checks.execute([*stack.compose, *exec_], "/notebooks/quickstart.ipynb", output,
                          read=[*stack.compose, "exec", "-T", "jupyterlab", "cat", output], env=stack.env)


def _get(url: str, user: str | None = None, password: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_quickstart_runs_in_jupyterlab_on_the_compose_workers(quickstart: dict, stack: Stack) -> None:
    checks.assert_all(quickstart)
    summaries = [o.data["text/plain"] for cell in quickstart["cells"].values() for o in cell.outputs
                 if o.output_type == "display_data" and "celery_nb job" in o.data.get("text/plain", "")]
    workers = stack.workers()
    assert summaries and all(any(f" on {w} " in s for w in workers) for s in summaries), summaries


def test_flower_lists_the_jobs_by_name(quickstart: dict, stack: Stack) -> None:
    user, password = "celery-nb", stack.env["FLOWER_PASSWORD"]
    # kind and label: a cell's first line, a function's name, a map chunk's function and size
    expected = {"cell: import os, sys, time", "cell: import numpy as np", "call: describe()", "call: square()",
                "call: square() over 1 item"}
    deadline = time.monotonic() + 30  # Flower hears of the last jobs through events, a moment later
    while True:
        status, body = _get(stack.url("flower", "/api/tasks"), user, password)
        assert status == 200, body
        tasks = json.loads(body).values()
        names = {t["name"] for t in tasks}
        if expected <= names or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert expected <= names and "celery_nb.run_job" not in names, names
    assert {t["worker"] for t in tasks} == stack.workers()  # both replicas took jobs
    numpy_cell = next(t for t in tasks if "'pip'" in t["args"])
    assert numpy_cell["args"] == f"{{'image': '{IMAGE}', 'pip': ('numpy', 'tqdm')}}"  # the options, not the payload
    status, body = _get(stack.url("flower", "/api/workers?refresh=1"), user, password)  # (Celery's inspect stats)
    assert status == 200 and set(json.loads(body)) == stack.workers(), body
    assert _get(stack.url("flower", "/api/tasks"))[0] == 401
    assert _get(stack.url("flower", "/api/tasks"), user, "wrong")[0] == 401


def test_a_big_result_comes_back_from_a_worker_in_a_container(stack: Stack) -> None:
    """A worker in a container cannot read the job containers' /dev/shm through /proc/<pid>/root
    (another pid namespace): big results come through Docker's stream instead."""
    client = Client(stack.broker_url())
    job = client.submit_cell("blob = bytes(range(256)) * 16384\n", {}, image=IMAGE)
    assert job.result(timeout=120) == {"blob": bytes(range(256)) * 16384}  # 4 MiB: above the blob threshold
    assert job.worker in stack.workers()


def test_the_stack_is_locked(stack: Stack) -> None:
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=int(stack.env["REDIS_PORT"]), retry=None).ping()  # no retries with backoff
    assert redis.Redis.from_url(stack.broker_url()).ping()
    assert _get(stack.url("jupyter", "/api/contents"))[0] == 403
    assert _get(stack.url("jupyter", f"/api/contents?token={stack.env['JUPYTER_TOKEN']}"))[0] == 200
    published = [binding for c in stack.containers() for bindings in c.ports.values() if bindings
                 for binding in bindings]
    assert len(published) == 3 and {b["HostIp"] for b in published} == {"127.0.0.1"}


def test_services_are_scaled_checked_and_restarted(stack: Stack) -> None:
    containers = {c.name: c for c in stack.containers()}
    assert len(stack.workers()) == 2  # --scale worker=2
    for name, container in containers.items():
        assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped", name
        assert container.attrs["Config"]["Healthcheck"]["Test"], name
    sockets = {c.labels["com.docker.compose.service"] for c in containers.values()
               if any(m["Source"] == "/var/run/docker.sock" for m in c.attrs["Mounts"])}
    assert sockets == {"worker"}  # only the workers hold the host's Docker


def test_the_workers_build_environments_that_survive_their_restart(stack: Stack) -> None:
    """The workers build environments on the host's Docker (the CA bundle their container trusts,
    uv from their Python); restarted, they find them there and build nothing."""
    remove_environments(stack.docker, PIP)
    client = Client(stack.broker_url())
    cell = "import importlib.metadata, iniconfig\nv = importlib.metadata.version('iniconfig')\n"
    job = client.submit_cell(cell, {}, image=IMAGE, pip=PIP)
    assert job.result(timeout=300) == {"v": "1.1.1"} and job.environment == "built" and job.worker in stack.workers()
    stack.check("restart", "worker", timeout=180)
    _wait_healthy(stack)
    again = client.submit_cell(cell, {}, image=IMAGE, pip=PIP)
    assert again.result(timeout=120) == {"v": "1.1.1"}
    assert again.environment == "cached" and "build" not in again.timing_breakdown()
