"""Soak: 500 mixed jobs (successes, exceptions, timeouts, cancels) across two real workers.

Every job must reach the right final state, and nothing may stay behind: no container of
either worker once they stopped, no blob in Redis. Prints its figures (run pytest with -s).
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter

import docker
import redis

from celery_nb import Client, JobCancelled, JobTimeoutError, RemoteError
from tests.conftest import IMAGE, start_worker, stop_process, worker_containers

BIG = 2 << 20  # above the blob threshold (1 MiB)


def test_soak_500_mixed_jobs_leave_nothing_behind(redis_url: str, docker_client: docker.DockerClient) -> None:
    queue = "soak"
    nodes = [f"soak{i}@soak.{os.getpid()}" for i in (1, 2)]
    workers = [start_worker(redis_url, queue, node.split("@")[0], node_name=node) for node in nodes]
    def square(v: int) -> int:  # local: it travels by value, as a notebook's function does
        return v * v

    try:
        client = Client(redis_url)
        kinds = (["cell"] * 230 + ["call"] * 100 + ["big"] * 20 + ["error"] * 50 + ["timeout"] * 50
                 + ["cancel-queued"] * 25 + ["cancel-running"] * 25)
        random.Random(4).shuffle(kinds)
        started = time.monotonic()
        jobs = []
        for i, kind in enumerate(kinds):
            if kind == "cell":
                job = client.submit_cell("y = x + 1\n", {"x": i}, image=IMAGE, queue=queue)
            elif kind == "call":
                job = client.submit(square, i, image=IMAGE, queue=queue)
            elif kind == "big":  # a blob in, a blob out
                job = client.submit_cell("back = blob[::-1]\n", {"blob": bytes([i % 256]) * BIG}, image=IMAGE, queue=queue)
            elif kind == "error":
                job = client.submit_cell(f"raise ValueError('soak {i}')\n", {}, image=IMAGE, queue=queue)
            elif kind == "timeout":
                job = client.submit_cell("import time\ntime.sleep(30)\n", {}, image=IMAGE, queue=queue, timeout=0.5)
            else:
                job = client.submit_cell("import time\ntime.sleep(30)\n", {"pad": b"p" * (BIG if i % 5 == 0 else 10)},
                                         image=IMAGE, queue=queue)
                if kind == "cancel-queued":
                    job.cancel()
            jobs.append((i, kind, job))

        to_cancel = [job for _i, kind, job in jobs if kind == "cancel-running"]
        deadline = time.monotonic() + 150
        while not all(job.finished for _i, _kind, job in jobs):
            assert time.monotonic() < deadline, Counter(job.status for _i, _kind, job in jobs)
            for job in [job for job in to_cancel if job.status == "running"]:
                job.cancel()
                to_cancel.remove(job)
            time.sleep(0.05)

        outcome: Counter = Counter()
        wrong = []
        for i, kind, job in jobs:
            try:
                value = job.result(timeout=0)  # collects (and deletes) big results
                outcome["succeeded"] += 1
                expected = {"cell": {"y": i + 1}, "call": i * i, "big": {"back": bytes([i % 256]) * BIG}}.get(kind)
            except RemoteError as exc:
                outcome["failed"] += 1
                value, expected = ("error", exc.exc_type), ("error", "ValueError")
            except JobTimeoutError:
                outcome["timed out"] += 1
                value, expected = "timeout", "timeout"
            except JobCancelled:
                outcome["cancelled"] += 1
                value, expected = "cancelled", "cancelled"
            except Exception as exc:  # anything else is wrong
                outcome["other"] += 1
                value, expected = repr(exc), None
            want = {"error": ("error", "ValueError"), "timeout": "timeout"}.get(kind, expected)
            if kind.startswith("cancel"):
                # a job cancelled while queued may already have started: it is cancelled all the same
                want = "cancelled"
            if value != want:
                wrong.append((i, kind, job.status, repr(value)[:80]))
        wall = time.monotonic() - started
        cancelled_queued = sum(job.status == "cancelled" and "started" not in job.timings for _i, _kind, job in jobs)
        print(f"\n[soak] jobs submitted {len(jobs)}: succeeded {outcome['succeeded']}, failed (exception) "
              f"{outcome['failed']}, timed out {outcome['timed out']}, cancelled {outcome['cancelled']} "
              f"({cancelled_queued} before they started), lost {len(jobs) - sum(outcome.values())}; wall {wall:.1f} s")
        assert not wrong, wrong[:10]
        assert outcome == {"succeeded": 350, "failed": 50, "timed out": 50, "cancelled": 50}
        assert 0 < cancelled_queued < 50  # both ways of cancelling were exercised
        # what a timeout or a cancel killed is gone already: left are the warm ones of the pool (4 at most)
        for node in nodes:
            kept = worker_containers(docker_client, node)
            assert len(kept) <= 4 and all(c.status == "running" for c in kept), [(c.id, c.status) for c in kept]
    finally:
        for proc in workers:
            stop_process(proc)
    for node in nodes:
        assert not worker_containers(docker_client, node)
    server = redis.Redis.from_url(redis_url)
    blobs = list(server.scan_iter("celery_nb:blob:*"))
    # local modules' code (of other tests' jobs) is a cache by content hash that expires by itself
    code = [key for key in blobs if key.startswith(b"celery_nb:blob:code-")]
    assert not set(blobs) - set(code) and all(server.ttl(key) > 0 for key in code)
