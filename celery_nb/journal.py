"""A local journal of the jobs this machine's kernels sent to a broker, so that a restarted
kernel can find them again (``%celery_jobs``, ``Job.attach``).

One JSON line per job in ``CELERY_NB_JOURNAL`` (default ``~/.cache/celery_nb/jobs.jsonl``).
Jobs of the embedded worker are not journalled: they end with their kernel. Broker URLs are
kept without their password.
"""
from __future__ import annotations

import json
import os
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


def record(entry: JournalEntry) -> None:
    path = journal_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(entry)) + "\n")
        size = f.tell()
    if size > _MAX_BYTES:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(lines[len(lines) // 2:]), encoding="utf-8")


def entries(broker_url: str) -> list[JournalEntry]:
    """Jobs sent to ``broker_url`` whose events may still be readable, oldest first."""
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
