"""A local journal of the jobs this machine's kernels sent to a broker, so that a restarted
kernel can find them again (``%celery_jobs``, ``Job.attach``).

One row per job in a SQLite database, ``CELERY_NB_JOURNAL`` (default
``~/.cache/celery_nb/jobs.sqlite3``), which any number of kernels write at once: each write is
a transaction, so none loses another's. A background thread writes a job's entry at once, or in
a burst of jobs with the others of the last _BURST_WINDOW. Entries go once their job's events
have expired (or beyond the newest _MAX_ENTRIES). Jobs of the embedded worker are not
journalled: they end with their kernel. Broker URLs are kept without their password.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from celery_nb.jobstore import DEFAULT_TTL

_MAX_ENTRIES = 100_000  # the newest kept, however many jobs a day brings
_BUSY_TIMEOUT = 30.0  # s a write waits for other kernels' writes
# s: in a burst of jobs their entries are written together, at most this often (a write per job
# cost a kernel sending thousands a quarter of its CPU); an entry alone is written at once
_BURST_WINDOW = 0.02


def journal_path() -> Path:
    return Path(os.environ.get("CELERY_NB_JOURNAL") or Path.home() / ".cache/celery_nb/jobs.sqlite3")


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
_more = threading.Event()  # entries are pending
_write_lock = threading.Lock()
_writer_lock = threading.Lock()  # not _write_lock: a job must not wait for the previous one's write
_writer: threading.Thread | None = None
# the connection writes go through, kept open (opening one costs more than a write), and what it
# is of: (process, path, inode)
_writing: tuple[tuple[int, Path, int], sqlite3.Connection] | None = None


def record(entry: JournalEntry) -> None:
    """Note a job. A background thread writes it: a write must not delay the job."""
    global _writer
    _pending.put(entry)
    _more.set()
    with _writer_lock:
        if _writer is None:
            _writer = threading.Thread(target=_write_forever, name="celery_nb-journal", daemon=True)
            _writer.start()
            atexit.register(write_pending)


def _write_forever() -> None:
    written = 0.0
    while True:  # soon: the journal is for kernels that die, maybe right after sending a job
        _more.wait()  # (an entry stays queued until written: a kernel's exit writes what is left)
        time.sleep(max(0.0, written + _BURST_WINDOW - time.monotonic()))
        _more.clear()
        write_pending()
        written = time.monotonic()


def _connect() -> sqlite3.Connection:
    """The journal, created if need be. A write takes about a millisecond (a kernel may die right
    after sending a job): no fsync, so an OS crash may cost the journal, a kernel's crash never.
    A file that is no journal (damaged by an OS crash, or another file) is moved aside."""
    path = journal_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, check_same_thread=False)  # (used under _write_lock)
    try:
        db.execute("PRAGMA journal_mode=TRUNCATE")
        db.execute("PRAGMA synchronous=OFF")
        columns = ", ".join(field.name for field in dataclasses.fields(JournalEntry))
        db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({columns}, PRIMARY KEY (job_id))")
        db.execute("CREATE INDEX IF NOT EXISTS jobs_by_broker ON jobs (broker, submitted_at)")
        db.execute("CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (submitted_at)")  # what expires, found at once
    except sqlite3.DatabaseError as exc:
        db.close()
        if isinstance(exc, sqlite3.OperationalError):  # (busy: not a damaged file)
            raise
        path.replace(path.with_name(path.name + ".damaged"))
        return _connect()
    return db


def write_pending() -> None:
    """Write the entries noted so far, in this thread (waiting for a write under way)."""
    global _writing
    with _write_lock:
        rows = []
        while not _pending.empty():
            rows.append(dataclasses.astuple(_pending.get_nowait()))
        if not rows:
            return
        path = journal_path()
        try:
            key = (os.getpid(), path, path.stat().st_ino)
        except FileNotFoundError:
            key = None
        if _writing is None or _writing[0] != key:  # the first write, or another file (moved aside, a fork)
            if _writing is not None and _writing[0][0] == os.getpid():
                _writing[1].close()  # (a connection a fork inherited is its parent's to close)
            db = _connect()
            _writing = ((os.getpid(), path, path.stat().st_ino), db)
        db = _writing[1]
        with db:  # one transaction
            db.executemany(f"INSERT OR REPLACE INTO jobs VALUES ({', '.join('?' * len(rows[0]))})", rows)
            db.execute("DELETE FROM jobs WHERE submitted_at < ?", (time.time() - DEFAULT_TTL,))
            db.execute("DELETE FROM jobs WHERE rowid <= (SELECT MAX(rowid) FROM jobs) - ?", (_MAX_ENTRIES,))


def entries(broker_url: str) -> list[JournalEntry]:
    """Jobs sent to ``broker_url`` whose events may still be readable, oldest first."""
    write_pending()
    if not journal_path().exists():
        return []
    db = _connect()
    try:
        rows = db.execute("SELECT * FROM jobs WHERE broker = ? AND submitted_at >= ? ORDER BY submitted_at, rowid",
                          (public_url(broker_url), time.time() - DEFAULT_TTL)).fetchall()
    finally:
        db.close()
    return [JournalEntry(*row) for row in rows]


def resolve(broker_url: str, job_id: str) -> str:
    """The full id of a journalled job from the id or a prefix of it (as widgets show it);
    ``job_id`` itself when the journal does not know it."""
    matches = {e.job_id for e in entries(broker_url) if e.job_id.startswith(job_id)}
    if len(matches) > 1:
        raise ValueError(f"job id {job_id!r} is ambiguous: it starts {len(matches)} jobs' ids; give more of it")
    return matches.pop() if matches else job_id
