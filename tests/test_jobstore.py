"""The job store (no Docker): the embedded worker's memory store and the Redis store behave
alike for everything a kernel and a worker do with them."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from celery_nb.jobstore import LEASE, START, JobStore, MemoryJobStore, RedisJobStore


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> JobStore:
    if request.param == "memory":
        return MemoryJobStore()
    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    return RedisJobStore(url)


def _job() -> str:
    return uuid.uuid4().hex


def test_events_are_kept_in_order_and_read_on_from_a_cursor(store: JobStore) -> None:
    job = _job()
    store.append(job, {"type": "status", "status": "queued"})
    store.append_many(job, [{"type": "log", "text": f"{k}\n"} for k in range(3)])
    store.append(job, {"type": "done", "status": "succeeded"}, blob=b"\x00result\xff")
    events, cursor = store.read(job, START, timeout=1)
    assert [e.get("status") or e["text"] for e in events] == ["queued", "0\n", "1\n", "2\n", "succeeded"]
    assert events[-1]["blob"] == b"\x00result\xff" and "blob" not in events[0]
    assert store.read(job, cursor, timeout=0.05) == ([], cursor)  # nothing new
    store.append(job, {"type": "log", "text": "later"})
    later, _ = store.read(job, cursor, timeout=1)
    assert later == [{"type": "log", "text": "later"}]


def test_one_read_waits_for_several_jobs_and_a_bell_ends_it(store: JobStore) -> None:
    quiet, busy = _job(), _job()
    bell = store.waker()
    threading.Timer(0.2, lambda: store.append(busy, {"type": "log", "text": "hi"})).start()
    started = time.monotonic()
    found = store.read_many({quiet: START, busy: START}, timeout=10, wake=bell)
    assert list(found) == [busy] and found[busy][0] == [{"type": "log", "text": "hi"}]
    assert time.monotonic() - started < 5
    threading.Timer(0.2, bell.ring).start()
    started = time.monotonic()
    assert store.read_many({quiet: START}, timeout=10, wake=bell) == {}
    assert time.monotonic() - started < 5  # the bell, not the timeout


def test_cancel_flags(store: JobStore) -> None:
    job = _job()
    assert not store.cancel_requested(job)
    store.request_cancel(job)
    assert store.cancel_requested(job) and not store.cancel_requested(_job())


def test_a_job_runs_and_ends_once(store: JobStore) -> None:
    job = _job()
    claim = store.claim(job, "worker-a/1", LEASE, "tag-1")
    assert (claim.outcome, claim.attempt) == ("run", 1)
    assert store.renew({job: "worker-a/1"}, LEASE) == set()
    assert store.finish(job, {"type": "done", "status": "succeeded"})
    assert not store.finish(job, {"type": "done", "status": "failed"})  # only one run reports the end
    assert store.claim(job, "worker-b/2", LEASE).outcome == "done"  # a finished job never runs again
    assert [e["status"] for e in store.read(job, START, timeout=1)[0]] == ["succeeded"]
    assert store.expired_leases() == [] and store.take_over([job]) == []


def test_a_job_cancelled_before_it_runs_is_not_run(store: JobStore) -> None:
    job = _job()
    store.request_cancel(job)
    assert store.claim(job, "worker-a/1", LEASE).outcome == "cancelled"
