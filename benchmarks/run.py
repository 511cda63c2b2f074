"""celery_nb against raw Celery, ipyparallel, Dask and `docker run`, measured in one run.

    python benchmarks/run.py            # prints the table

    python benchmarks/run.py --big-data # only the big data rows

    python benchmarks/run.py --runtime  # only the runtime alone in a container (no Redis needed)

Needs Docker, a Redis at BENCH_REDIS_URL (default redis://127.0.0.1:6379/14, flushed), the
images BENCH_IMAGE (python3; default local/py311) and BENCH_NUMPY_IMAGE (with numpy; default
local/py311-numpy), both with the kernel's Python minor version for the function benchmarks,
and the package index (the environment rows build numpy environments, and remove them and
uv's download cache first). Starts its own `celery-nb worker`, another one as on another host
(CELERY_NB_KERNEL_SHARED_MEMORY=0: big data through Redis, on queue ELSEWHERE), for the
signing rows one with CELERY_NB_SECRET (on queue SIGNED), and a plain Celery worker (threads, 4
each); a container of BENCH_IMAGE running benchmarks/fork_server.py,
the least a warm container does to run each call in a fresh process, which a raw Celery task
calls ("raw Celery + container"); ipyparallel (two engines) and Dask (two single-threaded worker
processes) when they are installed.

Each figure is printed with each baseline measured in the same run and the ratio. Round trips
are timed in alternating blocks (celery_nb, then each baseline), so that the machine's drift
over a run does not decide a ratio; medians and p90s.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import docker
import redis
import uv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import celery_nb_runtime  # noqa: E402
from benchmarks.fork_server import ask  # noqa: E402
from benchmarks.in_kernel import BenchKernel  # noqa: E402
from benchmarks.peers import Peer, running_peers  # noqa: E402
from benchmarks.raw_celery import BROKER_URL, echo, echo_in_container, ones, size_of  # noqa: E402
from celery_nb import Client, JobOptions, payload  # noqa: E402
from celery_nb.jobstore import LEASE  # noqa: E402
from celery_nb.worker import docker_api, environments  # noqa: E402
from celery_nb.worker.channel import RuntimeContainer  # noqa: E402
from celery_nb.worker.policy import WorkerPolicy  # noqa: E402
from celery_nb.worker.settings import WorkerSettings  # noqa: E402
from celery_nb_runtime import protocol  # noqa: E402

IMAGE = os.environ.get("BENCH_IMAGE", "local/py311")
NUMPY_IMAGE = os.environ.get("BENCH_NUMPY_IMAGE", "local/py311-numpy")
BIG = 100 * 2**20
BIG_CELL = f"import numpy as np\nresult = np.ones({BIG // 8})\n"
NO_RESULT_CELL = f"import numpy as np\nnp.ones({BIG // 8})\nresult = 1\n"  # the same work, nothing big back
ONE_GB_PER_S = BIG / 1e9 * 1e3  # ms that BIG bytes take at 1 GB/s
ELSEWHERE = "elsewhere"  # the queue of the worker as on another host (and its node name's start)
BIG_RUNS = 11  # timings of each big data side
MANY = 2000
CACHED_PIP = "numpy tqdm"  # the environment of the cache-hit row (the quickstart's)
BUILT_PIP = "numpy"  # the environment the first-build rows build, again and again
BUILDS = 5  # first builds (and installs by hand) per row
FORK_SERVER_DIR = ROOT / "build" / "fork_server"  # its sockets, shared with its containers
PRELOADED = ("cloudpickle", "celery_nb_runtime.runner")  # what celery_nb's server imports for its jobs
RUNTIME_CALLS = 1000  # trivial calls a round of the runtime-alone rows
RUNTIME_ROUNDS = 3
IN_CONTAINER = "raw Celery + container"  # raw Celery's task calling benchmarks/fork_server.py
NEW_PROCESS = "--new-process"  # celery_nb's jobs each in a process of its own
SIGNED = "signed"  # the queue of the worker with CELERY_NB_SECRET set (and its node name's start)


def identity(value: object) -> object:  # defined in __main__: travels by value to the container
    return value


@dataclass
class Samples:
    """Timings of one thing, in seconds."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def p90(self) -> float:
        return statistics.quantiles(self.values, n=10)[-1] if len(self.values) >= 10 else max(self.values)


def seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def timed(fn: Callable[[], object], repeat: int) -> Samples:
    return Samples([seconds(fn) for _ in range(repeat)])


def alternating(sides: dict[str, Callable[[], object]], runs: int, block: int, settle: int = 0,
                pause: float = 0.0, shuffled: bool = False) -> dict[str, Samples]:
    """``runs`` timings of each side, taken in alternating blocks of ``block`` back-to-back runs,
    so that all meet the machine's load as it drifts over the run. What one side leaves behind
    (a standby process being forked, a container being removed) must not be timed against
    another: each block starts with ``settle`` untimed runs, or after ``pause`` seconds; and
    (``shuffled``) each round takes the sides in a new random order, so that what one side does
    to the next (memory it freed) falls on each side alike, not always on the same one."""
    samples = {name: Samples() for name in sides}
    order = list(sides)
    while len(samples[order[0]].values) < runs:
        if shuffled:
            random.shuffle(order)
        for name in order:
            target = sides[name]
            time.sleep(pause)
            for _ in range(settle):
                target()
            samples[name].values.extend(seconds(target) for _ in range(block))
    return samples


@dataclass
class Row:
    """One measure: celery_nb's figure against each baseline, with a target per baseline."""

    measure: str
    value: float
    unit: str
    baselines: dict[str, float]
    targets: dict[str, tuple[str, float]]  # baseline -> ("<=" or ">=", ratio), or ("+<=", most added)
    p90: float | None = None


def per_second(count: int, samples: Samples) -> float:
    return count / samples.median


def start(args: list[str], env: dict[str, str], ready: Callable[[], bool], log: str) -> subprocess.Popen:
    proc = subprocess.Popen(args, env={**os.environ, **env}, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    try:
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{args[:4]} did not start; see {log}")
            time.sleep(0.2)
    except BaseException:  # not left behind to take a later run's jobs
        proc.terminate()
        proc.wait(30)
        raise
    return proc


def _memory_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + ":"))


def peak_memory(kind: str) -> None:
    """In a fresh process: the peak resident memory added by collecting one big result and
    reading it once (all its pages resident), as a multiple of the payload (ru_maxrss would not
    do: Linux keeps it across exec). ``kind``: "same host" (a worker of this host), "elsewhere"
    (through Redis) or "raw" (raw Celery)."""
    if kind != "raw":
        client, queue = Client(BROKER_URL), ELSEWHERE if kind == "elsewhere" else None
        client.submit_cell("a = 1", {}, image=NUMPY_IMAGE, memory="1g", queue=queue).result(60)
        collect = lambda: client.submit_cell(BIG_CELL, {}, image=NUMPY_IMAGE, memory="1g",  # noqa: E731
                                             queue=queue).result(120)["result"]
    else:
        echo.delay(1).get(timeout=60)
        collect = lambda: ones.delay(BIG).get(timeout=120)  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _memory_kib("VmRSS")
    result = collect()
    float(result.sum())
    print((_memory_kib("VmHWM") - before) * 1024 / BIG)
    del result


def round_trips(client: Client, peers: list[Peer]) -> list[Row]:
    raw = lambda: echo.delay(1).get(timeout=60)  # noqa: E731
    in_container = lambda: echo_in_container.delay(1).get(timeout=60)  # noqa: E731
    cell = lambda: client.submit_cell("a = 1", {}, image=IMAGE).result(60)  # noqa: E731
    function = lambda: client.submit(identity, 1, image=IMAGE).result(60)  # noqa: E731
    # what keeping the kernel's process saves: a new process per job, as before
    own = lambda: client.submit(identity, 1, image=IMAGE, new_process=True).result(60)  # noqa: E731
    sides = {"cell": cell, "function": function, NEW_PROCESS: own, "raw Celery": raw, IN_CONTAINER: in_container,
             **{p.name: p.round_trip for p in peers}}
    for side in sides.values():
        side()
    times = alternating(sides, runs=200, block=50, settle=5)
    baselines = {name: times[name].median * 1e3 for name in ("raw Celery", IN_CONTAINER, *(p.name for p in peers))}
    targets = {"raw Celery": ("<=", 1.5), "ipyparallel": ("<=", 1.0)}
    measures = {"cell": "warm trivial cell round trip", "function": "warm trivial function round trip",
                NEW_PROCESS: f"warm trivial function round trip, {NEW_PROCESS}"}
    return [Row(measure, times[kind].median * 1e3, "ms", baselines, targets if kind != NEW_PROCESS else {},
                times[kind].p90 * 1e3) for kind, measure in measures.items()]


def kernel_round_trip() -> Row:
    """The cell through the magic in a real kernel, against a cell calling the raw Celery task."""
    env = {**os.environ, "CELERY_NB_BROKER_URL": BROKER_URL, "CELERY_NB_DEFAULT_IMAGE": IMAGE}
    kernel = BenchKernel(env, cwd=str(ROOT))
    try:
        kernel.run("%load_ext celery_nb\nfrom benchmarks.raw_celery import echo")
        magic = lambda: kernel.run("%%celery_docker\na = 1")  # noqa: E731
        raw = lambda: kernel.run("a = echo.delay(1).get(timeout=60)")  # noqa: E731
        times = alternating({"magic": magic, "raw": raw}, runs=100, block=25, settle=3)
    finally:
        kernel.shutdown()
    return Row("%%celery_docker cell in a kernel (execute_request)", times["magic"].median * 1e3, "ms",
               {"raw Celery cell": times["raw"].median * 1e3}, {"raw Celery cell": ("<=", 1.5)},
               times["magic"].p90 * 1e3)


def lease_claim(client: Client) -> Row:
    """What a job's lease costs it: the claim, one Redis round trip (a Lua script) before the job
    runs, against a PING of the same Redis. (The lease is what makes a message delivered again
    run once, and another worker take over from a dead one; renewing the leases of running jobs
    is one round trip per worker every RENEW_INTERVAL, and the job's end releases its lease.)"""
    ping = redis.Redis.from_url(BROKER_URL).ping
    claim = lambda: client.store.claim(uuid.uuid4().hex, "benchmark", LEASE)  # noqa: E731
    times = alternating({"claim": claim, "PING": ping}, runs=1000, block=100, settle=5)
    return Row("a job's lease claim (one Redis round trip)", times["claim"].median * 1e3, "ms",
               {"Redis PING": times["PING"].median * 1e3}, {}, times["claim"].p90 * 1e3)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time so far: the machine's (busy: user, nice, system, irq, softirq; idle: idle, iowait;
    a hypervisor's steal is neither) and each named process's, with its reaped children's."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq = map(int, f.readline().split()[1:8])
    use = {"machine": (user + nice + system + irq + softirq) / tick, "idle": (idle + iowait) / tick}
    for name, pid in pids.items():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        use[name] = sum(map(int, fields[11:15])) / tick  # utime stime cutime cstime
    return use


def throughput(client: Client, peers: list[Peer], pids: dict[str, dict[str, int]]) -> list[Row]:
    """Individual jobs per second, and the CPU each took: the machine's, and for celery_nb and
    raw Celery that of the kernel (this process), the worker and Redis (``pids``: of each side)."""
    def individual_jobs(new_process: bool) -> None:
        for job in [client.submit(identity, i, image=IMAGE, new_process=new_process) for i in range(MANY)]:
            job.result(120)

    def raw_tasks(task: Callable[..., Any]) -> None:
        for result in [task.delay(i) for i in range(MANY)]:
            result.get(timeout=120)

    sides = {"celery_nb": functools.partial(individual_jobs, False), NEW_PROCESS: functools.partial(individual_jobs, True),
             "raw Celery": functools.partial(raw_tasks, echo),
             IN_CONTAINER: functools.partial(raw_tasks, echo_in_container), **{p.name: lambda p=p: p.many(MANY) for p in peers}}
    used: dict[str, list[dict[str, float]]] = {name: [] for name in sides}

    def accounted(name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            watched = {"kernel": os.getpid(), **pids.get("celery_nb" if name == NEW_PROCESS else name, {})}
            before = cpu_seconds(watched)
            target()
            after = cpu_seconds(watched)
            used[name].append({what: (after[what] - before[what]) / MANY * 1e3 for what in after})
        return run

    times = alternating({name: accounted(name, target) for name, target in sides.items()}, runs=3, block=1)
    rates = {name: per_second(MANY, samples) for name, samples in times.items()}
    cpu = {name: {what: statistics.median(run[what] for run in runs) for what in runs[0]} for name, runs in used.items()}
    for name, parts in cpu.items():
        named = [what for what in parts if what not in ("machine", "idle")]
        rest = parts["machine"] - sum(parts[what] for what in named)
        print(f"CPU per individual job, {name}: machine {parts['machine']:.2f} ms, idle {parts['idle']:.2f} ms; "
              + "".join(f"{what} {parts[what]:.2f}, " for what in named) + f"the rest {rest:.2f} ms"
              + (" (containers, Docker, the system)" if name in ("celery_nb", NEW_PROCESS, IN_CONTAINER) else ""))
    machine = {name: parts["machine"] for name, parts in cpu.items()}
    own_rate, own_machine = rates.pop(NEW_PROCESS), machine.pop(NEW_PROCESS)
    return [Row(f"{MANY} individual jobs (submit each, no chunks)", rates.pop("celery_nb"), "/s", rates,
                {"raw Celery": (">=", 0.75), "ipyparallel": (">=", 1.0)}),
            Row("machine CPU per individual job", machine.pop("celery_nb"), "ms", machine, {}),
            Row(f"{MANY} individual jobs, {NEW_PROCESS}", own_rate, "/s", rates, {}),
            Row(f"machine CPU per individual job, {NEW_PROCESS}", own_machine, "ms", machine, {})]


def cold_start(client: Client) -> Row:
    docker_client = docker.from_env()
    docker_run = lambda: docker_client.containers.run(IMAGE, ["python3", "-c", "a = 1"], remove=True)  # noqa: E731
    fresh = lambda: client.submit_cell("a = 1", {}, image=IMAGE, fresh=True).result(60)  # noqa: E731
    docker_run()
    times = alternating({"fresh": fresh, "docker run": docker_run}, runs=10, block=1, pause=0.5)
    return Row("cold cell (--fresh)", times["fresh"].median * 1e3, "ms", {"docker run": times["docker run"].median * 1e3},
               {"docker run": ("<=", 1.2)}, times["fresh"].p90 * 1e3)


def chunked_map(client: Client, raw_rate: float) -> Row:
    square = client.remote(lambda v: v * v, image=IMAGE)
    square.map(range(100))
    rate = per_second(10_000, timed(lambda: square.map(range(10_000)), 3))
    return Row("map of 10,000 items (chunked)", rate, "/s", {"raw Celery tasks": raw_rate}, {"raw Celery tasks": (">=", 5)})


def big_data(client: Client, embedded: Client) -> list[Row]:
    """100 MiB results and inputs with a worker on this host (the embedded one, a separate one:
    shared memory), against the same cell without them, and against 1 GB/s; and with a worker as
    on another host (through Redis), against raw Celery's pickle result and arguments."""
    data = b"x" * BIG
    cell = lambda c, source, queue=None: c.submit_cell(source, {}, image=NUMPY_IMAGE, memory="1g",  # noqa: E731
                                                       queue=queue).result(120)
    given = lambda c, inputs, queue=None: c.submit_cell("n = len(data)\n", inputs, image=IMAGE,  # noqa: E731
                                                        memory="1g", queue=queue).result(120)
    workers = {"embedded worker": (embedded, None), "worker on this host": (client, None),
               "worker elsewhere (Redis)": (client, ELSEWHERE)}
    sides: dict[str, Callable[[], object]] = {"Celery pickle result": lambda: ones.delay(BIG).get(timeout=120),
                                              "Celery pickle input": lambda: size_of.delay(data).get(timeout=120)}
    for where, (c, queue) in workers.items():
        sides[f"result, {where}"] = functools.partial(cell, c, BIG_CELL, queue)
        sides[f"input, {where}"] = functools.partial(given, c, {"data": data}, queue)
        if queue is None:
            sides[f"no result, {where}"] = functools.partial(cell, c, NO_RESULT_CELL)
            sides[f"no input, {where}"] = functools.partial(given, c, {"data": b""})
    for side in sides.values():
        side()
    times = alternating(sides, runs=BIG_RUNS, block=1, pause=0.3, shuffled=True)  # (what the previous side freed, freed first)
    for name, samples in times.items():
        print(f"{name}: median {samples.median * 1e3:.1f} ms, {min(samples.values) * 1e3:.1f}-"
              f"{max(samples.values) * 1e3:.1f} ms over {len(samples.values)}")
    ms = {name: samples.median * 1e3 for name, samples in times.items()}
    rows = []
    for way, what in (("result", "numpy result"), ("input", "bytes input")):
        for where, (_c, queue) in workers.items():
            value = ms[f"{way}, {where}"]
            if queue is None:  # what the bytes add to the same cell, and the whole cell against 1 GB/s
                without = f"same cell, no {way}"
                rows.append(Row(f"100 MiB {what}, {where}", value, "ms",
                                {without: ms[f"no {way}, {where}"], "1 GB/s": ONE_GB_PER_S},
                                {without: ("+<=", ONE_GB_PER_S)}, times[f"{way}, {where}"].p90 * 1e3))
            else:
                celery = f"Celery pickle {way}"
                rows.append(Row(f"100 MiB {what}, {where}", value, "ms", {celery: ms[celery]},
                                {celery: ("<=", 0.5)}, times[f"{way}, {where}"].p90 * 1e3))
    return rows


def kernel_memory() -> Row:
    peaks = {kind: float(subprocess.run([sys.executable, __file__, "--peak-memory", kind], capture_output=True,
                                        text=True, check=True, cwd=ROOT).stdout)
             for kind in ("same host", "elsewhere", "raw")}
    return Row("kernel peak memory for a 100 MiB result", peaks["same host"], "x",
               {"payload": 1.0, "through Redis": peaks["elsewhere"], "raw Celery": peaks["raw"]},
               {"payload": ("<=", 1.5)})


def big_data_rows(client: Client) -> list[Row]:
    embedded = Client(None)
    try:
        rows = big_data(client, embedded)
    finally:
        embedded.shutdown()
    return [*rows, kernel_memory(), *signing_rows(client)]


def signing_rows(client: Client) -> list[Row]:
    """What signing costs (CELERY_NB_SECRET on the kernel and on a worker of this host: each
    request and end event signed and checked; big data here goes through the kernel's shared
    memory folder, signed by its file's name): a warm function round trip, a 100 MiB result and a
    100 MiB input, against the same unsigned (``client``, the benchmark's own worker)."""
    secret = os.urandom(16).hex()
    signed = Client(BROKER_URL, secret=secret)
    node = f"{SIGNED}{os.getpid()}@{socket.gethostname()}"  # (pinged alone: the raw Celery worker answers in pickle)
    worker = start([sys.executable, "-m", "celery_nb.worker.cli", "worker", "--broker", BROKER_URL, "-c", "4", "-Q",
                    SIGNED, "-n", node, "-l", "WARNING"], {"CELERY_NB_SECRET": secret},
                   lambda: bool(client.app.control.ping(destination=[node], timeout=0.5)),
                   str(ROOT / "build/bench-signed-worker.log"))
    data = b"x" * BIG
    try:
        ways = {"function": lambda c, queue: c.submit(identity, 1, image=IMAGE, queue=queue).result(60),
                "result": lambda c, queue: c.submit_cell(BIG_CELL, {}, image=NUMPY_IMAGE, memory="1g",
                                                         queue=queue).result(120),
                "input": lambda c, queue: c.submit_cell("n = len(data)\n", {"data": data}, image=IMAGE, memory="1g",
                                                        queue=queue).result(120)}
        # signed and unsigned alike, a result after an input and an input after a result (a side's
        # time depends on what the one before it freed: see README, Benchmarks)
        sides = {(way, kind): functools.partial(call, *where)
                 for kind, where in (("unsigned", (client, None)), ("signed", (signed, SIGNED)))
                 for way, call in ways.items()}
        for side in sides.values():
            side()
        times = alternating({k: v for k, v in sides.items() if k[0] == "function"}, runs=200, block=50, settle=5)
        times.update(alternating({k: v for k, v in sides.items() if k[0] != "function"}, runs=BIG_RUNS, block=1,
                                 pause=0.3))
    finally:
        worker.terminate()
        worker.wait(30)
        signed.shutdown()
    measures = {"function": "warm trivial function round trip, signed", "result": "100 MiB numpy result, signed",
                "input": "100 MiB bytes input, signed"}
    return [Row(measure, times[(way, "signed")].median * 1e3, "ms", {"unsigned": times[(way, "unsigned")].median * 1e3},
                {}, times[(way, "signed")].p90 * 1e3) for way, measure in measures.items()]


def remove_environment(docker_client: docker.DockerClient, requirements: str) -> None:
    """So that the next job of ``requirements`` builds its environment: a first build."""
    for info in environments.list_environments(docker_client):
        if info.requirements == tuple(requirements.split()):
            environments.remove_environment(docker_client, info)


def first_build(client: Client, docker_client: docker.DockerClient, download_cache: bool) -> float:
    """Seconds the build of a new numpy environment takes (the job's ``build`` phase); uv's
    download cache emptied first unless ``download_cache``."""
    remove_environment(docker_client, BUILT_PIP)
    if not download_cache:
        environments.clear_download_cache(docker_client)
    job = client.submit_cell("import numpy\n", {}, image=IMAGE, pip=BUILT_PIP, fresh=True)
    job.result(300)
    return job.timing_breakdown()["build"]


BY_HAND_CACHE = "celery-nb-bench-uv-cache"  # the download cache of the installs by hand that have one


def install_by_hand(docker_client: docker.DockerClient, download_cache: bool) -> float:
    """Seconds to install the same requirement into a new container of the same image by hand:
    uv (and the CA bundle) copied in, then `uv venv` and `uv pip install` in it, compiling the
    bytecode as the builds do (and pip does); with ``download_cache``, uv's cache in a volume
    kept from one install to the next, as the builds' is."""
    started = time.perf_counter()
    cache = {"volumes": {BY_HAND_CACHE: {"bind": "/uv-cache", "mode": "rw"}}} if download_cache else {}
    container = docker_client.containers.create(
        IMAGE, ["sh", "-c", "/uv/uv venv -q /opt/venv && /uv/uv pip install -q --compile-bytecode "
                            "--python /opt/venv/bin/python " + BUILT_PIP],
        environment={"SSL_CERT_FILE": "/uv/ca.crt", **({"UV_CACHE_DIR": "/uv-cache"} if download_cache else {})}, **cache)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(uv.find_uv_bin(), "uv/uv")
        tar.add(WorkerSettings().build_ca_bundle, "uv/ca.crt")
    container.put_archive("/", archive.getvalue())
    container.start()
    code = container.wait()["StatusCode"]
    elapsed = time.perf_counter() - started
    container.remove()
    if code:
        raise SystemExit(f"installing {BUILT_PIP} by hand in {IMAGE} failed with code {code}")
    return elapsed


def builds_against_installs(client: Client, docker_client: docker.DockerClient,
                            download_cache: bool) -> tuple[float, float, list[float], list[float]]:
    """Medians of BUILDS first builds and installs by hand, alternating, and their values."""
    builds, installs = [], []
    if download_cache:
        install_by_hand(docker_client, download_cache)  # its cache filled, as the builds' is
    try:
        for _ in range(BUILDS):
            builds.append(first_build(client, docker_client, download_cache))
            installs.append(install_by_hand(docker_client, download_cache))
    finally:
        if download_cache:
            docker_client.volumes.get(BY_HAND_CACHE).remove()
    return statistics.median(builds), statistics.median(installs), builds, installs


def environment_rows(client: Client) -> list[Row]:
    docker_client = docker.from_env()
    plain = lambda: client.submit_cell("a = 1", {}, image=IMAGE).result(60)  # noqa: E731
    cache_hit = lambda: client.submit_cell("a = 1", {}, image=IMAGE, pip=CACHED_PIP).result(60)  # noqa: E731
    cache_hit()
    times = alternating({"hit": cache_hit, "plain": plain}, runs=200, block=50, settle=5)
    rows = [Row("--pip cache hit (a warm cell)", times["hit"].median * 1e3, "ms",
                {"plain warm cell": times["plain"].median * 1e3}, {"plain warm cell": ("+<=", 5.0)},
                times["hit"].p90 * 1e3)]
    for download_cache, which in ((False, "empty"), (True, "warm")):
        build, install, builds, installs = builds_against_installs(client, docker_client, download_cache)
        print(f"first builds, uv cache {which}: {', '.join(f'{v:.2f}' for v in builds)} s; "
              f"installs by hand: {', '.join(f'{v:.2f}' for v in installs)} s")
        rows.append(Row(f"first numpy environment, uv cache {which}", build, "s", {"uv install by hand": install},
                        {"uv install by hand": ("<=", 1.0)}))
    return rows


def run_all(client: Client, pids: dict[str, dict[str, int]]) -> list[Row]:
    with running_peers() as peers:
        for peer in peers:
            peer.round_trip()
        rows = round_trips(client, peers)
        many = throughput(client, peers, pids)
        rows.extend(many)
    raw_rate = many[0].baselines["raw Celery"]  # (the first row's)
    rows.append(kernel_round_trip())
    rows.append(lease_claim(client))
    rows.append(cold_start(client))
    rows.append(chunked_map(client, raw_rate))
    rows.extend(big_data_rows(client))
    rows.extend(environment_rows(client))
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"\ncelery_nb benchmarks (image {IMAGE}, numpy image {NUMPY_IMAGE}, Redis {BROKER_URL})\n")
    width = max(len(row.measure) for row in rows) + 2
    print(f"{'measure':<{width}}{'celery_nb':>22}  {'baseline':<22}{'value':>10}{'ratio':>8}  target")
    for row in rows:
        value = f"{row.value:.4g} {row.unit}"
        if row.p90 is not None:
            value += f" (p90 {row.p90:.3g})"
        for i, (name, baseline) in enumerate(row.baselines.items()):
            ratio = row.value / baseline if baseline else float("nan")
            target = row.targets.get(name)
            verdict = "-"
            if target:
                op, bound = target
                if op == "+<=":  # at most ``bound`` more than the baseline, in its unit
                    met, verdict = row.value - baseline <= bound, f"<= +{bound:g} {row.unit} "
                else:
                    met, verdict = (ratio <= bound if op == "<=" else ratio >= bound), f"{op} {bound:g}x "
                verdict += "met" if met else "NOT met"
            left = f"{row.measure:<{width}}{value:>22}" if i == 0 else " " * (width + 22)
            print(f"{left}  {name:<22}{baseline:>10.4g}{ratio:>8.2f}  {verdict}")


@contextlib.contextmanager
def fork_server(preload: tuple[str, ...] = ()) -> Iterator[tuple[str, docker.models.containers.Container]]:
    """benchmarks/fork_server.py in a container of IMAGE, confined as a celery_nb worker's by
    default (2 GiB, 512 processes, no capabilities, no network), with the modules ``preload``
    (of cloudpickle and the runtime, copied in read-only) imported first; yields its socket's
    path and its container."""
    folder = FORK_SERVER_DIR / ("preloaded" if preload else "bare")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    socket_path = folder / "server.sock"
    packages = {os.path.dirname(package.__file__): {"bind": f"/preload/{package.__name__}", "mode": "ro"}
                for package in (cloudpickle, celery_nb_runtime)} if preload else {}
    container = docker.from_env().containers.run(
        IMAGE, ["python3", "/benchmarks/fork_server.py", "/run/fork_server/server.sock", *preload], detach=True,
        remove=True, mem_limit="2g", memswap_limit="2g", pids_limit=512, cap_drop=["ALL"],
        security_opt=["no-new-privileges"], network_mode="none",
        environment={"PYTHONPATH": "/preload"} if preload else {},
        volumes={str(ROOT / "benchmarks"): {"bind": "/benchmarks", "mode": "ro"},
                 str(folder): {"bind": "/run/fork_server", "mode": "rw"}, **packages})
    try:
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            container.reload()
            if container.status == "exited" or time.monotonic() > deadline:
                raise SystemExit(f"benchmarks/fork_server.py did not start in {IMAGE}: {container.logs().decode()}")
            time.sleep(0.1)
        yield str(socket_path), container
    finally:
        container.kill()


def container_usage(container: docker.models.containers.Container) -> tuple[float, int]:
    """A container's CPU seconds and page faults so far (Docker's stats: any cgroup version)."""
    stats = container.stats(stream=False)
    return stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9, stats["memory_stats"]["stats"]["pgfault"]


def fork_server_call(socket_path: str) -> Callable[[], object]:
    """One trivial call to benchmarks/fork_server.py, over a connection of its own."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(socket_path)
    return functools.partial(ask, conn, 1)


def runtime_call(runtime: RuntimeContainer, process: str | None) -> Callable[[], None]:
    """One trivial function call to celery_nb's runtime in ``runtime``, as a worker sends it, with
    the process key ``process``, until the runtime's END (its job's process has exited and been
    reaped, or stays for the next call of that key)."""
    call_payload = b"".join(payload.call_payload(identity, (1,), {}))

    def call() -> None:
        runtime.send(call_payload, {}, process=process)
        while True:
            frames = runtime.read_frames(10)
            if not frames:
                raise SystemExit(f"celery_nb's runtime in {IMAGE} did not answer a call within 10 s")
            end = next((body for kind, body in frames if kind == protocol.FRAME_END), None)
            if end is not None:
                runtime.ended(json.loads(end))
                return
    return call


def runtime_alone() -> list[Row]:
    """celery_nb's runtime alone in a warm container of IMAGE (created as a worker with the
    default policy creates it, and fed as a worker on this host feeds it), against
    benchmarks/fork_server.py in a container of the same image, bare and with the modules
    celery_nb's server keeps loaded: the container's CPU and page faults per trivial call, one
    call after another (RUNTIME_CALLS a round, rounds alternating, medians)."""
    spec = WorkerPolicy().plan(JobOptions(image=IMAGE)).container
    runtime, kept = (docker_api.create_container(docker.from_env(), spec, {}, "never", one_shot=False) for _ in "ab")
    try:
        docker_api.start(runtime)
        docker_api.start(kept)
        with fork_server() as (bare_socket, bare), fork_server(PRELOADED) as (loaded_socket, loaded):
            sides = {"celery_nb runtime, a process a call": (runtime.container, runtime_call(runtime, None)),
                     "celery_nb runtime, process kept": (kept.container, runtime_call(kept, "benchmark")),
                     "fork server": (bare, fork_server_call(bare_socket)),
                     "fork server + imports": (loaded, fork_server_call(loaded_socket))}
            cpu: dict[str, list[float]] = {name: [] for name in sides}
            faults: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(RUNTIME_ROUNDS):
                for name, (container, call) in sides.items():
                    for _ in range(50):  # its standby process forked and settled
                        call()
                    cpu_before, faults_before = container_usage(container)
                    for _ in range(RUNTIME_CALLS):
                        call()
                    cpu_after, faults_after = container_usage(container)
                    cpu[name].append((cpu_after - cpu_before) / RUNTIME_CALLS * 1e3)
                    faults[name].append((faults_after - faults_before) / RUNTIME_CALLS)
    finally:
        runtime.remove()
        kept.remove()
    for name in sides:
        print(f"runtime alone, {name}: {', '.join(f'{v:.2f}' for v in cpu[name])} ms of CPU and "
              f"{', '.join(f'{v:.0f}' for v in faults[name])} page faults a call")
    median = {name: (statistics.median(cpu[name]), statistics.median(faults[name])) for name in sides}
    ours = [name for name in sides if name.startswith("celery_nb runtime, ")]
    baselines = [name for name in sides if name not in ours]
    return [Row(f"runtime alone, {name[len('celery_nb runtime, '):]}: {what} per trivial call", median[name][i], unit,
                {baseline: median[baseline][i] for baseline in baselines}, {})
            for name in ours for i, (what, unit) in enumerate((("container CPU", "ms"), ("page faults", "faults")))]


def local_redis_pid() -> int | None:
    """The pid of the benchmark's Redis if it runs on this machine (its CPU is then counted)."""
    pid = redis.Redis.from_url(BROKER_URL).info("server")["process_id"]
    try:
        with open(f"/proc/{pid}/comm") as f:
            return pid if f.read().startswith("redis") else None
    except FileNotFoundError:
        return None


def main(big_data_only: bool) -> None:
    redis.Redis.from_url(BROKER_URL).flushdb()
    client = Client(BROKER_URL)
    os.makedirs(ROOT / "build", exist_ok=True)
    with fork_server() as (server_socket, _container):
        workers = [
            start([sys.executable, "-m", "celery_nb.worker.cli", "worker", "--broker", BROKER_URL, "-c", "4",
                   "-n", f"bench{os.getpid()}@%h", "-l", "WARNING"], {}, lambda: bool(client.app.control.ping(timeout=0.5)),
                  str(ROOT / "build/bench-celery_nb-worker.log")),
            start([sys.executable, "-m", "celery_nb.worker.cli", "worker", "--broker", BROKER_URL, "-c", "4", "-Q",
                   ELSEWHERE, "-n", f"{ELSEWHERE}{os.getpid()}@%h", "-l", "WARNING"],
                  {"CELERY_NB_KERNEL_SHARED_MEMORY": "0"},
                  lambda: any(ELSEWHERE in node for reply in client.app.control.ping(timeout=0.5) for node in reply),
                  str(ROOT / "build/bench-elsewhere-worker.log")),
            start([sys.executable, "-m", "celery", "-A", "benchmarks.raw_celery", "worker", "-P", "threads", "-c", "4",
                   "-n", f"raw{os.getpid()}@%h", "-l", "WARNING", "--without-gossip", "--without-mingle"],
                  {"C_FORCE_ROOT": "1", "BENCH_FORK_SERVER_SOCKET": server_socket},  # pickle baseline as root
                  lambda: bool(echo.app.control.ping(timeout=0.5)), str(ROOT / "build/bench-raw-worker.log")),
        ]
        try:
            redis_pid = {"Redis": pid} if (pid := local_redis_pid()) else {}
            raw_worker = {"worker": workers[2].pid, **redis_pid}
            pids = {"celery_nb": {"worker": workers[0].pid, **redis_pid}, "raw Celery": raw_worker, IN_CONTAINER: raw_worker}
            rows = big_data_rows(client) if big_data_only else run_all(client, pids)
        finally:
            for proc in workers:
                proc.terminate()
                proc.wait(30)
    print_table(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-data", action="store_true", help="only the big data rows")
    parser.add_argument("--runtime", action="store_true",
                        help="only the runtime alone in a container, against the fork server (no Redis needed)")
    parser.add_argument("--peak-memory", metavar="KIND", help=argparse.SUPPRESS)  # (kernel_memory's fresh process)
    arguments = parser.parse_args()
    if arguments.peak_memory:
        peak_memory(arguments.peak_memory)
    elif arguments.runtime:
        print_table(runtime_alone())
    else:
        main(arguments.big_data)
