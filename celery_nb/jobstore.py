"""Per-job event streams and cancel flags, shared by the kernel and the workers.

Every job has one ordered, append-only stream of events (status, log chunks, progress,
final result). The widget, ``Job.logs`` and re-reading a job all replay the same stream.
With a Redis broker the stream is a Redis stream on that server; the embedded default keeps
it in memory (kernel and worker share the process).
"""
from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

Event = dict[str, Any]
START = "0"  # cursor before the first event
DEFAULT_TTL = 24 * 3600  # seconds a finished job's events stay readable
DEFAULT_PATIENCE = 5.0  # s a kernel retries while Redis is away (its job follower then keeps trying)
_RETRY_CAP = 1.0  # s between two attempts to reach a Redis that went away, at most
LEASE = 6.0  # s a job's lease outlives its worker's last renewal: how soon another worker takes over
RENEW_INTERVAL = 1.5  # s between a live worker's renewals of its jobs' leases
# s a Redis that does not answer (hung, a lost host) may take before a command fails (and is
# retried), unless the URL sets its own (?socket_timeout=...&socket_connect_timeout=...)
REDIS_TIMEOUTS = {"socket_connect_timeout": 10.0, "socket_timeout": 30.0}
LEASES_KEY = "celery_nb:leases"  # sorted set: job id -> when its lease ends (ms, Redis's clock)
DELIVERIES_KEY = "celery_nb:deliveries"  # hash: job id -> delivery tag of its lease holder's broker message
WORKERS_KEY = "celery_nb:workers"  # set: the names of workers that announced themselves (worker_key)


def events_key(job_id: str) -> str:
    return f"celery_nb:events:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"celery_nb:cancel:{job_id}"


def lease_key(job_id: str) -> str:
    return f"celery_nb:lease:{job_id}"


def done_key(job_id: str) -> str:
    return f"celery_nb:done:{job_id}"


def attempts_key(job_id: str) -> str:
    return f"celery_nb:attempts:{job_id}"


def worker_key(worker: str) -> str:
    """What a live worker tells kernels (celery_nb.shm.worker_facts), until its announcement expires."""
    return f"celery_nb:worker:{worker}"


def redis_retry(patience: float) -> Retry:
    """Reconnect and retry for about ``patience`` seconds when Redis goes away (restart,
    failover) before giving up: waits of 0.1, 0.2, 0.4, 0.8, then 1 s."""
    return Retry(ExponentialBackoff(cap=_RETRY_CAP, base=0.05), retries=math.ceil(patience / _RETRY_CAP) + 3)


def connect_redis(url: str, patience: float = DEFAULT_PATIENCE, retry: Retry | None = None) -> redis.Redis:
    """A Redis client of ``url`` (redis://, or rediss:// for TLS with the URL's ssl_cert_reqs,
    ssl_ca_certs, ...), with REDIS_TIMEOUTS and the retries of redis_retry(patience) (or ``retry``)."""
    return redis.Redis.from_url(url, retry=retry or redis_retry(patience), **REDIS_TIMEOUTS)


@dataclass(frozen=True)
class Expired:
    """A job whose lease ended without its run ending it (its worker died), taken over by the
    caller of JobStore.take_over: the broker message of its last holder is to be handed out again."""

    job_id: str
    delivery_tag: str


@dataclass(frozen=True)
class Claim:
    """What a worker that received a job may do with it (JobStore.claim)."""

    outcome: str  # "run" (the lease is ours), "held" (a live run has it), "done" (finished), "cancelled"
    attempt: int = 0  # which run of the job this is (1: the first), for "run"
    holder: str = ""  # who holds the lease, for "held"


class JobStore(Protocol):
    def append(self, job_id: str, event: Event, blob: bytes | None = None, wake: Waker | None = None) -> None:
        """Append an event (``blob``: binary attachment, read back as event["blob"]); ring
        ``wake`` in the same round trip."""

    def append_many(self, job_id: str, events: list[Event]) -> None:
        """Append several events at once (one round trip)."""

    def append_dropping(self, job_id: str, events: list[Event], drop: list[str]) -> list[str]:
        """Append several events and delete the earlier ones ``drop`` (ids this returned), in
        one round trip; returns the new events' ids. Readers never see deleted events."""

    def read(self, job_id: str, cursor: str, timeout: float) -> tuple[list[Event], str]:
        """Events after ``cursor`` (waiting up to ``timeout`` s for one) and the new cursor."""

    def read_many(self, cursors: dict[str, str], timeout: float, wake: Waker,
                  routed: Callable[[set[str]], dict[str, str]] | None = None) -> dict[str, tuple[list[Event], str]]:
        """New events of several jobs at once, waiting up to ``timeout`` s for any of them or
        for ``wake`` to be rung; only jobs with events are in the answer. The jobs routed to
        ``wake``'s inbox (``route``) need not be among ``cursors``: they are read once named there,
        so that the wait costs the same however many jobs are followed; ``routed(named)`` gives
        the cursors of those of the named jobs to read (asked after the wait: jobs followed
        meanwhile are among them). A job's last event, if small, comes with its name: a job
        that ends with nothing unread before that event costs no read of its stream."""

    def waker(self) -> Waker:
        """A bell that interrupts read_many (to make it read a newly followed job), and the inbox
        of the jobs routed to it."""

    def route(self, job_id: str, inbox: str | None) -> None:
        """From now on each write of ``job_id``'s events also names the job in ``inbox`` (a
        ``Waker.inbox``, from its request), until it finishes or ``inbox`` is None."""

    def request_cancel(self, job_id: str) -> None: ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def claim(self, job_id: str, holder: str, lease: float, delivery_tag: str | None = None) -> Claim:
        """Take the job's lease for ``lease`` seconds, unless a live run holds it or the job
        is finished or cancelled; each new holder counts as one more attempt. A message the
        broker delivers twice (a worker that died, an ack lost with the broker) runs once.
        ``delivery_tag``: of the holder's broker message, handed out again if the lease ends
        with the job unfinished (take_over)."""

    def renew(self, leases: dict[str, str], lease: float) -> set[str]:
        """Extend the leases {job id: holder} by ``lease`` seconds; returns the jobs whose lease
        another holder has taken meanwhile."""

    def expired_leases(self, limit: int = 100) -> list[str]:
        """Jobs whose lease has ended without the job ending (their worker died, or its renewals
        are late), at most ``limit``."""

    def take_over(self, job_ids: list[str]) -> list[Expired]:
        """Of ``job_ids``, the jobs whose lease is still ended and that are unfinished, each
        returned to one caller only, once: its holder's broker message is the caller's to hand
        out again. Called a renewal interval after expired_leases named them, so that a live
        holder whose renewals were late (Redis was away) takes its lease back first."""

    def finish(self, job_id: str, event: Event, blob: bytes | None = None,
               message: tuple[str, str, str] | None = None) -> bool:
        """Append the job's final event and release its lease, unless it already has one
        (then False: another run finished it first). ``message``: where kombu's Redis transport
        records the run's broker message until it is acked (its hash and index, the delivery
        tag): removed in the same round trip, whatever the outcome (the message is acked)."""

    local: bool
    """True when the store lives in this process (its calls cost no round trip)."""


class Waker(Protocol):
    inbox: str | None  # what a job's request names for route (None: every read looks at every job)

    def ring(self) -> None: ...


class MemoryJobStore:
    """In-process store for the embedded worker."""

    local = True

    def __init__(self) -> None:
        self._events: dict[str, list[Event | None]] = {}  # None: an event deleted (append_dropping)
        self._cancelled: set[str] = set()
        self._attempts: dict[str, int] = {}
        self._finished: set[str] = set()
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

    def append_dropping(self, job_id: str, events: list[Event], drop: list[str]) -> list[str]:
        with self._changed:
            stream = self._events.setdefault(job_id, [])
            for event_id in drop:
                stream[int(event_id)] = None  # a deleted event: read_many skips it
            ids = [str(len(stream) + i) for i in range(len(events))]
            stream.extend(dict(event) for event in events)
            self._changed.notify_all()
        return ids

    def read(self, job_id: str, cursor: str, timeout: float) -> tuple[list[Event], str]:
        return self.read_many({job_id: cursor}, timeout, self.waker()).get(job_id, ([], cursor))

    def read_many(self, cursors: dict[str, str], timeout: float, wake: Waker,
                  routed: Callable[[set[str]], dict[str, str]] | None = None) -> dict[str, tuple[list[Event], str]]:
        deadline = time.monotonic() + timeout
        with self._changed:
            rings = self._rings
            while True:
                found = {}
                for job_id, cursor in cursors.items():
                    stream = self._events.get(job_id, [])
                    events = [event for event in stream[int(cursor):] if event is not None]
                    if events:
                        found[job_id] = (events, str(len(stream)))
                remaining = deadline - time.monotonic()
                if found or remaining <= 0 or self._rings != rings:
                    return found
                self._changed.wait(remaining)

    def waker(self) -> Waker:
        return _MemoryWaker(self)

    def route(self, job_id: str, inbox: str | None) -> None:
        pass  # a read looks at every job's events in memory at no cost

    def _ring(self) -> None:
        with self._changed:
            self._rings += 1
            self._changed.notify_all()

    def request_cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancelled

    # The memory transport never delivers a message twice: one claim per job, nothing to renew.
    def claim(self, job_id: str, holder: str, lease: float, delivery_tag: str | None = None) -> Claim:
        with self._changed:
            if job_id in self._finished:
                return Claim("done")
            if job_id in self._cancelled:
                return Claim("cancelled")
            self._attempts[job_id] = attempt = self._attempts.get(job_id, 0) + 1
        return Claim("run", attempt)

    def renew(self, leases: dict[str, str], lease: float) -> set[str]:
        return set()

    # the embedded worker dies with its kernel, and its jobs with it: no lease expires
    def expired_leases(self, limit: int = 100) -> list[str]:
        return []

    def take_over(self, job_ids: list[str]) -> list[Expired]:
        return []

    def finish(self, job_id: str, event: Event, blob: bytes | None = None,
               message: tuple[str, str, str] | None = None) -> bool:
        with self._changed:
            if job_id in self._finished:
                return False
            self._finished.add(job_id)
            self._attempts.pop(job_id, None)
        self.append(job_id, event, blob)
        return True


class _MemoryWaker:
    inbox = None

    def __init__(self, store: MemoryJobStore) -> None:
        self._store = store

    def ring(self) -> None:
        self._store._ring()


def is_inbox(key: Any) -> bool:
    """Whether ``key`` (from a request) names a kernel's inbox, the only keys a worker notifies."""
    return isinstance(key, str) and key.startswith(_INBOX_PREFIX) and len(key) <= 100


_INBOX_PREFIX = "celery_nb:inbox:"


class _RedisWaker:
    """A stream of its own that the follower's XREAD watches: its bell, and the inbox where the
    jobs routed to it are named when they have new events (what a read takes, the next trims)."""

    def __init__(self, client: redis.Redis) -> None:
        self.key = self.inbox = f"{_INBOX_PREFIX}{uuid.uuid4().hex}"
        self.cursor = "0"
        self.trimmed = "0"  # the inbox's entries before this id are gone
        self._redis = client

    def ring(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        self.ring_in(pipe)
        pipe.execute()

    def ring_in(self, pipe: Any) -> None:
        pipe.xadd(self.key, {"w": 1})  # (never MAXLEN: it would drop jobs' names not read yet)
        pipe.expire(self.key, DEFAULT_TTL)


_CARRIED_MAX = 1 << 16  # bytes of a job's last event (and its result) that its inbox entry carries too

# Scripts that say when a lease ends do so in Redis's clock, the one clock every host shares.
_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
"""
# The lease of a running job: celery_nb:lease:<job> (its holder, expiring), and in LEASES_KEY
# when it ends and in DELIVERIES_KEY its holder's message (for take_over).
# KEYS: done, cancel, lease, attempts, leases, deliveries; ARGV: holder, lease ms, ttl s, job id,
# delivery tag ('' if none) -> {outcome, attempt, holder}
_CLAIM = _NOW_MS + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'done', 0, ''} end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then return {'held', 0, holder} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cancelled', 0, ''} end
local attempt
if holder then  -- our own claim, sent again after a lost reply
  attempt = tonumber(redis.call('GET', KEYS[4]) or 1)
else
  attempt = redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[3])
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[5], now_ms() + ARGV[2], ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[6], ARGV[4], ARGV[5]) else redis.call('HDEL', KEYS[6], ARGV[4]) end
return {'run', attempt, ''}
"""
FIRST_EVENT_ID = "0-1"  # a job's first event, written by its kernel: the lowest id a stream entry can have
# KEYS: events; ARGV: id, event json, ttl s
_FIRST_EVENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XADD', KEYS[1], ARGV[1], 'e', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
"""
# KEYS: leases, then the lease and done key of each job; ARGV: lease ms, then each job's holder
# and id -> indexes of lost leases
_RENEW = _NOW_MS + """
local lost = {}
local ends = now_ms() + ARGV[1]
for i = 1, (#KEYS - 1) / 2 do
  local holder = redis.call('GET', KEYS[2 * i])
  if holder and holder ~= ARGV[2 * i] then
    table.insert(lost, i)
  elseif redis.call('EXISTS', KEYS[2 * i + 1]) == 0 then  -- (expired while Redis was away: taken again)
    redis.call('SET', KEYS[2 * i], ARGV[2 * i], 'PX', ARGV[1])
    redis.call('ZADD', KEYS[1], ends, ARGV[2 * i + 1])
  end
end
return lost
"""
# KEYS: leases; ARGV: limit -> ids of the jobs whose lease has ended
_EXPIRED = _NOW_MS + """
return redis.call('ZRANGE', KEYS[1], '-inf', '(' .. now_ms(), 'BYSCORE', 'LIMIT', 0, ARGV[1])
"""
# KEYS: leases, deliveries, then the lease and done key of each job; ARGV: the job ids ->
# {job id, delivery tag} of each job taken over (its lease still gone, the job not finished)
_TAKE_OVER = _NOW_MS + """
local taken = {}
for i = 1, #ARGV do
  local lease, done = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local left = redis.call('PTTL', lease)
  if left > 0 then  -- its holder came back in time: it ends later
    redis.call('ZADD', KEYS[1], now_ms() + left, ARGV[i])
  elseif redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    local tag = redis.call('HGET', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    if tag and redis.call('EXISTS', done) == 0 then table.insert(taken, {ARGV[i], tag}) end
  end
end
return taken
"""
# KEYS: done, events, lease, leases, deliveries, inbox, unacked messages, their index (unused ones: any key);
# ARGV: ttl s, job id, event json, the inbox: 'name' the job there, 'carry' the event too, or '';
# delivery tag to ack ('' if none)[, blob] -> 1 if appended. A carried event says which entry of
# the job's stream precedes it (p) and its own id there (i): a kernel that has read up to p
# needs no read of the stream for it.
_FINISH = """
if ARGV[5] ~= '' then
  redis.call('HDEL', KEYS[7], ARGV[5])
  redis.call('ZREM', KEYS[8], ARGV[5])
end
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return 0 end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local fields = {'e', ARGV[3]}
if ARGV[6] then
  table.insert(fields, 'b')
  table.insert(fields, ARGV[6])
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('EXPIRE', KEYS[2], ARGV[1])
if ARGV[4] == 'carry' and last[1] then
  redis.call('XADD', KEYS[6], '*', 'j', ARGV[2], 'p', last[1][1], 'i', id, unpack(fields))
  redis.call('EXPIRE', KEYS[6], ARGV[1])
elseif ARGV[4] ~= '' then
  redis.call('XADD', KEYS[6], '*', 'j', ARGV[2])
  redis.call('EXPIRE', KEYS[6], ARGV[1])
end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
return 1
"""


# KEYS: the set of announced workers; ARGV: the prefix of their keys. Returns name, facts, name,
# facts... of the workers whose announcement has not expired, and forgets the others.
_LIVE_WORKERS = """
local found = {}
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local facts = redis.call('GET', ARGV[1] .. worker)
  if facts then
    table.insert(found, worker)
    table.insert(found, facts)
  else
    redis.call('SREM', KEYS[1], worker)
  end
end
return found
"""


class RedisJobStore:
    """Redis streams (``celery_nb:events:<job>``), flags and leases, expiring after ``ttl`` seconds.

    ``patience``: seconds to keep retrying while Redis is away (see connect_redis); a worker's
    running jobs must outlive a Redis restart.
    """

    local = False

    def __init__(self, url: str, ttl: int = DEFAULT_TTL, patience: float = DEFAULT_PATIENCE) -> None:
        self._redis = connect_redis(url, patience)
        self._ttl = ttl
        self._routes: dict[str, str] = {}  # job id -> the inbox its writes notify (route)
        self._claim = self._redis.register_script(_CLAIM)
        self._renew = self._redis.register_script(_RENEW)
        self._finish = self._redis.register_script(_FINISH)
        self._expired = self._redis.register_script(_EXPIRED)
        self._take_over = self._redis.register_script(_TAKE_OVER)
        self._live_workers = self._redis.register_script(_LIVE_WORKERS)

    def append(self, job_id: str, event: Event, blob: bytes | None = None, wake: Waker | None = None) -> None:
        fields: dict[str, Any] = {"e": json.dumps(event)}
        if blob is not None:
            fields["b"] = blob
        self._xadd(job_id, [fields], wake)

    def append_many(self, job_id: str, events: list[Event]) -> None:
        self._xadd(job_id, [{"e": json.dumps(event)} for event in events])

    def _xadd(self, job_id: str, entries: list[dict[str, Any]], wake: Waker | None = None) -> None:
        key = events_key(job_id)
        pipe = self._redis.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(key, fields)
        pipe.expire(key, self._ttl)
        self._notify_in(pipe, job_id)
        if isinstance(wake, _RedisWaker):
            wake.ring_in(pipe)
        pipe.execute()

    def route(self, job_id: str, inbox: str | None) -> None:
        if is_inbox(inbox):
            self._routes[job_id] = inbox
        else:
            self._routes.pop(job_id, None)

    def _notify_in(self, pipe: redis.client.Pipeline, job_id: str) -> None:
        inbox = self._routes.get(job_id)
        if inbox is not None:
            pipe.xadd(inbox, {"j": job_id})
            pipe.expire(inbox, self._ttl)

    def append_dropping(self, job_id: str, events: list[Event], drop: list[str]) -> list[str]:
        key = events_key(job_id)
        pipe = self._redis.pipeline(transaction=False)
        for event in events:
            pipe.xadd(key, {"e": json.dumps(event)})
        if drop:
            pipe.xdel(key, *drop)
        pipe.expire(key, self._ttl)
        self._notify_in(pipe, job_id)
        return [event_id.decode() for event_id in pipe.execute()[:len(events)]]

    def first_event(self, job_id: str, event: Event, then: Callable[[redis.client.Pipeline], object]) -> None:
        """In one round trip: ``event`` becomes the job's first event, with id FIRST_EVENT_ID (once,
        however often the round trip is retried), then the commands that ``then`` adds to the
        pipeline run (the job's task message: its worker's events come after)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.eval(_FIRST_EVENT, 1, events_key(job_id), FIRST_EVENT_ID, json.dumps(event), self._ttl)
        then(pipe)
        pipe.execute()

    def read(self, job_id: str, cursor: str, timeout: float) -> tuple[list[Event], str]:
        return self.read_many({job_id: cursor}, timeout, self.waker()).get(job_id, ([], cursor))

    def read_many(self, cursors: dict[str, str], timeout: float, wake: Waker,
                  routed: Callable[[set[str]], dict[str, str]] | None = None) -> dict[str, tuple[list[Event], str]]:
        assert isinstance(wake, _RedisWaker)
        streams = {events_key(job_id): cursor for job_id, cursor in cursors.items()}
        streams[wake.key] = wake.cursor
        # one blocking read: one connection however many jobs run (BLOCK 0 would never return);
        # what the last read took from the inbox goes in the same round trip
        pipe = self._redis.pipeline(transaction=False)
        if wake.trimmed != wake.cursor:
            pipe.xtrim(wake.key, minid=wake.cursor, approximate=False)
            wake.trimmed = wake.cursor
        pipe.xread(streams, block=max(1, int(timeout * 1000)))
        reply = pipe.execute()[-1]
        found: dict[str, tuple[list[Event], str]] = {}
        inbox: list[dict[bytes, bytes]] = []
        for key, entries in reply:
            if key.decode() == wake.key:
                wake.cursor = entries[-1][0].decode()
                inbox = [fields for _entry_id, fields in entries if b"j" in fields]
            else:
                found[key.decode()[len(events_key("")):]] = _events(entries)
        if inbox and routed is not None:  # (not the jobs just read: their events named were there)
            unread = _take_carried(inbox, routed({fields[b"j"].decode() for fields in inbox} - cursors.keys()), found)
            if unread:
                for key, entries in self._redis.xread({events_key(job_id): cursor for job_id, cursor in unread.items()}):
                    job_id = key.decode()[len(events_key("")):]
                    events, cursor = _events(entries)
                    found[job_id] = (found.get(job_id, ([], ""))[0] + events, cursor)
        return found

    def waker(self) -> Waker:
        return _RedisWaker(self._redis)

    def request_cancel(self, job_id: str) -> None:
        self._redis.set(cancel_key(job_id), 1, ex=self._ttl)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._redis.exists(cancel_key(job_id)))

    def claim(self, job_id: str, holder: str, lease: float, delivery_tag: str | None = None) -> Claim:
        outcome, attempt, held_by = self._claim(
            keys=[done_key(job_id), cancel_key(job_id), lease_key(job_id), attempts_key(job_id), LEASES_KEY,
                  DELIVERIES_KEY],
            args=[holder, int(lease * 1000), self._ttl, job_id, delivery_tag or ""])
        return Claim(outcome.decode(), int(attempt), held_by.decode())

    def renew(self, leases: dict[str, str], lease: float) -> set[str]:
        if not leases:
            return set()
        jobs = list(leases)
        keys = [key for job_id in jobs for key in (lease_key(job_id), done_key(job_id))]
        args = [arg for job_id, holder in leases.items() for arg in (holder, job_id)]
        lost = self._renew(keys=[LEASES_KEY, *keys], args=[int(lease * 1000), *args])
        return {jobs[i - 1] for i in lost}

    def expired_leases(self, limit: int = 100) -> list[str]:
        return [job_id.decode() for job_id in self._expired(keys=[LEASES_KEY], args=[limit])]

    def take_over(self, job_ids: list[str]) -> list[Expired]:
        if not job_ids:
            return []
        keys = [key for job_id in job_ids for key in (lease_key(job_id), done_key(job_id))]
        taken = self._take_over(keys=[LEASES_KEY, DELIVERIES_KEY, *keys], args=job_ids)
        return [Expired(job_id.decode(), tag.decode()) for job_id, tag in taken]

    def finish(self, job_id: str, event: Event, blob: bytes | None = None,
               message: tuple[str, str, str] | None = None) -> bool:
        inbox = self._routes.pop(job_id, None)  # its last write
        unacked, index, tag = message or ("", "", "")
        events = events_key(job_id)
        keys = [done_key(job_id), events, lease_key(job_id), LEASES_KEY, DELIVERIES_KEY, inbox or events,
                unacked or events, index or events]
        event_json = json.dumps(event)
        carried = len(event_json) + (len(blob) if blob is not None else 0) <= _CARRIED_MAX
        args: list[Any] = [self._ttl, job_id, event_json, ("carry" if carried else "name") if inbox else "", tag]
        if blob is not None:
            args.append(blob)
        return bool(self._finish(keys=keys, args=args))

    def announce(self, worker: str, facts: dict[str, Any], ttl: float) -> None:
        """Tell kernels ``facts`` of a live worker (celery_nb.shm.worker_facts), for ``ttl`` seconds."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(worker_key(worker), json.dumps(facts), px=int(ttl * 1000))  # expires by Redis's clock
        pipe.sadd(WORKERS_KEY, worker)
        pipe.execute()

    def withdraw(self, worker: str) -> None:
        """The worker stops: its announcement goes."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(worker_key(worker))
        pipe.srem(WORKERS_KEY, worker)
        pipe.execute()

    def live_workers(self) -> dict[str, dict[str, Any]]:
        """The facts of the workers whose announcement has not expired, by worker name."""
        found = self._live_workers(keys=[WORKERS_KEY], args=[worker_key("")])
        return {found[i].decode(): json.loads(found[i + 1]) for i in range(0, len(found), 2)}


def _take_carried(inbox: list[dict[bytes, bytes]], positions: dict[str, str],
                  found: dict[str, tuple[list[Event], str]]) -> dict[str, str]:
    """Take into ``found`` the events the inbox's entries carry (in order) for the jobs whose
    ``positions`` (cursors) they follow on from; returns where to read the stream of the other
    jobs named, from what was taken."""
    unread: set[str] = set()
    for fields in inbox:
        job_id = fields[b"j"].decode()
        if job_id not in positions or job_id in unread:
            continue
        if b"i" in fields and fields[b"p"].decode() == positions[job_id]:
            positions[job_id] = fields[b"i"].decode()
            events = found.get(job_id, ([], ""))[0]
            found[job_id] = (events + _events([(fields[b"i"], fields)])[0], positions[job_id])
        else:  # the job has events in between, or its worker only named it: its stream has them
            unread.add(job_id)
    return {job_id: positions[job_id] for job_id in unread}


def _events(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> tuple[list[Event], str]:
    """A job's stream entries as events (a binary attachment as event["blob"]), and the last one's id."""
    events = []
    for _entry_id, fields in entries:
        event = json.loads(fields[b"e"])
        if b"b" in fields:
            event["blob"] = fields[b"b"]
        events.append(event)
    return events, entries[-1][0].decode()
