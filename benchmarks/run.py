"""celery_nb against raw Celery and `docker run`, measured in one run on the same Redis.

    python benchmarks/run.py            # prints the table

Needs Docker, a Redis at BENCH_REDIS_URL (default redis://127.0.0.1:6379/14, flushed), the
images BENCH_IMAGE (python3; default local/py311) and BENCH_NUMPY_IMAGE (with numpy; default
local/py311-numpy), both with the kernel's Python minor version for the function benchmarks,
and the package index (the environment rows build numpy environments, and remove them and
uv's download cache first). Starts its own `celery-nb worker` and a plain Celery worker
(threads, 4 each).
"""
from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import docker
import redis
import uv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.raw_celery import BROKER_URL, echo, ones  # noqa: E402
from celery_nb import Client  # noqa: E402
from celery_nb.worker import environments  # noqa: E402
from celery_nb.worker.settings import WorkerSettings  # noqa: E402

IMAGE = os.environ.get("BENCH_IMAGE", "local/py311")
NUMPY_IMAGE = os.environ.get("BENCH_NUMPY_IMAGE", "local/py311-numpy")
BIG = 100 * 2**20
CACHED_PIP = "numpy tqdm"  # the environment of the cache-hit row (the quickstart's)
BUILT_PIP = "numpy"  # the environment the first-build rows build, again and again
BUILDS = 5  # first builds (and installs by hand) per row
BIG_CELL = f"import numpy as np\nresult = np.ones({BIG // 8})\n"


def seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    return statistics.median(seconds(fn) for _ in range(repeat))


def alternating_median_seconds(fn: Callable[[], object], baseline: Callable[[], object], runs: int, block: int,
                               settle: int = 0, pause: float = 0.0) -> tuple[float, float]:
    """Medians of ``runs`` timings of ``fn`` and of ``baseline``, taken in alternating blocks of
    ``block`` back-to-back runs, so that both meet the machine's load as it drifts over the
    run. What one side leaves behind (a standby process being forked, a container being
    removed) must not be timed against the other: each block starts with ``settle`` untimed
    runs, or after ``pause`` seconds."""
    times: tuple[list[float], list[float]] = ([], [])
    while len(times[1]) < runs:
        for side, target in zip(times, (fn, baseline)):
            time.sleep(pause)
            for _ in range(settle):
                target()
            side.extend(seconds(target) for _ in range(block))
    return statistics.median(times[0]), statistics.median(times[1])


def start(args: list[str], env: dict[str, str], ready: Callable[[], bool], log: str) -> subprocess.Popen:
    proc = subprocess.Popen(args, env={**os.environ, **env}, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{args[:4]} did not start; see {log}")
        time.sleep(0.2)
    return proc


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory(kind: str) -> None:
    """In a fresh process: the peak resident memory added by collecting one big result, as a
    multiple of the payload (ru_maxrss would not do: Linux keeps it across exec)."""
    if kind == "celery_nb":
        client = Client(BROKER_URL)
        client.submit_cell("a = 1", {}, image=NUMPY_IMAGE, memory="1g").result(60)
        collect = lambda: client.submit_cell(BIG_CELL, {}, image=NUMPY_IMAGE, memory="1g").result(120)  # noqa: E731
    else:
        echo.delay(1).get(timeout=60)
        collect = lambda: ones.delay(BIG).get(timeout=120)  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _memory_kib("VmRSS")
    result = collect()
    print((_memory_kib("VmHWM") - before) * 1024 / BIG)
    del result


def main() -> None:
    redis.Redis.from_url(BROKER_URL).flushdb()
    client = Client(BROKER_URL)
    os.makedirs(ROOT / "build", exist_ok=True)
    workers = [
        start([sys.executable, "-m", "celery_nb.worker.cli", "worker", "--broker", BROKER_URL, "-c", "4",
               "-n", "bench@%h", "-l", "WARNING"], {}, lambda: bool(client.app.control.ping(timeout=0.5)),
              str(ROOT / "build/bench-celery_nb-worker.log")),
        start([sys.executable, "-m", "celery", "-A", "benchmarks.raw_celery", "worker", "-P", "threads", "-c", "4",
               "-n", "raw@%h", "-l", "WARNING", "--without-gossip", "--without-mingle"], {"C_FORCE_ROOT": "1"},  # pickle baseline as root
              lambda: bool(echo.app.control.ping(timeout=0.5)), str(ROOT / "build/bench-raw-worker.log")),
    ]
    try:
        rows = run_all(client)
    finally:
        for proc in workers:
            proc.terminate()
            proc.wait(30)
    print(f"\ncelery_nb benchmarks (image {IMAGE}, numpy image {NUMPY_IMAGE}, Redis {BROKER_URL})\n")
    print(f"{'measure':<46}{'value':>14}{'baseline':>14}{'ratio':>9}  target")
    for name, value, baseline, unit, target, ok in rows:
        ratio = value / baseline if baseline else float("nan")
        verdict = "" if target == "-" else ("met" if ok(ratio) else "NOT met")
        print(f"{name:<46}{value:>11.4g} {unit:<2}{baseline:>11.4g} {unit:<2}{ratio:>9.2f}  {target} {verdict}")


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


def install_by_hand(docker_client: docker.DockerClient) -> float:
    """Seconds to install the same requirement into a new container of the same image by hand:
    uv (and the CA bundle) copied in, then `uv venv` and `uv pip install` in it, compiling the
    bytecode as the builds do (and pip does)."""
    started = time.perf_counter()
    container = docker_client.containers.create(
        IMAGE, ["sh", "-c", "/uv/uv venv -q /opt/venv && /uv/uv pip install -q --compile-bytecode "
                            "--python /opt/venv/bin/python " + BUILT_PIP], environment={"SSL_CERT_FILE": "/uv/ca.crt"})
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
    for _ in range(BUILDS):
        builds.append(first_build(client, docker_client, download_cache))
        installs.append(install_by_hand(docker_client))
    return statistics.median(builds), statistics.median(installs), builds, installs


def run_all(client: Client) -> list[tuple]:
    raw_round_trip = lambda: echo.delay(1).get(timeout=60)  # noqa: E731
    trivial = lambda **kw: client.submit_cell("a = 1", {}, image=IMAGE, **kw).result(60)  # noqa: E731
    raw_round_trip()
    trivial()
    warm, raw_rt = alternating_median_seconds(trivial, raw_round_trip, runs=200, block=50, settle=5)
    started = time.perf_counter()
    results = [echo.delay(i) for i in range(2000)]
    for r in results:
        r.get(timeout=120)
    raw_tps = 2000 / (time.perf_counter() - started)

    docker_client = docker.from_env()
    docker_run = lambda: docker_client.containers.run(IMAGE, ["python3", "-c", "a = 1"], remove=True)  # noqa: E731
    docker_run()
    cold, docker_run_time = alternating_median_seconds(lambda: trivial(fresh=True), docker_run, runs=10, block=1,
                                                       pause=0.5)
    embedded = Client(None)
    embedded_trivial = lambda: embedded.submit_cell("a = 1", {}, image=IMAGE).result(60)  # noqa: E731
    embedded_trivial()
    warm_embedded = median_seconds(embedded_trivial, 100)
    embedded.shutdown()

    square = client.remote(lambda v: v * v, image=IMAGE)
    square.map(range(100))
    map_rate = 10_000 / median_seconds(lambda: square.map(range(10_000)), 3)

    big = lambda: client.submit_cell(BIG_CELL, {}, image=NUMPY_IMAGE, memory="1g").result(120)  # noqa: E731
    big()
    big_nb = median_seconds(big, 3)
    ones.delay(BIG).get(timeout=120)
    big_raw = median_seconds(lambda: ones.delay(BIG).get(timeout=120), 3)
    peaks = {kind: float(subprocess.run([sys.executable, __file__, "--peak-memory", kind], capture_output=True,
                                        text=True, check=True, cwd=ROOT).stdout) for kind in ("celery_nb", "raw")}

    cache_hit = lambda: client.submit_cell("a = 1", {}, image=IMAGE, pip=CACHED_PIP).result(60)  # noqa: E731
    cache_hit()
    hit, plain = alternating_median_seconds(cache_hit, trivial, runs=200, block=50, settle=5)
    cold_build, cold_install, cold_builds, cold_installs = builds_against_installs(client, docker_client, False)
    warm_build, warm_install, warm_builds, warm_installs = builds_against_installs(client, docker_client, True)
    for name, values in (("first builds, uv cache empty", cold_builds), ("installs by hand", cold_installs),
                         ("first builds, uv cache warm", warm_builds), ("installs by hand", warm_installs)):
        print(f"{name}: {', '.join(f'{v:.2f}' for v in values)} s")
    return [
        ("warm trivial cell round trip vs raw Celery", warm * 1e3, raw_rt * 1e3, "ms", "<= 2x", lambda r: r <= 2),
        ("warm trivial cell, embedded worker (no target)", warm_embedded * 1e3, raw_rt * 1e3, "ms", "-",
         lambda _r: True),
        ("cold cell (--fresh) vs docker run", cold * 1e3, docker_run_time * 1e3, "ms", "<= 1.2x", lambda r: r <= 1.2),
        ("map 10,000 items: items/s vs raw Celery tasks/s", map_rate, raw_tps, "/s", ">= 5x", lambda r: r >= 5),
        ("100 MiB numpy result vs Celery pickle result", big_nb * 1e3, big_raw * 1e3, "ms", "<= 0.5x",
         lambda r: r <= 0.5),
        ("kernel peak memory / payload (raw Celery's)", peaks["celery_nb"], peaks["raw"], "x", "<= 2.5x payload",
         lambda _r: peaks["celery_nb"] <= 2.5),
        ("--pip cache hit vs plain warm cell", hit * 1e3, plain * 1e3, "ms", "<= +5 ms",
         lambda _r: hit - plain <= 0.005),
        ("first numpy env build (empty uv cache) vs by hand", cold_build, cold_install, "s", "<= 1x", lambda r: r <= 1),
        ("first numpy env build (warm uv cache) vs by hand", warm_build, warm_install, "s", "<= 1x", lambda r: r <= 1),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak-memory"]:
        peak_memory(sys.argv[2])
    else:
        main()
