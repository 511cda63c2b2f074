"""Routing with --queue, and GPU requests, through two real `celery-nb worker`s: the session's
worker on the default queue (its policy allows no GPUs) and one on `gpu` whose policy allows one
GPU. This machine has none: an allowed request must reach Docker as a device request and come
back as Docker's own refusal, explained."""
from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import docker
import pytest

from celery_nb import Client, ContainerError, PolicyError
from celery_nb.worker.cli import WORKER_PATIENCE
from tests.conftest import IMAGE, assert_container_removed, start_worker, stop_process
from tests.kernel import Kernel


@pytest.fixture(scope="module")
def gpu_worker(redis_url: str, docker_client: docker.DockerClient) -> Iterator[subprocess.Popen]:
    proc = start_worker(redis_url, "gpu", "gpu", env={"CELERY_NB_GPUS": "1"}, concurrency=2)
    yield proc
    stop_process(proc)


def test_queue_routes_cells_from_a_kernel(gpu_worker: subprocess.Popen, celery_worker: subprocess.Popen,
                                          redis_url: str) -> None:
    kernel = Kernel({"CELERY_NB_BROKER_URL": redis_url})
    try:
        kernel.run("%load_ext celery_nb\nimport celery_nb.client")
        worker_of_last_job = "print(celery_nb.client.default_client().jobs[-1].worker)"
        for options, worker in ((f"--queue gpu --image {IMAGE}", "gpu@"), (f"--image {IMAGE}", "main@")):
            run = kernel.run(f"%%celery_docker {options}\nanswer = 42")
            assert run.error() is None, run.error()
            assert kernel.run(worker_of_last_job).stream_text().startswith(worker)
        refused = kernel.run(f"%%celery_docker --gpus all --image {IMAGE}\nanswer = 0").error()
        assert refused["ename"] == "PolicyError" and "this worker allows no GPUs" in refused["evalue"]
        assert kernel.run(worker_of_last_job).stream_text().startswith("main@")
        assert kernel.run("print(answer)").stream_text() == "42\n"
    finally:
        kernel.shutdown()


def test_queue_routes_functions(gpu_worker: subprocess.Popen, redis_client: Client) -> None:
    def double(v: int) -> int:
        return 2 * v

    gpu_job = redis_client.submit(double, 1, image=IMAGE, queue="gpu")
    default_job = redis_client.submit(double, 2, image=IMAGE)
    assert (gpu_job.result(timeout=60), default_job.result(timeout=60)) == (2, 4)
    assert gpu_job.worker.startswith("gpu@") and default_job.worker.startswith("main@")
    remote_job = redis_client.remote(double, image=IMAGE, queue="gpu").submit(3)
    assert remote_job.result(timeout=60) == 6 and remote_job.worker.startswith("gpu@")


@pytest.mark.parametrize("queue, gpus, rule", [
    (None, "all", "--gpus all: this worker allows no GPUs (CELERY_NB_GPUS is unset or 0)"),
    ("gpu", "all", "--gpus all exceeds this worker's maximum of 1 (CELERY_NB_GPUS=1)"),
    ("gpu", "device=0,1", "--gpus device=0,1 exceeds this worker's maximum of 1"),
    ("gpu", 2, "--gpus 2 exceeds this worker's maximum of 1"),
])
def test_gpu_requests_outside_the_policy_are_refused(gpu_worker: subprocess.Popen, redis_client: Client,
                                                     queue: str | None, gpus: str | int, rule: str) -> None:
    job = redis_client.submit_cell("ran = True\n", {}, image=IMAGE, queue=queue, gpus=gpus)
    with pytest.raises(PolicyError, match=re.escape(rule)):
        job.result(timeout=60)


@pytest.mark.parametrize("gpus", [1, "device=0"])
def test_an_allowed_gpu_request_reaches_docker(gpu_worker: subprocess.Popen, redis_client: Client,
                                               docker_client: docker.DockerClient, gpus: str | int) -> None:
    job = redis_client.submit_cell("ran = True\n", {}, image=IMAGE, queue="gpu", gpus=gpus)
    # Docker's answer to a GPU device request on a host without the NVIDIA runtime
    with pytest.raises(ContainerError, match=re.escape(
            f"--gpus {gpus}: the worker host's Docker cannot give GPUs to containers "
            f"(could not select device driver \"\" with capabilities: [[gpu]])")):
        job.result(timeout=60)
    assert job.worker.startswith("gpu@")
    assert_container_removed(docker_client, job.container_id)


@pytest.mark.parametrize("gpus", ["lots", "0", "device=", "-1"])
def test_malformed_gpu_requests_are_refused_before_sending(redis_client: Client, gpus: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"--gpus {gpus!r} is not a GPU request")):
        redis_client.submit_cell("ran = True\n", {}, image=IMAGE, queue="gpu", gpus=gpus)


def test_workers_answer_celery_inspect_stats(celery_worker: subprocess.Popen, redis_client: Client) -> None:
    # what Flower's worker pages and `celery inspect stats` show: the transport by name, and the
    # worker's patience with Redis among its options
    stats = redis_client.app.control.inspect(timeout=5).stats() or {}
    main = next(reply for name, reply in stats.items() if name.startswith("main@"))
    assert main["broker"]["transport"] == "celery_nb.broker:PatientRedisTransport"
    assert main["broker"]["transport_options"]["celery_nb_patience"] == WORKER_PATIENCE
