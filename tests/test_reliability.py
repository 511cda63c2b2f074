"""Chaos through the real stack: a worker SIGKILLed mid-job, Redis restarted mid-run.

Each test prints its figures (jobs submitted / completed / lost, attempts, wall time); run
pytest with -s to see them.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import docker
import pytest
import redis

from celery_nb import Client
from celery_nb import client as client_module
from celery_nb.widgets import JobWidget
from celery_nb.worker.docker_api import LABEL_OWNER, LABEL_WORKER
from tests.conftest import IMAGE, ROOT, _unavailable, start_worker, stop_process, worker_containers

# short, so that the broker hands out again the message of a job that outlives it, unless its
# live worker keeps it young (the default is minutes)
CHAOS_ENV = {"CELERY_NB_VISIBILITY_TIMEOUT": "5"}
REDIS_PORT = int(os.environ.get("CELERY_NB_TEST_CHAOS_REDIS_PORT", "6391"))


def _node(name: str) -> str:
    return f"{name}@chaos.{os.getpid()}"


@pytest.fixture
def chaos_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels hand unacked messages back too: the test's kernel uses the workers' timeout."""
    for key, value in CHAOS_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel and the workers it starts run with the default timings."""
    for key in (*CHAOS_ENV, "CELERY_NB_ORPHAN_INTERVAL"):
        monkeypatch.delenv(key, raising=False)


def _died_at(docker_client: docker.DockerClient, since: float) -> dict[str, float]:
    """When each container that stopped since ``since`` did, by id (Docker's clock)."""
    events = docker_client.events(since=int(since), until=int(time.time()) + 1, decode=True,
                                  filters={"type": "container", "event": "die"})
    return {event["id"]: event["timeNano"] / 1e9 for event in events}


def test_a_job_of_a_killed_worker_runs_again_elsewhere_within_seconds_at_default_settings(
        redis_url: str, docker_client: docker.DockerClient, default_settings: None) -> None:
    queue = "chaos-kill"
    nodes = {name: _node(name) for name in ("doomed", "survivor")}
    workers = {name: start_worker(redis_url, queue, name, node_name=nodes[name]) for name in nodes}
    try:
        client = Client(redis_url)
        cell = "import time\nprint('working', flush=True)\ntime.sleep(3)\ndoubled = value * 2\n"
        jobs = [client.submit_cell(cell, {"value": i}, image=IMAGE, queue=queue) for i in range(8)]
        deadline = time.monotonic() + 60
        while not any(job.status == "running" and job.worker == nodes["doomed"] for job in jobs):
            assert time.monotonic() < deadline, [job.summary() for job in jobs]
            time.sleep(0.05)
        killed_at = time.time()
        workers["doomed"].send_signal(signal.SIGKILL)  # no warm shutdown, no ack, no cleanup
        workers["doomed"].wait()
        killed_with = [job for job in jobs if job.worker == nodes["doomed"] and not job.finished]
        orphans = {c.id for c in worker_containers(docker_client, nodes["doomed"])}
        assert killed_with and orphans  # the containers of its running jobs stay behind, for now ...
        # ... but their jobs end at once: their worker's hang-up is their end, on whatever host
        while any(c.attrs["State"] == "running" for c in worker_containers(docker_client, nodes["doomed"])):
            assert time.time() - killed_at < 5, "the killed worker's containers still run its jobs after 5 s"
            time.sleep(0.05)
        stopped = time.time() - killed_at

        results = [job.result(timeout=60) for job in jobs]
        assert results == [{"doubled": i * 2} for i in range(8)]
        failover = max(job.finished_at for job in killed_with) - killed_at
        while worker_containers(docker_client, nodes["doomed"]):
            assert time.time() - killed_at < 40, "the killed worker's containers are still there after 40 s"
            time.sleep(0.2)
        swept = time.time() - killed_at
        died = _died_at(docker_client, killed_at - 1)
        retried = [job for job in jobs if job.attempts > 1]
        assert set(killed_with) == set(retried)
        orphaned_runs = 0
        for job in jobs:
            events = client.store.read(job.id, "0", timeout=1)[0]
            starts = [(e["worker"], e.get("attempt")) for e in events if e.get("status") == "starting"]
            if job in retried:  # started on the killed worker, then ran again from the start
                assert job.attempts == 2 and job.worker == nodes["survivor"]
                assert starts == [(nodes["doomed"], 1), (nodes["survivor"], 2)]
                assert "attempt 2" in job.summary() and "attempt 2" in JobWidget(job).title.value
                *first, second = [e for e in events if e.get("status") == "running"]
                assert second["worker"] == nodes["survivor"] and second["container_id"] == job.container_id
                for run in first:  # once at a time: its first run's container had stopped before the second began
                    assert run["container_id"] in orphans and died[run["container_id"]] <= second["t"]
                    orphaned_runs += 1
            else:
                assert starts == [(job.worker, 1)]
            assert [e["type"] for e in events].count("done") == 1
        assert orphaned_runs  # (a run killed while its container was starting had none running yet)
        print(f"\n[chaos: SIGKILL, default settings] jobs {len(jobs)}, completed {len(results)}, running on the "
              f"killed worker {len(killed_with)}, run again {len(retried)} (attempts "
              f"{sorted(job.attempts for job in jobs)}); their last one done {failover:.1f} s after the kill; "
              f"the killed worker's containers stopped after {stopped:.1f} s, gone after {swept:.1f} s")
        assert failover < 20, f"the killed worker's jobs finished {failover:.1f} s after the kill"
    finally:
        for proc in workers.values():
            stop_process(proc)


def test_a_job_longer_than_the_visibility_timeout_runs_once_and_a_redelivered_message_is_dropped(
        redis_url: str, docker_client: docker.DockerClient, chaos_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = "chaos-long"
    names = ("patient-a", "patient-b")
    env = {**CHAOS_ENV, "CELERY_NB_ORPHAN_INTERVAL": "1"}
    workers = [start_worker(redis_url, queue, name, env=env, node_name=_node(name)) for name in names]
    try:
        # a container whose creator died after the workers started: a running worker removes it
        dead = subprocess.Popen(["true"])
        dead.wait()
        orphan = docker_client.containers.create(IMAGE, ["sleep", "300"], labels={
            LABEL_WORKER: _node("gone"), LABEL_OWNER: f"{socket.gethostname()}:{dead.pid}"})
        client = Client(redis_url)
        sent = []  # what the kernel built its task message of
        build = client_module.task_message
        monkeypatch.setattr(client_module, "task_message", lambda *args: sent.append(args) or build(*args))
        # three visibility timeouts long: the live worker keeps its message from being handed out again
        job = client.submit_cell("import time\ntime.sleep(15)\nx = 1\n", {}, image=IMAGE, queue=queue)
        assert job.result(timeout=60) == {"x": 1}
        logs = lambda: "".join((ROOT / f".pytest_cache/worker-{name}.log").read_text() for name in names)
        assert job.attempts == 1 and logs().count(f"[{job.id}] received") == 1

        # its message delivered once more (as when an ack is lost with the broker): dropped, not run
        redis.Redis.from_url(redis_url).lpush(queue, build(*sent[0]))
        deadline = time.monotonic() + 20
        while f"job {job.id} has already finished" not in logs():
            assert time.monotonic() < deadline, "the worker did not drop the message of a finished job"
            time.sleep(0.1)
        events = client.store.read(job.id, "0", timeout=1)[0]
        assert [e.get("status") for e in events if e["type"] in ("status", "done")] == [
            "queued", "starting", "running", "succeeded"]
        assert not worker_containers(docker_client, _node("gone")), f"orphan {orphan.id} not removed"
    finally:
        for proc in workers:
            stop_process(proc)


@pytest.fixture
def restartable_redis(docker_client: docker.DockerClient) -> Iterator[tuple[str, callable]]:
    """A redis-server of the test's own that persists every write (AOF, fsync always), and a
    function that restarts it: SIGTERM, then a new server on the same port and data."""
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed (scripts/setup.sh installs it)")
    data = tempfile.mkdtemp(prefix="celery-nb-chaos-redis-")
    command = ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--dir", data, "--save", "",
               "--appendonly", "yes", "--appendfsync", "always"]
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    log = open(ROOT / ".pytest_cache/chaos-redis.log", "a")

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        probe = redis.Redis(port=REDIS_PORT)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                assert proc.poll() is None, f"port {REDIS_PORT} is taken by another server; see {log.name}"
                return proc
            except redis.ConnectionError:  # not up yet, or still loading its data
                assert proc.poll() is None and time.monotonic() < deadline, f"redis-server did not start: {log.name}"
                time.sleep(0.05)

    server = [start()]

    def restart(downtime: float) -> float:
        """Returns how long Redis was away (s)."""
        went = time.monotonic()
        server[0].terminate()
        server[0].wait(10)
        time.sleep(downtime)  # as long as a big server takes to load its data
        server[0] = start()
        return time.monotonic() - went

    try:
        yield f"redis://127.0.0.1:{REDIS_PORT}/0", restart
    finally:
        server[0].terminate()
        server[0].wait(10)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def test_redis_restarted_mid_run_loses_no_job(restartable_redis, docker_client: docker.DockerClient,
                                              chaos_env: None) -> None:
    url, restart = restartable_redis
    queue = "chaos-redis"
    nodes = {name: _node(name) for name in ("steady-a", "steady-b")}
    workers = [start_worker(url, queue, name, env=CHAOS_ENV, node_name=node) for name, node in nodes.items()]
    try:
        client = Client(url)
        started = time.monotonic()
        cell = "import time\ntime.sleep(pause)\nn = len(data)\nprint('done', n)\n"
        inputs = [{"pause": 0.5 + (i % 4) * 0.5, "data": b"x" * ((2 << 20) if i % 5 == 0 else 1000)} for i in range(20)]
        jobs = [client.submit_cell(cell, ns, image=IMAGE, queue=queue) for ns in inputs]
        deadline = time.monotonic() + 60
        while sum(job.status == "running" for job in jobs) < 4:  # some running, the others queued
            assert time.monotonic() < deadline, [job.summary() for job in jobs]
            time.sleep(0.05)
        running = sum(job.status == "running" for job in jobs)
        queued = sum(job.status == "queued" for job in jobs)
        away = restart(downtime=3.0)
        results = []
        for job in jobs:
            try:
                results.append(job.result(timeout=120))
            except Exception as exc:  # counted as lost below, with what happened
                results.append(exc)
        wall = time.monotonic() - started
        completed = sum(isinstance(r, dict) for r in results)
        attempts = sorted(job.attempts for job in jobs)
        logs = "".join((ROOT / f".pytest_cache/worker-{name}.log").read_text() for name in nodes)
        print(f"\n[chaos: Redis restart] jobs submitted {len(jobs)} ({running} running, {queued} queued at the restart), "
              f"completed {completed}, lost {len(jobs) - completed}; Redis away {away:.2f} s; attempts {attempts}; "
              f"messages delivered again and dropped as already finished "
              f"{logs.count('its message delivered again is dropped')}; wall {wall:.1f} s")
        assert results == [{"n": len(ns["data"])} for ns in inputs]
        assert all("done" in job.logs for job in jobs)
    finally:
        for proc in workers:
            stop_process(proc)


def test_redis_away_for_longer_than_a_lease_runs_no_job_twice(restartable_redis, docker_client: docker.DockerClient,
                                                              default_settings: None) -> None:
    """Every lease ends while Redis is away; as it comes back, the live workers renew theirs before
    any worker would take a job over."""
    url, restart = restartable_redis
    queue = "chaos-away"
    nodes = {name: _node(name) for name in ("away-a", "away-b")}
    workers = [start_worker(url, queue, name, node_name=node) for name, node in nodes.items()]
    try:
        client = Client(url)
        jobs = [client.submit_cell("import time\ntime.sleep(10)\nk = key\n", {"key": i}, image=IMAGE, queue=queue)
                for i in range(6)]
        deadline = time.monotonic() + 60
        while not all(job.status == "running" for job in jobs):
            assert time.monotonic() < deadline, [job.summary() for job in jobs]
            time.sleep(0.05)
        away = restart(downtime=8.0)
        results = [job.result(timeout=120) for job in jobs]
        attempts = [job.attempts for job in jobs]
        print(f"\n[chaos: Redis away {away:.1f} s, longer than a lease, default settings] jobs {len(jobs)}, "
              f"completed {len(results)}, attempts {attempts}")
        assert results == [{"k": i} for i in range(6)]
        assert attempts == [1] * 6
        for job in jobs:
            events = client.store.read(job.id, "0", timeout=1)[0]
            assert [e.get("status") for e in events if e["type"] in ("status", "done")] == [
                "queued", "starting", "running", "succeeded"]
    finally:
        for proc in workers:
            stop_process(proc)
