"""Signed requests and results (CELERY_NB_SECRET) through the real stack: hand-crafted,
unsigned, tampered, expired or replayed messages are refused, and nothing runs (again) or is
unpickled; and the signatures on their own (no Docker)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pickle
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import docker
import pytest
import redis

from celery_nb import Client, Job, SignatureError
from celery_nb import client as client_module
from celery_nb import payload as payload_module
from celery_nb.broker import TASK_NAME
from celery_nb.signing import CLOCK_SKEW, LIFETIME, Signer
from celery_nb_runtime import protocol
from tests.conftest import IMAGE, ROOT, start_worker, stop_process

SECRET = "test-secret-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def signed_worker(redis_url: str, docker_client: docker.DockerClient) -> Iterator[subprocess.Popen]:
    proc = start_worker(redis_url, "signed", "signed", env={"CELERY_NB_SECRET": SECRET})
    yield proc
    stop_process(proc)


@pytest.fixture(scope="module")
def signed_client(redis_url: str, signed_worker: subprocess.Popen) -> Client:
    return Client(redis_url, secret=SECRET)


def test_signed_jobs_run(signed_client: Client) -> None:
    job = signed_client.submit_cell("y = x * 2\n", {"x": 21}, image=IMAGE, queue="signed")
    assert job.result(timeout=60) == {"y": 42}
    # big data both ways, in the kernel's shared memory folder (this worker's host): signed by the files' names
    big = signed_client.submit_cell("n = len(blob)\nback = blob[::-1]\n", {"blob": b"ab" * (3 << 20)}, image=IMAGE,
                                    queue="signed")
    assert big.result(timeout=60) == {"n": 6 << 20, "back": b"ba" * (3 << 20)}
    events = signed_client.store.read(big.id, "0", timeout=1)[0]
    assert "shm" in [e for e in events if e["type"] == "done"][0]["result_ref"]


def test_an_unsigned_request_is_refused_and_nothing_runs(redis_url: str, signed_worker: subprocess.Popen) -> None:
    unsigned = Client(redis_url, secret="")
    job = unsigned.submit_cell("print('ran')\n", {}, image=IMAGE, queue="signed")
    with pytest.raises(SignatureError, match="not signed with the worker's CELERY_NB_SECRET"):
        job.result(timeout=60)
    assert "ran" not in job.logs and job.container is None


def _submit_altered(client: Client, source: str, alter: Callable[[dict], dict]) -> Job:
    """Submit cell ``source``, its request changed by ``alter`` on the way to the broker (after signing)."""
    build = client_module.task_message
    client_module.task_message = lambda app, request, *args: build(app, alter(request), *args)
    try:
        return client.submit_cell(source, {}, image=IMAGE, queue="signed")
    finally:
        client_module.task_message = build


def test_a_tampered_request_is_refused_and_nothing_runs(signed_client: Client) -> None:
    evil = base64.b64encode(b"".join(payload_module.cell_payload("print('evil')\n", 1, {}, [], False))).decode()
    job = _submit_altered(signed_client, "print('meant')\n", lambda request: {**request, "payload": evil})
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
    now = time.time()
    forged = {"type": "done", "status": "succeeded", "error": None, "worker": "attacker", "timings": {},
              "result_sig": {"sig": "0" * 64, "signed_at": now, "expires_at": now + 60}, "t": 0}
    redis.Redis.from_url(redis_url).xadd(f"celery_nb:events:{job.id}", {"e": json.dumps(forged), "b": bundle})
    with pytest.raises(SignatureError, match="was not unpickled"):
        job.result(timeout=30)
    assert not os.path.exists(planted)


def test_a_result_file_an_end_event_names_is_unpickled_only_if_signed_by_that_name(signed_client: Client,
                                                                                    redis_url: str, tmp_path) -> None:
    """A big result in the kernel's shared memory folder is signed by its name, not its bytes': an
    end event naming a file there (one planted as an attacker with a foothold would) is refused
    with a signature made for another file, and (the control) accepted with one made for it."""
    def planted_result(planted: str) -> dict:
        bundle = b"".join(protocol.pack_bundle({"outputs": {"a": [0]}, "skipped": {}},
                                               [pickle.dumps(PlantsAFile(planted))]))
        path = os.path.join(signed_client.kernel_files.folder, f"out-{uuid.uuid4().hex}")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(bundle)
        return {"shm": path, "size": len(bundle)}

    def ended_with(job: Job, ref: dict, signed_file: dict) -> None:
        done = {"type": "done", "status": "succeeded", "error": None, "worker": "attacker", "timings": {},
                "result_ref": ref, "result_sig": _signed_at({"job_id": job.id, "file": signed_file}, time.time()),
                "t": 0}
        redis.Redis.from_url(redis_url).xadd(f"celery_nb:events:{job.id}", {"e": json.dumps(done)})

    forged = signed_client.submit_cell("a = 1\n", {}, image=IMAGE, queue="nobody-consumes-this")
    refused = tmp_path / "refused"
    ref = planted_result(str(refused))
    ended_with(forged, ref, planted_result(str(tmp_path / "other")))
    with pytest.raises(SignatureError, match="was not unpickled"):
        forged.result(timeout=30)
    assert not refused.exists()

    control = signed_client.submit_cell("a = 1\n", {}, image=IMAGE, queue="nobody-consumes-this")
    accepted = tmp_path / "accepted"
    ref = planted_result(str(accepted))
    ended_with(control, ref, ref)
    control.result(timeout=30)
    assert accepted.exists()


def _signed_at(message: dict, signed_at: float) -> dict:
    """``message`` signed with the test's secret as it would have been at ``signed_at`` (the
    wire format: HMAC-SHA256 of the canonical JSON, signing and expiry times included)."""
    body = {k: v for k, v in message.items() if k not in ("sig", "signed_at", "expires_at")}
    body.update(signed_at=signed_at, expires_at=signed_at + LIFETIME)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return {**body, "sig": hmac.new(SECRET.encode(), canonical, hashlib.sha256).hexdigest()}


def test_an_expired_request_is_refused_and_nothing_runs(signed_client: Client) -> None:
    """As a request captured a day ago and replayed now, once its job's done marker is gone."""
    long_ago = time.time() - LIFETIME - CLOCK_SKEW - 60
    job = _submit_altered(signed_client, "print('ran')\n", lambda request: _signed_at(request, long_ago))
    with pytest.raises(SignatureError, match=r"its request expired at \d{4}-\d\d-\d\d .* UTC \(signed at .*\): "
                                             r"it was replayed, or waited longer than that"):
        job.result(timeout=60)
    assert "ran" not in job.logs and job.container_id is None


def test_a_replayed_request_of_a_finished_job_is_dropped(signed_client: Client) -> None:
    captured: list[dict] = []
    job = _submit_altered(signed_client, "print('ran')\n", lambda request: captured.append(request) or request)
    job.result(timeout=60)
    signed_client.app.send_task(TASK_NAME, args=captured, task_id=job.id, queue="signed")  # replayed, still valid
    log = ROOT / ".pytest_cache/worker-signed.log"
    deadline = time.monotonic() + 20
    while f"job {job.id} has already finished" not in log.read_text():
        assert time.monotonic() < deadline, "the worker did not drop the replayed request"
        time.sleep(0.1)
    events = signed_client.store.read(job.id, "0", timeout=1)[0]
    assert [e.get("status") for e in events if e["type"] in ("status", "done")] == [
        "queued", "starting", "running", "succeeded"]  # it ran once


# -- signatures on their own ----------------------------------------------------------------

def test_a_signature_covers_the_message_and_its_times() -> None:
    signer = Signer(SECRET)
    signed = signer.sign({"job_id": "j", "digest": "d"})
    assert signed["expires_at"] - signed["signed_at"] == LIFETIME
    signer.check(signed, "the worker's")
    for field, value in (("digest", "e"), ("expires_at", signed["expires_at"] + 3600), ("signed_at", 0)):
        with pytest.raises(SignatureError, match="is not signed with the worker's CELERY_NB_SECRET, or was altered"):
            signer.check({**signed, field: value}, "the worker's")
    with pytest.raises(SignatureError, match="is not signed with the worker's"):
        Signer("another secret").check(signed, "the worker's")
    Signer("").check({"job_id": "j"}, "the worker's")  # signing off: nothing to check


def test_a_signature_is_valid_from_its_signing_time_to_its_expiry_give_or_take_the_clock_skew() -> None:
    signer = Signer(SECRET)
    now = time.time()
    signer.check(_signed_at({"job_id": "j"}, now - LIFETIME), "the worker's")  # just expired: within the skew
    signer.check(_signed_at({"job_id": "j"}, now + CLOCK_SKEW / 2), "the worker's")  # a kernel's clock a bit ahead
    with pytest.raises(SignatureError, match="expired at"):
        signer.check(_signed_at({"job_id": "j"}, now - LIFETIME - CLOCK_SKEW - 1), "the worker's")
    with pytest.raises(SignatureError, match=r"s ahead of this host's clock; .* synchronise them \(NTP\)"):
        signer.check(_signed_at({"job_id": "j"}, now + CLOCK_SKEW + 60), "the worker's")
    unstamped = {"job_id": "j"}
    unstamped["sig"] = hmac.new(SECRET.encode(), json.dumps(unstamped, sort_keys=True, separators=(",", ":")).encode(),
                                hashlib.sha256).hexdigest()
    with pytest.raises(SignatureError, match="carries no signing time"):
        signer.check(unstamped, "the worker's")


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
