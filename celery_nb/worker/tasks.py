"""The Celery task: policy -> container -> relay events -> final event with the result.

The worker never unpickles user data: payload and result are opaque bytes between the
kernel and the container.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import mmap
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from dataclasses import dataclass

from celery_nb import shm
from celery_nb.blobs import BLOB_THRESHOLD, BlobStore
from celery_nb.broker import acked_with_its_job, unacked_records
from celery_nb.errors import CeleryNBError, ImageNotFoundError, InputError, JobCancelled, SignatureError, error_kind
from celery_nb.jobstore import LEASE, Claim, JobStore
from celery_nb.options import JobOptions, format_memory, format_size
from celery_nb.signing import Signer, digest
from celery_nb.worker import docker_api
from celery_nb.worker import handover
from celery_nb.worker.channel import ContainerExited, ExitStatus, RuntimeContainer
from celery_nb.worker.codecache import CodeCache
from celery_nb.worker.environments import Environment, Environments
from celery_nb.worker.leases import LeaseKeeper
from celery_nb.worker.logs import JobLog
from celery_nb.worker.policy import ContainerSpec, JobPlan, WorkerPolicy
from celery_nb.worker.pool import ContainerPool
from celery_nb.worker.settings import WorkerSettings
from celery_nb_runtime import protocol

CANCEL_POLL_INTERVAL = 0.1  # s; cancel and timeout act within this, and a running job is reported within it
_END_GRACE = 5.0  # s a job's process may take to exit after its result, before its container is dropped
# display: rich output, at most ~1 MiB each (the runtime sees to it); downloads: the files the job sends back
_RELAYED_EVENT_TYPES = {"progress", "display", "downloads"}
_HELD_POLL_INTERVAL = 1.0  # s; how often a job delivered twice checks on the run that holds it
_LOG_STREAMS = {protocol.FRAME_STDOUT: "stdout", protocol.FRAME_STDERR: "stderr"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerServices:
    """What every job of a worker uses."""

    store: JobStore
    blobs: BlobStore
    policy: WorkerPolicy
    pool: ContainerPool
    signer: Signer
    leases: LeaseKeeper
    code: CodeCache
    environments: Environments
    acks_with_finish: bool = False  # a job's end acks its broker message (kombu's Redis transport: broker.unacked_records)


class JobRun:
    """Runs one job request and writes its events; returns the final status."""

    def __init__(self, services: WorkerServices, request: dict[str, Any], worker: str,
                 delivery_tag: str | None = None) -> None:
        self.store = services.store
        self.leases = services.leases
        self.blobs = services.blobs
        self.policy = services.policy
        self.pool = services.pool
        self.signer = services.signer
        self.code = services.code
        self.environments = services.environments
        self.acks_with_finish = services.acks_with_finish
        self.request = request
        self.job_id: str = request["job_id"]
        self.worker = worker
        self.run_id = f"{worker}/{uuid.uuid4().hex[:12]}"  # this run's hold on the job's lease
        self.delivery_tag = delivery_tag  # of the broker message, kept unacked until the job ends
        self.timings: dict[str, float] = {"received": time.time()}
        self._starting: dict[str, Any] | None = {"type": "status", "status": "starting", "worker": worker,
                                                 "t": self.timings["received"]}
        # a warm job's start, reported only once it has run for CANCEL_POLL_INTERVAL (most end within
        # milliseconds, and their "done" says the same): one event batch, and one wake of the kernel, less per job
        self._held_back: list[dict[str, Any]] | None = None
        self._next_look = 0.0  # (monotonic) when the running job is next looked at (_look)
        self._container: str | None = None  # "warm" or "cold", once it has one
        self._container_id: str | None = None  # its Docker id
        self._environment: Environment | None = None  # of a job that asks for packages, once known
        self._attempt: int | None = None
        self._result: Any = None  # the result bundle (bytes-like), or the handover.SharedFile it was written into
        self._payload_file: int | None = None  # a big payload's file, handed over when the job's process asks
        self._result_file: handover.SharedFile | None = None  # handed over for a big result
        self._returning = False  # announced to the pool as coming back
        self._error: dict[str, Any] | None = None
        self._usage: dict[str, Any] | None = None  # what the job used (its container's memory limit with it)
        self._process: str | None = None  # the key of the job processes it may share (_process_key)
        self.log = JobLog(self.store, self.blobs, self.job_id, self.pool.settings, before_write=self._take_held_back)

    def emit(self, event: dict[str, Any]) -> None:
        """Write ``event`` after what the job printed before it (a display's output goes first), in
        one round trip with it."""
        self.log.flush(now=event["type"] != "progress", then=[{**event, "t": time.time()}])

    def _report_starting(self) -> None:
        """The "starting" event, once."""
        if self._starting:
            self.store.append(self.job_id, self._starting)
            self._starting = None

    def _report_held_back(self) -> None:
        """A warm job's start events, once it turns out not to be over at once."""
        held_back = self._take_held_back()
        if held_back:
            self.store.append_many(self.job_id, held_back)

    def _take_held_back(self) -> list[dict[str, Any]]:
        """The start events held back, to be written now (first in the next write)."""
        held_back, self._held_back = self._held_back or [], None
        return held_back

    def run(self) -> str:
        self.store.route(self.job_id, self.request.get("inbox"))  # its kernel's (checked: an inbox's key)
        try:
            return self._checked_run()
        finally:
            self.store.route(self.job_id, None)

    def _checked_run(self) -> str:
        try:
            self.signer.check(self.request, "the worker's")
        except SignatureError as refusal:
            log.warning("celery_nb: refused job %s: its request %s", self.job_id, refusal)
            self._error = {"kind": "signature",
                           "message": f"worker {self.worker} refused job {self.job_id}: its request {refusal}; nothing ran"}
            return self._finish("failed")
        self.leases.keep(self.run_id, self.job_id, self.delivery_tag, holder=False)
        try:
            plan: JobPlan | CeleryNBError = self.policy.plan(JobOptions.from_request(self.request["options"]))
        except CeleryNBError as refusal:
            plan = refusal  # reported once the job is claimed
        if isinstance(plan, JobPlan) and plan.requirements:  # its environment, if this process knows it already
            self._environment = self.environments.cached(plan.container.image, plan.requirements)
        if isinstance(plan, JobPlan):
            self._process = self._process_key(plan)
        warm = (self.pool.checkout(self._spec(plan), self._process) if isinstance(plan, JobPlan) and not plan.fresh
                and (self._environment is not None or not plan.requirements) else None)
        try:
            claim, warm = self._claim(warm)
            if claim.outcome == "done":  # a message delivered again after its job had ended
                log.info("celery_nb: job %s has already finished; its message delivered again is dropped", self.job_id)
                drop_payload(self.blobs, self.request, lambda: self._kernel_files)
                return "duplicate"
            if claim.outcome == "cancelled":  # also covers a worker that missed the revoke broadcast
                return self._finish("cancelled")
            self.leases.keep(self.run_id, self.job_id, self.delivery_tag, holder=True)
            self._attempt = self._starting["attempt"] = claim.attempt
            if warm is not None:
                self._held_back = self._start_events("warm", warm)
                self._starting = None
            if claim.attempt > 1:
                log.warning("celery_nb: job %s runs again (attempt %d): its previous run's worker stopped",
                            self.job_id, claim.attempt)
            return self._run(plan, warm)
        finally:
            self.leases.drop(self.run_id)

    def _claim(self, warm: RuntimeContainer | None) -> tuple[Claim, RuntimeContainer | None]:
        """Take the job's lease (waiting for a run that holds it); a warm container checked out
        for a job this run does not get goes back to the pool, not lost with this run."""
        try:
            claim = self.store.claim(self.job_id, self.run_id, LEASE, self.delivery_tag)
        except BaseException:
            if warm is not None:
                self.pool.checkin(warm, ran=False)
            raise
        if claim.outcome != "run" and warm is not None:
            self.pool.checkin(warm, ran=False)
            warm = None
        if claim.outcome == "held":
            claim = self._wait_for_holder(claim.holder)
        return claim, warm

    def _start_events(self, container: str, runtime: RuntimeContainer) -> list[dict[str, Any]]:
        """The "starting" event (unless reported) and "running", timed now: the request goes
        to the container (``runtime``, a ``container`` one: "warm" or "cold") next."""
        self._container = container
        self._container_id = runtime.container.id
        running = {"type": "status", "status": "running", "worker": self.worker, "container": container,
                   "container_id": self._container_id, "t": time.time(), **self._environment_state()}
        self.timings["started"] = running["t"]
        return [self._starting, running] if self._starting else [running]

    def _wait_for_holder(self, holder: str) -> Claim:
        """The job was delivered twice and another run holds it: wait until that run ends the
        job or stops renewing its lease (its worker died), then claim again."""
        log.info("celery_nb: job %s is held by %s; waiting for it to end", self.job_id, holder)
        while True:
            time.sleep(_HELD_POLL_INTERVAL)
            claim = self.store.claim(self.job_id, self.run_id, LEASE, self.delivery_tag)
            if claim.outcome != "held":
                return claim

    def _run(self, plan: JobPlan | CeleryNBError, runtime: RuntimeContainer | None) -> str:
        """Run the claimed job as ``plan`` says (or report the policy's refusal): in ``runtime``
        (a warm container, its start events held back) or in a container started now."""
        reusable = False
        try:
            if isinstance(plan, CeleryNBError):
                raise plan
            if runtime is not None:
                self._send(runtime, plan)
            else:
                self._report_starting()  # a container start takes a while: say so now
                runtime = self._start_cold(plan)
                self._send(runtime, plan)
                self.store.append_many(self.job_id, self._start_events("cold", runtime))
            status, reusable = self._supervise(runtime, plan.timeout)
            return status
        except JobCancelled:  # while its environment was being built
            return self._finish("cancelled")
        except CeleryNBError as exc:
            self._error = {"kind": error_kind(exc), "message": str(exc)}
            return self._finish("failed")
        except Exception as exc:  # never leave the kernel waiting on a job that died here
            self._error = {"kind": "container", "message": (
                f"the worker {self.worker} failed while running the job: {type(exc).__name__}: {exc}")}
            return self._finish("failed")
        finally:
            self._release_files()  # (also of a run another one superseded)
            if runtime is not None:
                if reusable and not runtime.one_shot:
                    self.pool.checkin(runtime, was_returning=self._returning)
                else:
                    self.pool.discard(runtime, was_returning=self._returning)

    def _spec(self, plan: JobPlan) -> ContainerSpec:
        """The job's container: of its plan, in its environment once that is known."""
        return plan.container if self._environment is None else self._environment.container(plan.container)

    def _start_cold(self, plan: JobPlan) -> RuntimeContainer:
        """A new container for the job; its environment is built first if it needs one, and
        again if it was removed since this process last used it."""
        try:
            return self._start_container(plan)
        except ImageNotFoundError:
            if self._environment is None:
                raise
            self.environments.forget(self._environment)  # pruned meanwhile
            self._environment = None
            return self._start_container(plan)

    def _start_container(self, plan: JobPlan) -> RuntimeContainer:
        if plan.requirements and self._environment is None:
            self._environment = self.environments.ensure(plan.container.image, plan.requirements, _BuildProgress(self))
            if "building" in self.timings:
                self.timings["built"] = time.time()
        runtime = docker_api.create_container(
            docker_api.connect(), self._spec(plan), labels={docker_api.LABEL_WORKER: self.worker},
            pull="never" if self._environment else self.policy.pull,  # an environment's image is this host's own
            one_shot=plan.fresh or not self.pool.settings.pool_size)
        self._container_id = runtime.container.id  # reported even if it does not start
        try:
            docker_api.start(runtime)
        except BaseException:
            runtime.remove()
            raise
        return runtime

    def _environment_state(self) -> dict[str, str]:
        """What the job's events say of its environment: "cached" (this host had it) or "built"."""
        return {"environment": self._environment.state} if self._environment is not None else {}

    def _supervise(self, runtime: RuntimeContainer, timeout: float | None) -> tuple[str, bool]:
        """Relay frames until the job ends; returns (status, container reusable).

        The job is reported done as soon as its result or error frame arrives; the END frame
        (the job's process has exited) only decides whether the container can be reused.
        """
        deadline = time.monotonic() + timeout if timeout else None  # this job's, not the container's first
        self._next_look = time.monotonic() + CANCEL_POLL_INTERVAL
        status: str | None = None
        end: dict[str, Any] | None = None
        while end is None:
            try:
                wait = self._next_look - time.monotonic() if status is None else CANCEL_POLL_INTERVAL
                frames = runtime.read_frames(min(max(wait, 0.001), CANCEL_POLL_INTERVAL))
            except ContainerExited:
                break
            for kind, body in frames:
                if kind == protocol.FRAME_END:
                    end = json.loads(body)
                    runtime.ended(end)
                    break
                self._relay(runtime, kind, body)
                if status is None and (self._result is not None or self._error is not None):
                    self.timings["exited"] = time.time()
                    if not runtime.one_shot:
                        self.pool.returning(runtime)  # a job arriving meanwhile waits for it
                        self._returning = True
                    status = self._finish("succeeded" if self._result is not None else "failed")
                    deadline = time.monotonic() + _END_GRACE
            if end is not None:
                break
            self.log.flush(now=False)
            if status is None and time.monotonic() >= self._next_look:
                stopped = self._look(runtime)
                if stopped is not None:
                    return stopped, False
            if deadline is not None and time.monotonic() > deadline:
                runtime.kill()
                if status is not None:  # reported, but its process would not exit
                    return status, False
                self._error = {"kind": "timeout", "message": (
                    f"the job exceeded its timeout of {timeout:g} s and its container was killed; "
                    f"raise --timeout if it needs longer")}
                return self._finish("failed"), False
        if status is not None:
            return status, end is not None
        self.timings["exited"] = time.time()
        if end is None:  # the container itself died: OOM of the server, no python3, ...
            self._error = self._explain_exit(runtime, runtime.exit_status())
            return self._finish("failed"), False
        self._usage = _usage_in(runtime, end["usage"])  # its process ended before it could report
        self._error = self._explain_end(runtime, end)
        # after an OOM kill the container is dropped too: no container outlives a timeout, OOM or cancel
        return self._finish("failed"), self._error["kind"] != "oom"

    def _look(self, runtime: RuntimeContainer) -> str | None:
        """Every CANCEL_POLL_INTERVAL while the job runs (one that ends sooner costs no round trip
        for it): its start reported, if held back, and whether it was cancelled or another worker
        took it over; then its container is killed and this returns how the run ended."""
        self._next_look = time.monotonic() + CANCEL_POLL_INTERVAL
        self._report_held_back()
        if self.store.cancel_requested(self.job_id):
            runtime.kill()
            return self._finish("cancelled")
        if self.leases.lost(self.run_id):  # another worker runs it now
            runtime.kill()
            log.warning("celery_nb: job %s was taken over by another worker; this run stops", self.job_id)
            return "superseded"
        return None

    def _explain_end(self, runtime: RuntimeContainer, end: dict[str, Any]) -> dict[str, Any]:
        """The job's process ended without a result or an error report."""
        if end.get("oom_kills") or end.get("signal") == 9:
            return _out_of_memory(runtime, "the job's process was killed", self._usage)
        how = f"signal {end['signal']}" if end.get("signal") else f"exit code {end.get('exit')}"
        return {"kind": "container", "message": f"the job's process in image {runtime.spec.image!r} ended with {how} "
                                                f"without a result (see its output above)"}

    def _explain_exit(self, runtime: RuntimeContainer, status: ExitStatus) -> dict[str, Any]:
        if status.oom_killed or status.code == 137:
            return _out_of_memory(runtime, f"its container was killed (exit code {status.code})", None)
        stderr = runtime.stderr_tail.decode("utf-8", "replace").strip()
        if status.code == 127:
            return {"kind": "container", "message": (
                f"image {runtime.spec.image!r} has no python3 on its PATH; celery_nb needs an image with "
                f"Python 3.9 or newer")}
        return {"kind": "container", "message": (
            f"the container of image {runtime.spec.image!r} exited with code {status.code} without a "
            f"result" + (f"; its last output:\n{stderr[-2000:]}" if stderr else ""))}

    def _send(self, runtime: RuntimeContainer, plan: JobPlan) -> None:
        """The job's request to ``runtime``: env, the job's payload (a big one is handed over as a
        file where the worker can, when the job's process asks), the code of the kernel's local
        modules, and the key of the process it may share."""
        payload = self._payload(runtime.reachable)
        code = [self.code.get(module) for module in self.request.get("code", ())]
        runtime.send(payload, plan.env, code, None if runtime.one_shot else self._process)

    def _process_key(self, plan: JobPlan) -> str | None:
        """The key of the job processes this job may share, kept by a container after a job: its
        client's jobs with the same env and local modules (the rest of what they run with is the
        container's). None: a process of its own."""
        client = self.request.get("client")
        if client is None or plan.new_process:
            return None
        return hashlib.sha256(repr((client, sorted(plan.env.items()), self.request.get("code", []))).encode()).hexdigest()

    @functools.cached_property
    def _kernel_files(self) -> shm.Exchange | None:
        """The kernel's shared memory folder, where this worker shares its host and may use it."""
        return kernel_files(self.pool.settings, self.request)

    def _payload(self, as_file: bool) -> Any:
        """The job's payload bundle (bytes-like; one from the blob store checked against its signed
        digest); None once it is ready to be handed over as a file (``as_file``)."""
        if "payload_shm" in self.request:  # (signed by its name: see celery_nb.signing)
            self._payload_file = self._kernel_payload_file()
            if as_file:
                return None
            return mmap.mmap(self._payload_file, self.request["payload_shm"]["size"], prot=mmap.PROT_READ)
        if "payload_ref" not in self.request:
            return base64.b64decode(self.request["payload"])
        payload = self.blobs.get(self.request["payload_ref"])
        if self.signer.enabled and digest(payload) != self.request.get("payload_digest"):
            raise SignatureError(f"the payload of job {self.job_id} in the blob store does not match its "
                                 f"signed request: it was altered; nothing ran")
        if not as_file:
            return payload
        self._payload_file = handover.memory_file_of(payload)
        return None

    def _kernel_payload_file(self) -> int:
        """The payload file the kernel left in its shared memory folder."""
        if self._kernel_files is None:
            raise InputError(
                f"the payload of job {self.job_id} is in shared memory on its kernel's host, which worker "
                f"{self.worker} does not share (every live worker of queue {self.request['options'].get('queue')!r} "
                f"was on that host when the job was sent); send the job again, and it goes through the blob store")
        return self._kernel_files.open(self.request["payload_shm"])

    def _hand_over(self, runtime: RuntimeContainer, wanted: dict[str, Any]) -> None:
        """Give the job's process the file it asks for: its payload's, or a new one of the size of
        its result, in the kernel's shared memory folder where this worker shares it (the kernel
        maps it), else in this process's memory (sent on to the blob store); or none if there is
        no room, and the result comes through the frame stream."""
        if wanted.get("for") == "payload":
            handover.hand_over(runtime, wanted, self._payload_file)
            return
        size = int(wanted["size"])
        try:
            reserved = self._kernel_files.reserve(size) if self._kernel_files is not None else None
            fd, ref = reserved or (handover.memory_file(size), None)
        except OSError as exc:
            log.warning("celery_nb: no file for the %d-byte result of job %s (%s); it comes through the "
                        "container's stream", size, self.job_id, exc)
            handover.hand_over(runtime, wanted, None)
            return
        self._drop_result_file()
        self._result_file = handover.SharedFile(fd, size, ref)
        handover.hand_over(runtime, wanted, fd)

    def _drop_result_file(self) -> None:
        """The file handed over for a result that did not end up in it (or was not used)."""
        if self._result_file is not None:
            self._result_file.close()
            if self._result_file.ref is not None:
                self._kernel_files.delete(self._result_file.ref)
            self._result_file = None

    def _relay(self, runtime: RuntimeContainer, kind: int, body: bytes) -> None:
        """One frame of the runtime as an event (or the kept result/error)."""
        if kind in _LOG_STREAMS:
            self.log.add(_LOG_STREAMS[kind], body)
        elif kind == protocol.FRAME_EVENT:
            event = json.loads(body)
            if event.get("type") in _RELAYED_EVENT_TYPES:
                self.emit(event)
        elif kind == protocol.FRAME_RESULT:
            self._drop_result_file()  # asked for, but not used
            self._result = body
        elif kind == protocol.FRAME_RESULT_FILE:
            self._result = self._result_file  # written into it
        elif kind == protocol.FRAME_FILE_WANTED:
            self._hand_over(runtime, json.loads(body))
        elif kind == protocol.FRAME_ERROR:
            self._error = json.loads(body)
        elif kind == protocol.FRAME_USAGE:
            self._usage = _usage_in(runtime, json.loads(body))

    def _finish(self, status: str) -> str:
        self._report_starting()
        self.log.finish()  # (output still pending goes after the held-back start events: a job that printed ran)
        self._held_back = None  # the done event tells the same
        self.timings["finished"] = time.time()
        done = {"type": "done", "status": status, "error": self._error, "worker": self.worker, "timings": self.timings,
                "container": self._container, "container_id": self._container_id, "attempt": self._attempt,
                "usage": self._usage, **self._environment_state()}
        result = self._result if status == "succeeded" else None
        if result is not None:
            # (a mapping outlives its file's descriptor, which storing the result closes)
            stored = ((result.contents() if isinstance(result, handover.SharedFile) else result)
                      if self.signer.enabled else None)
            result, ref = self._stored_result(result)
            done.update({"result_ref": ref} if ref else {})
            if self.signer.enabled:  # checked by the kernel before it unpickles: a file in its shared
                # memory folder by its name (see celery_nb.signing), other bytes by their digest
                content = {"file": ref} if ref is not None and "shm" in ref else {"digest": digest(stored)}
                done["result_sig"] = self.signer.sign({"job_id": self.job_id, **content})
        self._release_files()
        message = unacked_records(self.delivery_tag) if self.acks_with_finish and self.delivery_tag else None
        finished = self.store.finish(self.job_id, {**done, "t": time.time()}, blob=result, message=message)
        if message is not None:
            acked_with_its_job(message[2])
        if not finished:
            log.warning("celery_nb: job %s was finished by another run first; this run's end (%s) is dropped",
                        self.job_id, status)
            if "result_ref" in done:
                delete_blob(self.blobs, lambda: self._kernel_files, done["result_ref"])
            return "superseded"
        drop_payload(self.blobs, self.request, lambda: self._kernel_files)  # only the run that ends the job
        return status

    def _stored_result(self, result: Any) -> tuple[Any, dict[str, Any] | None]:
        """(the result bundle inside the done event, or the reference of where it is kept): a big one
        in the kernel's shared memory folder where this worker shares it, else in the blob store;
        collected (and deleted) by the kernel."""
        if isinstance(result, handover.SharedFile):
            self._result_file = None  # kept, not dropped
            ref = result.ref or self.blobs.put([result.contents()])
            result.close()
            return None, ref
        if memoryview(result).nbytes <= BLOB_THRESHOLD:
            return result, None
        in_kernel_files = self._kernel_files.put([result]) if self._kernel_files is not None else None
        return None, in_kernel_files or self.blobs.put([result])

    def _release_files(self) -> None:
        """Close the job's files: its payload's, and one handed over for a result it did not end with."""
        if self._payload_file is not None:
            os.close(self._payload_file)
            self._payload_file = None
        self._drop_result_file()


def _usage_in(runtime: RuntimeContainer, measured: dict[str, Any]) -> dict[str, Any]:
    """A job's usage as the runtime measured it, with the memory limit of the container it ran in."""
    return {**measured, "memory_limit": runtime.spec.memory}


class _BuildProgress:
    """What the build of a job's environment tells the job: "building", the installer's
    output as log lines, and whether it was cancelled meanwhile."""

    def __init__(self, run: JobRun) -> None:
        self.run = run

    def started(self) -> None:
        self.run.timings["building"] = time.time()
        self.run.emit({"type": "status", "status": "building", "worker": self.run.worker})

    def output(self, text: str) -> None:
        self.run.emit({"type": "log", "stream": "stdout", "text": text})

    def cancelled(self) -> bool:
        return self.run.store.cancel_requested(self.run.job_id)


def _out_of_memory(runtime: RuntimeContainer, what: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    peak = f" (the job's processes peaked at {format_size(usage['peak_memory'])})" if usage else ""
    return {"kind": "oom", "message": (
        f"the job ran out of memory: {what} for exceeding the --memory limit of "
        f"{format_memory(runtime.spec.memory)}{peak}; raise --memory or process the data in smaller pieces")}


def kernel_files(settings: WorkerSettings, request: dict[str, Any]) -> shm.Exchange | None:
    """The shared memory folder of the kernel that sent ``request``, where this worker shares its
    host (and ``settings`` let it) and may use the folder."""
    return shm.Exchange.of(request.get("kernel_shm")) if settings.kernel_shared_memory else None


def delete_blob(blobs: BlobStore, kernel_files: Callable[[], shm.Exchange | None], ref: dict[str, Any]) -> None:
    """Delete a payload or result kept by reference: in the blob store, or a kernel's shared memory
    file (``kernel_files``: that kernel's folder, looked for only then)."""
    if "shm" not in ref:
        blobs.delete(ref)
    elif (files := kernel_files()) is not None:
        files.delete(ref)


def drop_payload(blobs: BlobStore, request: dict[str, Any], kernel_files: Callable[[], shm.Exchange | None]) -> None:
    """Delete a big payload kept by reference: its job has ended."""
    for key in ("payload_ref", "payload_shm"):
        if key in request:
            delete_blob(blobs, kernel_files, request[key])


def report_revoked(services: WorkerServices, job_id: str, worker: str, request: dict[str, Any] | None) -> None:
    """A job cancelled while queued: Celery dropped its message; its kernel still hears of it."""
    now = time.time()
    services.store.route(job_id, (request or {}).get("inbox"))
    if services.store.finish(job_id, {"type": "done", "status": "cancelled", "error": None, "worker": worker,
                                      "timings": {"received": now, "finished": now}, "t": now}) and request:
        drop_payload(services.blobs, request, lambda: kernel_files(services.pool.settings, request))


def run_job(request: dict[str, Any], services: WorkerServices, worker: str,
            delivery_tag: str | None = None) -> dict[str, Any]:
    """Celery task body (registered by celery_nb.worker.app.make_app)."""
    status = JobRun(services, request, worker, delivery_tag).run()
    return {"job_id": request["job_id"], "status": status}
