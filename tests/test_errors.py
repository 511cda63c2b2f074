"""Every failure through the real stack, with a message that names the thing involved."""
from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import docker
import pytest

from celery_nb import (BrokerUnavailableError, Client, ContainerError, DockerUnavailableError, ImageNotFoundError, InputError,
                       JobTimeoutError, OutOfMemoryError, OutputError, PythonVersionError, RemoteError)
from tests.conftest import IMAGE, OTHER_PYTHON_IMAGE, assert_container_removed, start_worker, stop_process


def test_image_not_found(client: Client) -> None:
    with pytest.raises(ImageNotFoundError, match="'celery-nb-test/no-such-image:1'"):
        client.submit_cell("a = 1", {}, image="celery-nb-test/no-such-image:1").result(timeout=120)


@pytest.fixture(scope="module")
def worker_without_docker(redis_url: str) -> Iterator[subprocess.Popen]:
    proc = start_worker(redis_url, "nodocker", "nodocker", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    yield proc
    stop_process(proc)


def test_docker_daemon_unreachable(redis_client: Client, worker_without_docker: subprocess.Popen) -> None:
    job = redis_client.submit_cell("a = 1", {}, image=IMAGE, queue="nodocker")
    with pytest.raises(DockerUnavailableError, match="unix:///nonexistent/docker.sock"):
        job.result(timeout=60)
    assert "nodocker@" in job.worker


def test_syntax_error_is_raised_locally_and_nothing_is_submitted(client: Client) -> None:
    before = len(client.jobs)
    with pytest.raises(SyntaxError) as info:
        client.submit_cell("a = 1\nb = (1 +\n", {}, image=IMAGE, first_line=2)
    assert info.value.lineno == 3
    assert len(client.jobs) == before


def test_unpicklable_input_names_the_variable_and_nothing_is_submitted(client: Client) -> None:
    import threading

    before = len(client.jobs)
    with pytest.raises(InputError, match="'lock'"):
        client.submit_cell("print(lock)", {"lock": threading.Lock()}, image=IMAGE)
    assert len(client.jobs) == before


def test_missing_explicit_input(client: Client) -> None:
    with pytest.raises(InputError, match="'nope'"):
        client.submit_cell("print(nope)", {}, image=IMAGE, inputs=["nope"])


def test_exception_in_the_container_shows_the_cells_line_numbers(client: Client) -> None:
    job = client.submit_cell("a = 1\n\ndef divide(v):\n    return v / 0\n\nb = divide(a)\n", {}, image=IMAGE,
                             first_line=2)
    with pytest.raises(RemoteError) as info:
        job.result(timeout=60)
    error = info.value
    assert error.exc_type == "ZeroDivisionError"
    # the magic line is line 1 of the notebook cell, so `b = divide(a)` is line 7
    assert 'File "<cell>", line 7, in <module>' in error.remote_traceback
    assert 'File "<cell>", line 5, in divide' in error.remote_traceback
    assert "return v / 0" in error.remote_traceback
    assert "runner.py" not in error.remote_traceback  # no runtime frames
    rendered = "\n".join(error._render_traceback_())
    assert "ZeroDivisionError: division by zero" in rendered and IMAGE in rendered


def test_timeout_kills_the_container(client: Client, docker_client: docker.DockerClient) -> None:
    job = client.submit_cell("import time\ntime.sleep(60)\n", {}, image=IMAGE, timeout=1.5)
    with pytest.raises(JobTimeoutError, match="timeout of 1.5 s"):
        job.result(timeout=30)
    assert_container_removed(docker_client, job.container_id)


def test_out_of_memory_says_the_limit_and_the_peak(client: Client, docker_client: docker.DockerClient) -> None:
    job = client.submit_cell("blob = b'x' * (400 * 1024 * 1024)\n", {}, image=IMAGE, memory="64m")
    with pytest.raises(OutOfMemoryError) as info:
        job.result(timeout=60)
    said = re.search(r"--memory limit of 64m \(the job's processes peaked at ([\d.]+) MiB\)", str(info.value))
    assert said, str(info.value)
    peak = float(said.group(1))
    assert 40 <= peak <= 80 and job.usage["memory_limit"] == 64 * 1024**2  # near the limit, far below 400 MiB
    assert abs(job.usage["peak_memory"] / 1024**2 - peak) < 1
    assert_container_removed(docker_client, job.container_id)


def test_out_name_never_assigned(client: Client) -> None:
    with pytest.raises(OutputError, match="--out names z, but the cell never assigned it"):
        client.submit_cell("a = 1", {}, image=IMAGE, outputs=["a", "z"]).result(timeout=60)


def test_unpicklable_output_named_with_out_names_the_variable(client: Client) -> None:
    with pytest.raises(OutputError, match=r"output variable 'lock' \(lock\) cannot be pickled"):
        client.submit_cell("import threading\nlock = threading.Lock()\n", {}, image=IMAGE,
                           outputs=["lock"]).result(timeout=60)


def test_unpicklable_output_found_automatically_is_skipped(client: Client, capsys: pytest.CaptureFixture) -> None:
    job = client.submit_cell("import threading\nlock = threading.Lock()\nn = 1\n", {}, image=IMAGE)
    assert job.result(timeout=60) == {"n": 1}
    assert job.skipped_outputs == {"lock": "lock: cannot pickle '_thread.lock' object"}
    assert capsys.readouterr().err == ("[celery_nb] not brought back to the kernel: lock (lock: cannot pickle "
                                       "'_thread.lock' object). The cell's other variables are there; assign plain "
                                       "data to bring these back too.\n")


def test_function_python_version_mismatch_is_explained(client: Client) -> None:
    with pytest.raises(PythonVersionError, match=r"kernel runs Python 3\.11, this image runs Python 3\.\d+"):
        client.submit(len, [1, 2], image=OTHER_PYTHON_IMAGE).result(timeout=60)


def test_cells_work_on_another_python_version(client: Client) -> None:
    out = client.submit_cell("import sys\nver = list(sys.version_info[:2])\ndoubled = [v * 2 for v in data]\n",
                             {"data": [1, 2]}, image=OTHER_PYTHON_IMAGE).result(timeout=60)
    assert out["doubled"] == [2, 4] and out["ver"] != [3, 11] and out["ver"] >= [3, 9]


def test_image_without_python(client: Client, docker_client: docker.DockerClient) -> None:
    tag = "celery-nb-test/no-python:1"
    if not docker_client.images.list(name=tag):
        import io
        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("README")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"empty"))
        docker_client.api.import_image_from_data(buf.getvalue(), repository=tag.split(":")[0], tag="1")
    with pytest.raises(ContainerError, match="has no python3"):
        client.submit_cell("a = 1", {}, image=tag).result(timeout=60)


def test_unreachable_broker_is_reported_and_nothing_is_submitted(docker_client: docker.DockerClient) -> None:
    client = Client("redis://127.0.0.1:1/0")  # nothing listens on port 1
    with pytest.raises(BrokerUnavailableError, match="cannot reach the broker at redis://127.0.0.1:1/0"):
        client.submit_cell("a = 1", {}, image=IMAGE)
    assert client.jobs == []
