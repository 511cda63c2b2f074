"""Files handed between the worker and a job's process in a container of this host: the job's
big payload, and the file its big result is written into, as file descriptors passed over a
unix socket that the job's process listens on in its container's /dev/shm. The bytes never go
through Docker's stream, and neither side copies them: the job maps its payload, and writes its
result where the kernel maps it (the kernel's shared memory folder, celery_nb.shm) or whence the
worker sends it to the blob store.

Only the job's own process gets a file: the socket it names must be a socket in the container's
/dev/shm (no link is followed), and its listener must be the process that asked, in that container.
"""
from __future__ import annotations

import mmap
import os
import re
import socket
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from celery_nb.worker.channel import RuntimeContainer
from celery_nb_runtime.protocol import SHARED_DIR, write_pieces

_SOCKET_NAME = re.compile(r"celery_nb-[0-9a-f]{32}\.sock")
_CONNECT_TIMEOUT = 10.0  # s; the job's process listens before it asks


class HandoverError(Exception):
    """A job's process asked for a file in a way the worker does not follow."""


@dataclass(eq=False)
class SharedFile:
    """A file of ``size`` bytes that a job's result was written into: in its kernel's shared
    memory folder (``ref``), or an anonymous memory file of this process (``ref`` None)."""

    fd: int
    size: int
    ref: dict[str, Any] | None
    _mapping: mmap.mmap | None = field(default=None, repr=False)

    def contents(self) -> mmap.mmap:
        """The file, mapped read-only."""
        if self._mapping is None:
            self._mapping = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        return self._mapping

    def close(self) -> None:
        """Close the descriptor (a mapping handed on keeps the memory)."""
        os.close(self.fd)


def memory_file(size: int) -> int:
    """A descriptor of a new anonymous shared memory file of ``size`` bytes, allocated now."""
    fd = os.memfd_create("celery_nb", os.MFD_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def memory_file_of(data: Any) -> int:
    """A descriptor of a new anonymous shared memory file holding ``data`` (bytes-like)."""
    fd = os.memfd_create("celery_nb", os.MFD_CLOEXEC)
    try:
        write_pieces(fd, [data])
    except OSError:
        os.close(fd)
        raise
    return fd


def hand_over(runtime: RuntimeContainer, wanted: dict[str, Any], fd: int | None) -> None:
    """Give ``fd`` to the job's process in ``runtime`` that asked for a file (``wanted``: its
    FILE_WANTED frame); ``fd`` None tells it that there is none."""
    folder, name = os.path.split(str(wanted.get("socket")))
    if folder != SHARED_DIR or not _SOCKET_NAME.fullmatch(name) or not isinstance(wanted.get("pid"), int):
        raise HandoverError(f"a job's process asked for a file on {wanted.get('socket')!r}, not a socket of "
                            f"celery_nb's in {SHARED_DIR}")
    pid = runtime.pid()
    folder_fd = os.open(f"/proc/{pid}/root{SHARED_DIR}", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        socket_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=folder_fd)
    finally:
        os.close(folder_fd)
    try:
        if not stat.S_ISSOCK(os.fstat(socket_fd).st_mode):
            raise HandoverError(f"{wanted['socket']} in the container is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(_CONNECT_TIMEOUT)
            connection.connect(f"/proc/self/fd/{socket_fd}")  # the socket just checked, wherever links lead
            _check_listener(connection, pid, wanted["pid"])
            if fd is None:
                connection.sendall(b"-")
            else:
                socket.send_fds(connection, [b"f"], [fd])
    finally:
        os.close(socket_fd)


def _check_listener(connection: socket.socket, container_pid: int, asking_pid: int) -> None:
    """The process listening on ``connection``'s socket must be ``asking_pid`` (as the container
    numbers it) in the pid namespace of the container whose main process is ``container_pid``."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    listener = struct.unpack("3i", credentials)[0]
    try:
        with open(f"/proc/{listener}/status") as f:
            numbers = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
        same_namespace = os.stat(f"/proc/{listener}/ns/pid").st_ino == os.stat(f"/proc/{container_pid}/ns/pid").st_ino
    except (OSError, StopIteration):
        numbers, same_namespace = [], False
    if not same_namespace or numbers[-1:] != [str(asking_pid)]:
        raise HandoverError(f"the socket a job's process asked for a file on is held by another process (pid "
                            f"{listener}); nothing was handed over")
