"""The joblib backend "celery_nb" through the real stack (Redis + a separate `celery-nb worker`
process, and the embedded worker): joblib's Parallel and scikit-learn's GridSearchCV run their
batches in containers of an image without joblib; errors, aborts, kernel interrupts and the
Cancel button stop the other batches; what a batch needs from the package index."""
from __future__ import annotations

import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator

import cloudpickle
import docker
import joblib
import numpy as np
import pytest
import urllib3
from joblib import Parallel, delayed, parallel_config
from joblib.parallel import BatchedCalls, ThreadingBackend
from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

from celery_nb import Client, NoWorkerError, OptionError, RemoteError
from celery_nb.distributions import installed_version
from celery_nb.joblib_backend import batch_label, keep_warning_filters_the_job_can_use
from celery_nb.local_code import ReferenceRecorder
from celery_nb.requirements import function_modules, pins_for
from celery_nb.worker.environments import LABEL_REQUIREMENTS
from tests.conftest import IMAGE, assert_container_removed, job_statuses, kernel_with_celery_nb, wait_for
from tests.kernel import Execution, Kernel

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its functions run in containers without it
SKLEARN_PACKAGES = {"scikit-learn", "numpy", "scipy", "joblib"}


class Unlucky(ValueError):
    """Raised in a container; the kernel gets this class back."""


def square_where(v: int, delay: float) -> tuple[int, str, str, float, float]:
    """v * v, with the container's id (its host name), its joblib's version and when it ran there."""
    import socket
    import time

    import joblib
    started = time.time()
    time.sleep(delay)
    return v * v, socket.gethostname(), joblib.__version__, started, time.time()


def fail_on_two(v: int) -> int:
    if v == 2:
        raise Unlucky(f"item {v} is unlucky")
    return v


def fail_late_or_sleep(v: int) -> None:
    """Item 0 raises after 5 s; the others print their container's id and sleep."""
    import socket
    import time
    if v == 0:
        time.sleep(5)
        raise Unlucky("item 0 failed after 5 s")
    print("started in", socket.gethostname(), flush=True)
    time.sleep(120)


def test_parallel_runs_a_plain_function_in_containers_n_jobs_at_once(client: Client) -> None:
    before = len(client.jobs)
    with parallel_config(backend="celery_nb", client=client, image=IMAGE):
        out = Parallel(n_jobs=3)(delayed(square_where)(v, 0.5) for v in range(9))
    assert [r[0] for r in out] == [v * v for v in range(9)]
    assert {r[2] for r in out} == {joblib.__version__}  # the kernel's joblib, in an image that has none
    hosts = {r[1] for r in out}
    assert all(re.fullmatch("[0-9a-f]{12}", host) for host in hosts) and socket.gethostname() not in hosts
    spans = [(r[3], r[4]) for r in out]
    # measured in the containers: never more than n_jobs ran at once (the worker runs 4)
    assert max(sum(1 for start, end in spans if start <= moment < end) for moment, _ in spans) <= 3
    jobs = client.jobs[before:]
    sizes = [int(re.fullmatch(r"joblib batch: (\d+) × square_where\(\)", job.label).group(1)) for job in jobs]
    assert sum(sizes) == 9 and all(job.status == "succeeded" and job.image == IMAGE for job in jobs)
    assert hosts <= {job.container_id[:12] for job in jobs}  # the containers its jobs ran in
    assert all(job.environment in ("built", "cached") for job in jobs)


def test_an_error_in_a_batch_reaches_the_caller_as_its_own_class(client: Client) -> None:
    with parallel_config(backend="celery_nb", client=client, image=IMAGE):
        with pytest.raises(Unlucky, match="item 2 is unlucky") as failure:
            Parallel(n_jobs=2)(delayed(fail_on_two)(v) for v in range(4))
    assert isinstance(failure.value, RemoteError) and failure.value.exc_type == "Unlucky"
    assert "fail_on_two" in failure.value.remote_traceback
    assert failure.value.what == "joblib batch: 1 × fail_on_two()"


def test_an_error_cancels_the_queued_batches_and_kills_the_running_ones(
        redis_client: Client, docker_client: docker.DockerClient) -> None:
    before = len(redis_client.jobs)
    with parallel_config(backend="celery_nb", client=redis_client, image=IMAGE):
        started = time.monotonic()
        with pytest.raises(Unlucky, match="item 0 failed"):
            # 12 batches: 6 sent (the worker runs 4, 2 wait in its queue), 6 held in the kernel
            Parallel(n_jobs=6)(delayed(fail_late_or_sleep)(v) for v in range(12))
    assert time.monotonic() - started < 60  # not the 120 s the others sleep
    jobs = redis_client.jobs[before:]
    assert len(jobs) == 6  # the held ones were never sent
    wait_for(lambda: all(job.finished for job in jobs), 15, "the stopped jobs end")
    assert [job.status for job in jobs] == ["failed"] + ["cancelled"] * 5
    ran = [job for job in jobs[1:] if "started in" in job.logs]
    assert len(ran) >= 3  # the three that ran beside item 0 (the worker may have taken a queued one meanwhile)
    for job in ran:
        assert job.container_id.startswith(job.logs.split("started in ")[1].split()[0])
    for job in jobs[1:]:
        if job.container_id:  # its container was killed and removed
            assert_container_removed(docker_client, job.container_id)
    # the ones still queued on the broker were cancelled there
    assert any("running" not in job_statuses(redis_client, job.id) for job in jobs[4:])


def test_grid_search_scores_equal_the_local_run(redis_client: Client, docker_client: docker.DockerClient) -> None:
    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 10], "kernel": ["linear", "rbf"]}
    here = GridSearchCV(SVC(), grid, cv=3).fit(X, y)
    before = len(redis_client.jobs)
    with parallel_config(backend="celery_nb", client=redis_client, image=IMAGE):
        there = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)
    for key in ("mean_test_score", "std_test_score", "rank_test_score", "split0_test_score", "split2_test_score"):
        assert np.array_equal(here.cv_results_[key], there.cv_results_[key]), key
    assert here.best_params_ == there.best_params_
    jobs = redis_client.jobs[before:]
    assert sum(int(job.label.split()[2]) for job in jobs) == 12  # 4 candidates x 3 folds, fitted in containers
    assert all(job.label.endswith("× _fit_and_score()") and job.status == "succeeded" for job in jobs)
    # the environment the worker built: the kernel's scikit-learn, and nothing of the kernel's
    # warning filters about other packages (pytest's, requests')
    warm = next(job for job in reversed(jobs) if docker_client.containers.list(filters={"id": job.container_id}))
    specifiers = docker_client.containers.get(warm.container_id).image.labels[LABEL_REQUIREMENTS].split()
    pinned = dict(specifier.split("==") for specifier in specifiers)
    assert {name: pinned.get(name) for name in SKLEARN_PACKAGES} == {
        name: installed_version(name) for name in SKLEARN_PACKAGES}
    assert not {"pytest", "requests", "urllib3", "ipython"} & set(pinned)


def test_n_jobs_minus_one_counts_the_slots_of_the_workers_that_take_the_queue(redis_client: Client) -> None:
    with parallel_config(backend="celery_nb", client=redis_client):
        assert joblib.effective_n_jobs(-1) == 4  # the session's worker: -c 4 on the default queue
        assert joblib.effective_n_jobs(-2) == 3
        assert joblib.effective_n_jobs(7) == 7
    with parallel_config(backend="celery_nb", client=redis_client, queue="nobody-takes-this"):
        with pytest.raises(NoWorkerError, match="no worker answered that it takes that queue"):
            joblib.effective_n_jobs(-1)


def test_n_jobs_minus_one_on_the_embedded_worker_is_its_concurrency(embedded_client: Client) -> None:
    with parallel_config(backend="celery_nb", client=embedded_client):
        assert joblib.effective_n_jobs(-1) == 4 and joblib.effective_n_jobs(None) == 4


def test_options_are_checked_when_the_backend_is_configured() -> None:
    with pytest.raises(OptionError, match="--memory 'lots' is not a size"):
        parallel_config(backend="celery_nb", memory="lots")
    with pytest.raises(OptionError, match="unknown job option imgae"):
        parallel_config(backend="celery_nb", imgae="python:3.12-slim")


def _grid_search_batches() -> list:
    """The batches a GridSearchCV hands its joblib backend (run here, on threads)."""
    batches = []

    class Capturing(ThreadingBackend):
        def submit(self, func, callback=None):  # noqa: ANN001, ANN202
            batches.append(func)
            return super().submit(func, callback)

    X, y = load_iris(return_X_y=True)
    with parallel_config(backend=Capturing()):
        GridSearchCV(SVC(), {"C": [1, 10]}, cv=2, n_jobs=2).fit(X, y)
    return batches


def test_a_grid_search_batch_needs_joblib_and_the_estimators_packages_at_the_kernels_versions() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the job should ignore these too
        # about packages the job does not need (as a kernel's IPython, pytest, requests add theirs)
        warnings.simplefilter("ignore", pytest.PytestUnhandledThreadExceptionWarning)
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        batch = _grid_search_batches()[0]
    assert batch_label(batch) == "joblib batch: 1 × _fit_and_score()"

    def pinned(batch: object) -> dict[str, str]:
        recorded = ReferenceRecorder()
        recorded(batch, protocol=5)  # as the client pickles a call's payload
        return dict(pin.split("==") for pin in pins_for(frozenset(function_modules(batch, (), recorded.modules))))

    assert {"pytest", "urllib3"} <= set(pinned(batch))  # as scikit-learn sends it: the kernel's warning filters
    keep_warning_filters_the_job_can_use(batch)
    pins = pinned(batch)
    assert {name: pins.get(name) for name in SKLEARN_PACKAGES} == {
        name: installed_version(name) for name in SKLEARN_PACKAGES}
    assert not {"pytest", "requests", "urllib3", "ipython"} & set(pins)
    kept = {rule[2] for func, _args, _kwargs in batch.items for rule in func.warning_filters}
    assert ConvergenceWarning in kept and DeprecationWarning in kept
    assert not {pytest.PytestUnhandledThreadExceptionWarning, urllib3.exceptions.InsecureRequestWarning} & kept


def six_is_for_python_3() -> bool:
    import six  # in its body only: nothing else of the batch names six
    return six.PY3


def test_a_batch_needs_what_its_notebook_functions_import_in_their_bodies() -> None:
    batch = BatchedCalls([delayed(six_is_for_python_3)()], (ThreadingBackend(nesting_level=1), None))
    recorded = ReferenceRecorder()
    recorded(batch, protocol=5)  # the function travels by value, as a notebook's does
    assert {"six", "joblib"} <= function_modules(batch, (), recorded.modules)
    assert f"six=={installed_version('six')}" in pins_for(frozenset(function_modules(batch, (), recorded.modules)))


@pytest.fixture(scope="module", params=["redis", "embedded"])
def kernel(request: pytest.FixtureRequest, docker_client: docker.DockerClient) -> Iterator[Kernel]:
    yield from kernel_with_celery_nb(request, {"CELERY_NB_DEFAULT_FUNCTION_IMAGE": IMAGE})


# a cell whose 8 batches sleep: 4 run at once (n_jobs), the others are held in the kernel
SLEEPING_CELL = """import joblib

def sleep_where(v):
    import socket, time
    print("started in", socket.gethostname(), flush=True)
    time.sleep(120)

with joblib.parallel_config(backend="celery_nb"):
    joblib.Parallel(n_jobs=4)(joblib.delayed(sleep_where)(v) for v in range(8))
"""
# after the cell: the containers of its jobs that ran, and the statuses of its jobs
ITS_JOBS = ("import celery_nb\njobs = celery_nb.default_client().jobs[-4:]\n"
            "print(*[j.container_id for j in jobs if j.container_id])\nprint(*[j.status for j in jobs])")


def _stopped_with_all_running(kernel: Kernel, docker_client: docker.DockerClient, stop) -> Execution:  # noqa: ANN001
    """Runs SLEEPING_CELL, calls ``stop(execution)`` once its 4 jobs run, and checks that its
    jobs were stopped and their containers removed; returns the execution."""
    ex = kernel.start(SLEEPING_CELL)
    kernel.collect(ex, until=lambda _m: any("4 running" in value for value in ex.html_values()), timeout=300)
    stopped = time.monotonic()
    stop(ex)
    kernel.collect(ex, timeout=30)
    assert time.monotonic() - stopped < 10
    containers, states = kernel.run(ITS_JOBS, timeout=10).stream_text().splitlines()
    assert states.split() == ["cancelled"] * 4
    assert containers.split()  # at least one ran
    for container in containers.split():
        assert_container_removed(docker_client, container)
    final = [m["content"]["data"]["text/plain"] for m in ex.messages if m["msg_type"] == "update_display_data"]
    assert final[-1].startswith("celery_nb joblib call: cancelled after ")
    assert "| 0/8 tasks in 8 batches (0 waiting, 0 running, 8 ended)" in final[-1]
    return ex


def test_interrupting_the_kernel_stops_the_jobs_of_a_parallel_call(kernel: Kernel,
                                                                   docker_client: docker.DockerClient) -> None:
    ex = _stopped_with_all_running(kernel, docker_client, lambda _ex: kernel.manager.interrupt_kernel())
    assert ex.error()["ename"] == "KeyboardInterrupt"


def test_the_cancel_button_stops_the_jobs_of_a_parallel_call(kernel: Kernel,
                                                             docker_client: docker.DockerClient) -> None:
    ex = _stopped_with_all_running(
        kernel, docker_client, lambda ex: kernel.click(ex.comm_opens("ButtonModel")[0]["comm_id"]))
    assert ex.error()["ename"] == "JobCancelled"
