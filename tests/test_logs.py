"""Bounded logs: what a job prints is kept as its first and its newest part (the worker's
CELERY_NB_MAX_LOG_BYTES), in Redis and in the kernel alike, and whole, compressed, for an hour
(Job.full_log()); a print flood leaves Redis, the kernel and the widget in bounds."""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import docker
import pytest
import redis

from celery_nb import Client, LogUnavailableError
from celery_nb.blobs import MemoryBlobStore, MissingBlobError
from celery_nb.job import Job
from celery_nb.jobstore import START, MemoryJobStore, RedisJobStore, events_key
from celery_nb.options import format_size
from celery_nb.widgets import JobWidget
from celery_nb.worker.logs import JobLog
from celery_nb.worker.settings import WorkerSettings
from tests.conftest import IMAGE, ROOT, _unavailable, free_port, start_worker, stop_process

MiB = 1 << 20
MAX_LOG_BYTES = WorkerSettings().max_log_bytes  # the default
PAD = "x" * 90
FLOOD_LINES = 2_000_000  # of 105 bytes: 210 MB, as a print in a training loop would
FLOOD_CELL = f"pad = 'x' * 90\nfor i in range({FLOOD_LINES}):\n    print(f'step {{i:8d}} {{pad}}')\nprint('the end')\n"
FLOOD_BYTES = FLOOD_LINES * 105 + len("the end\n")
# Redis during and after that flood, as measured (INFO memory) on a Redis of the test's own: the
# stream keeps 4 MiB of log, the whole log compresses to ~6 MiB; before the bound, 680 MB
PEAK_BOUND = 32 * MiB
KEPT_BOUND = 16 * MiB


@pytest.fixture
def own_redis(docker_client: docker.DockerClient) -> Iterator[str]:
    """A redis-server of the test's own, so that its memory figures are this test's alone."""
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed (scripts/setup.sh installs it)")
    port = free_port(range(16400, 16500))
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    with open(ROOT / ".pytest_cache/flood-redis.log", "w") as log:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT)
    probe = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, f"redis-server did not start: {log.name}"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    stop_process(proc)


def _settled_memory(r: redis.Redis) -> dict:
    """INFO memory once Redis has freed what the job's last commands left behind (the query
    buffers of its clients, a few MiB, which Redis shrinks once a client has been idle for 2 s):
    what it keeps, not what it passes through. Settled: no change of 64 KiB for 3 s."""
    memory = r.info("memory")
    steady_since = time.monotonic()
    deadline = steady_since + 20
    while time.monotonic() < deadline and time.monotonic() - steady_since < 3:
        time.sleep(0.5)
        later = r.info("memory")
        if abs(later["used_memory"] - memory["used_memory"]) >= 64 * 1024:
            steady_since = time.monotonic()
        memory = later
    return memory


def test_a_print_flood_leaves_redis_the_kernel_and_the_widget_in_bounds(own_redis: str) -> None:
    worker = start_worker(own_redis, "celery_nb", "flood")
    try:
        r = redis.Redis.from_url(own_redis)
        client = Client(own_redis)
        before = r.info("memory")["used_memory"]
        started = time.monotonic()
        job = client.submit_cell(FLOOD_CELL, {}, image=IMAGE)
        assert job.result(timeout=600) == {"pad": PAD, "i": FLOOD_LINES - 1}
        took = time.monotonic() - started
        memory = _settled_memory(r)
        stream = r.memory_usage(events_key(job.id), samples=0)
        blobs = {key: r.memory_usage(key, samples=0) for key in r.scan_iter("celery_nb:blob:*")}
        print(f"\n[flood] {FLOOD_BYTES / 1e6:.0f} MB printed in {took:.1f} s; Redis: peak +"
              f"{(memory['used_memory_peak'] - before) / MiB:.1f} MiB, after +{(memory['used_memory'] - before) / MiB:.1f}"
              f" MiB (the stream {stream / MiB:.2f} MiB in {r.xlen(events_key(job.id))} entries, the whole log "
              f"{sum(blobs.values()) / MiB:.2f} MiB); the kernel's Job.logs {len(job.logs) / MiB:.2f} MiB")
        assert memory["used_memory_peak"] - before < PEAK_BOUND
        assert memory["used_memory"] - before < KEPT_BOUND
        assert stream < 1.25 * MAX_LOG_BYTES + 64 * 1024  # allocator rounding and event overhead
        (blob, size), = blobs.items()
        assert 3000 < r.ttl(blob) <= 3600  # the whole log goes after an hour, not a day

        # the kernel keeps the first and the newest 2 MiB, and says what is missing in between
        logs = job.logs
        assert len(logs) < MAX_LOG_BYTES + 1000
        assert logs.startswith(f"step        0 {PAD}\nstep        1 ") and logs.endswith(f"step  1999999 {PAD}\nthe end\n")
        head, _, rest = logs.partition("[celery_nb] ")
        line, _, tail = rest.partition("\n")
        assert len(head) == MAX_LOG_BYTES // 2 + 1 and MAX_LOG_BYTES // 2 * 7 / 8 <= len(tail) <= MAX_LOG_BYTES // 2
        dropped, _, said = line.partition(" MiB of output dropped here: ")
        assert said.startswith(f"the log keeps the first 2.0 MiB and the last 2.0 MiB (CELERY_NB_MAX_LOG_BYTES="
                               f"{MAX_LOG_BYTES}); job.full_log() has all {format_size(FLOOD_BYTES)} of it until ")
        # what the worker dropped between its head and its window, which keeps at least 7/8 of its size (the
        # kernel's tail may hold more: lines it read before the worker deleted them)
        # (to the MiB: format_size gives three figures)
        assert (FLOOD_BYTES - len(head) + 1 - MAX_LOG_BYTES // 2) / MiB - 0.5 <= float(dropped) <= \
            (FLOOD_BYTES - len(head) + 1 - MAX_LOG_BYTES // 2 * 7 / 8) / MiB + 0.5
        full = job.full_log()
        assert len(full) == FLOOD_BYTES and full.endswith(f"step  1999999 {PAD}\nthe end\n")
        assert f"\nstep  1000000 {PAD}\nstep  1000001 {PAD}\n" in full
        # the widget draws the newest lines
        shown = JobWidget(job).logs.value
        assert len(shown) < 8000 and "step  1999999" in shown and "the end" in shown

        started = time.monotonic()
        after = client.submit_cell("print('next')\ny = 1\n", {}, image=IMAGE)
        assert after.result(timeout=60) == {"y": 1} and after.logs == "next\n"
        assert time.monotonic() - started < 10
    finally:
        stop_process(worker)


def _job_log(settings: WorkerSettings) -> tuple[MemoryJobStore, JobLog, Job]:
    """A JobLog writing to the embedded worker's store, and a Job reading it back."""
    store, blobs = MemoryJobStore(), MemoryBlobStore()

    class Backend:
        def read_blob(self, ref: dict) -> memoryview:
            return blobs.get(ref)

    return store, JobLog(store, blobs, "job", settings, before_write=list), Job(
        Backend(), "job", "cell", IMAGE, "celery_nb", "a flood")


def _replay(store: MemoryJobStore, job: Job) -> None:
    store.append("job", {"type": "done", "status": "succeeded", "error": None, "timings": {}})
    for event in store.read("job", START, timeout=0)[0]:
        job._apply(event)


def test_the_log_keeps_its_first_and_newest_part_and_the_whole_log() -> None:
    store, log, job = _job_log(WorkerSettings(max_log_bytes=1000, max_full_log_bytes=1 << 20, full_log_ttl=60))
    printed = "".join(f"line {i}\n" for i in range(5000))
    for i, start in enumerate(range(0, len(printed), 70)):  # chunks that split lines, on both streams
        log.add("stderr" if i % 10 == 3 else "stdout", printed[start:start + 70].encode())
        log.flush(now=False)
    log.finish()
    kept = [e for e in store._events["job"] if e is not None and e["type"] == "log"]
    assert sum(len(e["text"]) for e in kept) <= 1000  # the rest was deleted from the stream
    _replay(store, job)
    head, _, rest = job.logs.partition("[celery_nb] ")
    line, _, tail = rest.partition("\n")
    assert head == printed[:500] + "\n"  # the line saying what was dropped stands on a line of its own
    assert printed.endswith(tail) and 7 / 8 * 500 <= len(tail) <= 500 and tail.startswith("line ")
    assert re.fullmatch(f"{format_size(len(printed) - 500 - len(tail))} of output dropped here: the log keeps the "
                        f"first 500 B and the last 500 B \\(CELERY_NB_MAX_LOG_BYTES=1000\\); job.full_log\\(\\) has "
                        f"all {format_size(len(printed))} of it until \\d\\d:\\d\\d", line), line
    assert job.full_log() == printed
    # the terminal view (Job.new_output) gets each kept item once
    items, seen = job.new_output(0)
    assert "".join(text for _kind, text in items) == job.logs and job.new_output(seen) == ([], seen)


def test_output_held_back_events_and_a_display_go_in_one_write_in_order() -> None:
    class CountingStore(MemoryJobStore):
        writes = 0

        def append_many(self, job_id: str, events: list) -> None:
            self.writes += 1
            super().append_many(job_id, events)

        def append_dropping(self, job_id: str, events: list, drop: list) -> list:
            self.writes += 1
            return super().append_dropping(job_id, events, drop)

    store = CountingStore()
    held_back = [[{"type": "status", "status": "running"}]]  # given once, as the run does
    log = JobLog(store, MemoryBlobStore(), "job", WorkerSettings(max_log_bytes=100),
                 before_write=lambda: held_back.pop() if held_back else [])
    log.add("stdout", b"before the figure\n")
    log.flush(then=[{"type": "display", "data": {"text/plain": "figure"}}])
    log.add("stdout", b"x" * 200)  # past the first half: written by append_dropping
    log.flush(then=[{"type": "display", "data": {"text/plain": "another"}}])
    kinds = [(e["type"], e.get("status") or e.get("text", "")[:6] or e.get("data", {}).get("text/plain"))
             for e in store._events["job"] if e is not None]
    assert kinds[:3] == [("status", "running"), ("log", "before"), ("display", "figure")]
    assert kinds[-1] == ("display", "another") and kinds[-2][0] == "log"
    assert store.writes == 4  # the two flushes; between them, the first half's rest and the log_cut event


def test_a_whole_log_beyond_its_cap_says_where_it_ends() -> None:
    store, log, job = _job_log(WorkerSettings(max_log_bytes=1000, max_full_log_bytes=20_000, full_log_ttl=60))
    printed = "".join(f"{i} {i * 7919 % 104729}\n" for i in range(100_000)).encode()
    for start in range(0, len(printed), 4096):
        log.add("stdout", printed[start:start + 4096])
    log.finish()
    _replay(store, job)
    full = job.full_log()
    kept, _, note = full.partition("\n[celery_nb] the whole log ends here, after ")
    assert 20_000 < len(kept) < len(printed) and printed.startswith(kept.encode())
    assert note.startswith(f"{len(kept)} of the {len(printed)} bytes the job printed (the worker's "
                           f"CELERY_NB_MAX_FULL_LOG_BYTES is 20000)")
    assert "job.full_log() has its first" in job.logs


def test_the_embedded_workers_whole_logs_expire_without_a_thread_each() -> None:
    blobs = MemoryBlobStore()
    threads = threading.active_count()
    refs = [blobs.put([f"log {i}".encode()]) for i in range(200)]
    for ref in refs[:-1]:
        blobs.expire(ref, 0.2)
    blobs.expire(refs[-1], 60)
    assert threading.active_count() == threads
    renewed = blobs.put([b"renewed"], name=refs[0]["key"])  # a new blob of that name does not expire
    assert all(blobs.touch(ref) for ref in refs)
    time.sleep(0.3)
    assert not blobs.touch(refs[1]) and blobs.touch(refs[-1]) and bytes(blobs.get(renewed)) == b"renewed"
    with pytest.raises(MissingBlobError):
        blobs.get(refs[2])
    assert len(blobs._blobs) == 2  # the expired ones are gone, not only hidden


def test_the_window_holds_with_multibyte_and_broken_text() -> None:
    store, log, job = _job_log(WorkerSettings(max_log_bytes=200, max_full_log_bytes=1 << 20, full_log_ttl=60))
    printed = ("é" * 70 + "\n").encode() * 30 + b"\xff\xfe broken" + ("€" * 300).encode()
    for start in range(0, len(printed), 37):  # cuts characters in two
        log.add("stdout", printed[start:start + 37])
        log.flush(now=False)
    log.finish()
    _replay(store, job)
    _head, _, rest = job.logs.partition("[celery_nb] ")
    tail = rest.partition("\n")[2]
    assert 0 < len(tail.encode()) <= 100 and printed.decode("utf-8", "replace").endswith(tail)
    assert job.full_log() == printed.decode("utf-8", "replace")


def test_no_whole_log_when_the_worker_keeps_none() -> None:
    store, log, job = _job_log(WorkerSettings(max_log_bytes=100, max_full_log_bytes=0))
    log.add("stdout", b"y" * 1000)
    log.finish()
    _replay(store, job)
    assert "the whole log was not kept (CELERY_NB_MAX_FULL_LOG_BYTES=0)" in job.logs
    with pytest.raises(LogUnavailableError, match="CELERY_NB_MAX_FULL_LOG_BYTES is 0"):
        job.full_log()


def test_readers_never_see_events_dropped_from_a_redis_stream(redis_url: str) -> None:
    store = RedisJobStore(redis_url)
    first = store.append_dropping("dropping", [{"type": "log", "n": 1}, {"type": "log", "n": 2}], [])
    store.append_dropping("dropping", [{"type": "log", "n": 3}], first[:1])
    assert [e["n"] for e in store.read("dropping", START, timeout=0)[0]] == [2, 3]
    assert redis.Redis.from_url(redis_url).xlen(events_key("dropping")) == 2
