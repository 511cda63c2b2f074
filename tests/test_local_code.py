"""The kernel's own modules reach the job by themselves: a module or package next to the
notebook (here: in a folder on sys.path that is also the working directory), imported by a
cell or needed by a submitted function, imports in the container as in the kernel; an edited
module is picked up by the next job; an unchanged one is not sent again; a size cap."""
from __future__ import annotations

import hashlib
import importlib
import re
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import redis

from celery_nb import Client, InputError
from celery_nb.blobs import RedisBlobStore
from celery_nb.local_code import SOURCE_CAP
from celery_nb.worker.codecache import CodeCache
from tests.conftest import IMAGE


@pytest.fixture
def notebook_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A notebook's folder: the working directory, on sys.path (as '' is in a Jupyter kernel)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _unique(stem: str) -> str:
    """A module name no other test (or client) has imported in this process."""
    return f"{stem}_{uuid.uuid4().hex[:8]}"


def _write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def test_a_cell_imports_a_local_module_and_package(client: Client, notebook_dir: Path) -> None:
    feat, helper, pkg = _unique("features"), _unique("helpers"), _unique("mylib")
    _write(notebook_dir / f"{feat}.py", f"""\
        import {helper}
        def double(x):
            return {helper}.factor() * x
        """)
    _write(notebook_dir / f"{helper}.py", "def factor():\n    return 2\n")  # imported by the module only
    _write(notebook_dir / pkg / "__init__.py", "from .core import scale\nfrom . import sub\n")
    _write(notebook_dir / pkg / "core.py", "from .sub.data import BASE\ndef scale(x):\n    return BASE * x\n")
    _write(notebook_dir / pkg / "sub" / "__init__.py", "")
    _write(notebook_dir / pkg / "sub" / "data.py", "BASE = 10\n")
    cell = (f"import {feat}, {pkg}\nfrom {pkg} import scale\nimport {pkg}.sub.data as data\n"
            f"value = {feat}.double(scale(2))\nfiles = [{pkg}.__file__, data.__file__, {feat}.__file__]\n"
            f"package = {pkg}.__package__, data.__name__\n")
    out = client.submit_cell(cell, {}, image=IMAGE).result(timeout=60)
    assert out["value"] == 40
    assert out["package"] == (pkg, f"{pkg}.sub.data")
    code = out["files"][0][:-len(f"{pkg}/__init__.py")]
    assert re.fullmatch(r"/dev/shm/celery_nb-code-[0-9a-f]{12}/", code)  # the job's own copy
    assert out["files"] == [f"{code}{pkg}/__init__.py", f"{code}{pkg}/sub/data.py", f"{code}{feat}.py"]
    assert feat not in sys.modules and pkg not in sys.modules  # the kernel never imported them


def test_functions_and_classes_of_local_modules_work_with_submit_remote_and_map(
        client: Client, notebook_dir: Path) -> None:
    geo, pkg = _unique("geometry"), _unique("shapes")
    _write(notebook_dir / f"{geo}.py", f"""\
        from {pkg}.base import Shape
        class Point(Shape):
            def __init__(self, x, y):
                self.x, self.y = x, y
            def norm2(self):
                return self.x ** 2 + self.y ** 2
        def shifted(point, dx):
            return Point(point.x + dx, point.y)
        def norm2(point):
            return point.norm2()
        """)
    _write(notebook_dir / pkg / "__init__.py", "")
    _write(notebook_dir / pkg / "base.py", "class Shape:\n    kind = 'shape'\n")
    geometry = importlib.import_module(geo)
    moved = client.submit(geometry.shifted, geometry.Point(1, 2), 3, image=IMAGE).result(timeout=60)
    assert type(moved) is geometry.Point and (moved.x, moved.y) == (4, 2)  # the kernel's class again

    def kind_and_norm(point):  # defined here: pickled by value, its argument by reference
        return point.kind, point.norm2()

    assert client.submit(kind_and_norm, moved, image=IMAGE).result(timeout=60) == ("shape", 20)
    points = [geometry.Point(i, 1) for i in range(6)]
    assert client.remote(geometry.norm2, image=IMAGE).map(points, chunksize=2) == [i * i + 1 for i in range(6)]


def test_a_notebook_function_imports_a_local_module_in_its_body(client: Client, notebook_dir: Path) -> None:
    name = _unique("lazy")
    _write(notebook_dir / f"{name}.py", "ANSWER = 42\n")
    notebook: dict = {"__name__": "__main__"}  # as a notebook cell defines it
    exec(f"def answer():\n    import {name}\n    return {name}.ANSWER\n", notebook)
    assert client.submit(notebook["answer"], image=IMAGE).result(timeout=60) == 42


def test_an_edited_module_is_picked_up_by_the_next_job(client: Client, notebook_dir: Path) -> None:
    name = _unique("config")
    path = notebook_dir / f"{name}.py"
    cell = (f"import os, {name}\nversion = {name}.VERSION\nmine = os.path.dirname({name}.__file__)\n"
            "copies = sorted(f'/dev/shm/{n}' for n in os.listdir('/dev/shm') if n.startswith('celery_nb-code-'))\n")
    path.write_text("VERSION = 1\n")
    first = client.submit_cell(cell, {}, image=IMAGE, memory="136m").result(timeout=60)
    assert first["version"] == 1 and first["copies"] == [first["mine"]]
    path.write_text("VERSION = 2  # edited\n")
    job = client.submit_cell(cell, {}, image=IMAGE, memory="136m")
    second = job.result(timeout=60)
    assert second["version"] == 2 and job.container == "warm"
    assert second["copies"] == [second["mine"]]  # the first job's copy is gone


def test_a_kept_process_imports_more_of_an_unchanged_package_later(client: Client, notebook_dir: Path) -> None:
    """The next job of the kernel runs in the process its last one left: the package is still
    imported, and a module of it that only the second job imports comes from the same copy."""
    pkg = _unique("lazy")
    _write(notebook_dir / pkg / "__init__.py", "A = 1\ndef load_later():\n    from . import later\n    return later.B\n")
    _write(notebook_dir / pkg / "later.py", "B = 2\n")
    cell = f"import os, sys, {pkg}\npid = os.getpid()\ncopy = {pkg}.__file__\n"
    first = client.submit_cell(cell + f"a = {pkg}.A\n", {}, image=IMAGE, memory="140m").result(timeout=60)
    second = client.submit_cell(cell + f"b = {pkg}.load_later()\nb_file = sys.modules['{pkg}.later'].__file__\n",
                                {}, image=IMAGE, memory="140m")
    out = second.result(timeout=60)
    assert (out["pid"], out["copy"], out["b"]) == (first["pid"], first["copy"], 2)
    assert out["b_file"] == first["copy"].replace("__init__.py", "later.py")


def test_an_unchanged_module_is_sent_once_and_fetched_once(redis_client: Client, redis_url: str,
                                                           notebook_dir: Path) -> None:
    server = redis.Redis.from_url(redis_url)
    name = _unique("stable")
    (notebook_dir / f"{name}.py").write_text("VALUE = 7\n")
    cell = f"import {name}\nvalue = {name}.VALUE\n"
    before = set(server.keys("celery_nb:blob:code-*"))
    assert redis_client.submit_cell(cell, {}, image=IMAGE).result(timeout=60) == {"value": 7}
    key, = set(server.keys("celery_nb:blob:code-*")) - before  # stored under its content hash
    bundle = server.get(key)
    assert f"{name}.py".encode() in bundle and 0 < server.ttl(key) <= 24 * 3600
    # neither sent again by the kernel nor fetched again by the worker: what the store holds now would not load
    server.set(key, b"garbage", ex=1000)
    assert redis_client.submit_cell(cell, {}, image=IMAGE).result(timeout=60) == {"value": 7}
    assert server.get(key) == b"garbage"
    assert 1000 < server.ttl(key) <= 24 * 3600  # kept while jobs use it
    server.delete(key)  # expired: the kernel sends it again
    assert redis_client.submit_cell(cell, {}, image=IMAGE).result(timeout=60) == {"value": 7}
    assert server.get(key) == bundle


def test_code_altered_in_the_store_is_refused(redis_url: str) -> None:
    """A worker checks a bundle against the hash its signed request names before using it."""
    blobs = RedisBlobStore(redis_url)
    digest = hashlib.sha256(b"the real bundle").hexdigest()
    ref = blobs.put([b"something else"], name=f"code-{digest}")
    with pytest.raises(InputError, match="local module 'features' in the blob store does not match"):
        CodeCache(blobs).get({"module": "features", "digest": digest, "ref": ref})


def test_the_source_cap_names_the_biggest_files(embedded_client: Client, notebook_dir: Path) -> None:
    name, small = _unique("generated"), _unique("small")
    line = "# " + "x" * 97 + "\n"
    (notebook_dir / f"{name}.py").write_text(f"import {small}\n" + line * (SOURCE_CAP // len(line) + 1))
    (notebook_dir / f"{small}.py").write_text("X = 1\n")
    jobs = len(embedded_client.jobs)
    with pytest.raises(InputError) as info:
        embedded_client.submit_cell(f"import {name}\n", {}, image=IMAGE)
    message = str(info.value)
    assert re.search(rf"20\.0 MiB of Python source, more than the 20\.0 MiB a job may ship; the biggest files: "
                     rf"\S+/{name}\.py \(20\.0 MiB\), \S+/{small}\.py \(6 B\)", message), message
    assert len(embedded_client.jobs) == jobs  # nothing was submitted

