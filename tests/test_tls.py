"""A TLS Redis (rediss://, with a password and a database, as managed Redis services offer it):
the broker, the job store and big data all go over TLS, and a Redis that stops answering fails
a blob read after the timeout instead of blocking it for ever.

The server is the test's own redis-server, with a TLS port only and a certificate of a CA made
here with openssl."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import redis

from celery_nb import Client
from celery_nb.blobs import RedisBlobStore
from celery_nb.broker import TASK_NAME, celery_app
from celery_nb.jobstore import RedisJobStore
from tests.conftest import IMAGE, ROOT, _unavailable, free_port, start_worker, stop_process

PASSWORD = "tls-" + uuid.uuid4().hex
SIZES = (100, 3 << 20, 40 << 20)


def _certificates(folder: Path) -> None:
    """A CA, and a certificate it signed for 127.0.0.1 (as an IP address: the name checked)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=celery_nb test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.cnf")


@pytest.fixture(scope="module")
def tls_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """rediss:// to a redis-server that speaks TLS only, with a password, database 2."""
    for tool in ("redis-server", "openssl"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is not installed (scripts/setup.sh installs redis-server)")
    folder = tmp_path_factory.mktemp("tls")
    _certificates(folder)
    port = free_port(range(16400, 16900))
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    log = open(ROOT / ".pytest_cache/tls-redis.log", "w")
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
         "--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt",
         "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"], cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/2?ssl_cert_reqs=required&ssl_ca_certs={folder / 'ca.crt'}"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert server.poll() is None and time.monotonic() < deadline, f"the TLS redis-server did not start: {log.name}"
            time.sleep(0.05)
    try:
        yield url
    finally:
        stop_process(server)
        log.close()


def _data(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def test_blobs_job_events_and_the_broker_speak_tls(tls_url: str) -> None:
    plain = tls_url.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.ConnectionError):  # the server has no plain port: only TLS gets through
        redis.Redis.from_url(plain, socket_timeout=2).ping()
    blobs = RedisBlobStore(tls_url)
    for size in SIZES:
        data = _data(size)
        ref = blobs.put([data])
        assert bytes(blobs.get(ref)) == data
        blobs.delete(ref)
    store = RedisJobStore(tls_url)
    job_id = uuid.uuid4().hex
    store.append(job_id, {"type": "log", "text": "over TLS"})
    assert store.read(job_id, "0", timeout=1)[0] == [{"type": "log", "text": "over TLS"}]
    app = celery_app(tls_url)
    app.send_task(TASK_NAME, args=[{"job_id": job_id}], task_id=job_id, queue="tls-probe")
    with app.connection_for_read() as connection, connection.SimpleQueue("tls-probe") as queue:
        message = queue.get(timeout=10)
        assert message.headers["id"] == job_id
        message.ack()


def test_a_redis_that_stops_answering_fails_a_blob_read_instead_of_blocking() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0?socket_timeout=0.25"
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError, match="lost Redis while reading blob celery_nb:blob:x"):
            RedisBlobStore(url, patience=0).get({"key": "celery_nb:blob:x", "size": 10, "chunks": 1})
        assert time.monotonic() - started < 10


def test_jobs_with_big_inputs_and_results_through_tls(tls_url: str, docker_client: docker.DockerClient) -> None:
    # as on another host: big data does not go through the kernel's shared memory
    worker = start_worker(tls_url, "tlsq", "tls", env={"CELERY_NB_KERNEL_SHARED_MEMORY": "0"})
    try:
        client = Client(tls_url)
        for size in SIZES:
            data = _data(size)
            job = client.submit_cell("echoed = data[::-1]\n", {"data": data}, image=IMAGE, queue="tlsq",
                                     memory="512m")
            assert job.result(timeout=120)["echoed"] == data[::-1]
            done = [e for e in client.store.read(job.id, "0", 1)[0] if e["type"] == "done"][0]
            assert ("key" in done.get("result_ref", {})) == (size > 1 << 20)  # the big ones through TLS Redis
        assert redis.Redis.from_url(tls_url).keys("celery_nb:blob:*") == []  # collected and deleted
    finally:
        stop_process(worker)
