"""The worker's Docker: the daemon connection, images, and creating runtime containers with the
policy's limits and the house's safety settings, with Docker's errors said in the user's terms.
Containers carry labels saying which worker and process they belong to, so that what a dead
process left behind can be found and removed (which job ran in a container, its events say).
"""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable

import docker
import docker.errors

from celery_nb.errors import ContainerError, DockerUnavailableError, ImageNotFoundError
from celery_nb.worker.bootstrap import runtime_command
from celery_nb.worker.channel import RuntimeContainer, reaches_container
from celery_nb.worker.policy import ContainerSpec

LABEL_WORKER = "celery_nb.worker"
LABEL_POOL_KEY = "celery_nb.pool_key"
LABEL_OWNER = "celery_nb.owner"  # host:pid of the process that created the container
OWNER = f"{socket.gethostname()}:{os.getpid()}"
ENVIRONMENT_DIR = "/celery-nb"  # where the volume of the jobs' environments is mounted (read-only in jobs)


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


def device_requests(gpus: str | None) -> list[docker.types.DeviceRequest] | None:
    """Docker's device request for an options.parse_gpus spec (what `docker run --gpus` sends)."""
    if not gpus:
        return None
    if gpus.startswith("device="):
        return [docker.types.DeviceRequest(device_ids=gpus[len("device="):].split(","), capabilities=[["gpu"]])]
    return [docker.types.DeviceRequest(count=-1 if gpus == "all" else int(gpus), capabilities=[["gpu"]])]


def start_container(client: docker.DockerClient, spec: ContainerSpec, labels: dict[str, str], pull: str,
                    one_shot: bool) -> RuntimeContainer:
    """create_container, then start it (removed if it does not start)."""
    runtime = create_container(client, spec, labels, pull, one_shot)
    try:
        start(runtime)
    except ContainerError:
        runtime.remove()
        raise
    return runtime


def create_container(client: docker.DockerClient, spec: ContainerSpec, labels: dict[str, str], pull: str,
                     one_shot: bool) -> RuntimeContainer:
    """A created container of the runtime for ``spec``, not started yet (its id is known: a job
    reports it even if it never starts), its image pulled first if missing and ``pull`` allows.
    ``one_shot``: for one job only (--fresh). The low-level API spares the inspections the
    high-level one makes after each call: a cold start pays only create, attach and start."""
    labels = {**labels, LABEL_POOL_KEY: spec.pool_key, LABEL_OWNER: OWNER}
    try:
        try:
            container_id = _create(client, spec, labels, one_shot)
        except docker.errors.ImageNotFound:  # checked only now: the image is there nearly always
            ensure_image(client, spec.image, pull)
            container_id = _create(client, spec, labels, one_shot)
    except docker.errors.APIError as exc:
        raise ContainerError(f"could not create a container of image {spec.image!r}: "
                             f"{exc.explanation or exc}") from None
    container = client.containers.prepare_model({"Id": container_id})
    # attach before start so nothing the container writes is missed
    attached = client.api.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
    runtime = RuntimeContainer(container, getattr(attached, "_sock", attached), spec, one_shot)
    runtime._attached = attached  # keeps the HTTP response (and with it the socket) alive
    return runtime


def start(runtime: RuntimeContainer) -> None:
    """Start a created container; a ContainerError in the user's terms if Docker refuses (the
    container is then the caller's to remove). A pooled one's channel bypasses Docker where it can
    (RuntimeContainer.connect_direct)."""
    try:
        runtime.container.start()
    except docker.errors.APIError as exc:
        raise _start_error(runtime.spec, str(exc.explanation or exc)) from None
    runtime.reachable = reaches_container(runtime)
    if not runtime.one_shot:
        runtime.connect_direct()


def _create(client: docker.DockerClient, spec: ContainerSpec, labels: dict[str, str], one_shot: bool) -> str:
    host_config = client.api.create_host_config(
        mem_limit=spec.memory,
        memswap_limit=spec.memory,  # no swap: exceeding the limit is an OOM kill
        nano_cpus=spec.nano_cpus,
        pids_limit=spec.pids,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        privileged=False,
        log_config=docker.types.LogConfig(type="none"),  # output is streamed by attach, not stored
        shm_size=spec.memory,  # a job's own use of /dev/shm (counted in the memory limit)
        network_mode=spec.network,
        read_only=spec.read_only,
        tmpfs={"/tmp": ""} if spec.read_only else None,
        device_requests=device_requests(spec.gpus),
        mounts=[*(docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only) for m in spec.mounts),
                *([docker.types.Mount(ENVIRONMENT_DIR, spec.environment, type="volume", read_only=True)]
                  if spec.environment else [])],
    )
    return client.api.create_container(
        spec.image,
        command=runtime_command(one_shot),
        labels=labels,
        # the job's variables that act at start, after the defaults: glibc's malloc puts big blocks
        # (a big input loaded, a bytes object) in transparent huge pages where the host leaves it
        # to programs to ask (madvise), as numpy does for its arrays: filled several times faster
        environment={"PYTHONDONTWRITEBYTECODE": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", **dict(spec.env)},
        stdin_open=True,  # requests arrive on stdin
        # (the SDK's way to set StdinOnce) stdin closes when the worker's attach does: the worker
        # died or dropped the container, and the runtime ends its job and itself at once
        detach=False,
        user=spec.user,
        host_config=host_config,
    )["Id"]


def _start_error(spec: ContainerSpec, explanation: str) -> ContainerError:
    """Docker's refusal to start a container, in the user's terms."""
    if spec.gpus and "device driver" in explanation:
        return ContainerError(f"--gpus {spec.gpus}: the worker host's Docker cannot give GPUs to containers "
                              f"({explanation}); install the NVIDIA Container Toolkit there, or send the job "
                              f"to a GPU worker's queue with --queue")
    if "executable file not found" in explanation or "no such file" in explanation.lower():
        return ContainerError(f"image {spec.image!r} has no python3 on its PATH; celery_nb needs an image with "
                              f"Python 3.9 or newer")
    return ContainerError(f"could not start the container of image {spec.image!r}: {explanation}")


def orphans(client: docker.DockerClient) -> dict[str, docker.models.containers.Container]:
    """Containers created by a process of this host that is no longer alive."""
    orphans = {}
    for container in client.containers.list(all=True, filters={"label": LABEL_OWNER}, ignore_removed=True):
        host, _, pid = container.labels[LABEL_OWNER].rpartition(":")
        if host == socket.gethostname() and not _alive(int(pid)):
            orphans[container.id] = container
    return orphans


def remove(containers: Iterable[docker.models.containers.Container]) -> None:
    for container in containers:
        try:
            container.remove(force=True)
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):  # 409: another process removes it already
                raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    return True
