"""Leases and the takeover of a dead worker's jobs, on real Redis and kombu's real Redis
transport, without Docker: a job whose lease ends is handed out again exactly once, and a job
whose holder lives, comes back late, or finished never is."""
from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_nb.broker import TASK_NAME, celery_app
from celery_nb.jobstore import LEASE, RENEW_INTERVAL, RedisJobStore
from celery_nb.worker.leases import BrokerMessages, LeaseKeeper
from tests.conftest import _unavailable, free_port, stop_process

SHORT = 0.3  # s: a lease that ends soon, as a dead worker's does


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class Delivered:
    """A job's task message, published and taken by a consumer that never acks it (as a worker
    that dies mid-job leaves it: in kombu's unacked hash)."""

    def __init__(self, url: str, queue: str) -> None:
        self.app = celery_app(url)
        self.queue_name = queue
        self.job_id = uuid.uuid4().hex
        self.app.send_task(TASK_NAME, args=[{"job_id": self.job_id}], task_id=self.job_id, queue=queue)
        self.connection = self.app.connection_for_read()
        self.queue = self.connection.SimpleQueue(queue)
        self.tag = self.queue.get(timeout=5).delivery_tag

    def next_delivery(self, timeout: float) -> object:
        return self.queue.get(timeout=timeout)

    def close(self) -> None:
        self.queue.close()
        self.connection.release()


@pytest.fixture
def delivered(redis_url: str) -> Iterator[Delivered]:
    redis.Redis.from_url(redis_url).flushdb()
    message = Delivered(redis_url, f"leases-{uuid.uuid4().hex[:8]}")
    yield message
    message.close()


@pytest.fixture
def pausable_redis() -> Iterator[tuple[str, subprocess.Popen]]:
    """A redis-server of the test's own, to stop (SIGSTOP) and continue as a hung Redis does."""
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed (scripts/setup.sh installs it)")
    port = free_port(range(16900, 17400))
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    _wait_for(lambda: server.poll() is None and _answers(url), 10, "redis-server did not start")
    try:
        yield url, server
    finally:
        server.send_signal(signal.SIGCONT)
        stop_process(server)


def _answers(url: str) -> bool:
    try:
        return redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        return False


def test_a_job_whose_lease_ended_is_handed_out_again_once(redis_url: str, delivered: Delivered) -> None:
    server = redis.Redis.from_url(redis_url)
    store = RedisJobStore(redis_url)
    assert store.claim(delivered.job_id, "dead/1", SHORT, delivered.tag).outcome == "run"
    swept = threading.Event()
    keepers = [LeaseKeeper(store, BrokerMessages(delivered.app), after_takeover=swept.set) for _ in range(3)]
    assert [keeper.take_over() for keeper in keepers] == [[], [], []]  # its lease runs: nobody takes it
    _wait_for(lambda: store.expired_leases() == [delivered.job_id], 5, "the lease did not end")
    assert [keeper.take_over() for keeper in keepers] == [[], [], []]  # first look: suspects only
    taken = [keeper.take_over() for keeper in keepers]  # a look later: one of them takes it over
    assert [len(t) for t in taken] == [1, 0, 0]
    assert (taken[0][0].job_id, taken[0][0].delivery_tag) == (delivered.job_id, delivered.tag)
    # back on its queue (no longer unacked), then the containers of dead processes are removed
    _wait_for(swept.is_set, 5, "the containers of dead processes were not looked for")
    assert server.llen(delivered.queue_name) == 1 and not server.hexists("unacked", delivered.tag)
    assert [keeper.take_over() for keeper in keepers for _ in range(2)] == [[]] * 6
    message = delivered.next_delivery(timeout=5)
    assert message.headers["id"] == delivered.job_id and message.delivery_info["redelivered"]
    with pytest.raises(delivered.queue.Empty):  # handed out once, not once per keeper
        delivered.next_delivery(timeout=0.5)
    # the run it went to claims it: attempt 2
    assert store.claim(delivered.job_id, "live/2", LEASE, message.delivery_tag).attempt == 2


def test_a_live_holder_keeps_its_job(redis_url: str, delivered: Delivered) -> None:
    store = RedisJobStore(redis_url)
    holder = LeaseKeeper(store, BrokerMessages(delivered.app))
    first_lease = 2.0
    assert store.claim(delivered.job_id, "live/1", first_lease, delivered.tag).outcome == "run"
    holder.keep("live/1", delivered.job_id, delivered.tag, holder=True)  # renewed in the background
    watcher = LeaseKeeper(store, BrokerMessages(delivered.app))
    deadline = time.monotonic() + first_lease + 2 * RENEW_INTERVAL  # longer than the lease it took
    try:
        while time.monotonic() < deadline:
            assert watcher.take_over() == [] and store.expired_leases() == []
            time.sleep(0.5)
    finally:
        holder.stop()
    assert store.claim(delivered.job_id, "other/2", LEASE).outcome == "held"


def test_a_holder_that_renews_late_takes_its_lease_back_first(redis_url: str, delivered: Delivered) -> None:
    """As after Redis was away for longer than a lease: the lease has ended, but its holder
    renews before the next look, and runs on."""
    store = RedisJobStore(redis_url)
    assert store.claim(delivered.job_id, "slow/1", SHORT, delivered.tag).outcome == "run"
    watcher = LeaseKeeper(store, BrokerMessages(delivered.app))
    _wait_for(lambda: store.expired_leases() == [delivered.job_id], 5, "the lease did not end")
    assert watcher.take_over() == []  # a suspect
    assert store.renew({delivered.job_id: "slow/1"}, LEASE) == set()  # taken back: nobody else had it
    assert watcher.take_over() == [] and store.expired_leases() == []
    assert redis.Redis.from_url(redis_url).hexists("unacked", delivered.tag)  # still its holder's


def test_a_finished_job_is_never_taken_over(redis_url: str, delivered: Delivered) -> None:
    store = RedisJobStore(redis_url)
    assert store.claim(delivered.job_id, "done/1", SHORT, delivered.tag).outcome == "run"
    assert store.finish(delivered.job_id, {"type": "done", "status": "succeeded"})
    time.sleep(SHORT * 2)
    watcher = LeaseKeeper(store, BrokerMessages(delivered.app))
    assert store.expired_leases() == [] and watcher.take_over() == [] and watcher.take_over() == []
    assert store.claim(delivered.job_id, "late/2", LEASE).outcome == "done"


def test_a_look_that_waited_for_redis_suspects_nobody(pausable_redis: tuple[str, subprocess.Popen]) -> None:
    """Redis hangs (or is away) while a worker looks at the leases: every lease may have ended
    meanwhile, and their live holders renew as it comes back; that look counts for nothing, so a
    job is taken over two prompt looks later at the earliest."""
    url, server = pausable_redis
    delivered = Delivered(url, "leases-paused")
    try:
        store = RedisJobStore(url)
        assert store.claim(delivered.job_id, "dead/1", SHORT, delivered.tag).outcome == "run"
        _wait_for(lambda: store.expired_leases() == [delivered.job_id], 5, "the lease did not end")
        watcher = LeaseKeeper(store, BrokerMessages(delivered.app))
        server.send_signal(signal.SIGSTOP)
        threading.Timer(RENEW_INTERVAL, server.send_signal, args=(signal.SIGCONT,)).start()
        assert watcher.take_over() == []  # it waited for Redis: no suspects
        assert watcher.take_over() == []  # a prompt look: a suspect
        assert [e.job_id for e in watcher.take_over()] == [delivered.job_id]
    finally:
        delivered.close()
