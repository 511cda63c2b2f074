"""The worker's channel to one running container of the runtime's fork server: requests go in
as frames on its stdin, frames come back on its stdout, over one Docker attach socket that
lives as long as the container (Docker's multiplexed stream demultiplexed here). Big payloads
and results do not: they are handed over as files (celery_nb.worker.handover), when this
process can reach the container's /dev/shm.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass, field

import docker
import docker.errors

from celery_nb.worker.policy import ContainerSpec
from celery_nb_runtime import protocol

SHARED_DIR = "/dev/shm"  # the container's, where its jobs' processes listen for files handed over


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
    hands_over: bool = False  # whether this process reaches the container's /dev/shm (files are handed over there)
    jobs_run: int = 0
    replacing: bool = False  # it has run its max jobs and serves on while its replacement starts
    retired: bool = False  # its replacement is in the pool: removed when its job ends
    last_used: float = field(default_factory=time.monotonic)
    stderr_tail: bytearray = field(default_factory=bytearray)  # the server's own errors (no python3, ...)
    _attached: object = None
    _pid: int | None = None  # of its main process, as this process sees it
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

    def pid(self) -> int:
        """The host's pid of the container's main process (asked of Docker once)."""
        if self._pid is None:
            self.container.reload()
            self._pid = int(self.container.attrs["State"]["Pid"])
        return self._pid

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


_shared_dir_reachable: bool | None = None  # the answer of reaches_shared_dir, the same for every container


def reaches_shared_dir(runtime: RuntimeContainer) -> bool:
    """Whether this process reaches containers' /dev/shm: a worker on the containers' host, as
    root. Asked of the first container only, so later cold starts skip the inspection."""
    global _shared_dir_reachable
    if _shared_dir_reachable is None:
        _shared_dir_reachable = os.access(f"/proc/{runtime.pid()}/root{SHARED_DIR}", os.R_OK | os.W_OK)
    return _shared_dir_reachable
