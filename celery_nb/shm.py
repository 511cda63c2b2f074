"""Big payloads and results as shared memory files, between a kernel and the workers of its host.

A kernel keeps them in its user's folder of /dev/shm, ``/dev/shm/celery_nb-UID`` (mode 0700; a
kernel with the embedded worker has one of its own, ``celery_nb-UID-PID``, gone with it as its
jobs are): the payloads it sends (``in-…``), written once, and the results that workers of this host put there
(``out-…``: allocated by the worker, written by the job's process straight into the file, owned by
the kernel's user), which the kernel maps instead of reading them. A worker uses such files only
where it sees the kernel's /dev/shm: both read the same random host id from
``/dev/shm/celery_nb-host`` (a container has a /dev/shm of its own, so a host name would not do),
the request names the kernel's folder, and the worker may open files there (it runs as root or as
the kernel's user). Workers tell the job store which host id they see and which queues they
serve (``worker_facts``), so that a kernel puts a big payload here only when every live worker
of the job's queue can read it, and in the blob store (Redis, S3) otherwise.

Files go as blobs do: a payload once its job has ended, a result once it has been collected;
those never collected expire DEFAULT_TTL after they were written (their modification time), swept
by workers and by kernels; the folder of a kernel with the embedded worker goes when the kernel
shuts down, or (killed) when the next such kernel of its user starts.
"""
from __future__ import annotations

import functools
import mmap
import os
import re
import shutil
import stat
import time
import uuid
from typing import Any

from celery_nb.blobs import MissingBlobError
from celery_nb.jobstore import DEFAULT_TTL
from celery_nb_runtime.protocol import write_pieces

SHM_DIR = "/dev/shm"
_HOST_ID_FILE = os.path.join(SHM_DIR, "celery_nb-host")
_FOLDER = re.compile(re.escape(SHM_DIR) + r"/celery_nb-(\d+)(?:-(\d+))?")  # the user's; a process's of the user
_FILE_NAME = re.compile(r"(in|out)-[0-9a-f]{32}")


@functools.cache
def host_id() -> str | None:
    """The random id of this host's /dev/shm (made by the first process that asks), the same
    for every process that sees this /dev/shm; None where there is none."""
    try:
        return _read_host_id()
    except FileNotFoundError:
        pass
    except OSError:
        return None
    candidate = f"{_HOST_ID_FILE}.{uuid.uuid4().hex}"
    try:
        with open(candidate, "x") as f:
            f.write(uuid.uuid4().hex)
        os.chmod(candidate, 0o644)  # whatever the umask: every user's kernels and workers read it
        try:
            os.link(candidate, _HOST_ID_FILE)  # atomic: the first one made wins
        except FileExistsError:
            pass
        os.unlink(candidate)
        return _read_host_id()
    except OSError:
        return None


def _read_host_id() -> str:
    fd = os.open(_HOST_ID_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        found = f.read(64).strip()
    if not re.fullmatch("[0-9a-f]{32}", found):
        raise OSError(f"{_HOST_ID_FILE} does not hold a celery_nb host id")
    return found


def worker_facts(queues: list[str], shares: bool) -> dict[str, Any]:
    """What a worker tells kernels: the queues it serves, and (``shares``) which host's /dev/shm
    it sees and as which user it runs."""
    return {"queues": queues, "host": host_id() if shares else None, "uid": os.geteuid()}


class Exchange:
    """A kernel's folder of shared files. Kernels make their own (``own``); workers find a
    kernel's from what its request says (``of``)."""

    def __init__(self, folder: str, owner: int, host: str) -> None:
        self.folder = folder
        self.owner = owner  # the kernel's user
        self.host = host

    @classmethod
    def own(cls, this_process: bool = False) -> Exchange | None:
        """This process's user's folder (made, and swept of expired files, now), or one of this
        process's own (``this_process``: the folders of this user's processes that have died are
        removed first); None where there is no usable /dev/shm."""
        host = host_id()
        folder = f"{SHM_DIR}/celery_nb-{os.geteuid()}" + (f"-{os.getpid()}" if this_process else "")
        if this_process:
            _remove_folders_of_dead_processes(host)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
        exchange = cls._checked(folder, host)
        if exchange is not None:
            exchange.sweep()
        return exchange

    @classmethod
    def of(cls, where: dict[str, Any] | None) -> Exchange | None:
        """The folder a request names (``where``: the kernel's ``where()``), if this process
        sees the kernel's /dev/shm and may use its folder; else None."""
        if not where or where.get("host") is None or where.get("host") != host_id():
            return None
        return cls._checked(str(where.get("dir")), where["host"])

    @classmethod
    def _checked(cls, folder: str, host: str | None) -> Exchange | None:
        """The folder, if it is what a kernel makes (a real folder of its user, private to it)
        and this process may use it."""
        match = _FOLDER.fullmatch(folder)
        if host is None or match is None:
            return None
        try:
            info = os.lstat(folder)
        except OSError:
            return None
        owner = int(match.group(1))
        if (not stat.S_ISDIR(info.st_mode) or info.st_uid != owner or info.st_mode & 0o077
                or not os.access(folder, os.R_OK | os.W_OK | os.X_OK)):
            return None
        return cls(folder, owner, host)

    def where(self) -> dict[str, Any]:
        """How a request names this folder."""
        return {"host": self.host, "dir": self.folder}

    def shared_with(self, facts: dict[str, Any]) -> bool:
        """Whether the worker of ``facts`` (worker_facts) can use this folder."""
        return facts.get("host") == self.host and facts.get("uid") in (0, self.owner)

    def put(self, pieces: list[Any]) -> dict[str, Any] | None:
        """A new payload file of the concatenation of ``pieces``; None if it cannot be written."""
        path = self._new_path("in")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:  # the folder is gone, or this process has too many files open
            return None
        try:
            write_pieces(fd, pieces)
            size = os.fstat(fd).st_size
        except OSError:  # no room (ENOSPC), or a limit on this process's files (EFBIG)
            os.unlink(path)
            return None
        finally:
            os.close(fd)
        return {"shm": path, "size": size}

    def reserve(self, size: int) -> tuple[int, dict[str, Any]] | None:
        """A new result file of ``size`` bytes, allocated now (by this process: the memory is not
        charged to the container that writes it) and owned by the kernel's user; its descriptor
        (read-write) and reference. None if it cannot be allocated."""
        path = self._new_path("out")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:  # the folder is gone, or this process has too many files open
            return None
        try:
            if os.geteuid() != self.owner:
                os.fchown(fd, self.owner, -1)
            os.posix_fallocate(fd, 0, size)
        except OSError:  # no room (ENOSPC), or a limit on this process's files (EFBIG)
            os.close(fd)
            os.unlink(path)
            return None
        return fd, {"shm": path, "size": size}

    def open(self, ref: dict[str, Any]) -> int:
        """A read-only descriptor of the file ``ref``; MissingBlobError if it is gone."""
        path = self._path_of(ref)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise MissingBlobError(f"shared memory file {path} has expired or was deleted") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != self.owner or info.st_size != ref["size"]:
            os.close(fd)
            raise MissingBlobError(f"{path} is not the shared memory file its reference names")
        return fd

    def take(self, ref: dict[str, Any]) -> mmap.mmap:
        """The file ``ref``, mapped privately (values loaded from it in place are writable: a
        page is copied when written) and deleted: its memory goes when the mapping does."""
        fd = self.open(ref)
        try:
            mapping = mmap.mmap(fd, ref["size"], flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.delete(ref)
        return mapping

    def delete(self, ref: dict[str, Any]) -> None:
        try:
            os.unlink(self._path_of(ref))
        except FileNotFoundError:
            pass

    def remove(self) -> None:
        """Remove the folder and its files (a process's own, when it stops)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def sweep(self, max_age: float | None = None) -> None:
        """Delete the files written more than ``max_age`` seconds ago (default: the blobs' expiry)."""
        oldest = time.time() - (DEFAULT_TTL if max_age is None else max_age)
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if _FILE_NAME.fullmatch(entry.name) and entry.stat(follow_symlinks=False).st_mtime < oldest:
                    self.delete({"shm": entry.path})

    def _new_path(self, kind: str) -> str:
        return os.path.join(self.folder, f"{kind}-{uuid.uuid4().hex}")

    def _path_of(self, ref: dict[str, Any]) -> str:
        """The path ``ref`` names, which must be a file of this folder."""
        path = str(ref.get("shm"))
        folder, name = os.path.split(path)
        if folder != self.folder or not _FILE_NAME.fullmatch(name):
            raise MissingBlobError(f"{path} is not a file of the shared memory folder {self.folder}")
        return path


def _remove_folders_of_dead_processes(host: str | None) -> None:
    """Remove the folders of this user's processes that are no longer alive (a kernel with the
    embedded worker that was killed: its jobs ended with it)."""
    for folder in kernel_folders():
        match = _FOLDER.fullmatch(folder.folder)
        if match and match.group(2) and folder.owner == os.geteuid() and folder.host == host:
            try:
                os.kill(int(match.group(2)), 0)
            except ProcessLookupError:
                folder.remove()
            except PermissionError:
                pass  # alive, another user's: a pid reused


def kernel_folders() -> list[Exchange]:
    """The folders of this host's kernels that this process may use (a worker sweeps them)."""
    host = host_id()
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    found = (Exchange._checked(os.path.join(SHM_DIR, name), host) for name in names if name.startswith("celery_nb-"))
    return [exchange for exchange in found if exchange is not None]
