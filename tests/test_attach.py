"""Jobs outlive their kernel: a restarted kernel finds them (the local journal, `%celery_jobs`),
follows one again with `%celery_attach` (earlier logs replayed, live progress) and collects
its outputs; through Redis and a separate `celery-nb worker` process."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from celery_nb import Client, Job, UnknownJobError
from tests.conftest import IMAGE
from tests.kernel import Kernel

SLOW_CELL = ("%%celery_docker --no-wait\nimport time\nfrom celery_nb_runtime import progress\n"
             "for k in progress(range(30), desc='steps'):\n    print('step', k, flush=True)\n    time.sleep(0.2)\n"
             "answer = k * 2\n")


def test_a_restarted_kernel_finds_its_job_and_collects_the_outputs(redis_url: str, celery_worker: subprocess.Popen,
                                                                   tmp_path: Path) -> None:
    kernel = Kernel({"CELERY_NB_DEFAULT_IMAGE": IMAGE, "CELERY_NB_BROKER_URL": redis_url,
                     "CELERY_NB_JOURNAL": str(tmp_path / "jobs.sqlite3")})
    try:
        assert kernel.run("%load_ext celery_nb").error() is None
        job_id = kernel.run(SLOW_CELL).job_id()
        kernel.manager.restart_kernel(now=True)
        kernel.client.wait_for_ready(timeout=60)
        assert kernel.run("%load_ext celery_nb\n'answer' in globals()").error() is None

        table = kernel.run("%celery_jobs")
        text = next(m["content"]["data"]["text/plain"] for m in table.messages if m["msg_type"] == "execute_result")
        row = next(line for line in text.splitlines() if line.startswith(job_id[:12]))
        assert IMAGE in row and ("running" in row or "starting" in row), text
        assert table.comm_opens("ButtonModel")  # its Cancel button

        attached = kernel.run(f"%celery_attach {job_id[:12]}", timeout=60)
        assert attached.error() is None
        logs = [v for v in attached.html_values() if "celery-nb-logs" in v]
        assert "step 0\n" in logs[-1] and "step 29\n" in logs[-1]  # from before the restart, and after
        progress = attached.comm_values(attached.comm_opens("FloatProgressModel")[0]["comm_id"])
        assert len(set(progress)) > 2 and progress[-1] == 30  # it moved while this kernel watched
        assert ">succeeded<" in [v for v in attached.html_values() if "celery-nb-status" in v][-1]
        assert kernel.run("print(answer)").stream_text() == "58\n"
    finally:
        kernel.shutdown()


def test_job_attach_replays_a_finished_job(redis_client: Client, redis_url: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_NB_JOURNAL", str(tmp_path / "jobs.sqlite3"))
    sent = redis_client.submit_cell("print('hi')\nz = 5\n", {}, image=IMAGE)
    sent.result(timeout=60)
    later = Client(redis_url)  # a new kernel
    job = Job.attach(sent.id[:10], client=later)
    assert job.result(timeout=30) == {"z": 5}
    assert job.logs == "hi\n" and job.status == "succeeded" and job.image == IMAGE
    assert [j.id for j in later.known_jobs()] == [sent.id]
    with pytest.raises(UnknownJobError, match="no job 'f00d' is known to the broker redis://"):
        later.attach("f00d")
