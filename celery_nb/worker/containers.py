"""Docker: one container per job, created with the worker's limits and safety settings,
fed the runtime and the payload with put_archive, streamed, and always removed.
"""
from __future__ import annotations

import functools
import io
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import cloudpickle
import docker
import docker.errors
from docker.types import LogConfig

import celery_nb_runtime
from celery_nb.errors import ContainerError, DockerUnavailableError, ImageNotFoundError
from celery_nb.worker.policy import ContainerLimits

RUNTIME_DIR = "/opt/celery_nb"
PAYLOAD_PATH = f"{RUNTIME_DIR}/payload.bin"
LABEL_JOB = "celery_nb.job_id"
LABEL_TASK = "celery_nb.task_id"
LABEL_WORKER = "celery_nb.worker"


def connect() -> docker.DockerClient:
    """The worker host's Docker daemon (DOCKER_HOST or the local socket)."""
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise DockerUnavailableError(
            f"the worker cannot reach the Docker daemon at {where}: {exc}. Start Docker on the worker "
            f"host (or mount its socket into the worker) and run the cell again.") from None
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


@functools.lru_cache(maxsize=1)
def _runtime_files() -> tuple[tuple[str, bytes], ...]:
    """(path in container, content) of the runtime package and cloudpickle, read once."""
    files = []
    for package in (celery_nb_runtime, cloudpickle):
        src = os.path.dirname(package.__file__)
        for name in sorted(os.listdir(src)):
            if name.endswith(".py"):
                with open(os.path.join(src, name), "rb") as f:
                    files.append((f"{RUNTIME_DIR}/{package.__name__}/{name}", f.read()))
    return tuple(files)


def runtime_archive(payload: bytes) -> bytes:
    """A tar (for put_archive at /) holding the runtime, cloudpickle and the payload."""
    buf = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = {"opt", RUNTIME_DIR.lstrip("/")} | {os.path.dirname(p).lstrip("/") for p, _ in _runtime_files()}
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, now
            tar.addfile(info)
        for path, data in (*_runtime_files(), (PAYLOAD_PATH, payload)):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), 0o644, now
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class ExitStatus:
    code: int
    oom_killed: bool


class JobContainer:
    """One job's container: create -> stream() (attach, start) -> wait() -> remove()."""

    def __init__(self, client: docker.DockerClient, image: str, limits: ContainerLimits,
                 env: dict[str, str], labels: dict[str, str]) -> None:
        self._client = client
        self.image = image
        self.limits = limits
        self._env = env
        self._labels = labels
        self._container = None

    def create(self, payload: bytes) -> None:
        env = {**self._env, "PYTHONPATH": RUNTIME_DIR, "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            self._container = self._client.containers.create(
                self.image,
                command=["python3", "-u", "-m", "celery_nb_runtime", PAYLOAD_PATH],
                environment=env,
                labels=self._labels,
                mem_limit=self.limits.memory,
                memswap_limit=self.limits.memory,  # no swap: exceeding the limit is an OOM kill
                nano_cpus=self.limits.nano_cpus,
                pids_limit=self.limits.pids,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                privileged=False,
                log_config=LogConfig(type="none"),  # output is streamed by attach, not stored twice
                detach=True,
            )
            self._container.put_archive("/", runtime_archive(payload))
        except docker.errors.APIError as exc:
            raise ContainerError(f"could not create a container of image {self.image!r}: "
                                 f"{exc.explanation or exc}") from None

    def stream(self) -> Iterator[tuple[bytes | None, bytes | None]]:
        """Attach (before start, so nothing is missed), start, and yield (stdout, stderr) chunks."""
        chunks = self._client.api.attach(self._container.id, stdout=True, stderr=True,
                                         stream=True, logs=False, demux=True)
        try:
            self._container.start()
        except docker.errors.APIError as exc:
            explanation = str(exc.explanation or exc)
            if "executable file not found" in explanation or "no such file" in explanation.lower():
                raise ContainerError(f"image {self.image!r} has no python3 on its PATH; celery_nb needs an "
                                     f"image with Python 3.9 or newer") from None
            raise ContainerError(f"could not start the container of image {self.image!r}: {explanation}") from None
        return chunks

    def kill(self) -> None:
        try:
            self._container.kill()
        except docker.errors.APIError:
            pass  # already exited

    def wait(self) -> ExitStatus:
        code = self._container.wait()["StatusCode"]
        self._container.reload()
        return ExitStatus(code=code, oom_killed=bool(self._container.attrs["State"].get("OOMKilled")))

    def remove(self) -> None:
        if self._container is not None:
            try:
                self._container.remove(force=True)
            except docker.errors.NotFound:
                pass
