"""``Job.usage``: the peak memory and CPU time of a job's own processes, measured in its
container, in a warm and in a fresh container, and where a person sees them."""
from __future__ import annotations

import re

import sys

import cloudpickle

from celery_nb import Client, Job
from celery_nb.widgets import JobWidget, jobs_text_table
from tests.conftest import IMAGE, REDIS_URL

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its functions run in containers without it
MiB = 1 << 20


def allocate_and_burn(mib: int, cpu_seconds: float, sleep: float = 0.0) -> str:
    """Touches ``mib`` MiB, keeps a CPU busy for ``cpu_seconds`` and then sleeps; returns its
    container's id (the host name)."""
    import socket
    import time
    data = b"x" * (mib << 20)  # written, so resident
    started = time.process_time()
    while time.process_time() - started < cpu_seconds:
        pass
    time.sleep(sleep)
    del data
    return socket.gethostname()


def side_by_side(processes: int, mib: int, cpu_seconds: float) -> None:
    """``processes`` subprocesses at once, each holding ``mib`` MiB and burning ``cpu_seconds``."""
    import subprocess
    import sys
    code = (f"import time\ndata = b'x' * ({mib} << 20)\nt = time.process_time()\n"
            f"while time.process_time() - t < {cpu_seconds}:\n    pass\ntime.sleep(0.5)\n")
    children = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(processes)]
    for child in children:
        child.wait()


def assert_between(value: float, low: float, high: float, what: str) -> None:
    assert low <= value <= high, f"{what} {value:.3f} not in [{low}, {high}]"


def test_a_warm_job_reports_its_own_usage_not_its_containers(client: Client) -> None:
    options = {"image": IMAGE, "memory": "768m"}  # a pool key of its own: the second job runs where the first did
    first = client.submit(allocate_and_burn, 400, 1.2, **options)
    first_container = first.result(timeout=120)
    second = client.submit(allocate_and_burn, 200, 0.4, **options)
    assert second.result(timeout=120) == first_container and second.container == "warm"
    assert_between(first.usage["peak_memory"] / MiB, 400, 460, "first peak MiB")
    assert_between(first.usage["cpu_seconds"], 1.2, 2.5, "first CPU s")
    # the container's figures, or the first job's, would be >= 400 MiB and >= 1.6 s
    assert_between(second.usage["peak_memory"] / MiB, 200, 260, "second peak MiB")
    assert_between(second.usage["cpu_seconds"], 0.4, 1.1, "second CPU s")
    assert second.usage["memory_limit"] == 768 * MiB


def test_a_fresh_jobs_usage_is_its_own_next_to_another_job(redis_client: Client) -> None:
    small = redis_client.submit(allocate_and_burn, 200, 0.4, 1.5, image=IMAGE, fresh=True)
    big = redis_client.submit(allocate_and_burn, 400, 1.2, image=IMAGE, fresh=True)  # at the same time
    assert small.result(timeout=120) != big.result(timeout=120)
    assert small.container == big.container == "cold"
    assert_between(small.usage["peak_memory"] / MiB, 200, 260, "peak MiB")
    # CPU time, not the time it ran (which includes 1.5 s of sleep)
    assert_between(small.usage["cpu_seconds"], 0.4, 1.1, "CPU s")
    assert small.timing_breakdown()["run"] > 1.9
    assert_between(big.usage["peak_memory"] / MiB, 400, 460, "the other job's peak MiB")


def test_the_peak_adds_up_the_jobs_processes(redis_client: Client) -> None:
    job = redis_client.submit(side_by_side, 3, 100, 0.3, image=IMAGE, memory="1g")
    job.result(timeout=120)
    # one process's high-water mark would be about 110 MiB
    assert_between(job.usage["peak_memory"] / MiB, 300, 380, "peak MiB")
    assert_between(job.usage["cpu_seconds"], 0.9, 2.5, "CPU s of the subprocesses")


def test_usage_is_shown_in_the_widget_the_summary_and_the_jobs_table(redis_client: Client) -> None:
    job = redis_client.submit(allocate_and_burn, 50, 0.2, image=IMAGE)
    job.result(timeout=120)
    text = job.usage_text()
    assert text.startswith("peak ") and " MiB of 2.0 GiB, CPU 0." in text  # the worker's default limit
    assert re.search(f'<span class="celery-nb-usage" style="[^"]*"> · {re.escape(text)}</span>', JobWidget(job).timings.value)
    assert job.summary().endswith(f" | {text}")
    header, row = jobs_text_table([job]).splitlines()
    assert "peak memory" in header and "CPU" in header
    peak, of = text.split(", ")[0].removeprefix("peak ").split(" of ")
    assert f"{peak} of {of}" in row and f"{job.usage['cpu_seconds']:.2f} s" in row
    again = Job.attach(job.id, Client(REDIS_URL))  # another kernel replays the job's events
    assert again.usage == job.usage


def test_a_job_that_never_ran_has_no_usage(redis_client: Client) -> None:
    job = redis_client.submit(allocate_and_burn, 1, 0, image=IMAGE, gpus="all")  # the worker allows no GPUs
    assert job.wait(60) and job.status == "failed"
    assert job.usage is None and job.usage_text() == "" and "peak" not in job.summary()
