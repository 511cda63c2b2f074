"""``Executor``: ``concurrent.futures`` over celery_nb. Each call is a job in a container;
``max_workers`` bounds the jobs in flight, and the calls beyond it wait in the kernel.

Code written for ``concurrent.futures`` (``submit``, ``map``, ``as_completed``, ``wait``) runs
unchanged::

    with celery_nb.Executor(max_workers=8, image="python:3.11-slim", memory="2g") as pool:
        for future in concurrent.futures.as_completed(pool.submit(fit, p) for p in grid):
            print(future.result())
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from celery_nb.client import Client, default_client, map_chunks
from celery_nb.job import Job, JobFuture
from celery_nb.options import JobOptions
from celery_nb_runtime import map_chunk


@dataclass
class _Call:
    """A submitted call that has not been sent as a job yet."""

    future: JobFuture
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # the job's, when the caller names it (submit_as)


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose calls run in containers, each as a celery_nb job
    with these options (any JobOptions field: image=, memory=, gpus=, ...; checked now).

    ``max_workers``: the most jobs in flight at once (None: no bound; the workers' concurrency
    still is one); further calls wait in the kernel until one ends. ``client``: the Client to
    send the jobs with (default: celery_nb.default_client()). A future's ``job`` is its Job
    (logs, widget, usage) once sent.
    """

    def __init__(self, max_workers: int | None = None, *, client: Client | None = None,
                 options: JobOptions | None = None, **option_fields: Any) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, or None for no bound; got {max_workers}")
        self.options = JobOptions.build(options, **option_fields)
        self.max_workers = max_workers
        self._client = client
        self._changed = threading.Condition()
        self._held: deque[_Call] = deque()  # in submission order, waiting for room
        self._in_flight = 0  # jobs sent that have not ended
        self._unfinished: set[concurrent.futures.Future] = set()
        self._shut_down = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> JobFuture:
        """Run ``fn(*args, **kwargs)`` in a container; the future's result is its return value."""
        return self._hold(_Call(JobFuture(), fn, args, kwargs))

    def submit_as(self, label: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> JobFuture:
        """``submit``, with the job called ``label`` in its widget, ``%celery_jobs`` and Flower."""
        return self._hold(_Call(JobFuture(), fn, args, kwargs, label))

    def _hold(self, call: _Call) -> JobFuture:
        future = call.future
        with self._changed:
            if self._shut_down:
                raise RuntimeError("cannot submit to a celery_nb Executor after its shutdown()")
            self._held.append(call)
            self._unfinished.add(future)
        future.add_done_callback(self._forget)
        self._send_held()
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None) -> Iterator[Any]:
        """``fn(*args)`` for the items of ``iterables`` taken together, in order, as soon as each
        chunk's job has ended. Items go in chunks of ``chunksize`` per job (default: about 32
        jobs in all, as ``RemoteFunction.map``). ``timeout``: seconds from this call after which
        a result not yet there raises TimeoutError."""
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be at least 1, got {chunksize}")
        deadline = None if timeout is None else time.monotonic() + timeout
        star = len(iterables) > 1
        items = list(zip(*iterables)) if star else list(*iterables)
        futures = [self.submit(map_chunk, fn, chunk, star) for chunk in map_chunks(items, chunksize)]
        return _results_in_order(futures, deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls. ``cancel_futures``: cancel the calls not sent yet and the jobs
        queued, and stop the running ones (their containers are killed). ``wait``: return once
        every job sent has ended."""
        with self._changed:
            self._shut_down = True
            unfinished = list(self._unfinished)
        if cancel_futures:
            stop(unfinished)
        if wait:
            with self._changed:
                self._changed.wait_for(
                    lambda: self._in_flight == 0 and all(call.future.cancelled() for call in self._held))

    def _send_held(self) -> None:
        """Send held calls as jobs while there is room."""
        while True:
            with self._changed:
                if not self._held or (self.max_workers is not None and self._in_flight >= self.max_workers):
                    return
                call = self._held.popleft()
                if call.future.cancelled():
                    continue
                self._in_flight += 1
            try:
                job = (self._client or default_client()).submit(call.fn, *call.args, kwargs=call.kwargs,
                                                                options=self.options, label=call.label)
            except Exception as exc:  # e.g. an argument that cannot be pickled: the future says so
                with self._changed:
                    self._in_flight -= 1
                    self._changed.notify_all()
                with contextlib.suppress(concurrent.futures.InvalidStateError):  # unless cancelled meanwhile
                    call.future.set_exception(exc)
                continue
            call.future.bind(job)
            job.add_done_callback(self._job_ended)

    def _job_ended(self, _job: Job) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()
        self._send_held()

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._changed:
            self._unfinished.discard(future)
            self._changed.notify_all()


def stop(futures: Iterable[JobFuture]) -> None:
    """Cancel the calls not sent yet and the jobs queued, and stop the running ones (their
    containers are killed; their futures raise JobCancelled). The queued first: a worker slot
    that a stopped job frees must not start one of them."""
    running = [future for future in futures if not future.cancel()]
    for future in running:
        if future.job is not None:
            future.job.cancel()  # running (or done: then nothing happens)


def _results_in_order(futures: list[JobFuture], deadline: float | None) -> Iterator[Any]:
    """The items' results, chunk by chunk in order; the chunks not reached are cancelled when
    the iteration stops early (an error, a timeout, a break)."""
    pending = list(reversed(futures))
    try:
        while pending:
            yield from pending[-1].result(None if deadline is None else deadline - time.monotonic())
            pending.pop()
    finally:
        for future in pending:
            future.cancel()
