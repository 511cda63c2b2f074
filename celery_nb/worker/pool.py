"""The warm pool: idle runtime containers per ContainerSpec, reused by later jobs of the same
spec, replaced when worn out, reaped when idle, removed when the worker stops; and the sweeper
that removes the containers of dead processes on this host.
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


class ContainerPool:
    """Idle runtime containers per ContainerSpec (its pool_key), reused by later jobs of that spec.

    Each job still runs in a fresh process forked by the container's server, in a working
    directory of its own, so globals and those files do not leak between jobs; files written
    elsewhere in the container do persist (use --fresh).
    """

    def __init__(self, worker: str, settings: WorkerSettings) -> None:
        self.worker = worker
        self.settings = settings
        self._idle: dict[str, list[RuntimeContainer]] = {}
        self._returning: dict[str, int] = {}  # containers whose job is reported done, process still exiting
        self._lock = threading.Condition()
        self._stopped = threading.Event()
        self._reaper: threading.Thread | None = None

    def checkout(self, spec: ContainerSpec) -> RuntimeContainer | None:
        """A live idle container of ``spec``, most recently used first, or None. A container
        whose last job was just reported done is worth a short wait: a kernel that runs cells
        one after the other must not get a cold start because it was quick."""
        key = spec.pool_key
        while True:
            with self._lock:
                idle = self._idle.setdefault(key, [])  # the list checkin appends to
                if not idle and self._returning.get(key):
                    self._lock.wait_for(lambda: idle or not self._returning.get(key), timeout=_RETURN_WAIT)
                runtime = idle.pop() if idle else None
            if runtime is None or runtime.alive():
                return runtime
            runtime.remove()  # it died while idle (killed, OOM, daemon restart)

    def returning(self, runtime: RuntimeContainer) -> None:
        """``runtime``'s job was reported done; it comes back (checkin) or goes (discard) soon."""
        with self._lock:
            self._returning[runtime.spec.pool_key] = self._returning.get(runtime.spec.pool_key, 0) + 1

    def _returned(self, runtime: RuntimeContainer, was_returning: bool) -> None:
        if was_returning:
            self._returning[runtime.spec.pool_key] -= 1
        self._lock.notify_all()

    def discard(self, runtime: RuntimeContainer, was_returning: bool = False) -> None:
        """Remove a container that must not be reused."""
        with self._lock:
            self._returned(runtime, was_returning)
        runtime.remove()

    def checkin(self, runtime: RuntimeContainer, was_returning: bool = False, ran: bool = True) -> None:
        """Keep a healthy container for later jobs, or remove it if the pool has no room.
        ``ran``: whether a job ran in it (one that was checked out for nothing: False). One
        that has run its max jobs is kept until a replacement has started in the background."""
        runtime.jobs_run += ran
        runtime.last_used = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(runtime.spec.pool_key, [])
            replace = (runtime.jobs_run >= self.settings.pool_max_jobs and not runtime.replacing
                       and not self._stopped.is_set())
            runtime.replacing |= replace
            keep = (not self._stopped.is_set() and not runtime.retired and len(idle) < self.settings.pool_size
                    and (runtime.jobs_run < self.settings.pool_max_jobs or runtime.replacing))
            if keep:
                idle.append(runtime)
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
            idle = self._idle.setdefault(worn.spec.pool_key, [])
            worn_idle = worn in idle
            if worn_idle:
                idle.remove(worn)
            else:
                worn.retired = True  # running a job: removed when it ends
            keep = fresh is not None and not self._stopped.is_set() and len(idle) < self.settings.pool_size
            if keep:
                idle.append(fresh)
                self._lock.notify_all()
        if worn_idle:
            worn.remove()
        if fresh is not None and not keep:
            fresh.remove()

    def reap(self) -> int:
        """Remove containers idle for longer than the idle timeout; returns how many."""
        cutoff = time.monotonic() - self.settings.pool_idle_timeout
        with self._lock:
            stale = [r for idle in self._idle.values() for r in idle if r.last_used < cutoff]
            for idle in self._idle.values():
                idle[:] = [r for r in idle if r.last_used >= cutoff]
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
            idle = [r for runtimes in self._idle.values() for r in runtimes]
            self._idle.clear()
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

    def watch_for_orphans(self) -> None:
        """Until shutdown, remove the containers of processes on this host that died (a worker
        killed mid-job: its job keeps running in them while another worker runs it again)."""
        def sweep() -> None:
            while not self._stopped.wait(self.settings.orphan_interval):
                try:
                    docker_api.remove(docker_api.orphans(docker_api.connect()).values())
                except (DockerUnavailableError, docker.errors.DockerException):
                    pass  # Docker away for now: the next look

        threading.Thread(target=sweep, name="celery_nb-orphans", daemon=True).start()
