"""A local journal of the jobs this machine's kernels sent to a broker, so that a restarted
kernel can find them again (``%celery_jobs``, ``Job.attach``).

One JSON line per job in ``CELERY_NB_JOURNAL`` (default ``~/.cache/celery_nb/jobs.jsonl``).
Jobs of the embedded worker are not journalled: they end with their kernel. Broker URLs are
kept without their password.
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from celery_nb.jobstore import DEFAULT_TTL

_MAX_BYTES = 1 << 20  # past this the journal is cut to its newer half


def journal_path() -> Path:
    return Path(os.environ.get("CELERY_NB_JOURNAL") or Path.home() / ".cache/celery_nb/jobs.jsonl")


def public_url(broker_url: str) -> str:
    """``broker_url`` without its password: what the journal keeps and compares."""
    parts = urllib.parse.urlsplit(broker_url)
    if parts.password is None:
        return broker_url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


@dataclass(frozen=True)
class JournalEntry:
    job_id: str
    broker: str
    kind: str
    image: str
    queue: str
    label: str
    submitted_at: float
    kernel_pid: int


_pending: queue.SimpleQueue[JournalEntry] = queue.SimpleQueue()
_write_lock = threading.Lock()
_writer_lock = threading.Lock()  # not _write_lock: a job must not wait for the previous one's write
_writer: threading.Thread | None = None


def record(entry: JournalEntry) -> None:
    """Note a job. A background thread writes it: a file append must not delay the job."""
    global _writer
    _pending.put(entry)
    with _writer_lock:
        if _writer is None:
            _writer = threading.Thread(target=_write_forever, name="celery_nb-journal", daemon=True)
            _writer.start()
            atexit.register(_write_pending)


def _write_forever() -> None:
    while True:  # at once: the journal is for kernels that die, maybe right after sending a job
        _pending.put(_pending.get())  # wait for an entry, then write it with any that came meanwhile
        _write_pending()


def _write_pending() -> None:
    with _write_lock:
        lines = []
        while not _pending.empty():
            lines.append(json.dumps(asdict(_pending.get_nowait())) + "\n")
        if not lines:
            return
        path = journal_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            size = f.tell()
        if size > _MAX_BYTES:
            kept = path.read_text(encoding="utf-8").splitlines(keepends=True)
            path.write_text("".join(kept[len(kept) // 2:]), encoding="utf-8")


def entries(broker_url: str) -> list[JournalEntry]:
    """Jobs sent to ``broker_url`` whose events may still be readable, oldest first."""
    _write_pending()
    try:
        lines = journal_path().read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    broker = public_url(broker_url)
    oldest = time.time() - DEFAULT_TTL
    found = []
    for line in lines:
        try:
            entry = JournalEntry(**json.loads(line))
        except (ValueError, TypeError):
            continue  # a line cut short by a crash
        if entry.broker == broker and entry.submitted_at >= oldest:
            found.append(entry)
    return found


def resolve(broker_url: str, job_id: str) -> str:
    """The full id of a journalled job from the id or a prefix of it (as widgets show it);
    ``job_id`` itself when the journal does not know it."""
    matches = {e.job_id for e in entries(broker_url) if e.job_id.startswith(job_id)}
    if len(matches) > 1:
        raise ValueError(f"job id {job_id!r} is ambiguous: it starts {len(matches)} jobs' ids; give more of it")
    return matches.pop() if matches else job_id
