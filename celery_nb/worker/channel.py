"""The worker's channel to one running container of the runtime's fork server: requests go in
as frames on its stdin, frames come back on its stdout, over one Docker attach socket that
lives as long as the container (Docker's multiplexed stream demultiplexed here); or, where this
process sees the container's processes (a worker on its host, as root: reaches_container), over
a connection to a warm container's server's own socket, with no daemon copying the bytes
(connect_direct). Big payloads and results take neither: they are handed over as files
(celery_nb.worker.handover), there too only where this process sees the container's processes.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import docker
import docker.errors

from celery_nb.worker.policy import ContainerSpec
from celery_nb_runtime import protocol


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
    reachable: bool = False  # this process sees its processes and /dev/shm (reaches_container)
    jobs_run: int = 0
    replacing: bool = False  # it has run its max jobs and serves on while its replacement starts
    retired: bool = False  # its replacement is in the pool: removed when its job ends
    last_used: float = field(default_factory=time.monotonic)
    stderr_tail: bytearray = field(default_factory=bytearray)  # the server's own errors (no python3, ...)
    direct: socket.socket | None = None  # the connection to the server's socket (connect_direct), if any
    process: str | None = None  # the key of the job's process its server keeps for the next job of that key
    _sent_process: str | None = None  # the key of the last request sent
    _attached: object = None
    _pid: int | None = None  # of its main process, as this process sees it
    _raw: bytearray = field(default_factory=bytearray)
    _frames: protocol.FrameDecoder = field(default_factory=protocol.FrameDecoder)

    def send(self, payload: bytes | None, env: dict[str, str], code: Sequence[protocol.Buffer] = (),
             process: str | None = None) -> None:
        """A job's REQUEST frame (protocol.pack_request): its payload (None: handed over as a file
        when its process asks), environment, local modules' code, and the key of the ``process``
        it may share. A job process kept for another key, or for none, is retired first, so a new
        process runs it."""
        request = protocol.pack_request(payload, env, self.reachable, code, process)
        sock = self.direct or self.sock
        sock.settimeout(None)  # a big request blocks until the server has read it
        head = protocol.frame_header(protocol.FRAME_REQUEST, len(request))
        if self.process is not None and self.process != process:
            head = protocol.frame_header(protocol.FRAME_RETIRE, 0) + head
        self._sent_process, self.process = process, None
        if len(request) < 65536:  # one write: one wake-up of the container's reader
            sock.sendall(head + request)
        else:
            sock.sendall(head)
            sock.sendall(request)

    def ended(self, end: dict[str, Any]) -> None:
        """The server's END frame of the last job sent: its process may stay for the next job of its key."""
        self.process = self._sent_process if end.get("kept") else None

    def read_frames(self, timeout: float) -> list[tuple[int, bytes]]:
        """Frames that arrive within ``timeout`` s ([] if none); ContainerExited at EOF."""
        if self.direct is not None:
            self.direct.settimeout(timeout)
            try:
                chunk = self.direct.recv(1 << 20)
            except TimeoutError:
                return []
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self._keep_stderr()  # what the server said before it ended
                raise ContainerExited()
            return self._frames.feed(chunk)
        return self._read_attached(timeout)

    def _keep_stderr(self) -> None:
        """With a direct connection, only the server's stderr comes on the attach stream: read it
        (its tail is kept) until the stream ends, for at most _STDERR_WAIT s."""
        deadline = time.monotonic() + _STDERR_WAIT
        while time.monotonic() < deadline:
            try:
                self._read_attached(max(0.001, deadline - time.monotonic()))
            except ContainerExited:
                return

    def _read_attached(self, timeout: float) -> list[tuple[int, bytes]]:
        """read_frames from the attach stream."""
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
        sock = self.direct or self.sock
        sock.settimeout(0)
        try:
            return sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True  # open, nothing to read: a server waiting for its next job
        except OSError:
            return False
        finally:
            sock.settimeout(None)

    def pid(self) -> int:
        """The host's pid of the container's main process (asked of Docker once)."""
        if self._pid is None:
            self.container.reload()
            self._pid = int(self.container.attrs["State"]["Pid"])
        return self._pid

    def connect_direct(self) -> None:
        """Connect to the socket the container's server listens on at its start, through
        /proc/<pid>/root, so that requests and frames no longer go through Docker's attach
        stream, which dockerd and containerd copy (~2 ms of their CPU per job). Only where this
        process sees the container's processes (``reachable``); else, or if the server does not take the
        connection, the attach stream carries them, and the server uses it too."""
        if not self.reachable:
            return
        path = f"/proc/{self.pid()}/root{protocol.SERVER_SOCKET}"
        deadline = time.monotonic() + protocol.SERVER_SOCKET_WAIT
        while True:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(path)
                connection.settimeout(protocol.SERVER_SOCKET_WAIT + _STDERR_WAIT)
                taken = connection.recv(1) == b"."  # (the server gave up waiting: reset, or nothing)
            except (FileNotFoundError, ConnectionRefusedError):  # not listening yet
                connection.close()
                if time.monotonic() > deadline or not self.alive():
                    return
                time.sleep(_CONNECT_INTERVAL)
                continue
            except OSError:
                taken = False
            if taken:
                self.direct = connection
            else:
                connection.close()
            return

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
            if self.direct is not None:
                self.direct.close()
            self.sock.close()
            self.container.remove(force=True)
        except docker.errors.NotFound:
            pass


_STDERR_WAIT = 1.0  # s the server's last stderr may take to come after its direct connection ended
_CONNECT_INTERVAL = 0.002  # s between two tries to connect to a server that is starting
_container_reachable: bool | None = None  # the answer of reaches_container, the same for every container


def reaches_container(runtime: RuntimeContainer) -> bool:
    """Whether this process sees the container's processes and reaches its /dev/shm (a worker on
    the containers' host, as root): then it talks to a warm container's server over the server's
    socket, and hands files over to its jobs' processes. Asked of the first container only, so
    later cold starts skip the inspection."""
    global _container_reachable
    if _container_reachable is None:
        _container_reachable = _sees_processes_of(runtime.container.id, runtime.pid())
    return _container_reachable


def _sees_processes_of(container_id: str, pid: int) -> bool:
    """Whether ``pid`` is, as this process sees it, the main process of container ``container_id``
    (a worker in another pid namespace may see another process under that number), and its
    /dev/shm can be reached."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            if container_id not in f.read():
                return False
    except OSError:
        return False
    return os.access(f"/proc/{pid}/root{protocol.SHARED_DIR}", os.R_OK | os.W_OK | os.X_OK)
