"""Docker: containers that run the celery_nb runtime, and the warm pool that reuses them.

A container's command is the runtime's fork server, shipped in its argv (no put_archive, no
files written into the image). Jobs go in as REQUEST frames on stdin and come back as frames
on stdout, over one attach socket that lives as long as the container. Containers are
labelled with the job and the worker, created with the worker's limits and safety settings,
and always removed.
"""
from __future__ import annotations

import base64
import functools
import json
import logging
import mmap
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import cloudpickle
import docker
import docker.errors

import celery_nb_runtime
from celery_nb.errors import CeleryNBError, ContainerError, DockerUnavailableError, ImageNotFoundError
from celery_nb.worker.policy import ContainerLimits
from celery_nb_runtime import protocol

LABEL_JOB = "celery_nb.job_id"
LABEL_TASK = "celery_nb.task_id"
LABEL_WORKER = "celery_nb.worker"
LABEL_POOL_KEY = "celery_nb.pool_key"
LABEL_OWNER = "celery_nb.owner"  # host:pid of the process that created the container
OWNER = f"{socket.gethostname()}:{os.getpid()}"
SPOOL_DIR = "/dev/shm"
log = logging.getLogger(__name__)

# Runs in the container: import the runtime (and cloudpickle) from the sources in argv[1], then
# serve jobs ("serve") or run exactly one ("one-shot"). Only cheap stdlib modules here: importlib.abc
# and base64 would add ~20 ms to every cold start.
_BOOTSTRAP = """\
import binascii, importlib.machinery, json, sys, zlib
sources = json.loads(zlib.decompress(binascii.a2b_base64(sys.argv.pop(1))))
class SourceImporter:
    def find_spec(self, name, path, target=None):
        stem = name.replace(".", "/")
        for filename in (stem + "/__init__.py", stem + ".py"):
            if filename in sources:
                spec = importlib.machinery.ModuleSpec(
                    name, self, origin="/celery_nb/" + filename, is_package=filename.endswith("__init__.py"))
                spec.has_location = True
                return spec
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        source = sources[module.__spec__.origin[len("/celery_nb/"):]]
        exec(compile(source, module.__spec__.origin, "exec"), module.__dict__)
sys.meta_path.insert(0, SourceImporter())
from celery_nb_runtime.runner import serve
sys.exit(serve(one_shot=sys.argv[1] == "one-shot"))
"""


@functools.lru_cache(maxsize=1)
def _packed_sources() -> str:
    """The sources of celery_nb_runtime and cloudpickle, compressed for the command line."""
    sources = {}
    for package in (celery_nb_runtime, cloudpickle):
        folder = os.path.dirname(package.__file__)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    sources[f"{package.__name__}/{name}"] = f.read()
    return base64.b64encode(zlib.compress(json.dumps(sources).encode(), 9)).decode("ascii")


def runtime_command(one_shot: bool) -> list[str]:
    """python3 -c BOOTSTRAP <packed sources> serve|one-shot. A one-shot runtime (a --fresh
    container) skips what only pays off over many jobs and exits after its job."""
    return ["python3", "-u", "-c", _BOOTSTRAP, _packed_sources(), "one-shot" if one_shot else "serve"]


_docker_client: docker.DockerClient | None = None
_docker_lock = threading.Lock()


def connect() -> docker.DockerClient:
    """The worker host's Docker daemon (DOCKER_HOST or the local socket), shared by threads."""
    global _docker_client
    with _docker_lock:
        if _docker_client is not None:
            return _docker_client
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        try:
            client = docker.from_env()
            client.ping()
        except docker.errors.DockerException as exc:
            raise DockerUnavailableError(
                f"the worker cannot reach the Docker daemon at {where}: {exc}. Start Docker on the worker "
                f"host (or mount its socket into the worker) and run the cell again.") from None
        _docker_client = client
        return client


def ensure_image(client: docker.DockerClient, image: str, pull: str) -> None:
    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    hint = f"build or `docker pull {image}` on the worker host, or pick another --image"
    if pull != "missing":
        raise ImageNotFoundError(f"image {image!r} is not on the worker host (pulling is off): {hint}")
    try:
        client.images.pull(image)
    except docker.errors.DockerException as exc:
        raise ImageNotFoundError(f"image {image!r} is not on the worker host and pulling it failed "
                                 f"({_first_line(exc)}): {hint}") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class ContainerExited(Exception):
    """The container's output ended (it exited or was killed)."""


@dataclass
class ExitStatus:
    code: int
    oom_killed: bool


_DOCKER_STREAM_HEAD = struct.Struct(">BxxxL")  # docker's multiplexed attach stream: stream id, size


@dataclass
class RuntimeContainer:
    """A running container of the runtime's fork server, and the socket to talk to it."""

    container: docker.models.containers.Container
    sock: socket.socket
    image: str
    limits: ContainerLimits
    pool_key: str
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


def device_requests(gpus: str | None) -> list[docker.types.DeviceRequest] | None:
    """Docker's device request for a config.parse_gpus spec (what `docker run --gpus` sends)."""
    if not gpus:
        return None
    if gpus.startswith("device="):
        return [docker.types.DeviceRequest(device_ids=gpus[len("device="):].split(","), capabilities=[["gpu"]])]
    return [docker.types.DeviceRequest(count=-1 if gpus == "all" else int(gpus), capabilities=[["gpu"]])]


def start_container(client: docker.DockerClient, image: str, limits: ContainerLimits, labels: dict[str, str],
                    pool_key: str, pull: str, one_shot: bool) -> RuntimeContainer:
    """A started container of the runtime for ``image``, pulled first if missing and ``pull`` allows.
    ``one_shot``: for one job only (--fresh). The low-level API spares the inspections the
    high-level one makes after each call: a cold start pays only create, attach and start."""
    host_config = client.api.create_host_config(
        mem_limit=limits.memory,
        memswap_limit=limits.memory,  # no swap: exceeding the limit is an OOM kill
        nano_cpus=limits.nano_cpus,
        pids_limit=limits.pids,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        privileged=False,
        log_config=docker.types.LogConfig(type="none"),  # output is streamed by attach, not stored
        shm_size=limits.memory,  # big results are spooled to /dev/shm (counted in the memory limit)
        network_mode=limits.network,
        read_only=limits.read_only,
        tmpfs={"/tmp": ""} if limits.read_only else None,
        device_requests=device_requests(limits.gpus),
    )

    def create() -> str:
        return client.api.create_container(
            image,
            command=runtime_command(one_shot),
            labels={**labels, LABEL_POOL_KEY: pool_key, LABEL_OWNER: OWNER},
            environment={"PYTHONDONTWRITEBYTECODE": "1"},
            stdin_open=True,  # requests arrive on stdin
            user=limits.user,
            host_config=host_config,
            detach=True,
        )["Id"]

    try:
        try:
            container_id = create()
        except docker.errors.ImageNotFound:  # checked only now: the image is there nearly always
            ensure_image(client, image, pull)
            container_id = create()
    except docker.errors.APIError as exc:
        raise ContainerError(f"could not create a container of image {image!r}: {exc.explanation or exc}") from None
    container = client.containers.prepare_model({"Id": container_id})
    # attach before start so nothing the container writes is missed
    attached = client.api.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
    runtime = RuntimeContainer(container, getattr(attached, "_sock", attached), image, limits, pool_key, one_shot)
    runtime._attached = attached  # keeps the HTTP response (and with it the socket) alive
    try:
        container.start()
    except docker.errors.APIError as exc:
        runtime.remove()
        explanation = str(exc.explanation or exc)
        if limits.gpus and "device driver" in explanation:
            raise ContainerError(f"--gpus {limits.gpus}: the worker host's Docker cannot give GPUs to containers "
                                 f"({explanation}); install the NVIDIA Container Toolkit there, or send the job "
                                 f"to a GPU worker's queue with --queue") from None
        if "executable file not found" in explanation or "no such file" in explanation.lower():
            raise ContainerError(f"image {image!r} has no python3 on its PATH; celery_nb needs an image with "
                                 f"Python 3.9 or newer") from None
        raise ContainerError(f"could not start the container of image {image!r}: {explanation}") from None
    runtime.spools = _reads_spool(container)
    return runtime


_spool_readable: bool | None = None  # the answer of _reads_spool, the same for every container


def _reads_spool(container: docker.models.containers.Container) -> bool:
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


@dataclass(frozen=True)
class PoolSettings:
    """Warm pool of the worker (env variables on the worker)."""

    size: int = 4  # CELERY_NB_POOL_SIZE: idle containers kept per (image, limits); 0 turns the pool off
    idle_timeout: float = 300.0  # CELERY_NB_POOL_IDLE_TIMEOUT: seconds before an idle container is removed
    # CELERY_NB_POOL_MAX_JOBS: jobs a container runs before it is replaced (it serves on while its
    # replacement starts, so that no job waits for a container start because of this limit)
    max_jobs: int = 100
    # CELERY_NB_ORPHAN_INTERVAL: seconds between two looks for containers of dead processes on this
    # host (a worker killed mid-job leaves its job running in them)
    orphan_interval: float = 30.0

    @classmethod
    def from_env(cls) -> PoolSettings:
        env = os.environ
        return cls(size=int(env.get("CELERY_NB_POOL_SIZE", cls.size)),
                   idle_timeout=float(env.get("CELERY_NB_POOL_IDLE_TIMEOUT", cls.idle_timeout)),
                   max_jobs=int(env.get("CELERY_NB_POOL_MAX_JOBS", cls.max_jobs)),
                   orphan_interval=float(env.get("CELERY_NB_ORPHAN_INTERVAL", cls.orphan_interval)))


_RETURN_WAIT = 2.0  # s a job may wait for a container whose previous job is just ending (a cold start costs more)


def pool_key(image: str, limits: ContainerLimits) -> str:
    """What makes two containers interchangeable (the timeout is per job, not per container)."""
    return (f"{image}|{limits.memory}|{limits.nano_cpus}|{limits.pids}|{limits.network}|{limits.read_only}"
            f"|{limits.user}|{limits.gpus}")


class ContainerPool:
    """Idle runtime containers per (image, limits), reused by later jobs of the same key.

    Each job still runs in a fresh process forked by the container's server, so globals
    do not leak between jobs; files written in the container do persist (use --fresh).
    """

    def __init__(self, worker: str, settings: PoolSettings) -> None:
        self.worker = worker
        self.settings = settings
        self._idle: dict[str, list[RuntimeContainer]] = {}
        self._returning: dict[str, int] = {}  # containers whose job is reported done, process still exiting
        self._lock = threading.Condition()
        self._stopped = threading.Event()
        self._reaper: threading.Thread | None = None

    def checkout(self, key: str) -> RuntimeContainer | None:
        """A live idle container for ``key``, most recently used first, or None. A container
        whose last job was just reported done is worth a short wait: a kernel that runs cells
        one after the other must not get a cold start because it was quick."""
        while True:
            with self._lock:
                idle = self._idle.setdefault(key, [])  # the list checkin appends to
                if not idle and self._returning.get(key):
                    self._lock.wait_for(lambda: idle or not self._returning.get(key), timeout=_RETURN_WAIT)
                runtime = idle.pop() if idle else None
            if runtime is None or runtime.alive():
                return runtime
            runtime.remove()  # it died while idle (killed, OOM, daemon restart)

    def returning(self, runtime: RuntimeContainer) -> None:
        """``runtime``'s job was reported done; it comes back (checkin) or goes (discard) soon."""
        with self._lock:
            self._returning[runtime.pool_key] = self._returning.get(runtime.pool_key, 0) + 1

    def _returned(self, runtime: RuntimeContainer, was_returning: bool) -> None:
        if was_returning:
            self._returning[runtime.pool_key] -= 1
        self._lock.notify_all()

    def discard(self, runtime: RuntimeContainer, was_returning: bool = False) -> None:
        """Remove a container that must not be reused."""
        with self._lock:
            self._returned(runtime, was_returning)
        runtime.remove()

    def checkin(self, runtime: RuntimeContainer, was_returning: bool = False, ran: bool = True) -> None:
        """Keep a healthy container for later jobs, or remove it if the pool has no room.
        ``ran``: whether a job ran in it (one that was checked out for nothing: False). One
        that has run its max jobs is kept until a replacement has started in the background."""
        runtime.jobs_run += ran
        runtime.last_used = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(runtime.pool_key, [])
            replace = (runtime.jobs_run >= self.settings.max_jobs and not runtime.replacing
                       and not self._stopped.is_set())
            runtime.replacing |= replace
            keep = (not self._stopped.is_set() and not runtime.retired and len(idle) < self.settings.size
                    and (runtime.jobs_run < self.settings.max_jobs or runtime.replacing))
            if keep:
                idle.append(runtime)
                self._start_reaper()
            self._returned(runtime, was_returning)
        if replace:
            threading.Thread(target=self._replace, args=(runtime,), name="celery_nb-pool-replace", daemon=True).start()
        if not keep:
            runtime.remove()

    def _replace(self, worn: RuntimeContainer) -> None:
        """Start a container like ``worn`` and put it in the pool in ``worn``'s place."""
        try:
            fresh = start_container(connect(), worn.image, worn.limits, labels={LABEL_WORKER: self.worker},
                                    pool_key=worn.pool_key, pull="never", one_shot=False)
        except (CeleryNBError, docker.errors.DockerException) as exc:
            log.warning("celery_nb: could not start a replacement for a worn-out container of image %r: %s",
                        worn.image, exc)
            fresh = None
        with self._lock:
            idle = self._idle.setdefault(worn.pool_key, [])
            worn_idle = worn in idle
            if worn_idle:
                idle.remove(worn)
            else:
                worn.retired = True  # running a job: removed when it ends
            keep = fresh is not None and not self._stopped.is_set() and len(idle) < self.settings.size
            if keep:
                idle.append(fresh)
                self._lock.notify_all()
        if worn_idle:
            worn.remove()
        if fresh is not None and not keep:
            fresh.remove()

    def reap(self) -> int:
        """Remove containers idle for longer than the idle timeout; returns how many."""
        cutoff = time.monotonic() - self.settings.idle_timeout
        with self._lock:
            stale = [r for idle in self._idle.values() for r in idle if r.last_used < cutoff]
            for idle in self._idle.values():
                idle[:] = [r for r in idle if r.last_used >= cutoff]
        for runtime in stale:
            runtime.remove()
        return len(stale)

    def _start_reaper(self) -> None:
        if self._reaper is None:
            interval = max(0.5, min(30.0, self.settings.idle_timeout / 4))
            self._reaper = threading.Thread(target=self._reap_periodically, args=(interval,),
                                            name="celery_nb-pool-reaper", daemon=True)
            self._reaper.start()

    def _reap_periodically(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            self.reap()

    def shutdown(self) -> None:
        """Remove every idle container (the worker is stopping)."""
        self._stopped.set()
        with self._lock:
            idle = [r for runtimes in self._idle.values() for r in runtimes]
            self._idle.clear()
        for runtime in idle:
            runtime.remove()

    def remove_leftovers(self, client_factory: Callable[[], docker.DockerClient]) -> int:
        """Remove containers left behind by an earlier run of this worker (same name) or by a
        process on this host that has died (a kernel's embedded worker that was killed)."""
        try:
            client = client_factory()
        except DockerUnavailableError:
            return 0
        # ignore_removed: another worker may remove a listed container before it is inspected
        leftovers = {c.id: c for c in client.containers.list(
            all=True, filters={"label": f"{LABEL_WORKER}={self.worker}"}, ignore_removed=True)}
        leftovers.update(_orphans(client))
        _remove(leftovers.values())
        return len(leftovers)

    def watch_for_orphans(self, client_factory: Callable[[], docker.DockerClient]) -> None:
        """Until shutdown, remove the containers of processes on this host that died (a worker
        killed mid-job: its job keeps running in them while another worker runs it again)."""
        def sweep() -> None:
            while not self._stopped.wait(self.settings.orphan_interval):
                try:
                    _remove(_orphans(client_factory()).values())
                except (DockerUnavailableError, docker.errors.DockerException):
                    pass  # Docker away for now: the next look

        threading.Thread(target=sweep, name="celery_nb-orphans", daemon=True).start()


def _orphans(client: docker.DockerClient) -> dict[str, docker.models.containers.Container]:
    """Containers created by a process of this host that is no longer alive."""
    orphans = {}
    for container in client.containers.list(all=True, filters={"label": LABEL_OWNER}, ignore_removed=True):
        host, _, pid = container.labels[LABEL_OWNER].rpartition(":")
        if host == socket.gethostname() and not _alive(int(pid)):
            orphans[container.id] = container
    return orphans


def _remove(containers: Iterable[docker.models.containers.Container]) -> None:
    for container in containers:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    return True
