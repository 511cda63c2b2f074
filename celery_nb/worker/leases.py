"""Keeps a live worker's jobs its own: their leases in the job store, and their broker messages
out of the Redis transport's redelivery.

Celery acks a job's message when the job ends (acks_late), and kombu's Redis transport hands an
unacked message to another worker once it is older than the visibility timeout: that is how the
job of a worker that died (SIGKILL, lost host) runs again elsewhere. A worker that lives keeps its
messages younger than that, however long its jobs run, and keeps their leases: one thread per
worker process does both for all its jobs, once every RENEW_INTERVAL, off the jobs' own path.
"""
from __future__ import annotations

import logging
import threading
import time

import redis

from celery_nb.jobstore import LEASE, RENEW_INTERVAL, JobStore

log = logging.getLogger(__name__)


class UnackedIndex:
    """kombu's Redis transport's index of delivered, unacked messages (delivery tag -> delivery time)."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self._redis = client
        self.key = key

    def touch(self, tags: list[str]) -> None:
        """Mark the messages as delivered now (XX: a message acked or restored meanwhile stays so)."""
        if tags:
            now = time.time()
            self._redis.zadd(self.key, {tag: now for tag in tags}, xx=True)


class LeaseKeeper:
    """The runs of this worker process that hold or wait for a job, renewed in the background."""

    def __init__(self, store: JobStore, unacked: UnackedIndex | None) -> None:
        self._store = store
        self._unacked = unacked
        self._runs: dict[str, tuple[str, str | None, str | None]] = {}  # run -> (job, lease holder, delivery tag)
        self._lost: set[str] = set()  # runs whose lease another run took
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._needed = unacked is not None or not store.local  # an embedded worker's messages never come back

    def keep(self, run: str, job_id: str, delivery_tag: str | None, holder: bool) -> None:
        """Renew ``run``'s message (and its lease on ``job_id`` if ``holder``) until ``drop``."""
        with self._lock:
            self._runs[run] = (job_id, run if holder else None, delivery_tag)
            if self._thread is None and self._needed:
                self._thread = threading.Thread(target=self._renew_periodically, name="celery_nb-leases", daemon=True)
                self._thread.start()

    def drop(self, run: str) -> None:
        with self._lock:
            self._runs.pop(run, None)
            self._lost.discard(run)

    def lost(self, run: str) -> bool:
        """True once another run has taken the job (this worker could not renew in time)."""
        return run in self._lost

    def _renew_periodically(self) -> None:
        while True:
            time.sleep(RENEW_INTERVAL)
            with self._lock:
                runs = dict(self._runs)
            try:
                self.renew(runs)
            except redis.RedisError as exc:  # Redis away: the next round tries again
                log.warning("celery_nb: could not renew job leases: %s", exc)

    def renew(self, runs: dict[str, tuple[str, str | None, str | None]]) -> None:
        held = {job_id: holder for job_id, holder, _tag in runs.values() if holder}
        lost_jobs = self._store.renew(held, LEASE)
        if self._unacked is not None:
            self._unacked.touch([tag for _job, _holder, tag in runs.values() if tag])
        if lost_jobs:
            with self._lock:
                self._lost.update(run for run, (job_id, holder, _tag) in runs.items() if holder and job_id in lost_jobs)
