"""The worker's policy through the real stack: a worker configured strictly refuses requests
outside it with a PolicyError naming the rule, and applies its safety settings to containers;
and the policy's decisions on their own (no Docker)."""
from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import docker
import pytest

from celery_nb import Client, JobOptions, PolicyError
from celery_nb.errors import OptionError
from celery_nb.worker.policy import ContainerSpec, WorkerPolicy
from celery_nb.worker.settings import WorkerSettings
from tests.conftest import IMAGE, NUMPY_IMAGE, start_worker, stop_process

STRICT = {
    "CELERY_NB_ALLOWED_IMAGES": f"{IMAGE},local/py-other*",
    "CELERY_NB_MAX_MEMORY": "256m",
    "CELERY_NB_DEFAULT_MEMORY": "128m",
    "CELERY_NB_MAX_CPUS": "1",
    "CELERY_NB_MAX_TIMEOUT": "30",
    "CELERY_NB_NETWORKS": "none",
    "CELERY_NB_READ_ONLY": "1",
    "CELERY_NB_USER": "65534:65534",
    "CELERY_NB_ALLOW_PIP": "0",
}


@pytest.fixture(scope="module")
def strict_worker(redis_url: str, docker_client: docker.DockerClient) -> Iterator[subprocess.Popen]:
    proc = start_worker(redis_url, "strict", "strict", env=STRICT)
    yield proc
    stop_process(proc)


@pytest.mark.parametrize("request_options, rule", [
    ({"image": NUMPY_IMAGE}, f"image '{NUMPY_IMAGE}' is not allowed on this worker"),
    ({"memory": "1g"}, "--memory 1g exceeds this worker's maximum of 256m"),
    ({"cpus": 2}, "--cpus 2 exceeds this worker's maximum of 1"),
    ({"timeout": 60}, "--timeout 60s exceeds this worker's maximum of 30s"),
    ({"network": "bridge"}, "--network bridge is not allowed on this worker (allowed: none)"),
    ({"pip": "numpy==2.1.3 tqdm"}, "--pip/--requirements (numpy==2.1.3 tqdm): this worker builds no environments "
                                   "(CELERY_NB_ALLOW_PIP is off)"),
])
def test_requests_outside_the_policy_are_refused(strict_worker: subprocess.Popen, redis_client: Client,
                                                 request_options: dict, rule: str) -> None:
    options = {"image": IMAGE, **request_options}
    job = redis_client.submit_cell("ran = True\n", {}, queue="strict", **options)
    with pytest.raises(PolicyError, match=re.escape(rule)):
        job.result(timeout=60)
    assert "ran" not in job.logs


def test_the_worker_applies_its_safety_settings(strict_worker: subprocess.Popen, redis_client: Client) -> None:
    cell = (
        "import os\n"
        "uid = os.getuid()\n"
        "interfaces = sorted(os.listdir('/sys/class/net'))\n"
        "try:\n    open('/etc/celery_nb_probe', 'w')\n    root_writable = True\n"
        "except OSError:\n    root_writable = False\n"
        "open('/tmp/scratch', 'w').write('ok')\n"
        "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]\n"
        "no_new_privs = [l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0]\n"
        "limit = int(open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read()) "
        "if os.path.exists('/sys/fs/cgroup/memory/memory.limit_in_bytes') else int(open('/sys/fs/cgroup/memory.max').read())\n"
    )
    out = redis_client.submit_cell(cell, {}, image=IMAGE, queue="strict").result(timeout=60)
    assert out == {"uid": 65534, "interfaces": ["lo"], "root_writable": False, "caps": "0000000000000000",
                   "no_new_privs": "1", "limit": 128 * 1024**2}


# -- the policy's decisions, without Docker ---------------------------------------------------

def test_a_plan_fills_in_the_workers_defaults_and_limits() -> None:
    policy = WorkerPolicy.from_settings(WorkerSettings(**{"default_memory": "128m", "max_timeout": 30.0,
                                                          "networks": "none,bridge", "user": "65534:65534"}))
    plan = policy.plan(JobOptions(image=IMAGE, cpus=1.5, fresh=True))
    assert plan.container == ContainerSpec(image=IMAGE, memory=128 * 1024**2, nano_cpus=1_500_000_000, pids=512,
                                           network="none", read_only=False, user="65534:65534", gpus=None)
    assert (plan.timeout, plan.fresh, plan.env) == (30.0, True, {})


def test_variables_that_act_at_start_are_the_containers_and_key_the_warm_pool() -> None:
    policy = WorkerPolicy()
    start = {"PYTHONPATH": "/opt/lib", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "2", "LD_PRELOAD": "x.so",
             "LC_ALL": "C.UTF-8", "TZ": "UTC", "CUDA_VISIBLE_DEVICES": "1"}
    plan = policy.plan(JobOptions(image=IMAGE, env={**start, "GREETING": "hi", "MY_PYTHON_FLAG": "1"}))
    assert dict(plan.container.env) == start
    assert plan.env == {"GREETING": "hi", "MY_PYTHON_FLAG": "1"}  # set in the job's process
    same_start = policy.plan(JobOptions(image=IMAGE, env={**start, "GREETING": "hello"}))
    other_start = policy.plan(JobOptions(image=IMAGE, env={**start, "PYTHONHASHSEED": "1"}))
    plain = policy.plan(JobOptions(image=IMAGE))
    assert same_start.container.pool_key == plan.container.pool_key
    assert len({plan.container.pool_key, other_start.container.pool_key, plain.container.pool_key}) == 3


@pytest.mark.parametrize("max_gpus, visible, rule", [
    ("0", "all", "--env NVIDIA_VISIBLE_DEVICES=all: this worker allows no GPUs (CELERY_NB_GPUS is unset or 0)"),
    ("0", "0", "--env NVIDIA_VISIBLE_DEVICES=0: this worker allows no GPUs"),
    ("1", "all", "--env NVIDIA_VISIBLE_DEVICES=all exceeds this worker's maximum of 1 (CELERY_NB_GPUS=1)"),
    ("1", "0,1", "--env NVIDIA_VISIBLE_DEVICES=0,1 exceeds this worker's maximum of 1"),
])
def test_nvidia_visible_devices_is_a_gpu_request(max_gpus: str, visible: str, rule: str) -> None:
    """The NVIDIA runtime gives a container the GPUs its NVIDIA_VISIBLE_DEVICES names, as --gpus does."""
    policy = WorkerPolicy.from_settings(WorkerSettings(gpus=max_gpus))
    with pytest.raises(PolicyError, match=re.escape(rule)):
        policy.plan(JobOptions(image=IMAGE, env={"NVIDIA_VISIBLE_DEVICES": visible}))


@pytest.mark.parametrize("max_gpus, visible", [("0", "none"), ("0", "void"), ("1", "GPU-3a7f"), ("all", "all")])
def test_nvidia_visible_devices_within_the_policy(max_gpus: str, visible: str) -> None:
    plan = WorkerPolicy.from_settings(WorkerSettings(gpus=max_gpus)).plan(
        JobOptions(image=IMAGE, env={"NVIDIA_VISIBLE_DEVICES": visible}))
    assert dict(plan.container.env) == {"NVIDIA_VISIBLE_DEVICES": visible}


def test_a_request_names_no_file_for_the_worker_to_read(tmp_path) -> None:  # noqa: ANN001
    """--requirements is read on the kernel's side; a request that names a path (the worker's
    /etc/shadow, say) is refused, and the file is not read."""
    kept = tmp_path / "requirements.txt"
    kept.write_text("six==1.16.0\n")
    assert JobOptions.from_request({"requirements": ["six==1.16.0"]}).requirements == ("six==1.16.0",)
    with pytest.raises(OptionError, match="requirements are a path"):
        JobOptions.from_request({"requirements": str(kept)})


def test_defaults_and_a_jobs_own_options_add_up() -> None:
    defaults = JobOptions(pip=("numpy==2.1.3", "six"), download=("data/a.csv",))
    job = JobOptions(pip=("numpy==2.2.0",), download=("data/b.csv",)).with_defaults(defaults)
    assert job.pip == ("six", "numpy==2.2.0")  # the job's own pin wins
    assert job.download == ("data/a.csv", "data/b.csv")  # files in one folder: not one distribution "data"
    assert JobOptions().with_defaults(defaults).download == ("data/a.csv",)
