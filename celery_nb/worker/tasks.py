"""The Celery task: policy -> container -> relay events -> final event with the result.

The worker never unpickles user data: payload and result are opaque bytes between the
kernel and the container.
"""
from __future__ import annotations

import base64
import codecs
import json
import threading
import time
from typing import Any

from celery_nb.config import format_memory
from celery_nb.errors import CeleryNBError, error_kind
from celery_nb.jobstore import JobStore
from celery_nb.worker import containers
from celery_nb.worker.policy import WorkerPolicy
from celery_nb_runtime import protocol

CANCEL_POLL_INTERVAL = 0.1  # s; cancel and timeout act within this
_RELAYED_EVENT_TYPES = {"progress"}


class JobRun:
    """Runs one job request and writes its events; returns the final status."""

    def __init__(self, store: JobStore, policy: WorkerPolicy, request: dict[str, Any], worker: str) -> None:
        self.store = store
        self.policy = policy
        self.request = request
        self.job_id: str = request["job_id"]
        self.worker = worker
        self.timings: dict[str, float] = {"received": time.time()}
        self._result: bytes | None = None
        self._error: dict[str, Any] | None = None
        self._stderr_tail = bytearray()  # runtime-level failures (no python3, crash before frames)

    def emit(self, event: dict[str, Any], blob: bytes | None = None) -> None:
        self.store.append(self.job_id, {**event, "t": time.time()}, blob)

    def run(self) -> str:
        self.emit({"type": "status", "status": "starting", "worker": self.worker})
        if self.store.cancel_requested(self.job_id):
            return self._finish("cancelled")
        container = None
        try:
            limits = self.policy.limits_for(self.request["image"], self.request.get("limits", {}))
            client = containers.connect()
            containers.ensure_image(client, self.request["image"], self.policy.pull)
            container = containers.JobContainer(
                client, self.request["image"], limits, self.request.get("env", {}),
                labels={containers.LABEL_JOB: self.job_id, containers.LABEL_TASK: self.job_id,
                        containers.LABEL_WORKER: self.worker})
            container.create(base64.b64decode(self.request["payload"]))
            chunks = container.stream()
            self.timings["started"] = time.time()
            self.emit({"type": "status", "status": "running", "worker": self.worker})
            return self._supervise(container, chunks)
        except CeleryNBError as exc:
            self._error = {"kind": error_kind(exc), "message": str(exc)}
            return self._finish("failed")
        except Exception as exc:  # never leave the kernel waiting on a job that died here
            self._error = {"kind": "container", "message": (
                f"the worker {self.worker} failed while running the job: {type(exc).__name__}: {exc}")}
            return self._finish("failed")
        finally:
            if container is not None:
                container.remove()

    def _supervise(self, container: containers.JobContainer, chunks: Any) -> str:
        reader = threading.Thread(target=self._relay, args=(chunks,), daemon=True)
        reader.start()
        deadline = (time.monotonic() + container.limits.timeout) if container.limits.timeout else None
        stopped_by = None
        while reader.is_alive():
            reader.join(CANCEL_POLL_INTERVAL)
            if not reader.is_alive():
                break
            if self.store.cancel_requested(self.job_id):
                stopped_by = "cancel"
            elif deadline is not None and time.monotonic() > deadline:
                stopped_by = "timeout"
            if stopped_by:
                container.kill()
                reader.join(5)
                break
        exit_status = container.wait()
        self.timings["exited"] = time.time()
        if stopped_by == "cancel":
            return self._finish("cancelled")
        if stopped_by == "timeout":
            self._error = {"kind": "timeout", "message": (
                f"the job exceeded its timeout of {container.limits.timeout:g} s and its container was "
                f"killed; raise --timeout if it needs longer")}
        elif self._result is not None:
            return self._finish("succeeded")
        elif self._error is None:
            self._error = self._explain_exit(container, exit_status)
        return self._finish("failed")

    def _explain_exit(self, container: containers.JobContainer, status: containers.ExitStatus) -> dict[str, Any]:
        if status.oom_killed or status.code == 137:
            return {"kind": "oom", "message": (
                f"the job ran out of memory: its container exceeded the --memory limit of "
                f"{format_memory(container.limits.memory)} and was killed (exit code {status.code}); "
                f"raise --memory or process the data in smaller pieces")}
        stderr = self._stderr_tail.decode("utf-8", "replace").strip()
        if status.code == 127 or "No such file or directory" in stderr and "python3" in stderr:
            return {"kind": "container", "message": (
                f"image {container.image!r} has no python3 on its PATH; celery_nb needs an image with "
                f"Python 3.9 or newer")}
        return {"kind": "container", "message": (
            f"the container of image {container.image!r} exited with code {status.code} without a "
            f"result" + (f"; its last output:\n{stderr[-2000:]}" if stderr else ""))}

    def _relay(self, chunks: Any) -> None:
        """Decode the runtime's frames into events (runs on its own thread)."""
        decoder = protocol.FrameDecoder()
        text = {protocol.FRAME_STDOUT: ("stdout", codecs.getincrementaldecoder("utf-8")("replace")),
                protocol.FRAME_STDERR: ("stderr", codecs.getincrementaldecoder("utf-8")("replace"))}
        try:
            for out, err in chunks:
                if err:
                    self._stderr_tail = (self._stderr_tail + err)[-8192:]
                    self.emit({"type": "log", "stream": "stderr", "text": err.decode("utf-8", "replace")})
                if not out:
                    continue
                for kind, body in decoder.feed(out):
                    if kind in text:
                        stream, dec = text[kind]
                        chunk = dec.decode(body)
                        if chunk:
                            self.emit({"type": "log", "stream": stream, "text": chunk})
                    elif kind == protocol.FRAME_EVENT:
                        event = json.loads(body)
                        if event.get("type") in _RELAYED_EVENT_TYPES:
                            self.emit(event)
                    elif kind == protocol.FRAME_RESULT:
                        self._result = body
                    elif kind == protocol.FRAME_ERROR:
                        self._error = json.loads(body)
        except protocol.ProtocolError as exc:
            self._error = {"kind": "container", "message": f"the container's runtime channel broke: {exc}"}

    def _finish(self, status: str) -> str:
        self.timings["finished"] = time.time()
        self.emit({"type": "done", "status": status, "error": self._error, "worker": self.worker,
                   "timings": self.timings}, blob=self._result if status == "succeeded" else None)
        return status


def run_job(request: dict[str, Any], store: JobStore, policy: WorkerPolicy, worker: str) -> dict[str, Any]:
    """Celery task body (registered by celery_nb.worker.app.make_app)."""
    status = JobRun(store, policy, request, worker).run()
    return {"job_id": request["job_id"], "status": status, "image": request["image"]}
