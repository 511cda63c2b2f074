"""The worker's channel to one running container of the runtime's fork server: requests go in
as frames on its stdin, frames come back on its stdout, over one Docker attach socket that
lives as long as the container (Docker's multiplexed stream demultiplexed here). A big result
may instead be read from the container's /dev/shm, when this process can see it.
"""
from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from dataclasses import dataclass, field

import docker
import docker.errors

from celery_nb.worker.policy import ContainerSpec
from celery_nb_runtime import protocol

SPOOL_DIR = "/dev/shm"


class ContainerExited(Exception):
    """The container's output ended (it exited or was killed)."""


@dataclass
class ExitStatus:
    code: int
    oom_killed: bool


_DOCKER_STREAM_HEAD = struct.Struct(">BxxxL")  # docker's multiplexed attach stream: stream id, size


@dataclass(eq=False)  # each is itself: the pool finds it by identity
class RuntimeContainer:
    """A running container of the runtime's fork server, and the socket to talk to it."""

    container: docker.models.containers.Container
    sock: socket.socket
    spec: ContainerSpec
    one_shot: bool = False  # runs one job, then exits (never pooled)
    spools: bool = False  # whether this process reads the container's /dev/shm (big results spooled there)
    jobs_run: int = 0
    replacing: bool = False  # it has run its max jobs and serves on while its replacement starts
    retired: bool = False  # its replacement is in the pool: removed when its job ends
    last_used: float = field(default_factory=time.monotonic)
    stderr_tail: bytearray = field(default_factory=bytearray)  # the server's own errors (no python3, ...)
    _attached: object = None
    _raw: bytearray = field(default_factory=bytearray)
    _frames: protocol.FrameDecoder = field(default_factory=protocol.FrameDecoder)

    def send(self, request: bytes) -> None:
        self.sock.settimeout(None)  # a big request blocks until the server has read it
        if len(request) < 65536:  # one write: one wake-up of the container's reader
            self.sock.sendall(protocol.frame_header(protocol.FRAME_REQUEST, len(request)) + request)
        else:
            self.sock.sendall(protocol.frame_header(protocol.FRAME_REQUEST, len(request)))
            self.sock.sendall(request)

    def read_frames(self, timeout: float) -> list[tuple[int, bytes]]:
        """Frames that arrive within ``timeout`` s ([] if none); ContainerExited at EOF."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            return []
        if not chunk:
            raise ContainerExited()
        self._raw += chunk
        frames = []
        while len(self._raw) >= _DOCKER_STREAM_HEAD.size:
            stream, size = _DOCKER_STREAM_HEAD.unpack_from(self._raw)
            if len(self._raw) < _DOCKER_STREAM_HEAD.size + size:
                break
            data = bytes(self._raw[_DOCKER_STREAM_HEAD.size:_DOCKER_STREAM_HEAD.size + size])
            del self._raw[:_DOCKER_STREAM_HEAD.size + size]
            if stream == 2:
                self.stderr_tail = (self.stderr_tail + data)[-8192:]
            else:
                frames.extend(self._frames.feed(data))
        return frames

    def alive(self) -> bool:
        """False once the container has ended (its stream is closed); a cheap local check."""
        self.sock.settimeout(0)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True  # open, nothing to read: a server waiting for its next job
        except OSError:
            return False
        finally:
            self.sock.settimeout(None)

    def read_spooled(self, path: str, copy: bool) -> bytearray | mmap.mmap:
        """The result a job spooled to a file in the container (the file is deleted): mapped,
        with no copy, or (``copy``) copied out, so that values the caller keeps for long do not
        hold the container's memory (its /dev/shm counts against its limit)."""
        path = f"{_root_seen_from_here(self.container)}{path}"  # the container is alive: its job's server waits
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if copy:
                data: bytearray | mmap.mmap = bytearray(size)
                f.readinto(data)
            else:
                data = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        os.unlink(path)
        return data

    def kill(self) -> None:
        try:
            self.container.kill()
        except docker.errors.APIError:
            pass  # already exited

    def exit_status(self) -> ExitStatus:
        code = self.container.wait()["StatusCode"]
        self.container.reload()
        return ExitStatus(code=code, oom_killed=bool(self.container.attrs["State"].get("OOMKilled")))

    def remove(self) -> None:
        try:
            self.sock.close()
            self.container.remove(force=True)
        except docker.errors.NotFound:
            pass


_spool_readable: bool | None = None  # the answer of reads_spool, the same for every container


def reads_spool(container: docker.models.containers.Container) -> bool:
    """Whether this process can read containers' /dev/shm: a worker on the containers' host, as
    root. Asked of the first container only, so later cold starts skip the inspection."""
    global _spool_readable
    if _spool_readable is None:
        _spool_readable = os.access(f"{_root_seen_from_here(container)}{SPOOL_DIR}", os.R_OK | os.W_OK)
    return _spool_readable


def _root_seen_from_here(container: docker.models.containers.Container) -> str:
    """The running container's root directory, as this process sees it."""
    container.reload()
    return f"/proc/{container.attrs['State']['Pid']}/root"
