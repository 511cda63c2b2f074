"""The local journal of jobs sent to a broker (no Docker): kernels writing at once lose nothing,
an entry is written at once and a burst's together, and what it keeps expires with the jobs'
events."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import pytest

from celery_nb import journal
from celery_nb.jobstore import DEFAULT_TTL

BROKER = "redis://:secret@broker.example:6379/0"
KERNELS, JOBS = 6, 150


def _kernel(name: str, path: str) -> None:
    """A kernel: notes JOBS jobs one after the other in journal ``path``, as fast as it can (its
    background writer writes them meanwhile, while the other kernels write theirs, and each write
    deletes what has expired: every tenth entry is a day old), and makes sure of all of them every 25."""
    os.environ["CELERY_NB_JOURNAL"] = path
    for n in range(JOBS):
        age = DEFAULT_TTL + 60 if n % 10 == 9 else 0
        journal.record(journal.JournalEntry(f"{name}-{n:04d}", journal.public_url(BROKER), "cell", "img", "q",
                                            "x = 1", time.time() - age, os.getpid()))
        if n % 25 == 24:
            journal.entries(BROKER)  # (writes what is pending first)


@pytest.fixture
def journal_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "jobs.sqlite3"
    monkeypatch.setenv("CELERY_NB_JOURNAL", str(path))
    return path


def test_kernels_writing_at_once_lose_nothing(journal_file: Path) -> None:
    # processes of their own, forked from a server that imported celery_nb once (a new
    # interpreter each would take seconds; a fork of this one would inherit its threads' locks)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["celery_nb.journal", "tests.test_journal"])
    kernels = [context.Process(target=_kernel, args=(f"kernel{k}", str(journal_file))) for k in range(KERNELS)]
    for kernel in kernels:
        kernel.start()
    for kernel in kernels:
        kernel.join(120)
    assert [kernel.exitcode for kernel in kernels] == [0] * KERNELS
    ids = [entry.job_id for entry in journal.entries(BROKER)]
    fresh = [n for n in range(JOBS) if n % 10 != 9]
    assert len(ids) == len(set(ids)) == KERNELS * len(fresh)
    for k in range(KERNELS):  # each kernel's in the order it sent them
        assert [i for i in ids if i.startswith(f"kernel{k}-")] == [f"kernel{k}-{n:04d}" for n in fresh]
    with sqlite3.connect(journal_file) as db:  # the expired ones are gone from the file, not only unlisted
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone() == (len(ids),)


def test_entries_expire_with_the_jobs_events_and_keep_no_password(journal_file: Path) -> None:
    def note(job_id: str, submitted_at: float) -> None:
        journal.record(journal.JournalEntry(job_id, journal.public_url(BROKER), "call", "img", "q", "f()",
                                            submitted_at, 1))

    note("old", time.time() - DEFAULT_TTL - 60)
    note("f00d1", time.time())
    note("f00d2", time.time())
    assert [e.job_id for e in journal.entries(BROKER)] == ["f00d1", "f00d2"]
    assert [e.broker for e in journal.entries(BROKER)] == ["redis://:***@broker.example:6379/0"] * 2
    assert journal.entries("redis://other:6379/0") == []
    assert journal.resolve(BROKER, "f00d2") == "f00d2" and journal.resolve(BROKER, "beef") == "beef"
    with pytest.raises(ValueError, match="job id 'f00d' is ambiguous: it starts 2 jobs' ids"):
        journal.resolve(BROKER, "f00d")


def test_a_file_that_is_no_journal_is_moved_aside(journal_file: Path) -> None:
    journal_file.write_text('{"job_id": "from an older celery_nb, one JSON line per job"}\n')
    journal.record(journal.JournalEntry("f00d", journal.public_url(BROKER), "cell", "img", "q", "x = 1",
                                        time.time(), 1))
    assert [e.job_id for e in journal.entries(BROKER)] == ["f00d"]
    assert "older celery_nb" in (journal_file.parent / "jobs.sqlite3.damaged").read_text()


def _rows_in(path: Path) -> int:
    """How many entries the file holds now (what a kernel started now would find)."""
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        except sqlite3.OperationalError:  # (no table yet)
            return 0


def _wait_for_rows(path: Path, count: int) -> None:
    deadline = time.monotonic() + 5
    while _rows_in(path) != count:
        assert time.monotonic() < deadline, f"{_rows_in(path)} entries written, not {count}"
        time.sleep(0.005)


def test_an_entry_alone_is_written_at_once_and_a_burst_together(journal_file: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    writes = []

    def counted_write() -> None:
        writes.append(time.monotonic())
        real_write()

    real_write = journal.write_pending
    monkeypatch.setattr(journal, "write_pending", counted_write)  # (the background writer's)

    def note(job_id: str) -> None:
        journal.record(journal.JournalEntry(job_id, journal.public_url(BROKER), "call", "img", "q", "f()",
                                            time.time(), 1))

    time.sleep(journal._BURST_WINDOW)
    started = time.monotonic()
    note("alone")
    _wait_for_rows(journal_file, 1)  # by the writer, unasked
    assert time.monotonic() - started < 1
    time.sleep(journal._BURST_WINDOW)
    writes.clear()
    started = time.monotonic()
    for n in range(100):  # a job every 2 ms, for a fifth of a second or more
        note(f"burst-{n:03d}")
        time.sleep(0.002)
    _wait_for_rows(journal_file, 101)
    took = time.monotonic() - started
    assert len(writes) <= took / journal._BURST_WINDOW + 2, f"{len(writes)} writes for 100 entries in {took:.2f} s"
    assert [e.job_id for e in journal.entries(BROKER)] == ["alone"] + [f"burst-{n:03d}" for n in range(100)]
