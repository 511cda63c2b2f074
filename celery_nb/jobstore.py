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
import uuid
from typing import Any, Protocol

import redis

Event = dict[str, Any]
START = "0"  # cursor before the first event
DEFAULT_TTL = 24 * 3600  # seconds a finished job's events stay readable


class JobStore(Protocol):
    def append(self, job_id: str, event: Event, blob: bytes | None = None, wake: Waker | None = None) -> None:
        """Append an event (``blob``: binary attachment, read back as event["blob"]); ring
        ``wake`` in the same round trip."""

    def append_many(self, job_id: str, events: list[Event]) -> None:
        """Append several events at once (one round trip)."""

    def read(self, job_id: str, cursor: str, timeout: float) -> tuple[list[Event], str]:
        """Events after ``cursor`` (waiting up to ``timeout`` s for one) and the new cursor."""

    def read_many(self, cursors: dict[str, str], timeout: float, wake: Waker) -> dict[str, tuple[list[Event], str]]:
        """New events of several jobs at once, waiting up to ``timeout`` s for any of them or
        for ``wake`` to be rung; only jobs with events are in the answer."""

    def waker(self) -> Waker:
        """A bell that interrupts read_many (to make it read a newly followed job)."""

    def request_cancel(self, job_id: str) -> None: ...

    def cancel_requested(self, job_id: str) -> bool: ...

    local: bool
    """True when the store lives in this process (its calls cost no round trip)."""


class Waker(Protocol):
    def ring(self) -> None: ...


class MemoryJobStore:
    """In-process store for the embedded worker."""

    local = True

    def __init__(self) -> None:
        self._events: dict[str, list[Event]] = {}
        self._cancelled: set[str] = set()
        self._changed = threading.Condition()
        self._rings = 0

    def append(self, job_id: str, event: Event, blob: bytes | None = None, wake: Waker | None = None) -> None:
        event = {**event, "blob": blob} if blob is not None else dict(event)
        with self._changed:
            self._events.setdefault(job_id, []).append(event)
            if wake is not None:
                self._rings += 1
            self._changed.notify_all()

    def append_many(self, job_id: str, events: list[Event]) -> None:
        for event in events:
            self.append(job_id, event)

    def read(self, job_id: str, cursor: str, timeout: float) -> tuple[list[Event], str]:
        return self.read_many({job_id: cursor}, timeout, self.waker()).get(job_id, ([], cursor))

    def read_many(self, cursors: dict[str, str], timeout: float, wake: Waker) -> dict[str, tuple[list[Event], str]]:
        deadline = time.monotonic() + timeout
        with self._changed:
            rings = self._rings
            while True:
                found = {job_id: self._events[job_id][int(cursor):] for job_id, cursor in cursors.items()
                         if len(self._events.get(job_id, ())) > int(cursor)}
                remaining = deadline - time.monotonic()
                if found or remaining <= 0 or self._rings != rings:
                    return {job_id: (events, str(int(cursors[job_id]) + len(events))) for job_id, events in found.items()}
                self._changed.wait(remaining)

    def waker(self) -> Waker:
        return _MemoryWaker(self)

    def _ring(self) -> None:
        with self._changed:
            self._rings += 1
            self._changed.notify_all()

    def request_cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancelled


class _MemoryWaker:
    def __init__(self, store: MemoryJobStore) -> None:
        self._store = store

    def ring(self) -> None:
        self._store._ring()


class _RedisWaker:
    """A tiny stream of its own that the follower's XREAD also watches."""

    def __init__(self, client: redis.Redis) -> None:
        self.key = f"celery_nb:wake:{uuid.uuid4().hex}"
        self.cursor = "0"
        self._redis = client

    def ring(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        self.ring_in(pipe)
        pipe.execute()

    def ring_in(self, pipe: Any) -> None:
        pipe.xadd(self.key, {"w": 1}, maxlen=10, approximate=True)
        pipe.expire(self.key, 3600)


class RedisJobStore:
    """Redis streams (``celery_nb:events:<job>``) and flags, expiring after ``ttl`` seconds."""

    local = False

    def __init__(self, url: str, ttl: int = DEFAULT_TTL) -> None:
        self._redis = redis.Redis.from_url(url)
        self._ttl = ttl

    @staticmethod
    def _events_key(job_id: str) -> str:
        return f"celery_nb:events:{job_id}"

    @staticmethod
    def _cancel_key(job_id: str) -> str:
        return f"celery_nb:cancel:{job_id}"

    def append(self, job_id: str, event: Event, blob: bytes | None = None, wake: Waker | None = None) -> None:
        fields: dict[str, Any] = {"e": json.dumps(event)}
        if blob is not None:
            fields["b"] = blob
        self._xadd(job_id, [fields], wake)

    def append_many(self, job_id: str, events: list[Event]) -> None:
        self._xadd(job_id, [{"e": json.dumps(event)} for event in events])

    def _xadd(self, job_id: str, entries: list[dict[str, Any]], wake: Waker | None = None) -> None:
        key = self._events_key(job_id)
        pipe = self._redis.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(key, fields)
        pipe.expire(key, self._ttl)
        if isinstance(wake, _RedisWaker):
            wake.ring_in(pipe)
        pipe.execute()

    def read(self, job_id: str, cursor: str, timeout: float) -> tuple[list[Event], str]:
        return self.read_many({job_id: cursor}, timeout, self.waker()).get(job_id, ([], cursor))

    def read_many(self, cursors: dict[str, str], timeout: float, wake: Waker) -> dict[str, tuple[list[Event], str]]:
        assert isinstance(wake, _RedisWaker)
        streams = {self._events_key(job_id): cursor for job_id, cursor in cursors.items()}
        streams[wake.key] = wake.cursor
        # one blocking read for every job: one connection however many jobs run (BLOCK 0 would never return)
        reply = self._redis.xread(streams, block=max(1, int(timeout * 1000)))
        found = {}
        for key, entries in reply:
            key = key.decode()
            if key == wake.key:
                wake.cursor = entries[-1][0].decode()
                continue
            job_id = key[len("celery_nb:events:"):]
            events = []
            for _entry_id, fields in entries:
                event = json.loads(fields[b"e"])
                if b"b" in fields:
                    event["blob"] = fields[b"b"]
                events.append(event)
            found[job_id] = (events, entries[-1][0].decode())
        return found

    def waker(self) -> Waker:
        return _RedisWaker(self._redis)

    def request_cancel(self, job_id: str) -> None:
        self._redis.set(self._cancel_key(job_id), 1, ex=self._ttl)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._redis.exists(self._cancel_key(job_id)))
