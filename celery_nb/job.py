"""``Job``: a future-like handle on one submitted cell or function call.

State is built only from the job's event stream, so the widget, ``Job.logs`` and a later
re-read all see the same ordered history. One JobFollower thread per client reads the
streams of all its unfinished jobs with a single blocking read.
"""
from __future__ import annotations

import concurrent.futures
import html
import re
import sys
import threading
import time
import traceback
import zlib
from typing import Any, Callable, ClassVar, Protocol

from celery_nb import payload
from celery_nb.blobs import MissingBlobError
from celery_nb.errors import CeleryNBError, JobCancelled, LogUnavailableError, error_from_event
from celery_nb.files import write_downloads
from celery_nb.jobstore import START, Event, JobStore, Waker
from celery_nb.logwindow import LogWindow
from celery_nb.options import format_size

_READ_TIMEOUT = 0.5  # s; listeners are also called this often while the job runs (elapsed time)
# s between two reads of every followed job's events, also of those routed to the client's inbox:
# a job whose worker did not name it there (a queued job revoked before Celery read its request)
_SWEEP_INTERVAL = 2.0


class JobBackend(Protocol):
    """What a Job needs of whoever sent it (a celery_nb Client)."""

    def cancel(self, job_id: str) -> None:
        """Ask the worker to stop the job."""

    def collect(self, job_id: str, inline: bytes | None, ref: dict[str, Any] | None,
                signature: dict[str, Any] | None) -> Any:
        """The job's result bundle (a writable bytes-like, so that the arrays loaded from it in
        place are writable, as the kernel's own): ``inline``, or fetched by ``ref`` from the blob
        store and deleted there; checked against ``signature`` (SignatureError) before anything
        unpickles it."""

    def attach(self, job_id: str) -> Job:
        """Follow an earlier job again (see Job.attach)."""

    def read_blob(self, ref: dict[str, Any]) -> Any:
        """A blob (bytes-like) from the client's blob store, left there; MissingBlobError once it expired."""


class Job:
    """A submitted job. ``result()`` waits and returns the outputs or raises the job's error."""

    # set from outside, so that this module imports neither of them: how a notebook shows a job
    # (celery_nb.widgets), and the backend of Job.attach without one (celery_nb.client)
    live_view: ClassVar[Callable[[Job], None] | None] = None
    default_backend: ClassVar[Callable[[], JobBackend] | None] = None

    def __init__(self, backend: JobBackend, job_id: str, kind: str, image: str, queue: str, label: str) -> None:
        self.id = job_id
        self.kind = kind  # "cell" or "call"
        self.image = image
        self.queue = queue
        self.label = label  # what was submitted, for display: first cell line or function name
        self.status = "queued"
        self.worker: str | None = None
        self.container: str | None = None  # "warm" (reused from the worker's pool) or "cold"
        self.container_id: str | None = None  # the Docker id of the container it ran in (its last attempt's)
        self.environment: str | None = None  # of a job with --pip: "cached" (the worker host had it) or "built"
        self.attempts = 0  # runs started: more than 1 when a worker died and another ran the job again
        self.progress: dict[str, Any] | None = None  # latest {"n", "total", "desc"}
        # the files the job's --download patterns matched (path -> size in bytes; result() writes them), and
        # the patterns that matched nothing
        self.downloads: dict[str, int] = {}
        self.unmatched_downloads: list[str] = []
        self.timings: dict[str, float] = {}
        # once it ran: {"cpu_seconds", "peak_memory" (bytes), "memory_limit" (its container's, bytes)}
        self.usage: dict[str, Any] | None = None
        self.error: CeleryNBError | None = None
        self.submitted_at = time.time()
        self.finished_at: float | None = None
        self._backend = backend
        # what the job printed and displayed, in order: ("stdout"|"stderr", text) or ("display", bundle)
        self._output: list[tuple[str, Any]] = []
        self._log_window = LogWindow()  # keeps _output bounded as the worker bounds the stream
        self._result_blob: bytes | None = None
        self._result_ref: dict[str, Any] | None = None  # a big result, in the client's blob store
        self._result_sig: dict[str, Any] | None = None
        self._outputs: dict[str, Any] | None = None
        self.skipped_outputs: dict[str, str] = {}  # a cell's outputs that did not come back: name -> type, why
        self._final = threading.Event()  # the final event has been read
        self._done = threading.Event()  # ... and the done callbacks have run
        self._listeners: list[Callable[[Job], None]] = []
        self._done_callbacks: list[Callable[[Job], None]] = []
        self._lock = threading.Lock()
        self._future: JobFuture | None = None

    # -- state from events (called by the client's JobFollower) ------------------------
    def _apply(self, event: Event) -> None:
        kind = event.get("type")
        with self._lock:
            if kind == "status":
                self.status = event["status"]
                self.worker = event.get("worker", self.worker)
                self.attempts = event.get("attempt", self.attempts)
                if self.status == "starting":
                    self.timings["received"] = event["t"]
                elif self.status == "building":
                    self.timings["building"] = event["t"]
                elif self.status == "running":
                    self.timings["started"] = event["t"]
                    self.container = event.get("container")
                    self.container_id = event.get("container_id")
                    self.environment = event.get("environment")
            elif kind == "log":
                self._output.append((event["stream"], event["text"]))
                self._log_window.added(self._output)
            elif kind == "log_cut":
                self._log_window.cut(self._output, event)
            elif kind == "log_end":
                self._log_window.ended(self._output, event)
            elif kind == "display":
                self._output.append(("display", {"data": event["data"], "metadata": event.get("metadata", {})}))
            elif kind == "progress":
                self.progress = {k: event.get(k) for k in ("n", "total", "desc")}
            elif kind == "downloads":
                self.downloads = {path: size for path, size in event["files"]}
                self.unmatched_downloads = list(event["unmatched"])
            elif kind == "done":  # a warm job that ended at once reported no start: this says it all
                self.worker = event.get("worker", self.worker)
                self.container = event.get("container") or self.container
                self.container_id = event.get("container_id") or self.container_id
                self.environment = event.get("environment") or self.environment
                self.attempts = event.get("attempt") or self.attempts
                self.usage = event.get("usage")
                self.timings.update(event.get("timings", {}))
                self.timings["collected"] = time.time()
                self.timings["transfer"] = self.timings["collected"] - self.timings.get("finished", self.timings["collected"])
                self.finished_at = time.time()
                if event["status"] == "failed":
                    self.error = error_from_event(event["error"], self.id, self.image,
                                                  "the cell" if self.kind == "cell" else self.label)
                self._result_blob = event.get("blob")
                self._result_ref = event.get("result_ref")
                self._result_sig = event.get("result_sig")
                self.status = event["status"]
                self._final.set()

    def _complete(self) -> None:
        """Run the done callbacks (also those added meanwhile), then mark the job done."""
        while True:
            with self._lock:
                callbacks, self._done_callbacks = self._done_callbacks, []
                if not callbacks:
                    self._done.set()
                    return
            self._notify(callbacks)

    def _notify(self, callbacks: list[Callable[[Job], None]]) -> None:
        for callback in list(callbacks):
            try:
                callback(self)
            except Exception:  # a broken display must not stop the job from being followed
                traceback.print_exc()

    def add_listener(self, callback: Callable[[Job], None]) -> None:
        """Call ``callback(job)`` after new events arrive and periodically while running."""
        self._listeners.append(callback)

    def add_done_callback(self, callback: Callable[[Job], None]) -> None:
        """Call ``callback(job)`` once the job is final (at once if it already is)."""
        with self._lock:
            if not self._done.is_set():
                self._done_callbacks.append(callback)
                return
        callback(self)

    @classmethod
    def attach(cls, job_id: str, client: JobBackend | None = None) -> Job:
        """Follow a job again, e.g. one sent before the kernel restarted: its events replay
        from the start (logs, progress, status) and it is followed live; ``result()`` collects
        its outputs. ``job_id`` may be the first characters of the id, as widgets show it.
        ``client``: the Client to follow it with (default: celery_nb.default_client())."""
        if client is None:
            assert cls.default_backend is not None, "celery_nb.client sets Job.default_backend when imported"
            client = cls.default_backend()
        return client.attach(job_id)

    # -- future-like API --------------------------------------------------------------
    def done(self) -> bool:
        """True once the job is final and its done callbacks have run (they hand a ``--no-wait`` cell's
        outputs to the kernel's main thread, which puts them in the namespace before the next cell)."""
        return self._done.is_set()

    @property
    def finished(self) -> bool:
        """True once the job's final event has been read (done callbacks may still be running)."""
        return self._final.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is final or ``timeout`` passes; True when final."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Ask the worker to stop the job (kills its container); returns at once."""
        if not self.finished:
            self._backend.cancel(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """The job's outputs: a dict of variables for a cell, the return value for a call. The
        first call also writes the files the job's --download patterns matched into the kernel's
        working directory (``downloads`` lists them).

        Raises the job's error (RemoteError, JobTimeoutError, ...), JobCancelled, or
        TimeoutError if it is still running after ``timeout`` seconds.
        """
        if not self._final.wait(timeout):
            raise TimeoutError(f"job {self.id} is still {self.status} after {timeout:g} s")
        if self.status == "cancelled":
            raise JobCancelled(f"job {self.id} ({self.label}) was cancelled; nothing came back")
        if self.error is not None:
            raise self.error
        with self._lock:
            if self._outputs is None:
                decode_started = time.time()
                data = self._backend.collect(self.id, self._result_blob, self._result_ref, self._result_sig)
                # kept until it has been loaded: a call after a failure (a full disk) tries again
                self._result_blob, self._result_ref = data, None
                write_downloads(payload.result_files(data))
                self._outputs, self.skipped_outputs = payload.load_result(data)
                if self.skipped_outputs:
                    print(payload.skipped_outputs_note(self.skipped_outputs), file=sys.stderr)
                # from the worker's end of the job to usable values in the kernel
                self.timings["transfer"] += time.time() - decode_started
                self._result_blob = None
        return self._outputs if self.kind == "cell" else self._outputs["return"]

    # -- what a person reads ------------------------------------------------------------
    @property
    def logs(self) -> str:
        """What the job printed so far (stdout and stderr, interleaved as they came), with lines
        redrawn by carriage returns as they were left (see collapse_carriage_returns): past the
        worker's CELERY_NB_MAX_LOG_BYTES, its first and its newest part (``full_log()`` has all of it)."""
        return collapse_carriage_returns("".join(text for _stream, text in self.log_chunks()))

    def log_chunks(self) -> list[tuple[str, str]]:
        return [(kind, text) for kind, text in self._output if kind != "display"]

    def output_items(self) -> list[tuple[str, Any]]:
        """Logs and displays in the order they came: ("stdout"|"stderr", text) or ("display", bundle)."""
        return list(self._output)

    def new_output(self, seen: int) -> tuple[list[tuple[str, Any]], int]:
        """The output items (as ``output_items``) that came after the first ``seen`` (0, or what
        this returned last), and how many have come now; those the log dropped are left out."""
        with self._lock:
            start = self._log_window.index_after(seen)
            return self._output[start:], len(self._output) + self._log_window.trimmed

    def full_log(self, timeout: float | None = None) -> str:
        """Everything the job printed (stdout and stderr as they came), also what ``logs`` left
        out: past the worker's CELERY_NB_MAX_LOG_BYTES, the worker keeps the whole log for
        CELERY_NB_FULL_LOG_TTL seconds (one hour). Waits for the job to end (TimeoutError after
        ``timeout`` seconds); LogUnavailableError when the whole log was not kept or has expired."""
        if not self._final.wait(timeout):
            raise TimeoutError(f"job {self.id} is still {self.status} after {timeout:g} s; its whole log is "
                               f"kept when it ends")
        end = self._log_window.end
        if end is None:  # nothing was dropped
            return self.logs
        whole = end.get("full_log")
        if whole is None:
            raise LogUnavailableError(f"the worker of job {self.id} kept only its log's first and last part (its "
                                      f"CELERY_NB_MAX_FULL_LOG_BYTES is 0); set it on the worker to keep whole logs")
        try:
            data = self._backend.read_blob(whole["ref"])
        except MissingBlobError:
            raise LogUnavailableError(
                f"the whole log of job {self.id} was kept until "
                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(whole['until']))} and has expired; raise "
                f"CELERY_NB_FULL_LOG_TTL on the workers to keep whole logs longer") from None
        text = zlib.decompressobj().decompress(data, whole["size"]).decode("utf-8", "replace")
        return text if whole["size"] == end["printed"] else (
            text + f"\n[celery_nb] the whole log ends here, after {whole['size']} of the {end['printed']} bytes the "
                   f"job printed (the worker's CELERY_NB_MAX_FULL_LOG_BYTES is {end['cap']})\n")

    @property
    def displays(self) -> list[dict[str, Any]]:
        """What the job displayed so far (``display()``, pyplot figures): Jupyter MIME bundles,
        ``{"data": {mime type: value}, "metadata": {...}}``, in order."""
        return [bundle for kind, bundle in self._output if kind == "display"]

    @property
    def elapsed(self) -> float:
        return (self.finished_at or time.time()) - self.submitted_at

    def timing_breakdown(self) -> dict[str, float]:
        """Seconds spent queued, building the job's environment (--pip), starting the container,
        running, and bringing results back; the phase a job is in counts up to now."""
        t = self.timings
        now = self.finished_at or time.time()
        parts = {"queued": t.get("received", now) - self.submitted_at}
        if "building" in t:
            parts["build"] = t.get("built", t.get("started", now)) - t["building"]
        if "received" in t:
            parts["start"] = t.get("started", now) - t["received"] - parts.get("build", 0.0)
        if "started" in t:
            parts["run"] = t.get("exited", t.get("finished", now)) - t["started"]
        if "transfer" in t:
            parts["transfer"] = t["transfer"]
        return {k: max(0.0, v) for k, v in parts.items()}

    def usage_text(self) -> str:
        """What the job used, e.g. "peak 1.2 GiB of 2.0 GiB, CPU 3.40 s" ("" before it has run): the
        peak memory of its processes against its container's memory limit, and their CPU time."""
        if not self.usage:
            return ""
        return (f"peak {format_size(self.usage['peak_memory'])} of {format_size(self.usage['memory_limit'])}, "
                f"CPU {self.usage['cpu_seconds']:.2f} s")

    @property
    def future(self) -> JobFuture:
        """This job as a ``concurrent.futures.Future``, for ``as_completed(job.future for job in
        jobs)``, ``wait`` and code written for executors (see JobFuture)."""
        with self._lock:
            future, new = self._future or JobFuture(), self._future is None
            self._future = future
        if new:
            future.bind(self)
        return future

    def progress_text(self) -> str:
        if not self.progress:
            return ""
        n, total, desc = self.progress["n"], self.progress["total"], self.progress["desc"]
        count = f"{n:g}/{total:g}" if total else f"{n:g}"
        return f"{desc}: {count}" if desc else count

    def summary(self) -> str:
        """One line: what, where, status, time; plus progress."""
        where = f" on {self.worker}" if self.worker else ""
        if self.attempts > 1:
            where += f" (attempt {self.attempts})"
        line = f"celery_nb job {self.id[:12]} [{self.image}] {self.label}: {self.status}{where} after {self.elapsed:.1f} s"
        if self.progress:
            line += f" | {self.progress_text()}"
        if self.environment:
            line += f" | environment {self.environment}"
        if self.finished:
            line += " | " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timing_breakdown().items())
        if self.usage:
            line += f" | {self.usage_text()}"
        return line

    def __repr__(self) -> str:
        return f"<Job {self.id[:12]} {self.kind} image={self.image!r} status={self.status}>"

    def _ipython_display_(self) -> None:
        """In a notebook: the live view (celery_nb.widgets), else the summary."""
        if Job.live_view is not None:
            Job.live_view(self)
        else:
            print(self.summary())

    def _repr_html_(self) -> str:
        return f"<code>{html.escape(self.summary())}</code>"


def collapse_carriage_returns(text: str) -> str:
    """``text`` as a terminal shows it, and Jupyter's stream output: a carriage return goes back to
    the start of its line and what follows overwrites it (a progress line redrawn in place)."""
    if "\r" not in text:
        return text
    lines = []
    for line in re.sub(r"\r+\n", "\n", text).split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown)
    return "\n".join(lines)


class JobFuture(concurrent.futures.Future):
    """A job as a ``concurrent.futures.Future``: pending while it is queued, running once a
    worker has taken it, then done with the job's result (a function's return value, a cell's
    outputs) or its error. ``cancel()`` cancels a job that has not started; a running one goes
    on (stop it with ``future.job.cancel()``: its future then raises JobCancelled). ``job`` is
    None while an Executor holds the call back (max_workers)."""

    def __init__(self) -> None:
        super().__init__()
        self.job: Job | None = None
        self._transition = threading.RLock()  # one state change at a time: cancel, start, settle

    def bind(self, job: Job) -> None:
        """Follow ``job``, sent for this future (cancelled at once if the future was meanwhile)."""
        with self._transition:
            self.job = job
            cancelled = self.cancelled()
        with job._lock:  # job.future is this future, not a second one
            job._future = job._future or self
        if cancelled:
            job.cancel()
            return
        job.add_listener(self._start_when_taken)
        job.add_done_callback(self._settle)

    def cancel(self) -> bool:
        with self._transition:
            if self.cancelled():
                return True
            if not super().cancel():
                return False  # running or done
            self.set_running_or_notify_cancel()  # as_completed and wait see it now
            job = self.job
        if job is not None:
            job.cancel()
        return True

    def _start(self) -> None:
        with self._transition:
            if not (self.running() or self.done()):
                self.set_running_or_notify_cancel()

    def _start_when_taken(self, job: Job) -> None:
        if job.status != "queued":
            self._start()

    def _settle(self, job: Job) -> None:
        with self._transition:
            if self.done():  # cancelled through this future
                return
            if job.status == "cancelled" and not self.running():  # it never started
                super().cancel()
                self.set_running_or_notify_cancel()
                return
            self._start()  # a result, or the error of a run that was stopped: no cancel() any more
        try:
            value = job.result()
        except Exception as exc:
            self.set_exception(exc)
        else:
            self.set_result(value)


class JobFollower:
    """Reads the event streams of a client's unfinished jobs and applies them to the Jobs."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._waker = store.waker()
        self._jobs: dict[str, tuple[Job, str]] = {}  # job id -> (job, cursor)
        self._routed: set[str] = set()  # the jobs whose workers name them in the inbox
        self._unrouted: set[str] = set()  # the others, read at every round (a set, not a pass over all jobs)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def inbox(self) -> str | None:
        """What a job's request names for its worker to route its events to this follower (None:
        the store needs none)."""
        return self._waker.inbox

    def follow(self, job: Job, cursor: str = START, routed: bool = False) -> Waker:
        """Start reading ``job``'s events after ``cursor``. ``routed``: its request names the
        inbox, and its worker names it there with each of its writes; otherwise ring the returned
        bell (e.g. with the job's first event, in the same round trip) so that a read already
        waiting includes the job."""
        with self._lock:
            self._jobs[job.id] = (job, cursor)
            if routed:
                self._routed.add(job.id)
                self._unrouted.discard(job.id)
            elif job.id not in self._routed:
                self._unrouted.add(job.id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="celery_nb-job-follower", daemon=True)
                self._thread.start()
        return self._waker

    def forget(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)
            self._routed.discard(job.id)
            self._unrouted.discard(job.id)

    def _routed_cursors(self, named: set[str]) -> dict[str, str]:
        """The cursors of the jobs among ``named`` that are followed and routed to the inbox."""
        with self._lock:
            return {job_id: self._jobs[job_id][1] for job_id in named if job_id in self._jobs and job_id in self._routed}

    def _run(self) -> None:
        swept = ticked = time.monotonic()
        while True:  # also while no job runs: a bell ends the wait, and the thread stays warm
            sweep = time.monotonic() - swept > _SWEEP_INTERVAL
            swept = time.monotonic() if sweep else swept
            tick = time.monotonic() - ticked >= _READ_TIMEOUT  # every job's listeners are called
            ticked = time.monotonic() if tick else ticked
            with self._lock:  # the jobs routed to the inbox are read when named there (and at a sweep)
                cursors = ({job_id: cursor for job_id, (_job, cursor) in self._jobs.items()} if sweep
                           else {job_id: self._jobs[job_id][1] for job_id in self._unrouted})
            try:
                found = self._store.read_many(cursors, _READ_TIMEOUT, self._waker, self._routed_cursors)
            except Exception as exc:  # the broker went away: keep trying, say so in the logs
                for job, _cursor in list(self._jobs.values()):
                    job._apply({"type": "log", "stream": "stderr",
                                "text": f"[celery_nb] lost the job store ({exc}); retrying\n"})
                time.sleep(1)
                continue
            with self._lock:
                changed = []
                for job_id, (events, cursor) in found.items():
                    if job_id not in self._jobs:  # forgotten meanwhile
                        continue
                    job = self._jobs[job_id][0]
                    self._jobs[job_id] = (job, cursor)
                    changed.append(job)
                    for event in events:
                        job._apply(event)
                        if job.finished:
                            break
                # those with new events now, every job now and then (its elapsed time): not every job
                # at each read, which would cost a kernel sending many jobs at once their square
                listened = [job for job, _cursor in self._jobs.values()] if tick else changed
                finished = [job for job in changed if job.finished]
                for job in finished:
                    del self._jobs[job.id]
                    self._routed.discard(job.id)
                    self._unrouted.discard(job.id)
            if finished:
                time.sleep(0)  # let a thread waiting for a result (woken by _apply) run before the bookkeeping
            for job in listened:
                job._notify(job._listeners)
            for job in finished:
                job._complete()
