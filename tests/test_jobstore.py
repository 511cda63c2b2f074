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


def test_a_kernel_waits_on_its_inbox_and_reads_the_jobs_their_workers_name_there(redis_url: str) -> None:
    """However many jobs a kernel follows, it waits on one key: each write of a routed job's events
    names the job in the kernel's inbox, then the kernel reads that job's stream, also a job it
    began to follow while it waited; what it read of the inbox goes."""
    redis.Redis.from_url(redis_url).flushdb()
    kernel, worker = RedisJobStore(redis_url), RedisJobStore(redis_url)  # two processes' stores
    bell = kernel.waker()
    assert bell.inbox is not None and bell.inbox.startswith("celery_nb:inbox:")
    early, late, unrouted = _job(), _job(), _job()
    followed = {early: START}
    for job in (early, late):
        worker.route(job, bell.inbox)
    worker.route(unrouted, "celery_nb:events:not-an-inbox")  # (a forged request's "inbox": ignored)

    def work() -> None:
        followed[late] = START  # followed while the kernel waits
        worker.append(late, {"type": "status", "status": "starting"})
        worker.append(unrouted, {"type": "log", "text": "unseen"})

    threading.Timer(0.2, work).start()
    started = time.monotonic()
    found = kernel.read_many({}, timeout=10, wake=bell,
                             routed=lambda named: {job: followed[job] for job in named if job in followed})
    assert time.monotonic() - started < 5
    assert list(found) == [late] and found[late][0] == [{"type": "status", "status": "starting"}]
    worker.append_many(early, [{"type": "log", "text": "a"}, {"type": "log", "text": "b"}])
    assert worker.finish(early, {"type": "done", "status": "succeeded"})
    found = kernel.read_many({}, timeout=10, wake=bell, routed=lambda named: {job: START for job in named})
    assert [e.get("text") or e["status"] for e in found[early][0]] == ["a", "b", "succeeded"]
    client = redis.Redis.from_url(redis_url)
    assert client.xlen(bell.inbox) > 1
    assert kernel.read_many({}, timeout=0.05, wake=bell, routed=lambda named: {}) == {}
    assert client.xlen(bell.inbox) <= 1 and client.ttl(bell.inbox) > 3600  # read, trimmed; expires if the kernel dies
    assert client.type("celery_nb:events:not-an-inbox") == b"none"


def test_a_job_s_small_last_event_reaches_its_kernel_with_its_name(redis_url: str) -> None:
    """The inbox entry of a job's end carries its done event and result when they are small: a
    kernel that has read all before it takes them from there, without reading the job's stream.
    A kernel that has not (events in between), or a big end, reads the stream, in order."""
    redis.Redis.from_url(redis_url).flushdb()
    client = redis.Redis.from_url(redis_url)
    kernel, worker = RedisJobStore(redis_url), RedisJobStore(redis_url)
    bell = kernel.waker()
    quick, chatty, big = _job(), _job(), _job()
    for job in (quick, chatty, big):
        kernel.append(job, {"type": "status", "status": "queued"})
        worker.route(job, bell.inbox)
    position = {job: kernel.read(job, START, timeout=1)[1] for job in (quick, chatty, big)}  # the kernel's own event read
    worker.append(chatty, {"type": "log", "text": "in between"})
    for job in (quick, chatty):
        assert worker.finish(job, {"type": "done", "status": "succeeded"}, blob=b"\x00small")
    assert worker.finish(big, {"type": "done", "status": "succeeded"}, blob=b"x" * (1 << 17))
    client.delete(f"celery_nb:events:{quick}")  # only the inbox has its end now
    found = kernel.read_many({}, timeout=10, wake=bell, routed=lambda named: {job: position[job] for job in named})
    assert found[quick][0] == [{"type": "done", "status": "succeeded", "blob": b"\x00small"}]
    assert [e.get("text") or e["status"] for e in found[chatty][0]] == ["in between", "succeeded"]
    assert found[chatty][0][-1]["blob"] == b"\x00small"
    assert found[big][0][0]["blob"] == b"x" * (1 << 17)
    for job in (chatty, big):  # where each kernel's cursor goes: the stream's last entry
        assert found[job][1] == client.xrevrange(f"celery_nb:events:{job}", count=1)[0][0].decode()


def test_a_job_s_end_acks_its_broker_message_whoever_ends_it(redis_url: str) -> None:
    """The final event's round trip removes kombu's records of the run's unacked message (its
    ack), also for a run whose job another finished first."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store, job = RedisJobStore(redis_url), _job()
    records = ("test-unacked", "test-unacked-index")
    for tag in ("tag-1", "tag-2"):
        client.hset(records[0], tag, "[message]")
        client.zadd(records[1], {tag: time.time()})
    client.hset(records[0], "other", "[message]")
    assert store.finish(job, {"type": "done", "status": "succeeded"}, message=(*records, "tag-1"))
    assert not store.finish(job, {"type": "done", "status": "failed"}, message=(*records, "tag-2"))
    assert client.hkeys(records[0]) == [b"other"] and client.zcard(records[1]) == 0
