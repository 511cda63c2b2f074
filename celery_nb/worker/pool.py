"""The warm pool: idle runtime containers per ContainerSpec, reused by later jobs of the same
spec, replaced when worn out, reaped when idle, removed when the worker stops (its book-keeping,
PoolBook, apart from Docker); and the sweeper that removes the containers of dead processes on
this host.
"""
from __future__ import annotations

import logging
import threading
import time

import docker
import docker.errors

from celery_nb.errors import CeleryNBError, DockerUnavailableError
from celery_nb.worker import docker_api
from celery_nb.worker.channel import RuntimeContainer
from celery_nb.worker.policy import ContainerSpec
from celery_nb.worker.settings import WorkerSettings

log = logging.getLogger(__name__)
_RETURN_WAIT = 2.0  # s a job may wait for a container whose previous job is just ending (a cold start costs more)


class PoolBook:
    """The warm pool's book-keeping, apart from Docker and threads: the idle containers of each
    pool key (most recently used last), how many are coming back, and what checkin, replacement
    and reaping decide. The pool calls it holding its lock."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._idle: dict[str, list[RuntimeContainer]] = {}
        self._returning: dict[str, int] = {}  # containers whose job is reported done, process still exiting

    def take(self, key: str, process: str | None = None) -> RuntimeContainer | None:
        """An idle container of pool key ``key``, out of the book, or None: the most recently used
        one that keeps a process for jobs of process key ``process``, else that keeps none (its
        next process is forked already), else any."""
        idle = self._idle.get(key)
        if not idle:
            return None
        for wanted in (process, None):
            for index in range(len(idle) - 1, -1, -1):
                if idle[index].process == wanted:
                    return idle.pop(index)
        return idle.pop()

    def coming_back(self, key: str) -> bool:
        """True when no container of ``key`` is idle but one whose job is ending will be."""
        return not self._idle.get(key) and self._returning.get(key, 0) > 0

    def returning(self, runtime: RuntimeContainer) -> None:
        """``runtime``'s job was reported done; it comes back (check_in) or goes (returned) soon."""
        self._returning[runtime.spec.pool_key] = self._returning.get(runtime.spec.pool_key, 0) + 1

    def returned(self, runtime: RuntimeContainer) -> None:
        self._returning[runtime.spec.pool_key] -= 1

    def check_in(self, runtime: RuntimeContainer, ran: bool, stopped: bool) -> tuple[bool, bool]:
        """(keep, replace): whether ``runtime``, its job over (``ran``: a job ran in it; one that
        was checked out for nothing: False), stays idle, and whether its replacement is to start
        now: one that has run its max jobs serves on until its replacement is in."""
        runtime.jobs_run += ran
        runtime.last_used = time.monotonic()
        idle = self._idle.setdefault(runtime.spec.pool_key, [])
        worn = runtime.jobs_run >= self.settings.pool_max_jobs
        replace = worn and not runtime.replacing and not stopped
        runtime.replacing |= replace
        keep = (not stopped and not runtime.retired and len(idle) < self.settings.pool_size
                and (not worn or runtime.replacing))
        if keep:
            idle.append(runtime)
        return keep, replace

    def replace(self, worn: RuntimeContainer, fresh: RuntimeContainer | None, stopped: bool) -> tuple[bool, bool]:
        """(worn was idle, keep fresh): ``fresh`` (None if it did not start) takes ``worn``'s place.
        An idle ``worn`` leaves the book (to be removed now); one running a job is retired: it
        goes when its job ends."""
        idle = self._idle.setdefault(worn.spec.pool_key, [])
        worn_idle = worn in idle
        if worn_idle:
            idle.remove(worn)
        else:
            worn.retired = True
        keep = fresh is not None and not stopped and len(idle) < self.settings.pool_size
        if keep:
            idle.append(fresh)
        return worn_idle, keep

    def stale(self, idle_since: float) -> list[RuntimeContainer]:
        """The idle containers last used before ``idle_since`` (monotonic), out of the book."""
        stale = [r for idle in self._idle.values() for r in idle if r.last_used < idle_since]
        for idle in self._idle.values():
            idle[:] = [r for r in idle if r.last_used >= idle_since]
        return stale

    def empty(self) -> list[RuntimeContainer]:
        """Every idle container, out of the book."""
        idle = [r for runtimes in self._idle.values() for r in runtimes]
        self._idle.clear()
        return idle


class ContainerPool:
    """Idle runtime containers per ContainerSpec (its pool_key), reused by later jobs of that spec.

    Each job runs in a process forked by the container's server (or kept from its kernel's
    previous job there: the process key's), in a working directory of its own, so globals and
    those files do not leak between jobs; files written elsewhere in the container do persist
    (use --fresh).
    """

    def __init__(self, worker: str, settings: WorkerSettings) -> None:
        self.worker = worker
        self.settings = settings
        self._book = PoolBook(settings)
        self._lock = threading.Condition()
        self._stopped = threading.Event()
        self._reaper: threading.Thread | None = None

    def checkout(self, spec: ContainerSpec, process: str | None = None) -> RuntimeContainer | None:
        """A live idle container of ``spec`` (one that keeps a process of key ``process`` first,
        see PoolBook.take), or None. A container whose last job was just reported done is worth a
        short wait: a kernel that runs cells one after the other must not get a cold start
        because it was quick."""
        key = spec.pool_key
        while True:
            with self._lock:
                if self._book.coming_back(key):
                    self._lock.wait_for(lambda: not self._book.coming_back(key), timeout=_RETURN_WAIT)
                runtime = self._book.take(key, process)
            if runtime is None or runtime.alive():
                return runtime
            runtime.remove()  # it died while idle (killed, OOM, daemon restart)

    def returning(self, runtime: RuntimeContainer) -> None:
        """``runtime``'s job was reported done; it comes back (checkin) or goes (discard) soon."""
        with self._lock:
            self._book.returning(runtime)

    def _returned(self, runtime: RuntimeContainer, was_returning: bool) -> None:
        if was_returning:
            self._book.returned(runtime)
        self._lock.notify_all()

    def discard(self, runtime: RuntimeContainer, was_returning: bool = False) -> None:
        """Remove a container that must not be reused."""
        with self._lock:
            self._returned(runtime, was_returning)
        runtime.remove()

    def checkin(self, runtime: RuntimeContainer, was_returning: bool = False, ran: bool = True) -> None:
        """Keep a healthy container for later jobs, or remove it if the pool has no room (see
        PoolBook.check_in); a worn-out one's replacement starts in the background."""
        with self._lock:
            keep, replace = self._book.check_in(runtime, ran, self._stopped.is_set())
            if keep:
                self._start_reaper()
            self._returned(runtime, was_returning)
        if replace:
            threading.Thread(target=self._replace, args=(runtime,), name="celery_nb-pool-replace", daemon=True).start()
        if not keep:
            runtime.remove()

    def _replace(self, worn: RuntimeContainer) -> None:
        """Start a container like ``worn`` and put it in the pool in ``worn``'s place."""
        try:
            fresh = docker_api.start_container(docker_api.connect(), worn.spec, {docker_api.LABEL_WORKER: self.worker},
                                               pull="never", one_shot=False)
        except (CeleryNBError, docker.errors.DockerException) as exc:
            log.warning("celery_nb: could not start a replacement for a worn-out container of image %r: %s",
                        worn.spec.image, exc)
            fresh = None
        with self._lock:
            worn_idle, keep = self._book.replace(worn, fresh, self._stopped.is_set())
            self._lock.notify_all()
        if worn_idle:
            worn.remove()
        if fresh is not None and not keep:
            fresh.remove()

    def reap(self) -> int:
        """Remove containers idle for longer than the idle timeout; returns how many."""
        with self._lock:
            stale = self._book.stale(time.monotonic() - self.settings.pool_idle_timeout)
        for runtime in stale:
            runtime.remove()
        return len(stale)

    def _start_reaper(self) -> None:
        if self._reaper is None:
            interval = max(0.5, min(30.0, self.settings.pool_idle_timeout / 4))
            self._reaper = threading.Thread(target=self._reap_periodically, args=(interval,),
                                            name="celery_nb-pool-reaper", daemon=True)
            self._reaper.start()

    def _reap_periodically(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            self.reap()

    def shutdown(self) -> None:
        """Remove every idle container (the worker is stopping)."""
        self._stopped.set()
        with self._lock:
            idle = self._book.empty()
        for runtime in idle:
            runtime.remove()

    def remove_leftovers(self) -> int:
        """Remove containers left behind by an earlier run of this worker (same name) or by a
        process on this host that has died (a kernel's embedded worker that was killed)."""
        try:
            client = docker_api.connect()
        except DockerUnavailableError:
            return 0
        # ignore_removed: another worker may remove a listed container before it is inspected
        leftovers = {c.id: c for c in client.containers.list(
            all=True, filters={"label": f"{docker_api.LABEL_WORKER}={self.worker}"}, ignore_removed=True)}
        leftovers.update(docker_api.orphans(client))
        docker_api.remove(leftovers.values())
        return len(leftovers)

    def remove_orphans(self) -> int:
        """Remove the containers of processes on this host that died (a worker killed mid-job
        leaves them behind; their jobs ended with it); returns how many."""
        orphans = docker_api.orphans(docker_api.connect())
        docker_api.remove(orphans.values())
        return len(orphans)

    def watch_for_orphans(self) -> None:
        """Until shutdown, remove_orphans every orphan_interval s."""
        def sweep() -> None:
            while not self._stopped.wait(self.settings.orphan_interval):
                try:
                    self.remove_orphans()
                except (DockerUnavailableError, docker.errors.DockerException):
                    pass  # Docker away for now: the next look

        threading.Thread(target=sweep, name="celery_nb-orphans", daemon=True).start()
