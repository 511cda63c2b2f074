"""Tells kernels, through the job store, which queues this worker serves and whose shared memory
it sees (celery_nb.shm.worker_facts), renewed every ANNOUNCE_INTERVAL and lasting ANNOUNCED_FOR:
a kernel sends a big payload as a shared memory file only when every live worker of the job's
queue can read it. Also sweeps the expired files of the kernels' shared memory folders on this host.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from celery_nb import shm
from celery_nb.jobstore import LEASE, RENEW_INTERVAL, RedisJobStore

ANNOUNCE_INTERVAL = RENEW_INTERVAL  # s
ANNOUNCED_FOR = LEASE  # s an announcement lasts: a worker gone is forgotten as soon as its jobs' leases end
SWEEP_INTERVAL = 600.0  # s between two sweeps of expired shared memory files
log = logging.getLogger(__name__)


class WorkerPresence:
    """One thread per worker process. ``queues``: the queues it consumes now; ``shares``: whether
    it exchanges big data with the kernels of its host through shared memory."""

    def __init__(self, store: RedisJobStore, worker: str, queues: Callable[[], list[str]], shares: bool) -> None:
        self._store = store
        self._worker = worker
        self._queues = queues
        self._shares = shares
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="celery_nb-presence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop announcing, and withdraw the announcement: kernels send through the blob store at once."""
        self._stopping.set()
        self._thread.join(ANNOUNCE_INTERVAL * 2)
        try:
            self._store.withdraw(self._worker)
        except redis.RedisError as exc:  # it expires by itself
            log.warning("celery_nb: worker %s could not withdraw its announcement: %s", self._worker, exc)

    def _run(self) -> None:
        next_sweep = time.monotonic()
        while not self._stopping.is_set():
            try:
                self._store.announce(self._worker, shm.worker_facts(self._queues(), self._shares), ANNOUNCED_FOR)
            except redis.RedisError as exc:
                log.warning("celery_nb: worker %s could not announce itself to kernels: %s", self._worker, exc)
            if self._shares and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL
                for folder in shm.kernel_folders():
                    folder.sweep()
            self._stopping.wait(ANNOUNCE_INTERVAL)
