"""Files between the kernel's working directory and the job's: --upload keeps the layout of
relative paths, big files included; --download globs come back to the same paths, replacing old
files whole; bad paths fail before anything is submitted; each job, also in a warm container,
starts in an empty working directory of its own that is removed when it ends."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from celery_nb import Client, InputError, JobOptions
from tests.conftest import IMAGE, OTHER_PYTHON_IMAGE

LIST_AND_HASH = """\
import hashlib, os
tree = {}
for folder, subfolders, names in os.walk('.'):
    for name in subfolders + names:
        path = os.path.relpath(os.path.join(folder, name))
        tree[path] = hashlib.sha256(open(path, 'rb').read()).hexdigest() if name in names else 'folder'
cwd = os.getcwd()
executable = os.access('bin/run.sh', os.X_OK)
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def kernel_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The kernel's working directory (a notebook's folder)."""
    work = tmp_path / "notebook"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_uploads_keep_the_layout_of_relative_paths(client: Client, kernel_dir: Path, tmp_path: Path) -> None:
    small = b"a,b\n1,2\n"
    big = os.urandom(6 << 20)  # travels with the payload by reference, through the blob store
    (kernel_dir / "data").mkdir()
    (kernel_dir / "data/train.csv").write_bytes(small)
    (kernel_dir / "models/v1").mkdir(parents=True)
    (kernel_dir / "models/v1/weights.bin").write_bytes(big)
    (kernel_dir / "models/empty").mkdir()
    (kernel_dir / "bin").mkdir()
    (kernel_dir / "bin/run.sh").write_text("#!/bin/sh\n")
    (kernel_dir / "bin/run.sh").chmod(0o755)
    (kernel_dir / "not-uploaded.txt").write_text("stays here")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/lookup.json").write_text("{}")  # outside the working directory: by its name
    job = client.submit_cell(LIST_AND_HASH, {}, image=IMAGE, memory="256m",
                             upload=["data/train.csv", "models", "bin/run.sh", str(tmp_path / "elsewhere/lookup.json")])
    out = job.result(timeout=60)
    assert out["tree"] == {
        "data": "folder", "data/train.csv": _sha(small),
        "models": "folder", "models/v1": "folder", "models/empty": "folder", "models/v1/weights.bin": _sha(big),
        "bin": "folder", "bin/run.sh": _sha(b"#!/bin/sh\n"),
        "lookup.json": _sha(b"{}"),
    }
    assert out["executable"] is True
    assert re.fullmatch(r"/tmp/celery_nb-job-[0-9a-f]{12}", out["cwd"])


def test_downloads_by_glob_replace_files_whole(client: Client, kernel_dir: Path) -> None:
    (kernel_dir / "out").mkdir()
    (kernel_dir / "out/summary.csv").write_text("old summary")
    (kernel_dir / "out/summary.csv").chmod(0o600)
    (kernel_dir / "out/notes.txt").write_text("the job does not touch this")
    checkpoint = os.urandom(3 << 20)  # comes back by reference, through the blob store
    cell = (
        "import os\n"
        "os.makedirs('out/plots', exist_ok=True)\n"
        "open('out/summary.csv', 'w').write('new summary')\n"
        "open('out/plots/a.csv', 'w').write('a')\n"
        "open('out/plots/b.png', 'wb').write(b'png')\n"
        "os.makedirs('checkpoints/epoch1', exist_ok=True)\n"
        "open('checkpoints/epoch1/model.bin', 'wb').write(checkpoint)\n"
        "open('scratch.tmp', 'w').write('not asked for')\n"
    )
    job = client.submit_cell(cell, {"checkpoint": checkpoint}, image=IMAGE, memory="256m",
                             download=["out/**/*.csv", "checkpoints", "*.missing"])
    assert job.result(timeout=60) == {}
    assert job.downloads == {"out/plots/a.csv": 1, "out/summary.csv": 11, "checkpoints/epoch1/model.bin": 3 << 20}
    assert job.unmatched_downloads == ["*.missing"]  # reported, not raised
    assert (kernel_dir / "out/summary.csv").read_text() == "new summary"
    assert (kernel_dir / "out/summary.csv").stat().st_mode & 0o777 == 0o600  # as cp keeps it
    assert (kernel_dir / "out/plots/a.csv").read_text() == "a"
    assert (kernel_dir / "checkpoints/epoch1/model.bin").read_bytes() == checkpoint
    assert (kernel_dir / "out/notes.txt").read_text() == "the job does not touch this"
    assert not (kernel_dir / "out/plots/b.png").exists() and not (kernel_dir / "scratch.tmp").exists()
    leftovers = [p for p in kernel_dir.rglob("*") if p.name.endswith(".celery_nb-part")]
    assert leftovers == []


def test_a_job_that_fails_sends_no_files_back(client: Client, kernel_dir: Path) -> None:
    job = client.submit_cell("open('report.txt', 'w').write('written')\nraise RuntimeError('failed after writing')\n",
                             {}, image=IMAGE, download=["report.txt"])
    with pytest.raises(RuntimeError, match="failed after writing"):
        job.result(timeout=60)
    assert job.downloads == {} and not (kernel_dir / "report.txt").exists()


def test_a_function_downloads_what_it_wrote(client: Client, kernel_dir: Path) -> None:
    def fit(epochs):
        import json
        with open("history.json", "w") as f:
            json.dump({"epochs": epochs}, f)
        return "fitted"

    job = client.submit(fit, 3, image=IMAGE, download=["history.json"])
    assert job.result(timeout=60) == "fitted"
    assert (kernel_dir / "history.json").read_text() == '{"epochs": 3}'
    assert job.downloads == {"history.json": 13}


def test_a_download_that_fails_midway_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """A kernel that may write no file over 1 MiB (RLIMIT_FSIZE) collects a 2 MiB download:
    the error names it, the old file is whole and no partial file is left."""
    (tmp_path / "model.bin").write_bytes(b"old model")
    kernel = f"""\
import resource, signal
from celery_nb import Client, OutputError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
client = Client(None)
job = client.submit_cell("open('model.bin', 'wb').write(bytes(2 << 20))", {{}}, image={IMAGE!r}, download=["model.bin"])
try:
    job.result(timeout=60)
except OutputError as exc:
    print(exc)
client.shutdown()
"""
    run = subprocess.run([sys.executable, "-c", kernel], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "the downloaded file model.bin could not be written" in run.stdout, run.stdout + run.stderr
    assert "File too large" in run.stdout
    assert (tmp_path / "model.bin").read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_bad_paths_fail_before_anything_is_submitted(client: Client, kernel_dir: Path) -> None:
    jobs = len(client.jobs)
    with pytest.raises(InputError, match=rf"--upload data/missing.csv: no such file or folder \(a relative path "
                                         rf"starts from the kernel's working directory, {kernel_dir}\)"):
        client.submit_cell("x = 1\n", {}, image=IMAGE, upload=["data/missing.csv"])
    with pytest.raises(InputError, match="--download '/etc/passwd' would reach outside the job's working directory"):
        client.submit_cell("x = 1\n", {}, image=IMAGE, download=["/etc/passwd"])
    with pytest.raises(InputError, match=r"--download 'out/\.\./\.\./secret' would reach outside"):
        client.remote(lambda: 1, download=["out/../../secret"])
    with pytest.raises(InputError, match="--download"):
        JobOptions.from_flags({"download": ["../up.txt"]})
    assert len(client.jobs) == jobs


def test_working_directories_are_not_shared_in_a_warm_container(client: Client, kernel_dir: Path) -> None:
    memory = "120m"  # a pool key of its own
    first = client.submit_cell(
        "import os, socket\nhost = socket.gethostname()\ncwd = os.getcwd()\n"
        "open('secret.txt', 'w').write('mine')\n"
        "os.makedirs('locked/inner')\nopen('locked/inner/file', 'w').write('x')\n"
        "for path in ('locked/inner', 'locked', '.'):\n    os.chmod(path, 0)  # what it can, it may lock away\n",
        {}, image=IMAGE, memory=memory).result(timeout=60)
    job = client.submit_cell(
        "import os, socket\nhost = socket.gethostname()\ncwd = os.getcwd()\nfound = os.listdir('.')\n"
        f"seen = os.path.exists({first['cwd']!r})\n"
        "job_folders = [name for name in os.listdir('/tmp') if name.startswith('celery_nb-job-')]\n"
        "tmp_mode = oct(os.stat('/tmp').st_mode & 0o7777)\n",
        {}, image=IMAGE, memory=memory)
    second = job.result(timeout=60)
    assert job.container == "warm" and second["host"] == first["host"]  # the hostname is the container's id
    assert second["found"] == [] and second["cwd"] != first["cwd"]
    assert second["seen"] is False
    assert second["job_folders"] == [second["cwd"].split("/")[2]]  # only its own
    assert second["tmp_mode"] == "0o1777"


def test_the_working_directory_and_local_modules_in_an_older_python(
        embedded_client: Client, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime's side of files and local code runs in any image with Python 3.9+."""
    monkeypatch.syspath_prepend(str(kernel_dir))
    (kernel_dir / "data").mkdir()
    (kernel_dir / "data/x.txt").write_text("uploaded")
    name = f"older_{os.getpid()}"
    (kernel_dir / f"{name}.py").write_text("def shout(text):\n    return text.upper()\n")
    job = embedded_client.submit_cell(
        f"import sys, {name}\nversion = sys.version_info[:2]\ntext = {name}.shout(open('data/x.txt').read())\n"
        "open('result.txt', 'w').write(text)\n", {}, image=OTHER_PYTHON_IMAGE, upload=["data"], download=["*.txt"])
    assert job.result(timeout=60) == {"version": (3, 9), "text": "UPLOADED"}
    assert (kernel_dir / "result.txt").read_text() == "UPLOADED"
