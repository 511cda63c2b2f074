"""Named data mounts, decided by the worker: a worker started with CELERY_NB_MOUNTS mounts the
host folders a job names at /mnt/NAME (read-only where it says ro, on a read-only root
filesystem too), refuses a name it does not offer, and a job can never name a host path."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_nb import Client, OptionError, PolicyError
from tests.conftest import IMAGE, start_worker, stop_process

PROBE = """\
import os
seen = sorted(os.listdir('/mnt')) if os.path.isdir('/mnt') else []
readings = open('/mnt/datasets/train.csv').read() if os.path.exists('/mnt/datasets') else None
def try_write(path):
    try:
        open(path, 'w').write('from the job')
        return 'written'
    except OSError as exc:
        return exc.strerror
writes = {name: try_write(f'/mnt/{name}/new.txt') for name in seen}
"""


@pytest.fixture(scope="module")
def host_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {name: tmp_path_factory.mktemp(name) for name in ("datasets", "scratch")}
    (folders["datasets"] / "train.csv").write_text("a,b\n1,2\n")
    return folders


@pytest.fixture(scope="module")
def mount_worker(redis_url: str, host_folders: dict[str, Path]) -> Iterator[subprocess.Popen]:
    mounts = f"datasets={host_folders['datasets']}:ro,scratch={host_folders['scratch']}:rw"
    proc = start_worker(redis_url, "mounts", "mounts", env={"CELERY_NB_MOUNTS": mounts, "CELERY_NB_READ_ONLY": "1"})
    yield proc
    stop_process(proc)


def test_named_mounts_are_mounted_as_the_worker_says(mount_worker: subprocess.Popen, redis_client: Client,
                                                     host_folders: dict[str, Path]) -> None:
    out = redis_client.submit_cell(PROBE, {}, image=IMAGE, queue="mounts",
                                   mount=["datasets", "scratch"]).result(timeout=60)
    assert out["seen"] == ["datasets", "scratch"] and out["readings"] == "a,b\n1,2\n"
    assert out["writes"] == {"datasets": "Read-only file system", "scratch": "written"}
    assert (host_folders["scratch"] / "new.txt").read_text() == "from the job"
    assert not (host_folders["datasets"] / "new.txt").exists()
    # a job of the same worker that names no mount gets none (nor a warm container that has one)
    out = redis_client.submit_cell(PROBE, {}, image=IMAGE, queue="mounts").result(timeout=60)
    assert out["seen"] == [] and out["readings"] is None


def test_a_mount_the_worker_does_not_offer_is_refused(mount_worker: subprocess.Popen, redis_client: Client) -> None:
    job = redis_client.submit_cell("ran = True\n", {}, image=IMAGE, queue="mounts", mount=["datasets", "home"])
    with pytest.raises(PolicyError, match=r"--mount home: this worker offers no mount of that name \(it offers "
                                          r"datasets, scratch; pick one of those\)"):
        job.result(timeout=60)
    assert "ran" not in job.logs


def test_a_job_cannot_name_a_host_path(redis_client: Client) -> None:
    for path in ("/etc", "datasets:/etc", "../srv"):
        with pytest.raises(OptionError, match="never a host path"):
            redis_client.submit_cell("x = 1\n", {}, image=IMAGE, mount=[path])
