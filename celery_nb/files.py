"""Files between the kernel's working directory and a job's: what ``--upload`` sends, and writing
back what ``--download`` brought.

A relative upload path inside the kernel's working directory keeps its layout in the job's
(``data/train.csv`` is ``data/train.csv`` there); any other path lands there by its name. A
downloaded file replaces the kernel's file of the same path as ``cp`` would, but is written to
a temporary name next to it and renamed, so a failure midway leaves the old file whole.
"""
from __future__ import annotations

import mmap
import os
import stat
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery_nb.errors import InputError, OutputError


@dataclass(frozen=True)
class Upload:
    """One file to write into the job's working directory."""

    path: str  # where the job finds it, relative to its working directory ("/"-separated)
    source: str  # the file in the kernel
    mode: int  # its permission bits


@dataclass(frozen=True)
class Uploads:
    files: tuple[Upload, ...]
    folders: tuple[str, ...]  # every uploaded folder, so that empty ones exist in the job too


def resolve_uploads(paths: Sequence[str]) -> Uploads:
    """The files and folders ``paths`` name, relative to the kernel's working directory;
    InputError for one that does not exist or two that land on the same path."""
    cwd = os.getcwd()
    files: dict[str, Upload] = {}
    folders: list[str] = []
    for given in paths:
        source = os.path.join(cwd, os.path.expanduser(given))
        if not os.path.exists(source):
            raise InputError(f"--upload {given}: no such file or folder (a relative path starts from the kernel's "
                             f"working directory, {cwd}); check the path")
        target = _target(given, source, cwd)
        if os.path.isdir(source):
            for folder, subfolders, names in os.walk(source):
                subfolders.sort()
                base = _join(target, os.path.relpath(folder, source))
                folders.append(base)
                for name in sorted(names):
                    _add(files, given, os.path.join(folder, name), _join(base, name))
        else:
            _add(files, given, source, target)
    return Uploads(tuple(files.values()), tuple(dict.fromkeys(folders)))


def _target(given: str, source: str, cwd: str) -> str:
    """Where ``given`` lands in the job: its own relative path if it is one inside ``cwd``,
    else its name."""
    relative = os.path.relpath(os.path.normpath(source), cwd)
    if not os.path.isabs(os.path.expanduser(given)) and relative != ".." and not relative.startswith(".." + os.sep):
        return relative.replace(os.sep, "/")
    return os.path.basename(os.path.normpath(source)) or "."


def _join(folder: str, name: str) -> str:
    return os.path.normpath(os.path.join(folder, name)).replace(os.sep, "/")


def _add(files: dict[str, Upload], given: str, source: str, target: str) -> None:
    try:
        info = os.stat(source)
    except FileNotFoundError:
        return  # a dangling symbolic link in a folder: nothing to copy
    except OSError as exc:
        raise InputError(f"--upload {given}: cannot read {source}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        return  # sockets, pipes and devices are not files to copy
    if target in files:
        raise InputError(f"--upload: {files[target].source} and {source} would both be {target} in the job; "
                         f"upload one of them, or their folders under different names")
    files[target] = Upload(target, source, stat.S_IMODE(info.st_mode))


def read_upload(upload: Upload) -> Any:
    """The file's contents, mapped rather than read (the payload is joined from them once)."""
    try:
        with open(upload.source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) if size else b""
    except OSError as exc:
        raise InputError(f"--upload: cannot read {upload.source}: {exc.strerror}") from None


def write_downloads(files: Sequence[tuple[str, Any]]) -> None:
    """Write each (path relative to the job's working directory, contents) at the same path
    in the kernel's working directory, creating folders as needed."""
    cwd = os.getcwd()
    for path, data in files:
        parts = path.split("/")
        if not path or os.path.isabs(path) or ".." in parts:  # the job's result names it: do not trust it
            raise OutputError(f"the job sent back a file named {path!r}, which would be outside the kernel's "
                              f"working directory; it was not written")
        _replace(os.path.join(cwd, *parts), data, path)


def _replace(target: str, data: Any, path: str) -> None:
    """Write ``target`` through a temporary file in its folder, renamed over it when complete;
    a file it replaces keeps its permissions."""
    folder = os.path.dirname(target)
    temporary = os.path.join(folder, f".{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.celery_nb-part")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
            except FileNotFoundError:
                pass
            os.replace(temporary, target)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        raise OutputError(f"the downloaded file {path} could not be written to {target}: {exc.strerror or exc}; "
                          f"a file that was there is unchanged. Make room or fix the folder's permissions, then "
                          f"call the job's result() again") from None
