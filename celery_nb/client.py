"""Submitting cells and functions; the embedded default worker.

With a broker URL, jobs go through Redis to ``celery-nb worker`` processes anywhere.
Without one, the client starts a Celery worker inside this process (memory transport)
that still runs every job in a real container.
"""
from __future__ import annotations

import atexit
import base64
import dataclasses
import functools
import math
import os
import socket
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import kombu.exceptions
import redis
from celery._state import _set_task_join_will_block
from celery.worker import WorkController

from celery_nb import analysis, cell_syntax, journal, payload, requirements, shm
from celery_nb.blobs import BLOB_THRESHOLD, BlobStore, MemoryBlobStore, MissingBlobError, blob_store_for
from celery_nb.broker import TASK_NAME, celery_app, task_message
from celery_nb.config import settings
from celery_nb.errors import BrokerUnavailableError, InputError, SignatureError, UnknownJobError
from celery_nb.files import Uploads, resolve_uploads
from celery_nb.job import Job, JobFollower
from celery_nb.jobstore import DEFAULT_TTL, FIRST_EVENT_ID, START, JobStore, MemoryJobStore, RedisJobStore
from celery_nb.local_code import LocalCode, LocalModule, ReferenceRecorder
from celery_nb.options import JobOptions
from celery_nb.signing import Signer, digest
from celery_nb.worker.app import WORKER_SLOTS_COMMAND, worker_app
from celery_nb_runtime import map_chunk
from celery_nb_runtime.runner import CELL_BUILTINS


# unique per kernel: leftovers of one kernel are not another's
EMBEDDED_WORKER = f"embedded-{os.getpid()}@{socket.gethostname()}"
_embedded_owner: Client | None = None  # the client whose embedded worker runs in this process
_embedded_lock = threading.Lock()


class Client:
    """Sends jobs to workers and follows them. ``broker_url=None``: embedded worker."""

    def __init__(self, broker_url: str | None = None, *, embedded_workers: int = 4, secret: str | None = None) -> None:
        """``secret``: signs requests and checks results (default: $CELERY_NB_SECRET)."""
        self.broker_url = broker_url
        self.id = uuid.uuid4().hex  # its jobs (only) may share a job process in a warm container
        self.signer = Signer(secret)
        self.store: JobStore = RedisJobStore(broker_url) if broker_url else MemoryJobStore()
        self.blobs: BlobStore = blob_store_for(broker_url) if broker_url else MemoryBlobStore()
        # a kernel on a broker only publishes; the embedded worker's app also runs the jobs
        self.app = (celery_app(broker_url) if broker_url else
                    worker_app(None, self.store, self.blobs, worker_name=EMBEDDED_WORKER, signer=self.signer))
        self._follower = JobFollower(self.store)
        self._local_code = LocalCode()
        # big payloads and results as shared memory files, with the workers of this host that share it
        self.kernel_files = shm.Exchange.own(this_process=self.embedded) if self._shares_memory() else None
        self.jobs: list[Job] = []
        self._embedded: WorkController | None = None
        if broker_url is None:
            self._start_embedded_worker(embedded_workers)

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    def _shares_memory(self) -> bool:
        """Whether big data may go through shared memory files: with workers that say they see
        this host's, and (the embedded worker) unless its settings say no."""
        return not self.embedded or self.app.celery_nb_pool.settings.kernel_shared_memory

    def _payload_files_for(self, queue: str) -> shm.Exchange | None:
        """Where a big payload for ``queue`` goes as a shared memory file: the kernel's folder, if
        every live worker of the queue can read it (the embedded worker always); else None."""
        if self.kernel_files is None or not isinstance(self.store, RedisJobStore):  # or the embedded worker's
            return self.kernel_files
        serving = [facts for facts in self.store.live_workers().values() if queue in facts.get("queues", ())]
        return self.kernel_files if serving and all(map(self.kernel_files.shared_with, serving)) else None

    def _start_embedded_worker(self, concurrency: int) -> None:
        global _embedded_owner
        with _embedded_lock:
            if _embedded_owner is not None:
                # Celery keeps a worker's task registry in process-wide state: a second worker
                # would run the first one's jobs with its own job store
                raise RuntimeError("this process already runs an embedded celery_nb worker (another Client(None)); "
                                   "use celery_nb.default_client(), or shut the other client down first")
            _embedded_owner = self
        # Celery's pool threads look tasks up in the current/default app, not the worker's
        # (as celery.contrib.testing.worker does).
        self.app.set_current()
        self.app.set_default()
        ready = threading.Event()
        self._embedded = WorkController(
            app=self.app, pool_cls="threads", concurrency=concurrency,
            hostname=EMBEDDED_WORKER, queues=[settings().default_queue],
            without_heartbeat=True, without_mingle=True, without_gossip=True,
            send_events=False, loglevel="WARNING", ready_callback=lambda _consumer: ready.set())
        self.app.celery_nb_pool.remove_leftovers()  # of kernels that were killed
        threading.Thread(target=self._embedded.start, name="celery_nb-embedded-worker", daemon=True).start()
        atexit.register(self.shutdown)
        if not ready.wait(30):
            raise RuntimeError("the embedded celery_nb worker did not start within 30 s")
        # the worker marked this process as one whose tasks must not wait on results; the kernel
        # is no such process (celery.contrib.testing.worker does the same)
        _set_task_join_will_block(False)

    def shutdown(self) -> None:
        """Stop the embedded worker, remove its idle containers and the shared memory files of its jobs."""
        global _embedded_owner
        if self._embedded is not None:
            self._embedded.stop(in_sighandler=False, exitcode=0)
            self._embedded = None
            self.app.celery_nb_pool.shutdown()
            if self.kernel_files is not None:  # its jobs' files: they ended with the worker
                self.kernel_files.remove()
            with _embedded_lock:
                _embedded_owner = None

    # -- submitting ---------------------------------------------------------------------
    def submit_cell(self, source: str, namespace: Mapping[str, Any], *, inputs: Sequence[str] | None = None,
                    outputs: Sequence[str] | None = None, first_line: int = 1, hidden: Collection[str] = (),
                    options: JobOptions | None = None, **option_fields: Any) -> Job:
        """Run cell ``source`` (Python, or IPython syntax: ``!cmd``, ``%time``...) in a container;
        inputs come from ``namespace``.

        ``inputs``/``outputs`` override the automatic detection. The job's options are
        ``options`` with ``option_fields`` (any JobOptions field: image=, memory=, upload=, ...) on
        top. The local modules the cell imports travel with it. Raises SyntaxError,
        UnsupportedMagicError, OptionError and InputError locally, before anything is submitted.
        """
        job_options = JobOptions.build(options, **option_fields)
        cell = cell_syntax.to_python(source, first_line)
        names = analysis.analyse_cell(cell.analysed, first_line)
        if inputs is None:
            # a cell's display() is the container's, not the kernel's (which may be in the namespace)
            inputs = analysis.select_inputs(names, namespace.keys(), {*hidden, *CELL_BUILTINS})
        else:
            missing = [n for n in inputs if n not in namespace]
            if missing:
                raise InputError(f"--in names {', '.join(map(repr, missing))}, which the kernel does not have; "
                                 f"define {'it' if len(missing) == 1 else 'them'} first or fix --in")
        referenced = ReferenceRecorder()
        data = payload.cell_payload(cell.source, first_line, {n: namespace[n] for n in inputs},
                                    outputs if outputs is not None else names.assigns,
                                    outputs_explicit=outputs is not None, timed=cell.timed,
                                    uploads=_uploads(job_options), download=job_options.download or (),
                                    dumps=referenced)
        code = self._local_code.for_cell(cell.source, first_line, referenced.modules)
        label = next((line.strip() for line in source.splitlines() if line.strip()), "(empty cell)")
        values = [namespace[name] for name in inputs]
        return self._send("cell", data, job_options, label, code,
                          lambda: requirements.cell_modules(cell.source, first_line, values))

    def submit(self, fn: Callable[..., Any], *args: Any, kwargs: Mapping[str, Any] | None = None,
               options: JobOptions | None = None, label: str | None = None, **option_fields: Any) -> Job:
        """Run ``fn(*args, **kwargs)`` in a container (the image needs the kernel's Python minor
        version). The job's options are ``options`` with ``option_fields`` (any JobOptions
        field: image=, memory=, fresh=, network=, gpus=, upload=, ...) on top. The local modules
        it needs (``fn``'s own, those of the functions and classes it is given) travel with it.
        ``label``: what its widget, ``%celery_jobs`` and Flower call the job (default: ``fn``'s name)."""
        job_options = JobOptions.build(options, **option_fields)
        referenced = ReferenceRecorder()
        data = payload.call_payload(fn, args, kwargs or {}, _uploads(job_options), job_options.download or (),
                                    dumps=referenced)
        code = self._local_code.for_call(args[0] if fn is map_chunk else fn, referenced.modules)
        if fn is map_chunk:  # a chunk of RemoteFunction.map: name the mapped function
            count = f"{len(args[1])} item{'s' if len(args[1]) != 1 else ''}"
            label = label or f"{_function_name(args[0])}() over {count}"
            needs = functools.partial(requirements.function_modules, args[0], args[1], referenced.modules)
        else:
            label = label or f"{_function_name(fn)}()"
            needs = functools.partial(requirements.function_modules, fn, (*args, *(kwargs or {}).values()),
                                      referenced.modules)
        return self._send("call", data, job_options, label, code, needs)

    def _send(self, kind: str, data: list[Any], options: JobOptions, label: str, code: Sequence[LocalModule],
              imports: Callable[[], Iterable[str]] | None = None) -> Job:
        """``data``: the pieces of the payload bundle; ``code``: the local modules the job ships;
        ``imports``: the modules it needs, for ``--pip auto`` (asked only then)."""
        config = settings()
        options = requirements.pin_auto(options.with_defaults(config.job_defaults(kind)), imports)
        if self.embedded:  # the embedded worker consumes only the default queue: every job runs here
            options = dataclasses.replace(options, queue=config.default_queue)
        assert options.image is not None and options.queue is not None  # the defaults set them
        job = Job(self, uuid.uuid4().hex, kind, options.image, options.queue, label)
        request: dict[str, Any] = {"job_id": job.id, "kind": kind, "options": options.to_request(), "client": self.id}
        if self._follower.inbox is not None:  # its worker names it there: the follower reads it then
            request["inbox"] = self._follower.inbox
        try:
            self._add_payload(request, data, options.queue)
            if code:
                request["code"] = self._local_code.send(code, self.blobs)
            self._publish(job, self.signer.sign(request), options)
        except (redis.RedisError, kombu.exceptions.OperationalError) as exc:
            self._follower.forget(job)
            raise BrokerUnavailableError(
                f"cannot reach the broker at {self.broker_url}: {exc}. Start Redis there, or unset "
                f"CELERY_NB_BROKER_URL to run jobs on the embedded worker in this kernel.") from None
        self.jobs.append(job)
        if not self.embedded:  # a restarted kernel finds it again (embedded jobs end with their kernel)
            journal.record(journal.JournalEntry(job.id, journal.public_url(self.broker_url), kind, job.image,
                                                job.queue, label, job.submitted_at, os.getpid()))
        return job

    def _add_payload(self, request: dict[str, Any], data: list[Any], queue: str) -> None:
        """The payload into ``request``: inline, or (big) by reference, as a shared memory file where
        the job's workers can read it, else in the blob store; and where the kernel's shared memory
        folder is, for a big result to come back there."""
        if self.kernel_files is not None:
            request["kernel_shm"] = self.kernel_files.where()
        if sum(memoryview(piece).nbytes for piece in data) <= BLOB_THRESHOLD:
            request["payload"] = base64.b64encode(b"".join(data)).decode("ascii")
            return
        files = self._payload_files_for(queue)  # big inputs stay out of the Celery message
        in_files = files.put(data) if files is not None else None
        if in_files is not None:  # (signed by its name: see celery_nb.signing)
            request["payload_shm"] = in_files
        else:
            request["payload_ref"] = self.blobs.put(data)
            if self.signer.enabled:
                request["payload_digest"] = digest(data)

    def _publish(self, job: Job, request: dict[str, Any], options: JobOptions) -> None:
        """The job's first event ("queued") and its task message, and follow the job."""
        queued = {"type": "status", "status": "queued", "image": job.image, "queue": job.queue, "kind": job.kind,
                  "label": job.label, "t": job.submitted_at}
        # Flower and the worker's log show the job by its label (shadow) and its options
        # (argsrepr; its environment variables left out), not as celery_nb.run_job with the payload
        shown = {k: v for k, v in options.to_request().items() if k not in ("env", "queue")}
        shadow, argsrepr = f"{job.kind}: {job.label[:80]}", repr(shown)
        if isinstance(self.store, RedisJobStore) and self.app.celery_nb_redis_queues:
            # the job's first event and its task message (on its queue's list) in one round trip;
            # the follower reads on from after that event (the Job already says what it says)
            self._follower.follow(job, cursor=FIRST_EVENT_ID, routed="inbox" in request)
            message = task_message(self.app, request, job.id, job.queue, shadow, argsrepr)
            self.store.first_event(job.id, queued, then=lambda pipe: pipe.lpush(job.queue, message))
        else:
            wake = self._follower.follow(job)
            self.store.append(job.id, queued, wake=wake)
            self.app.send_task(TASK_NAME, args=[request], task_id=job.id, queue=job.queue, shadow=shadow,
                               argsrepr=argsrepr)

    def attach(self, job_id: str) -> Job:
        """See ``Job.attach``."""
        mine = [job for job in self.jobs if job.id.startswith(job_id)]
        if len(mine) == 1:
            return mine[0]
        if not self.embedded:
            job_id = journal.resolve(self.broker_url, job_id)
        events, cursor = self.store.read(job_id, START, timeout=0)
        if not events:
            where = ("the embedded worker of this kernel (its jobs end with the kernel)" if self.embedded
                     else f"the broker {journal.public_url(self.broker_url)}")
            raise UnknownJobError(f"no job {job_id!r} is known to {where}; job events are kept "
                                  f"{DEFAULT_TTL // 3600} h. `%celery_jobs` lists the jobs it knows.")
        queued = events[0]  # the kernel's first event says what the job is
        job = Job(self, job_id, queued["kind"], queued["image"], queued["queue"], queued["label"])
        job.submitted_at = queued["t"]
        for event in events:  # its history so far: logs, progress, status
            job._apply(event)
        if job.finished:
            job.finished_at = job.timings.get("finished", job.finished_at)  # not when it was replayed
            job._complete()
        else:
            self._follower.follow(job, cursor).ring()
        self.jobs.append(job)
        return job

    def known_jobs(self, limit: int = 20) -> list[Job]:
        """This client's jobs and, from the journal, the last ``limit`` jobs that earlier
        kernels sent to the same broker (followed again), oldest first."""
        jobs = {job.id: job for job in self.jobs}
        if not self.embedded:
            earlier = [e for e in journal.entries(self.broker_url) if e.job_id not in jobs][-limit:]
            for entry in earlier:
                try:
                    jobs[entry.job_id] = self.attach(entry.job_id)
                except UnknownJobError:
                    continue  # its events expired
        return sorted(jobs.values(), key=lambda job: job.submitted_at)

    def remote(self, fn: Callable[..., Any] | None = None, *, options: JobOptions | None = None,
               **option_fields: Any) -> Any:
        """Like ``celery_nb.remote`` but submitting through this client."""
        return _remote_decorator(fn, JobOptions.build(options, **option_fields), self)

    def collect(self, job_id: str, inline: bytes | None, ref: dict[str, Any] | None,
                signature: dict[str, Any] | None) -> Any:
        """A finished job's result bundle (see JobBackend.collect)."""
        if ref is not None and "shm" in ref:  # in this kernel's shared memory folder: mapped
            data = self._result_files().take(ref)
        elif ref is not None:
            data = self.blobs.get(ref)
            self.blobs.delete(ref)
        else:  # (below the blob threshold) copied into a writable buffer: the arrays loaded from it are writable
            data = bytearray(inline) if isinstance(inline, bytes) else inline
        if self.signer.enabled:  # what was signed: this job's id, and this kernel's file or these bytes' digest
            content = {"file": ref} if ref is not None and "shm" in ref else {"digest": digest(data)}
            signed = {**(signature if isinstance(signature, dict) else {}), "job_id": job_id, **content}
            try:
                self.signer.check(signed, "this kernel's")
            except SignatureError as problem:
                raise SignatureError(f"the result of job {job_id} {problem}; it was not unpickled") from None
        return data

    def _result_files(self) -> shm.Exchange:
        """This kernel's shared memory folder, where workers of its host leave big results."""
        if self.kernel_files is None:
            raise MissingBlobError("the result is in a shared memory folder of another host, or of a kernel "
                                   "whose folder this one cannot use")
        return self.kernel_files

    def read_blob(self, ref: dict[str, Any]) -> Any:
        """See JobBackend.read_blob."""
        return self.blobs.get(ref)

    def worker_slots(self, queue: str | None = None, timeout: float = 1.0) -> int:
        """How many jobs the workers that take ``queue``'s jobs (default: CeleryNB.default_queue)
        run at once: the embedded worker's concurrency, or the sum over the workers on the broker
        that answer within ``timeout`` seconds (0: none did)."""
        if self.embedded:  # its worker takes every job of this client, whatever its queue
            return self._embedded.concurrency if self._embedded is not None else 0
        queue = queue or settings().default_queue
        replies = self.app.control.broadcast(WORKER_SLOTS_COMMAND, reply=True, timeout=timeout)
        return sum(answer["concurrency"] for reply in replies for answer in reply.values()
                   if isinstance(answer, dict) and queue in answer.get("queues", ()))

    def cancel(self, job_id: str) -> None:
        # The flag stops a running job (its worker checks it while the container runs); the
        # revoke drops a queued one, and the worker reports it cancelled (report_revoked).
        self.store.request_cancel(job_id)
        if not self.embedded:
            self.app.control.revoke(job_id)


_DEFAULT_MAP_JOBS = 32


def _uploads(options: JobOptions) -> Uploads | None:
    """The files ``options.upload`` names (InputError if one is missing), read when the payload is built."""
    return resolve_uploads(options.upload) if options.upload else None


def _function_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", "function")


def map_chunks(items: Sequence[Any], chunksize: int | None = None) -> list[Sequence[Any]]:
    """``items`` in chunks of ``chunksize`` for the jobs of a map (default: about 32 jobs in all)."""
    size = chunksize or max(1, math.ceil(len(items) / _DEFAULT_MAP_JOBS))
    return [items[i:i + size] for i in range(0, len(items), size)]


class RemoteFunction:
    """A function that runs in a container: call it, ``.submit()`` it, or ``.map()`` it."""

    def __init__(self, fn: Callable[..., Any], options: JobOptions, client: Client | None = None) -> None:
        self.fn = fn
        self.options = options
        self.client = client  # None: the default client at call time
        self.__wrapped__ = fn
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", "remote")

    def submit(self, *args: Any, **kwargs: Any) -> Job:
        return (self.client or default_client()).submit(self.fn, *args, kwargs=kwargs, options=self.options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run remotely and wait for the return value."""
        return self.submit(*args, **kwargs).result()

    def map_jobs(self, items: Iterable[Any], chunksize: int | None = None) -> list[Job]:
        """Submit ``fn`` over ``items`` as jobs of ``chunksize`` items each (default: about 32
        jobs in all), so many small items cost a few jobs, not one each. Each job's progress
        counts its items; its result is the list of its items' results."""
        client = self.client or default_client()
        return [client.submit(map_chunk, self.fn, chunk, options=self.options)
                for chunk in map_chunks(list(items), chunksize)]

    def imap(self, items: Iterable[Any], chunksize: int | None = None) -> Iterator[Any]:
        """``fn(item)`` for each item, in order, as soon as its chunk has finished."""
        for job in self.map_jobs(items, chunksize):
            yield from job.result()

    def map(self, items: Iterable[Any], chunksize: int | None = None) -> list[Any]:
        """``[fn(item) for item in items]``, run in parallel chunks; see ``imap``."""
        return list(self.imap(items, chunksize))


_default_client: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client for the current settings (created, and the embedded worker started, on first use)."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            config = settings()
            _default_client = Client(config.broker_url, embedded_workers=config.embedded_workers)
        return _default_client


def submit(fn: Callable[..., Any], *args: Any, kwargs: Mapping[str, Any] | None = None,
           options: JobOptions | None = None, **option_fields: Any) -> Job:
    """Run ``fn(*args, **kwargs)`` in a container; returns a Job at once. Options: ``options``
    with ``option_fields`` (any JobOptions field: image=, memory=, ...) on top."""
    return default_client().submit(fn, *args, kwargs=kwargs, options=options, **option_fields)


def remote(fn: Callable[..., Any] | None = None, *, options: JobOptions | None = None, **option_fields: Any) -> Any:
    """Decorator: ``@remote(image="python:3.11-slim")`` makes calls run in containers. The
    options (any JobOptions field) are checked now, not at the first call."""
    return _remote_decorator(fn, JobOptions.build(options, **option_fields), None)


def _remote_decorator(fn: Callable[..., Any] | None, options: JobOptions, client: Client | None) -> Any:
    if fn is None:
        return lambda f: RemoteFunction(f, options, client)
    return RemoteFunction(fn, options, client)


Job.default_backend = default_client
