"""The joblib backend ``"celery_nb"``: joblib's ``Parallel``, and with it scikit-learn's ``n_jobs``,
runs its batches of calls as celery_nb jobs, in containers::

    with joblib.parallel_config(backend="celery_nb", image="python:3.11-slim", memory="2g"):
        GridSearchCV(SVC(), grid, n_jobs=-1).fit(X, y)

celery_nb registers it with joblib when it is imported, if joblib is installed. Each batch that
joblib makes (a ``BatchedCalls``) is one call of an ``Executor`` whose ``max_workers`` is the
``n_jobs`` worked out here (-1: the slots of the workers that take the jobs' queue). The jobs
run with ``--pip auto``: their environment gets the kernel's versions of joblib and of what the
batch holds (scikit-learn, numpy, scipy), so that the image needs python3 only. When joblib stops
early (a batch raised, a timeout, an interrupt), it aborts the call: the batches not sent and the
jobs queued are cancelled, and the running ones' containers killed.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import joblib
from joblib.parallel import AutoBatchingMixin, BatchedCalls, ParallelBackendBase, register_parallel_backend
from packaging.version import Version

from celery_nb import widgets
from celery_nb.client import Client, default_client
from celery_nb.config import settings
from celery_nb.distributions import distributions_of, installable
from celery_nb.errors import JobCancelled, NoWorkerError
from celery_nb.executor import Executor, stop
from celery_nb.job import JobFuture
from celery_nb.options import AUTO, JobOptions, add_requirements, requirement_name
from celery_nb.requirements import function_modules, pins_for

BACKEND_NAME = "celery_nb"
_SLOTS_FRESH = 30.0  # s; n_jobs=-1 asks the workers how many jobs they run at most this often


def register() -> None:
    """Have ``joblib.parallel_config(backend="celery_nb", ...)`` and ``Parallel(backend="celery_nb")``
    run their batches as celery_nb jobs."""
    register_parallel_backend(BACKEND_NAME, CeleryNBBackend)


class CeleryNBBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's batches as celery_nb jobs. It takes the options of a job (any JobOptions field:
    image=, memory=, cpus=, queue=, pip=, ...; checked when it is made, by ``parallel_config``)
    and ``client=`` (default: celery_nb.default_client()). Its jobs get ``pip="auto"``; a ``pip``
    given adds to it and wins for the packages it names.

    ``n_jobs``: the batches in flight at once (joblib holds the others back); -1, or unset inside
    ``parallel_config``: as many as the workers that take the queue run at once (asked at most
    every 30 s), -2 one fewer, and so on; a count worked out so is at least 2, as joblib runs
    ``n_jobs=1`` in the kernel.
    """

    default_n_jobs = -1
    supports_retrieve_callback = True  # a batch's result is taken in its future's done callback

    def __init__(self, *, client: Client | None = None, options: JobOptions | None = None,
                 nesting_level: int | None = None, **option_fields: Any) -> None:
        if Version(joblib.__version__) < Version("1.3"):  # before, results were not taken in callbacks
            raise ImportError(f"celery_nb's joblib backend needs joblib 1.3 or newer, and this kernel has joblib "
                              f"{joblib.__version__}: pip install -U joblib")
        super().__init__(nesting_level=nesting_level)
        options = JobOptions.build(options, **option_fields)
        self.options = dataclasses.replace(options, pip=add_requirements((AUTO,), options.pip or ()))
        self.client = client
        self._executor: Executor | None = None
        self._batches: list[tuple[JobFuture, int]] = []  # the current call's, with their number of tasks
        self._view: widgets.ParallelView | None = None
        self._slots: tuple[float, int] | None = None  # when the workers were asked, and their slots

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, **_backend_kwargs: Any) -> int:
        """A Parallel call begins (or a ``with Parallel(...)`` block): an Executor for its batches."""
        self.parallel = parallel
        n_jobs = self.effective_n_jobs(n_jobs)
        self.terminate()
        self._executor = Executor(n_jobs, client=self.client, options=self.options)
        return n_jobs

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is not None and n_jobs > 0:
            return n_jobs
        return max(self._worker_slots(n_jobs) + 1 + (n_jobs or -1), 2)

    def _worker_slots(self, n_jobs: int | None) -> int:
        if self._slots is None or time.monotonic() - self._slots[0] > _SLOTS_FRESH:
            queue = self.options.queue or settings().default_queue
            slots = (self.client or default_client()).worker_slots(queue)
            if slots == 0:
                raise NoWorkerError(
                    f"n_jobs={n_jobs} runs as many jobs at once as the workers that take queue {queue!r} have slots, "
                    f"and no worker answered that it takes that queue: start one (`celery-nb worker -Q {queue}`), "
                    f"or give n_jobs a number (its jobs then wait in the queue for a worker)")
            self._slots = (time.monotonic(), slots)
        return self._slots[1]

    def start_call(self) -> None:
        self._batches = []
        if widgets.in_kernel():
            self._view = widgets.ParallelView(self._batches, getattr(self.parallel, "n_tasks", None),
                                              self.abort_everything)

    def submit(self, func: BatchedCalls, callback: Callable[[JobFuture], Any] | None = None) -> JobFuture:
        """Send a batch as a job (held in the kernel while ``n_jobs`` are in flight)."""
        assert self._executor is not None, "joblib configures its backend before it submits"
        keep_warning_filters_the_job_can_use(func)
        future = self._executor.submit_as(batch_label(func), func)
        self._batches.append((future, len(func)))
        if callback is not None:
            future.add_done_callback(callback)
        return future

    apply_async = submit  # what joblib before 1.5 calls

    def retrieve_result_callback(self, future: JobFuture) -> list[Any]:
        """A batch's results, or its error: the original exception's class (a RemoteError too).
        joblib stops the call at the first error: the other batches are stopped here and now,
        before the Executor sends a held batch in this one's place."""
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            error: BaseException = JobCancelled(
                f"the job of a joblib batch was cancelled before it started"
                f"{f' (job {future.job.id})' if future.job is not None else ''}, so joblib stopped the others; "
                f"nothing came back")
        except BaseException as exc:
            error = exc
        self.abort_everything()
        raise error

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """joblib stops the call: the batches not sent and the jobs queued are cancelled, the
        running ones' containers killed. The Executor stays ready for the next call."""
        stop(future for future, _tasks in self._batches)

    def stop_call(self) -> None:
        if self._view is not None:
            self._view.finish()
            self._view = None

    def terminate(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


def batch_label(batch: BatchedCalls) -> str:
    """What a batch's job is called: "joblib batch: 3 × _fit_and_score()"."""
    names = dict.fromkeys(f"{_name(func)}()" for func, _args, _kwargs in batch.items)
    return f"joblib batch: {len(batch)} × {', '.join(names)}"


def _name(func: Any) -> str:
    """A function's name; a functools.partial's function's (scikit-learn's ``delayed`` keeps
    the name of the function it wraps)."""
    for candidate in (func, getattr(func, "func", None)):
        name = getattr(candidate, "__qualname__", None)
        if isinstance(name, str):
            return name
    return type(func).__qualname__


def keep_warning_filters_the_job_can_use(batch: BatchedCalls) -> None:
    """scikit-learn sends the kernel's warning filters with each task, so that its warnings are
    filtered in the job as they are in the kernel. A filter about a warning class of a package
    that the task does not need (IPython's, pytest's, requests') can match nothing in the job, but
    loading it there would need that package, which ``pip="auto"`` would then install and every
    job import: such filters are left out of the tasks, those about the builtin warnings and the
    packages the task needs (with their dependencies) are kept."""
    wrapped = [item for item in batch.items  # scikit-learn's wrappers of the task's function
               if isinstance(getattr(item[0], "warning_filters", None), list)]
    arguments: dict[int, tuple[Any, list[Any]]] = {}  # id of each function: it, and its calls' arguments
    for func, args, kwargs in wrapped:
        function = getattr(func, "function", func)
        arguments.setdefault(id(function), (function, []))[1].extend((*args, *kwargs.values()))
    # what the batch needs, found once for each function of it: the job gets it all
    needed = set().union(*(function_modules(function, values) for function, values in arguments.values()))
    available = {requirement_name(pin) for pin in pins_for(frozenset(needed))}
    for func, _args, _kwargs in wrapped:
        func.warning_filters = [rule for rule in func.warning_filters if _usable(rule, needed, available)]


def _usable(rule: tuple[Any, ...], modules: set[str], distributions: set[str]) -> bool:
    """Whether a warning filter's class loads in a job that has ``modules`` (the task's) and
    ``distributions`` installed: a builtin class, the notebook's, or one of theirs."""
    module = getattr(rule[2], "__module__", "builtins").partition(".")[0]
    if not installable(module) or module in modules:
        return True
    providers = distributions_of(module)
    return bool(providers) and set(providers) <= distributions
