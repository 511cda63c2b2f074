"""A job's own directory in the container, and what goes in and out of it.

The fork server names one per job, makes it while the job's process waits for its request
(having removed the previous job's first) and then tells the process its name: the job starts
only once it is there, and no job, warm container or kept process or not, sees another's files. It is the job's current directory: its
``--upload`` files are written there and its ``--download`` globs matched there. The kernel's
local modules shipped with the job go to a folder of their own on /dev/shm, first on the job's
``sys.path``, so they import as in the kernel (packages, ``__file__``, relative imports). The
working directory is on the image's /tmp (disk: a job may write big files there), where making
and removing a folder can take a millisecond: both happen while the next job's process waits for
its request, and a process kept for its kernel's next job keeps a directory its job left empty.

Stdlib only, Python 3.9 compatible (copied into arbitrary images).
"""
from __future__ import annotations

import glob
import mmap
import os
import stat
import sys
from typing import Any, Dict, List, Optional, Tuple

from celery_nb_runtime import events, protocol

# where a job's directory may go, and its local modules (small, in memory): the first writable one
_WORK_PARENTS = ("/tmp", "/var/tmp", "/dev/shm")
_CODE_PARENTS = ("/dev/shm", "/tmp", "/var/tmp")
_parents: Dict[Tuple[str, ...], str] = {}  # the ones found


def _writable(candidates: Tuple[str, ...]) -> str:
    if candidates not in _parents:  # Docker's /dev/shm always is writable
        _parents[candidates] = next((p for p in candidates if os.access(p, os.W_OK | os.X_OK)), "/dev/shm")
    return _parents[candidates]


class WorkdirError(Exception):
    """A job's files cannot be placed (``kind`` "input": a path outside the job's directory, a
    full disk) or collected ("output": a file the job made unreadable)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Downloads:
    """What a job's ``--download`` patterns matched: ``files`` (path relative to the working
    directory, contents), and the patterns that matched nothing."""

    def __init__(self, files: List[Tuple[str, Any]], unmatched: List[str], asked: bool) -> None:
        self.files = files
        self.unmatched = unmatched
        self.asked = asked

    def announce(self) -> None:
        """Say what comes back (a "downloads" event: the kernel shows it), once it surely does."""
        if self.asked and events.sink is not None:
            events.sink({"type": "downloads", "files": [[path, len(data)] for path, data in self.files],
                         "unmatched": self.unmatched})


NAME_SIZE = 12  # characters of a job directory's name, as the server tells it to the job's process


class JobDirectory:
    """A job's working directory ``work`` and the folder ``code`` of its local modules (made
    only when it has some), owned by the job's user. The server names and makes it, then tells
    the job's process its ``name`` (NAME_SIZE characters). A process that runs the next job of
    its kernel too keeps its ``code`` folder (the same modules: they are part of what makes the
    jobs its kernel's), whose modules it may have imported already."""

    def __init__(self, name: Optional[str] = None, code: Optional[str] = None) -> None:
        self.name = name or os.urandom(NAME_SIZE // 2).hex()
        self.work = os.path.join(_writable(_WORK_PARENTS), "celery_nb-job-" + self.name)
        self.code = code or os.path.join(_writable(_CODE_PARENTS), "celery_nb-code-" + self.name)
        self._made: Optional[Tuple[int, int]] = None  # the directory the server made: device, inode

    def make(self, previous: Optional[JobDirectory]) -> None:
        """In the server, while the job's process waits: remove ``previous`` (the last job's
        directory, and its modules' folder unless this job keeps it) and make this one (mode 0700),
        unless this one is ``previous`` (for_next_job)."""
        if previous is self:
            return
        if previous is not None:
            previous.remove(keep_code=previous.code == self.code)
        try:
            os.mkdir(self.work, 0o700)
            made = os.lstat(self.work)
            self._made = (made.st_dev, made.st_ino)
        except OSError:
            pass  # the job's process says so (enter)

    def for_next_job(self) -> JobDirectory:
        """In the server, once a job ended with its process kept for the next job of its kernel:
        this directory again if the job left it as it was made (the same empty folder, mode 0700:
        removing it and making another costs the server some 0.1 ms of CPU on overlayfs), else a
        new one. Either way the job finds an empty directory; its modules' folder stays."""
        try:
            info = os.lstat(self.work)
            if ((info.st_dev, info.st_ino) == self._made and stat.S_ISDIR(info.st_mode)
                    and stat.S_IMODE(info.st_mode) == 0o700 and not os.listdir(self.work)):
                return self
        except OSError:
            pass
        return JobDirectory(code=self.code)

    def enter(self, header: Dict[str, Any], sections: List[memoryview], code: List[memoryview]) -> None:
        """In the job's process, before its code runs: make the working directory its current
        one and write its uploads there, write its shipped modules and put them first on
        ``sys.path``."""
        files = header.get("files") or {}
        try:
            os.chdir(self.work)
            for folder in files.get("folders", ()):
                os.makedirs(_inside(self.work, folder), exist_ok=True)
            for path, index, mode in files.get("upload", ()):
                _write(_inside(self.work, path), sections[index], mode)
            if code and os.path.isdir(self.code):  # the process's earlier job wrote them: they may be imported
                code = []
            elif code:
                os.mkdir(self.code, 0o700)
                sys.path.insert(0, self.code)
            for bundle in code:
                listing, sources = protocol.unpack_bundle(bundle)
                for path, index in listing["files"]:
                    _write(_inside(self.code, path), sources[index], 0o644)
        except OSError as exc:
            raise WorkdirError("input", "the job's files could not be written to its working directory %s in "
                                        "the container: %s" % (self.work, exc)) from None

    def downloads(self, header: Dict[str, Any]) -> Downloads:
        """After the job succeeded: the files its ``--download`` patterns match, in pattern
        order; a matched folder brings its files."""
        patterns = (header.get("files") or {}).get("download") or []
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
        return Downloads(list(found.items()), unmatched, bool(patterns))

    def remove(self, keep_code: bool = False) -> None:
        """Remove the directory and (unless ``keep_code``) the modules' folder, and all in them
        (the job's process has ended or stays idle, its processes are gone): at once where the
        job left them empty (or made none), as most do."""
        for folder in (self.work,) if keep_code else (self.work, self.code):
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                pass
            except OSError:
                _remove_tree(folder)


def _remove_tree(root: str) -> None:
    """Remove ``root`` and all in it. A job may have taken its own permissions on its files
    away: the server, the same user without capabilities, gives them back to remove them,
    inside ``root`` only."""
    import shutil

    retried = set()

    def writable_again(_function: Any, path: str, _error: Any) -> None:
        if not path.startswith(root + os.sep) or path in retried:
            return
        retried.add(path)
        try:
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
                remove(path)
            else:
                os.unlink(path)
        except OSError:
            pass

    def remove(path: str) -> None:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=writable_again)
        else:
            shutil.rmtree(path, onerror=writable_again)

    try:
        os.chmod(root, 0o700)
    except FileNotFoundError:
        return  # never made (no modules shipped), or the job removed it itself
    except OSError:
        pass
    remove(root)


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
