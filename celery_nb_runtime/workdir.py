"""A job's own directory in the container, and what goes in and out of it.

The fork server makes one per job before forking its process and removes it when the job has
ended, so no job, warm container or not, sees another's files: ``work/`` is the job's current
directory (its ``--upload`` files are written there, its ``--download`` globs are matched
there), ``code/`` holds the kernel's local modules shipped with the job (first on the job's
``sys.path``, so they import as in the kernel: packages, ``__file__``, relative imports) and
``tmp/`` is its TMPDIR.

Stdlib only, Python 3.9 compatible (copied into arbitrary images).
"""
from __future__ import annotations

import glob
import mmap
import os
import stat
import sys
from typing import Any, Dict, List, Tuple

from celery_nb_runtime import events, protocol

_PARENTS = ("/tmp", "/var/tmp", "/dev/shm")  # where a job's directory may go: the first writable one


class WorkdirError(Exception):
    """A job's files cannot be placed (``kind`` "input": a path outside the job's directory, a
    full disk) or collected ("output": a file the job made unreadable)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class JobDirectory:
    """``root`` with ``work/``, ``code/`` and ``tmp/`` in it, owned by the job's user."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.work = os.path.join(root, "work")
        self.code = os.path.join(root, "code")
        self.tmp = os.path.join(root, "tmp")

    @classmethod
    def create(cls) -> JobDirectory:
        """A new, empty job directory (mode 0700) in the first writable of _PARENTS (Docker's
        /dev/shm always is)."""
        for parent in _PARENTS:
            root = os.path.join(parent, "celery_nb-job-" + os.urandom(6).hex())
            try:
                os.mkdir(root, 0o700)
                break
            except OSError:
                if parent == _PARENTS[-1]:
                    raise
        job_dir = cls(root)
        for folder in (job_dir.work, job_dir.code, job_dir.tmp):
            os.mkdir(folder, 0o700)
        return job_dir

    def enter(self, header: Dict[str, Any], sections: List[memoryview], code: List[memoryview],
              env: Dict[str, str]) -> None:
        """In the job's process, before its code runs: write its uploads and shipped modules,
        put the modules first on ``sys.path``, make ``work/`` its current directory and
        ``tmp/`` its TMPDIR (unless the job's environment ``env`` sets one)."""
        files = header.get("files") or {}
        try:
            for folder in files.get("folders", ()):
                os.makedirs(_inside(self.work, folder), exist_ok=True)
            for path, index, mode in files.get("upload", ()):
                _write(_inside(self.work, path), sections[index], mode)
            for bundle in code:
                listing, sources = protocol.unpack_bundle(bundle)
                for path, index in listing["files"]:
                    _write(_inside(self.code, path), sources[index], 0o644)
        except OSError as exc:
            raise WorkdirError("input", "the job's files could not be written to its working directory %s in "
                                        "the container: %s" % (self.work, exc)) from None
        if code:
            sys.path.insert(0, self.code)
        if "TMPDIR" not in env:
            os.environ["TMPDIR"] = self.tmp
            tempfile = sys.modules.get("tempfile")
            if tempfile is not None:
                tempfile.tempdir = None  # computed again, from TMPDIR
        os.chdir(self.work)

    def downloads(self, header: Dict[str, Any]) -> List[Tuple[str, Any]]:
        """After the job succeeded: the files its ``--download`` patterns match, as (path
        relative to ``work/``, contents), in pattern order; a matched folder brings its files.
        Says what it found (and which patterns matched nothing) in a "downloads" event."""
        patterns = (header.get("files") or {}).get("download") or []
        if not patterns:
            return []
        found: Dict[str, Any] = {}
        unmatched = []
        for pattern in patterns:
            matches = _matching_files(self.work, pattern)
            if not matches:
                unmatched.append(pattern)
            for path in matches:
                if path not in found:
                    try:
                        found[path] = _contents(os.path.join(self.work, path))
                    except OSError as exc:
                        raise WorkdirError("output", "--download %s: %s cannot be read in the container: %s"
                                           % (pattern, path, exc)) from None
        if events.sink is not None:
            events.sink({"type": "downloads", "files": [[path, len(data)] for path, data in found.items()],
                         "unmatched": unmatched})
        return list(found.items())

    def remove(self) -> None:
        """Remove the directory and all in it (the job's process group has been killed). A job
        may have taken its own permissions on its files away: the server, the same user without
        capabilities, gives them back to remove them, inside this directory only."""
        import shutil

        retried = set()

        def writable_again(_function: Any, path: str, _error: Any) -> None:
            if not path.startswith(self.root + os.sep) or path in retried:
                return
            retried.add(path)
            try:
                os.chmod(os.path.dirname(path), 0o700)
                if os.path.isdir(path) and not os.path.islink(path):
                    os.chmod(path, 0o700)
                    remove_tree(path)
                else:
                    os.unlink(path)
            except OSError:
                pass

        def remove_tree(path: str) -> None:
            if sys.version_info >= (3, 12):
                shutil.rmtree(path, onexc=writable_again)
            else:
                shutil.rmtree(path, onerror=writable_again)

        try:
            os.chmod(self.root, 0o700)
        except FileNotFoundError:
            return  # the job removed it itself
        except OSError:
            pass
        remove_tree(self.root)


def _inside(base: str, relative: str) -> str:
    """``base``/``relative``, refusing a path that would leave ``base``."""
    parts = relative.split("/")
    if not relative or os.path.isabs(relative) or ".." in parts:
        raise WorkdirError("input", "the request names %r, which is outside the job's directory" % relative)
    return os.path.join(base, *parts)


def _write(path: str, data: memoryview, mode: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode & 0o777)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _matching_files(work: str, pattern: str) -> List[str]:
    """Regular files under ``work`` that ``pattern`` (a glob, ``**`` for any depth) matches,
    sorted, relative to ``work``; a matched folder stands for the files in it."""
    files = []
    for path in glob.glob(os.path.join(glob.escape(work), pattern), recursive=True):
        if os.path.isdir(path) and not os.path.islink(path):
            for folder, _subfolders, names in os.walk(path):
                files.extend(os.path.join(folder, name) for name in names)
        else:
            files.append(path)
    relative = []
    for path in files:
        rel = os.path.relpath(path, work)
        if not rel.startswith(".." + os.sep) and _is_regular(path):
            relative.append(rel.replace(os.sep, "/"))
    return sorted(set(relative))


def _is_regular(path: str) -> bool:
    """A regular file (a symlink to one counts; devices, pipes and sockets do not)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _contents(path: str) -> Any:
    """A file's bytes, mapped rather than copied (a result may carry big files)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) if size else b""
