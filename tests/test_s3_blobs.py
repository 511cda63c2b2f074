"""Big payloads and results through an S3-compatible blob store (CELERY_NB_BLOB_URL=s3://...),
between a kernel and a `celery-nb worker` process.

The store is moto's standalone S3 server, a separate process spoken to over HTTP with the same
boto3 calls as S3 or MinIO (MinIO's server cannot be installed here: no image registry, no
binary in the package registries)."""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import boto3
import docker
import pytest
import redis as redis_lib

from celery_nb import Client
from tests.conftest import IMAGE, free_port, start_worker, stop_process

BUCKET = "celery-nb-blobs"
PREFIX = "jobs"


@pytest.fixture
def s3_blob_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, object]]:
    port = free_port(range(20000, 32000))
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "celery-nb", "AWS_SECRET_ACCESS_KEY": "celery-nb-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)  # read by this kernel's store and the worker it starts
    s3 = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + 30
    while True:
        try:
            s3.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            assert server.poll() is None and time.monotonic() < deadline, "the S3 server did not start"
            time.sleep(0.2)
    url = f"s3://{BUCKET}/{PREFIX}?endpoint_url={endpoint}"
    monkeypatch.setenv("CELERY_NB_BLOB_URL", url)
    try:
        yield url, s3
    finally:
        stop_process(server)


def _objects(s3: object) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX).get("Contents", [])]


def test_big_payloads_and_results_travel_through_s3_and_are_deleted(s3_blob_url, redis_url: str,
                                                                   docker_client: docker.DockerClient) -> None:
    _url, s3 = s3_blob_url
    # as on another host: big data does not go through the kernel's shared memory
    worker = start_worker(redis_url, "s3q", "s3", env={"CELERY_NB_KERNEL_SHARED_MEMORY": "0"})
    try:
        client = Client(redis_url)
        in_redis = set(redis_lib.Redis.from_url(redis_url).keys("celery_nb:blob:*"))  # other tests' local modules
        blob = bytes(range(256)) * (12 * 4096)  # 12 MiB in, twice that out
        job = client.submit_cell("import time\ntime.sleep(1)\ndoubled = data * 2\n", {"data": blob}, image=IMAGE,
                                 memory="512m", queue="s3q")
        assert len(_objects(s3)) == 1  # the input, while the job runs
        assert job.wait(60)
        done = [e for e in client.store.read(job.id, "0", 1)[0] if e["type"] == "done"][0]
        assert done["result_ref"]["size"] > len(blob) * 2 and "s3_key" in done["result_ref"]
        assert job.result(timeout=60)["doubled"] == blob * 2
        assert _objects(s3) == []  # input deleted by the worker, result by the kernel
        # nothing went through Redis
        assert set(redis_lib.Redis.from_url(redis_url).keys("celery_nb:blob:*")) == in_redis
    finally:
        stop_process(worker)


def test_local_modules_are_stored_once_in_s3_and_again_when_gone(s3_blob_url, redis_url: str, tmp_path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _url, s3 = s3_blob_url
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "s3_helpers.py").write_text("ANSWER = 42\n")
    worker = start_worker(redis_url, "s3q", "s3")
    try:
        client = Client(redis_url)
        cell = "import s3_helpers\nanswer = s3_helpers.ANSWER\n"
        assert client.submit_cell(cell, {}, image=IMAGE, queue="s3q").result(timeout=60) == {"answer": 42}
        key, = _objects(s3)  # the module's code, under its content hash
        assert key.startswith(f"{PREFIX}/code-")
        assert client.submit_cell(cell, {}, image=IMAGE, queue="s3q").result(timeout=60) == {"answer": 42}
        assert _objects(s3) == [key]
        s3.delete_object(Bucket=BUCKET, Key=key)  # a lifecycle rule removed it: the kernel sends it again
        assert client.submit_cell(cell, {}, image=IMAGE, queue="s3q").result(timeout=60) == {"answer": 42}
        assert _objects(s3) == [key]
    finally:
        stop_process(worker)
