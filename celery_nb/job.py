"""``Job``: a future-like handle on one submitted cell or function call.

State is built only from the job's event stream, so the widget, ``Job.logs`` and a later
re-read all see the same ordered history. One JobFollower thread per client reads the
streams of all its unfinished jobs with a single blocking read.
"""
from __future__ import annotations

import html
import threading
import time
import traceback
from typing import Any, Callable, ClassVar, Protocol

from celery_nb import payload
from celery_nb.errors import CeleryNBError, JobCancelled, error_from_event
from celery_nb.jobstore import START, Event, JobStore, Waker

_READ_TIMEOUT = 0.5  # s; listeners are also called this often while the job runs (elapsed time)


class JobBackend(Protocol):
    """What a Job needs of whoever sent it (a celery_nb Client)."""

    def cancel(self, job_id: str) -> None:
        """Ask the worker to stop the job."""

    def collect(self, job_id: str, inline: bytes | None, ref: dict[str, Any] | None,
                signature: str | None) -> Any:
        """The job's result bundle (bytes-like): ``inline``, or fetched by ``ref`` from the blob
        store and deleted there; checked against ``signature`` (SignatureError) before anything
        unpickles it."""

    def attach(self, job_id: str) -> Job:
        """Follow an earlier job again (see Job.attach)."""


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
        self.environment: str | None = None  # of a job with --pip: "cached" (the worker host had it) or "built"
        self.attempts = 0  # runs started: more than 1 when a worker died and another ran the job again
        self.progress: dict[str, Any] | None = None  # latest {"n", "total", "desc"}
        self.timings: dict[str, float] = {}
        self.error: CeleryNBError | None = None
        self.submitted_at = time.time()
        self.finished_at: float | None = None
        self._backend = backend
        # what the job printed and displayed, in order: ("stdout"|"stderr", text) or ("display", bundle)
        self._output: list[tuple[str, Any]] = []
        self._result_blob: bytes | None = None
        self._result_ref: dict[str, Any] | None = None  # a big result, in the client's blob store
        self._result_sig: str | None = None
        self._outputs: dict[str, Any] | None = None
        self._final = threading.Event()  # the final event has been read
        self._done = threading.Event()  # ... and the done callbacks have run
        self._listeners: list[Callable[[Job], None]] = []
        self._done_callbacks: list[Callable[[Job], None]] = []
        self._lock = threading.Lock()

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
                    self.environment = event.get("environment")
            elif kind == "log":
                self._output.append((event["stream"], event["text"]))
            elif kind == "display":
                self._output.append(("display", {"data": event["data"], "metadata": event.get("metadata", {})}))
            elif kind == "progress":
                self.progress = {k: event.get(k) for k in ("n", "total", "desc")}
            elif kind == "done":  # a warm job that ended at once reported no start: this says it all
                self.worker = event.get("worker", self.worker)
                self.container = event.get("container") or self.container
                self.environment = event.get("environment") or self.environment
                self.attempts = event.get("attempt") or self.attempts
                self.timings.update(event.get("timings", {}))
                self.timings["collected"] = time.time()
                self.timings["transfer"] = self.timings["collected"] - self.timings.get("finished", self.timings["collected"])
                self.finished_at = time.time()
                if event["status"] == "failed":
                    self.error = error_from_event(event["error"], self.id, self.image)
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
        """True once the job is final and its done callbacks (e.g. output injection) have run."""
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
        """The job's outputs: a dict of variables for a cell, the return value for a call.

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
                self._result_ref = None
                self._outputs = payload.load_result(data)
                # from the worker's end of the job to usable values in the kernel
                self.timings["transfer"] += time.time() - decode_started
                self._result_blob = None
        return self._outputs if self.kind == "cell" else self._outputs["return"]

    # -- what a person reads ------------------------------------------------------------
    @property
    def logs(self) -> str:
        """Everything the job printed so far (stdout and stderr, interleaved as they came)."""
        return "".join(text for _stream, text in self.log_chunks())

    def log_chunks(self) -> list[tuple[str, str]]:
        return [(kind, text) for kind, text in self._output if kind != "display"]

    def output_items(self) -> list[tuple[str, Any]]:
        """Logs and displays in the order they came: ("stdout"|"stderr", text) or ("display", bundle)."""
        return list(self._output)

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


class JobFollower:
    """Reads the event streams of a client's unfinished jobs and applies them to the Jobs."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._waker = store.waker()
        self._jobs: dict[str, tuple[Job, str]] = {}  # job id -> (job, cursor)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def follow(self, job: Job, cursor: str = START) -> Waker:
        """Start reading ``job``'s events after ``cursor``. Ring the returned bell (e.g. with
        the job's first event, in the same round trip) so that a read already waiting
        includes the job."""
        with self._lock:
            self._jobs[job.id] = (job, cursor)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="celery_nb-job-follower", daemon=True)
                self._thread.start()
        return self._waker

    def forget(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def _run(self) -> None:
        while True:  # also while no job runs: a bell ends the wait, and the thread stays warm
            with self._lock:
                cursors = {job_id: cursor for job_id, (_job, cursor) in self._jobs.items()}
            try:
                found = self._store.read_many(cursors, _READ_TIMEOUT, self._waker)
            except Exception as exc:  # the broker went away: keep trying, say so in the logs
                for job, _cursor in list(self._jobs.values()):
                    job._apply({"type": "log", "stream": "stderr",
                                "text": f"[celery_nb] lost the job store ({exc}); retrying\n"})
                time.sleep(1)
                continue
            with self._lock:
                for job_id, (events, cursor) in found.items():
                    if job_id not in self._jobs:  # forgotten meanwhile
                        continue
                    job = self._jobs[job_id][0]
                    self._jobs[job_id] = (job, cursor)
                    for event in events:
                        job._apply(event)
                        if job.finished:
                            break
                active = [job for job, _cursor in self._jobs.values()]
                finished = [job for job in active if job.finished]
                for job in finished:
                    del self._jobs[job.id]
            if finished:
                time.sleep(0)  # let a thread waiting for a result (woken by _apply) run before the bookkeeping
            for job in active:
                job._notify(job._listeners)
            for job in finished:
                job._complete()
