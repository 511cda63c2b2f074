"""The worker's policy through the real stack: a worker configured strictly refuses requests
outside it with a PolicyError naming the rule, and applies its safety settings to containers."""
from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest

from celery_nb import Client, PolicyError
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
def strict_worker(redis_url: str) -> Iterator[subprocess.Popen]:
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
