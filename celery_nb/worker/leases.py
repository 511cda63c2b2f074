"""Keeps a live worker's jobs its own, and takes over the jobs of workers that died.

Celery acks a job's message when the job ends (acks_late); until then kombu's Redis transport
keeps it as delivered and unacked. A job that runs holds a lease in the job store, which its
worker renews every RENEW_INTERVAL. One thread per worker process, off the jobs' own path:

- renews the leases of its running jobs, and keeps their messages younger than the visibility
  timeout (kombu would otherwise hand a long job's message out again);
- takes over the jobs whose lease has ended (their worker died: SIGKILL, lost host; its
  containers ended their jobs when it went): it puts exactly the dead holder's message back at
  the head of its queue, so that a live worker runs the job again within seconds, not after the
  visibility timeout, then removes the containers that dead processes left on this host. That
  timeout remains the backstop for a message whose worker died before its job took the lease.

The names it uses of kombu's Redis transport are private; tests/test_pinned.py checks them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import kombu.exceptions
import redis
from celery import Celery

from celery_nb.jobstore import LEASE, RENEW_INTERVAL, Expired, JobStore

log = logging.getLogger(__name__)
_PROMPT = RENEW_INTERVAL / 2  # s: a look at the leases that took longer waited for Redis


class BrokerMessages:
    """kombu's Redis transport's record of delivered, unacked messages (a hash of the messages
    and an index of their delivery times), through a kombu channel of the lease thread's own."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._connection: kombu.Connection | None = None

    def _channel(self) -> kombu.transport.redis.Channel:
        if self._connection is None:
            self._connection = self._app.connection_for_write()
        return self._connection.default_channel

    def touch(self, tags: list[str]) -> None:
        """Mark the messages as delivered now (XX: a message acked or restored meanwhile stays so)."""
        if tags:
            channel = self._channel()
            now = time.time()
            with channel.conn_or_acquire() as client:
                client.zadd(channel.unacked_index_key, {tag: now for tag in tags}, xx=True)

    def hand_out_again(self, tag: str) -> bool:
        """Put the unacked message ``tag`` back at the head of its queue, as kombu does when its
        visibility timeout passes (atomically: however many workers try, it goes back once).
        False if it was acked or handed out again already."""
        channel = self._channel()
        with channel.conn_or_acquire() as client:
            if not client.hexists(channel.unacked_key, tag):
                return False
            channel.qos.restore_by_tag(tag, client)
        return True


class LeaseKeeper:
    """The runs of this worker process that hold or wait for a job, renewed in the background;
    and the takeover of expired leases (``messages``: None for the embedded worker, whose
    messages never come back). ``after_takeover``: called once jobs are handed out again (the
    pool removes the containers of dead processes on this host)."""

    def __init__(self, store: JobStore, messages: BrokerMessages | None,
                 after_takeover: Callable[[], None] | None = None) -> None:
        self._store = store
        self._messages = messages
        self._after_takeover = after_takeover
        self._runs: dict[str, tuple[str, str | None, str | None]] = {}  # run -> (job, lease holder, delivery tag)
        self._lost: set[str] = set()  # runs whose lease another run took
        self._suspects: list[str] = []  # jobs whose lease had ended at the last look
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._needed = messages is not None or not store.local  # an embedded worker's messages never come back

    def start(self) -> None:
        """Start the background thread (at the latest with the first job): an idle worker takes
        over the jobs of dead ones too."""
        with self._lock:
            if self._thread is None and self._needed:
                self._thread = threading.Thread(target=self._renew_periodically, name="celery_nb-leases", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop renewing and taking over (the worker is stopping, its jobs have ended)."""
        self._stopped.set()

    def keep(self, run: str, job_id: str, delivery_tag: str | None, holder: bool) -> None:
        """Renew ``run``'s message (and its lease on ``job_id`` if ``holder``) until ``drop``."""
        with self._lock:
            self._runs[run] = (job_id, run if holder else None, delivery_tag)
        self.start()

    def drop(self, run: str) -> None:
        with self._lock:
            self._runs.pop(run, None)
            self._lost.discard(run)

    def lost(self, run: str) -> bool:
        """True once another run has taken the job (this worker could not renew in time)."""
        return run in self._lost

    def _renew_periodically(self) -> None:
        while not self._stopped.wait(RENEW_INTERVAL):
            with self._lock:
                runs = dict(self._runs)
            try:
                self.renew(runs)
                if self._messages is not None:
                    self.take_over()
            except (redis.RedisError, kombu.exceptions.OperationalError) as exc:  # Redis away: the next round tries again
                log.warning("celery_nb: could not renew job leases: %s", exc)

    def renew(self, runs: dict[str, tuple[str, str | None, str | None]]) -> None:
        held = {job_id: holder for job_id, holder, _tag in runs.values() if holder}
        lost_jobs = self._store.renew(held, LEASE)
        if self._messages is not None:
            self._messages.touch([tag for _job, _holder, tag in runs.values() if tag])
        if lost_jobs:
            with self._lock:
                self._lost.update(run for run, (job_id, holder, _tag) in runs.items() if holder and job_id in lost_jobs)

    def take_over(self) -> list[Expired]:
        """Take over the jobs whose lease had ended at the last look and still has: a look apart,
        so that a holder whose renewals were late takes its lease back first. A look that waited
        for Redis (it was away: every lease may have ended) suspects nobody, as the live holders
        renew when it returns. Their messages are handed out again from a thread of their own,
        then ``after_takeover`` is called."""
        suspects, self._suspects = self._suspects, []
        taken = self._store.take_over(suspects)
        looked = time.monotonic()
        expired = self._store.expired_leases()
        self._suspects = expired if time.monotonic() - looked < _PROMPT else []
        if taken:
            threading.Thread(target=self._hand_out_again, args=(taken,), name="celery_nb-takeover", daemon=True).start()
        return taken

    def _hand_out_again(self, taken: list[Expired]) -> None:
        assert self._messages is not None
        for expired in taken:
            try:
                again = self._messages.hand_out_again(expired.delivery_tag)
            except (redis.RedisError, kombu.exceptions.OperationalError) as exc:
                log.warning("celery_nb: could not hand job %s out again (its visibility timeout will): %s",
                            expired.job_id, exc)
                continue
            if again:
                log.warning("celery_nb: the lease of job %s ended without the job (its worker stopped); "
                            "its message is handed out again", expired.job_id)
        if self._after_takeover is not None:
            try:
                self._after_takeover()
            except Exception as exc:  # (Docker away: the periodic sweep will)
                log.warning("celery_nb: could not remove the containers of dead workers after a takeover: %s", exc)
