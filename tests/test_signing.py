"""Signed requests and results (CELERY_NB_SECRET) through the real stack: hand-crafted,
unsigned or tampered messages are refused, and nothing runs or is unpickled."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_nb import Client, SignatureError
from celery_nb import payload as payload_module
from celery_nb_runtime import protocol
from tests.conftest import IMAGE, start_worker, stop_process

SECRET = "test-secret-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def signed_worker(redis_url: str) -> Iterator[subprocess.Popen]:
    proc = start_worker(redis_url, "signed", "signed", env={"CELERY_NB_SECRET": SECRET})
    yield proc
    stop_process(proc)


@pytest.fixture(scope="module")
def signed_client(redis_url: str, signed_worker: subprocess.Popen) -> Client:
    return Client(redis_url, secret=SECRET)


def test_signed_jobs_run(signed_client: Client) -> None:
    job = signed_client.submit_cell("y = x * 2\n", {"x": 21}, image=IMAGE, queue="signed")
    assert job.result(timeout=60) == {"y": 42}
    big = signed_client.submit_cell("n = len(blob)\n", {"blob": b"b" * (3 << 20)}, image=IMAGE, queue="signed")
    assert big.result(timeout=60) == {"n": 3 << 20}  # payload by reference, checked by digest


def test_an_unsigned_request_is_refused_and_nothing_runs(redis_url: str, signed_worker: subprocess.Popen) -> None:
    unsigned = Client(redis_url, secret="")
    job = unsigned.submit_cell("print('ran')\n", {}, image=IMAGE, queue="signed")
    with pytest.raises(SignatureError, match="not signed with the worker's CELERY_NB_SECRET"):
        job.result(timeout=60)
    assert "ran" not in job.logs and job.container is None


def test_a_tampered_request_is_refused_and_nothing_runs(signed_client: Client) -> None:
    send_task = signed_client.app.send_task

    def tamper(name: str, args: list, **kwargs: object) -> object:
        evil = payload_module.cell_payload("print('evil')\n", 1, {}, [], False)
        args[0]["payload"] = __import__("base64").b64encode(evil).decode()  # after signing
        return send_task(name, args=args, **kwargs)

    signed_client.app.send_task = tamper
    try:
        job = signed_client.submit_cell("print('meant')\n", {}, image=IMAGE, queue="signed")
    finally:
        signed_client.app.send_task = send_task
    with pytest.raises(SignatureError, match="altered"):
        job.result(timeout=60)
    assert "evil" not in job.logs


class PlantsAFile:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_a_forged_result_is_not_unpickled(signed_client: Client, redis_url: str, tmp_path) -> None:
    planted = tmp_path / "pwned"
    job = signed_client.submit_cell("a = 1\n", {}, image=IMAGE, queue="nobody-consumes-this")
    bundle = b"".join(protocol.pack_bundle({"outputs": {"a": [0]}}, [pickle.dumps(PlantsAFile(str(planted)))]))
    forged = {"type": "done", "status": "succeeded", "error": None, "worker": "attacker", "timings": {},
              "result_sig": "0" * 64, "t": 0}
    redis.Redis.from_url(redis_url).xadd(f"celery_nb:events:{job.id}", {"e": json.dumps(forged), "b": bundle})
    with pytest.raises(SignatureError, match="was not unpickled"):
        job.result(timeout=30)
    assert not os.path.exists(planted)


def test_local_modules_and_files_travel_signed(signed_client: Client, tmp_path, monkeypatch) -> None:
    """The request names a local module's code by its hash, under the signature; the files a job
    sends back are part of its signed result."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"signed_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("GREETING = 'signed hello'\n")
    job = signed_client.submit_cell(f"import {name}\nopen('greeting.txt', 'w').write({name}.GREETING)\n", {},
                                    image=IMAGE, queue="signed", download=["greeting.txt"])
    assert job.result(timeout=60) == {}
    assert (tmp_path / "greeting.txt").read_text() == "signed hello"
