"""``celery_nb.Executor`` and ``Job.future`` as concurrent.futures code uses them, through the
real stack: Redis + a separate `celery-nb worker` process, and the embedded worker."""
from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
import time

import cloudpickle
import docker
import pytest

from celery_nb import Client, Executor, JobCancelled, OptionError, RemoteError
from tests.conftest import IMAGE, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its functions run in containers without it


def square(v: int, delay: float = 0.0) -> int:
    import time
    time.sleep(delay)
    return v * v


def timed_sleep(seconds: float) -> tuple[float, float]:
    """Sleeps in the container; returns when it started and ended there."""
    import time
    started = time.time()
    time.sleep(seconds)
    return started, time.time()


def announce_and_sleep(seconds: float) -> None:
    """Prints its container's id (its host name), then sleeps."""
    import socket
    import time
    print("started in", socket.gethostname(), flush=True)
    time.sleep(seconds)


def container_of(future: cf.Future) -> str:
    return future.job.logs.split("started in ")[1].split()[0]


def assert_gone(docker_client: docker.DockerClient, container_id: str) -> None:
    wait_for(lambda: not docker_client.containers.list(all=True, sparse=True, filters={"id": container_id}), 10,
             f"container {container_id} removed")


def test_submit_as_completed_wait_and_done_callbacks(client: Client) -> None:
    called: list[tuple[int, int]] = []
    all_called = threading.Event()

    def record(future: cf.Future) -> None:
        called.append((futures.index(future), future.result()))
        if len(called) == len(futures):
            all_called.set()

    with Executor(client=client, image=IMAGE) as pool:
        futures = [pool.submit(square, 7, delay=5), *(pool.submit(square, v) for v in range(3))]
        assert all(isinstance(f, cf.Future) for f in futures)
        for future in futures:
            future.add_done_callback(record)
        done, not_done = cf.wait(futures, timeout=120, return_when=cf.FIRST_COMPLETED)
        assert done and futures[0] in not_done
        order = [futures.index(f) for f in cf.as_completed(futures, timeout=120)]
        assert order[-1] == 0 and sorted(order) == [0, 1, 2, 3]  # the slow one comes last
        assert [f.result() for f in futures] == [49, 0, 1, 4]
        assert cf.wait(futures, timeout=0).not_done == set()
        failing = pool.submit(square, "text", "not a number")
        assert isinstance(failing.exception(timeout=60), RemoteError)
        assert failing.exception().exc_type == "TypeError"
    assert all_called.wait(10) and sorted(called) == [(0, 49), (1, 0), (2, 1), (3, 4)]
    assert all(f.job.status == "succeeded" and f.job.image == IMAGE for f in futures)
    assert all(f.job.future is f for f in futures)  # one future per job, the executor's


def test_map_in_order_in_chunks_and_over_several_iterables(client: Client) -> None:
    before = len(client.jobs)
    with Executor(max_workers=3, client=client, image=IMAGE) as pool:
        delays = [0.3 if v < 5 else 0 for v in range(20)]  # the first chunk ends last
        assert list(pool.map(square, range(20), delays, chunksize=5)) == [v * v for v in range(20)]
        assert len(client.jobs) - before == 4
        assert {job.label for job in client.jobs[before:]} == {"square() over 5 items"}
        assert list(pool.map(pow, range(6), [2, 3, 2], chunksize=2)) == [0, 1, 4]  # zip's length
        assert list(pool.map(square, [])) == []


def test_map_timeout_counts_from_the_call(redis_client: Client) -> None:
    with Executor(client=redis_client, image=IMAGE) as pool:
        started = time.monotonic()
        results = pool.map(square, [1, 2], [0, 5], chunksize=1, timeout=2.5)
        assert next(results) == 1
        with pytest.raises(TimeoutError):
            next(results)
        assert 2.4 < time.monotonic() - started < 4.5


def test_max_workers_bounds_the_jobs_in_flight(client: Client) -> None:
    pool = Executor(max_workers=2, client=client, image=IMAGE)
    futures = [pool.submit(timed_sleep, 0.8) for _ in range(6)]
    assert [f.job is not None for f in futures] == [True, True, False, False, False, False]  # held in the kernel
    most = 0
    while not all(f.done() for f in futures):
        most = max(most, sum(1 for f in futures if f.job is not None and not f.job.finished))
        time.sleep(0.01)
    assert most == 2
    spans = [f.result() for f in futures]
    # measured in the containers: never more than 2 ran at once (the worker runs 4)
    overlaps = [sum(1 for start, end in spans if start <= moment < end) for moment, _ in spans]
    assert max(overlaps) <= 2
    pool.shutdown()


def test_shutdown_cancel_futures_kills_running_jobs_and_drops_held_calls(
        client: Client, docker_client: docker.DockerClient) -> None:
    pool = Executor(max_workers=2, client=client, image=IMAGE)
    running = [pool.submit(announce_and_sleep, 120) for _ in range(2)]
    held = [pool.submit(announce_and_sleep, 120) for _ in range(3)]
    wait_for(lambda: all("started in" in f.job.logs for f in running), 60, "both jobs started")
    containers = [container_of(f) for f in running]
    assert all(docker_client.containers.list(sparse=True, filters={"id": c}) for c in containers)
    started = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - started < 10
    for future in running:
        assert isinstance(future.exception(timeout=0), JobCancelled) and future.job.status == "cancelled"
    for container in containers:
        assert_gone(docker_client, container)
    assert all(f.cancelled() and f.job is None for f in held)  # never sent: they never ran
    assert len({f.job.id for f in running}) == 2
    with pytest.raises(RuntimeError, match="after its shutdown"):
        pool.submit(square, 1)


def test_shutdown_cancel_futures_cancels_jobs_queued_on_the_broker(client: Client) -> None:
    pool = Executor(client=client, image=IMAGE)  # no bound: the worker runs 4, the rest wait in its queue
    futures = [pool.submit(announce_and_sleep, 120) for _ in range(6)]
    wait_for(lambda: sum("started in" in f.job.logs for f in futures) == 4, 60, "4 jobs started")
    queued = [f for f in futures if "started in" not in f.job.logs]
    assert [f.job.status for f in queued] == ["queued", "queued"] and not any(f.running() for f in queued)
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() and f.job.status == "cancelled" for f in queued)
    for future in queued:
        events, _ = client.store.read(future.job.id, "0", timeout=0)
        assert "running" not in [e.get("status") for e in events] and future.job.logs == ""
    assert all(isinstance(f.exception(timeout=0), JobCancelled) for f in futures if f not in queued)


def test_existing_jobs_join_as_completed(client: Client) -> None:
    call = client.submit(square, 6, image=IMAGE)
    cell = client.submit_cell("import time\ntime.sleep(4)\ny = x + 1\n", {"x": 1}, image=IMAGE)
    failing = client.submit_cell("1 / 0\n", {}, image=IMAGE)
    assert call.future is call.future
    finished = list(cf.as_completed([job.future for job in (cell, call, failing)], timeout=120))
    assert finished[-1] is cell.future
    assert call.future.result() == 36 and cell.future.result() == {"y": 2}
    assert isinstance(failing.future.exception(), RemoteError)
    assert call.future.job is call


def test_executor_options_are_checked_when_it_is_made() -> None:
    with pytest.raises(OptionError, match="--memory 'lots' is not a size"):
        Executor(memory="lots")
    with pytest.raises(OptionError, match="unknown job option"):
        Executor(imgae="python:3.12-slim")
    with pytest.raises(ValueError, match="max_workers must be at least 1"):
        Executor(max_workers=0)
