"""What a job's event stream keeps of its output: a bounded log, however much the job prints.

The first half of CELERY_NB_MAX_LOG_BYTES goes into the stream as it comes. Past it ("log_cut"
event), the stream holds a window of the newest output: log events are still written while the
job prints (at most every WINDOW_FLUSH_INTERVAL s, so a kernel following live sees the latest
lines), and the oldest of them are deleted from the stream as newer ones come, so the window
never holds more than the other half. When the job ends, one "log_end" event says how much was
dropped and where the whole log is: compressed, as a blob kept CELERY_NB_FULL_LOG_TTL seconds
(up to CELERY_NB_MAX_FULL_LOG_BYTES of it), which ``Job.full_log()`` reads.
"""
from __future__ import annotations

import codecs
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from celery_nb.blobs import BlobStore
from celery_nb.jobstore import Event, JobStore
from celery_nb.worker.settings import WorkerSettings

WINDOW_FLUSH_INTERVAL = 0.5  # s between two writes of output past the log's first half


class JobLog:
    """One job's output, written to its event stream as the settings bound it.

    ``before_write`` gives the events to write first in each write (those the run held back)."""

    def __init__(self, store: JobStore, blobs: BlobStore, job_id: str, settings: WorkerSettings,
                 before_write: Callable[[], list[Event]]) -> None:
        self._store = store
        self._blobs = blobs
        self._job_id = job_id
        self._limit = settings.max_log_bytes
        self._head_left = settings.max_log_bytes // 2  # bytes still written as they come
        self._window = settings.max_log_bytes - self._head_left
        self._full_log_cap = settings.max_full_log_bytes
        self._full_log_ttl = settings.full_log_ttl
        self._before_write = before_write
        self._decoders = {stream: codecs.getincrementaldecoder("utf-8")("replace") for stream in ("stdout", "stderr")}
        self._pending: deque[list[Any]] = deque()  # [stream, text, bytes] pieces not written yet
        self._pending_bytes = 0
        self._written: deque[tuple[str, int]] = deque()  # (event id, bytes) of the window's events in the stream
        self._written_bytes = 0
        self._cut = False
        self._flushed_at = 0.0
        self._printed = 0
        self._dropped = 0
        self._printed_so_far: list[bytes] = []  # until the cut: the whole log's start
        self._whole: _CompressedLog | None = None  # after the cut, unless CELERY_NB_MAX_FULL_LOG_BYTES is 0

    def add(self, stream: str, data: bytes) -> None:
        """Bytes the job wrote to ``stream`` ("stdout" or "stderr")."""
        self._printed += len(data)
        if self._cut:
            if self._whole is not None:
                self._whole.add(data)
        else:
            self._printed_so_far.append(data)
            head = data[:self._head_left]
            self._head_left -= len(head)
            self._queue(stream, head)
            data = data[len(head):]
            if data:
                self._cut_here()
        if data:
            self._queue(stream, data)
            self._fit_pending()

    def _cut_here(self) -> None:
        """The log's first half is full: what follows goes to the window; the whole log is
        kept from now on (most jobs never get here, and compress nothing)."""
        self.flush()
        self._cut = True
        self._write([{"type": "log_cut", "kept": self._limit - self._window, "window": self._window,
                      "limit": self._limit}])
        if self._full_log_cap:
            self._whole = _CompressedLog(self._full_log_cap)
            self._whole.add(b"".join(self._printed_so_far))
        self._printed_so_far.clear()

    def flush(self, now: bool = True, then: Sequence[Event] = ()) -> None:
        """Write what is pending, followed by the events ``then``, in one round trip; past the
        log's first half, the output only every WINDOW_FLUSH_INTERVAL s unless ``now``."""
        if not self._pending or (self._cut and not now
                                 and time.monotonic() - self._flushed_at < WINDOW_FLUSH_INTERVAL):
            if then:
                self._write(then)
            return
        runs: list[tuple[str, list[str]]] = []  # the pieces of each run of one stream
        for stream, text, _size in self._pending:
            if runs and runs[-1][0] == stream:
                runs[-1][1].append(text)
            else:
                runs.append((stream, [text]))
        # past the first half, events of at most 1/8 of the window: the window's oldest are
        # deleted whole, and then it still keeps at least 7/8 of its size
        most = self._window // 8 if self._cut else None
        events = [{"type": "log", "stream": stream, "text": part, "t": time.time()}
                  for stream, pieces in runs for part in _split("".join(pieces), most)]
        sizes = [len(event["text"].encode()) for event in events]
        self._pending.clear()
        self._pending_bytes = 0
        self._flushed_at = time.monotonic()
        if not self._cut:
            self._write([*events, *then])
            return
        drop = []  # the window's oldest events, to make room for these
        self._written_bytes += sum(sizes)
        while self._written_bytes > self._window and self._written:
            event_id, size = self._written.popleft()
            drop.append(event_id)
            self._written_bytes -= size
            self._dropped += size
        first = self._before_write()
        ids = self._store.append_dropping(self._job_id, [*first, *events, *then], drop)
        self._written.extend(zip(ids[len(first):], sizes))

    def finish(self) -> None:
        """Write what is pending and, if the log was cut, how much was dropped and where the
        whole log is (before the job's final event)."""
        self.flush()
        if not self._cut:
            return
        full_log = None
        if self._whole is not None:
            ref = self._blobs.put([self._whole.finish()])
            self._blobs.expire(ref, self._full_log_ttl)
            full_log = {"ref": ref, "size": self._whole.size, "until": time.time() + self._full_log_ttl}
        self._write([{"type": "log_end", "printed": self._printed, "dropped": self._dropped, "full_log": full_log,
                      "cap": self._full_log_cap}])

    def _queue(self, stream: str, data: bytes) -> None:
        text = self._decoders[stream].decode(data)
        if text:
            self._pending.append([stream, text, len(data)])
            self._pending_bytes += len(data)

    def _fit_pending(self) -> None:
        """Drop the oldest pending output beyond the window: it would be deleted at once."""
        while self._pending_bytes > self._window:
            piece = self._pending[0]
            excess = self._pending_bytes - self._window
            text = piece[1]
            start = text.find("\n", excess - 1) + 1 or excess  # its newest part stays, from a line's start
            cut = min(len(text[:start].encode()), piece[2])
            if piece[2] <= excess or start >= len(text) or not cut:  # none of it stays
                self._pending.popleft()
                cut = piece[2]
            else:
                piece[1] = text[start:]
                piece[2] -= cut
            self._pending_bytes -= cut
            self._dropped += cut

    def _write(self, events: Sequence[Event]) -> None:
        stamped = [{"t": time.time(), **event} for event in events]
        self._store.append_many(self._job_id, [*self._before_write(), *stamped])


def _split(text: str, most: int | None) -> list[str]:
    """``text`` in parts of at most ``most`` characters (all of it for None), cut after a
    newline where there is one."""
    parts = []
    start = 0
    while most and len(text) - start > most:
        end = text.rfind("\n", start, start + most) + 1 or start + most
        parts.append(text[start:end])
        start = end
    parts.append(text[start:])
    return parts


class _CompressedLog:
    """The whole log, compressed as it comes, until it takes ``cap`` compressed bytes."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._compressor = zlib.compressobj(1)  # fast: a print flood compresses at ~500 MB/s
        self._parts: list[bytes] = []
        self._stored = 0
        self.size = 0  # bytes of log it holds

    def add(self, data: bytes) -> None:
        if self._stored >= self._cap:
            return
        part = self._compressor.compress(data)
        self._parts.append(part)
        self._stored += len(part)
        self.size += len(data)

    def finish(self) -> bytes:
        """The compressed log (zlib) of its first ``size`` bytes."""
        return b"".join([*self._parts, self._compressor.flush()])
