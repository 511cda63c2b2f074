"""Per-job event streams and cancel flags, shared by the kernel and the workers.

Every job has one ordered, append-only stream of events (status, log chunks, progress,
final result). The widget, ``Job.logs`` and re-reading a job all replay the same stream.
With a Redis broker the stream is a Redis stream on that server; the embedded default keeps
it in memory (kernel and worker share the process).
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Protocol

import redis

Event = dict[str, Any]
START = "0"  # cursor before the first event
DEFAULT_TTL = 24 * 3600  # seconds a finished job's events stay readable


class JobStore(Protocol):
    def append(self, job_id: str, event: Event, blob: bytes | None = None) -> None:
        """Append an event (``blob``: binary attachment, read back as event["blob"])."""

    def read(self, job_id: str, cursor: str, timeout: float) -> tuple[list[Event], str]:
        """Events after ``cursor`` (waiting up to ``timeout`` s for one) and the new cursor."""

    def request_cancel(self, job_id: str) -> None: ...

    def cancel_requested(self, job_id: str) -> bool: ...


class MemoryJobStore:
    """In-process store for the embedded worker."""

    def __init__(self) -> None:
        self._events: dict[str, list[Event]] = {}
        self._cancelled: set[str] = set()
        self._changed = threading.Condition()

    def append(self, job_id: str, event: Event, blob: bytes | None = None) -> None:
        event = {**event, "blob": blob} if blob is not None else dict(event)
        with self._changed:
            self._events.setdefault(job_id, []).append(event)
            self._changed.notify_all()

    def read(self, job_id: str, cursor: str, timeout: float) -> tuple[list[Event], str]:
        start = int(cursor)
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._events.get(job_id, ())) <= start:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return [], cursor
                self._changed.wait(remaining)
            events = self._events[job_id][start:]
        return events, str(start + len(events))

    def request_cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancelled


class RedisJobStore:
    """Redis streams (``celery_nb:events:<job>``) and flags, expiring after ``ttl`` seconds."""

    def __init__(self, url: str, ttl: int = DEFAULT_TTL) -> None:
        self._redis = redis.Redis.from_url(url)
        self._ttl = ttl

    @staticmethod
    def _events_key(job_id: str) -> str:
        return f"celery_nb:events:{job_id}"

    @staticmethod
    def _cancel_key(job_id: str) -> str:
        return f"celery_nb:cancel:{job_id}"

    def append(self, job_id: str, event: Event, blob: bytes | None = None) -> None:
        fields: dict[str, Any] = {"e": json.dumps(event)}
        if blob is not None:
            fields["b"] = blob
        key = self._events_key(job_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(key, fields)
        pipe.expire(key, self._ttl)
        pipe.execute()

    def read(self, job_id: str, cursor: str, timeout: float) -> tuple[list[Event], str]:
        # BLOCK 0 would wait forever: wait at least 1 ms
        reply = self._redis.xread({self._events_key(job_id): cursor}, block=max(1, int(timeout * 1000)))
        events = []
        for _key, entries in reply:
            for entry_id, fields in entries:
                event = json.loads(fields[b"e"])
                if b"b" in fields:
                    event["blob"] = fields[b"b"]
                events.append(event)
                cursor = entry_id.decode()
        return events, cursor

    def request_cancel(self, job_id: str) -> None:
        self._redis.set(self._cancel_key(job_id), 1, ex=self._ttl)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._redis.exists(self._cancel_key(job_id)))
