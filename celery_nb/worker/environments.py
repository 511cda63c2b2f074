"""Per-job environments: an image plus the packages a job asks for (--pip, --requirements),
built once per host with uv and kept, so that later jobs of the same (image, requirements)
start at once, in warm containers of their own.

Every environment of a host lives in one Docker volume, ``celery-nb-envs``, mounted read-only
at ENVIRONMENT_DIR into the job containers: ``envs/<hash>-<build>`` is a virtual environment that
uv made from the image's own python3 (the image's packages stay visible), ``cache/`` is uv's
download cache and ``uv/<version>/uv`` the uv binary. Cache and environments share one file
system, so uv installs a cached package as hard links: a package is downloaded once per host,
installing it again costs next to nothing, and the environments that hold it share its files.
Nothing is committed into an image layer, and no job can change an environment.

The image ``celery-nb-env:<hash>`` names an environment: the base image with PATH and
VIRTUAL_ENV pointing into it and labels saying what it holds (an empty layer); the hash covers
what decides its content (the base image's id, the normalised requirements, the platform, the
package indexes). It is tagged last, so its existence means the environment is complete; a build
that fails removes its directory, and one that was interrupted leaves a directory no image names,
which pruning removes.

A build runs in a container of the base image, on the bridge network whatever the job's network,
into which uv (until the volume has it), the CA bundle and the requirements are copied through
the Docker API: never a host path, as a worker in a container talks to the host's daemon. The
build container's name is unique per hash, so the processes of one host (worker threads and
processes, compose replicas, kernels' embedded workers) build an environment once: the others
follow the first one's output and use its result. Environments beyond CELERY_NB_ENV_CACHE_SIZE go
least recently used first, never one a container uses. ``celery-nb envs list`` / ``prune``.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import io
import json
import logging
import platform
import queue
import re
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import docker
import docker.errors

from celery_nb.errors import EnvironmentBuildError, JobCancelled
from celery_nb.options import requirement_name
from celery_nb.worker import docker_api
from celery_nb.worker.docker_api import ENVIRONMENT_DIR
from celery_nb.worker.policy import ContainerSpec, WorkerPolicy
from celery_nb.worker.settings import WorkerSettings

log = logging.getLogger(__name__)
REPOSITORY = "celery-nb-env"  # environment images: celery-nb-env:<hash>
VOLUME = "celery-nb-envs"  # the host's environments, uv's download cache and uv
LABEL_ENVIRONMENT = "celery_nb.env"  # on environment images: the hash; on the volume: "volume"
LABEL_PATH = "celery_nb.env.path"  # the environment's directory (in the containers)
LABEL_BASE = "celery_nb.env.base"
LABEL_BASE_ID = "celery_nb.env.base_id"
LABEL_REQUIREMENTS = "celery_nb.env.requirements"
LABEL_BUILD = "celery_nb.env.build"  # on build containers: the hash they build
BUILD_TIMEOUT = 1800.0  # s a build may take before it is stopped
_RECIPE = 3  # how environments are built: part of their hash, so a new recipe builds them anew
_BUILD_DIR = "/celery-nb-build"  # in the build container: the CA bundle, the requirements, uv (for the volume)
_DONE = "\0celery-nb-build "  # the driver's last line: {"exit", "size", "python"} or {"uv_missing": true}
_REFRESH_INTERVAL = 60.0  # s between two checks that an environment in use is still there (and marks of its use)
_NAME_TAKEN = 10.0  # s a build container's name may be taken before the container can be seen
_STALE_BUILD = 30.0  # s a build container may stay unstarted, or ended, before it is taken for a dead builder's
_UV_LINE = re.compile(r"^\s*(Resolved|Prepared|Downloaded)\s+(\d+ packages?|\S+)")

# Runs in the build container with the image's python3 (3.9+): uv (the volume's, put there from
# the build directory the first time) makes the environment from that Python and installs the
# requirements, compiling their bytecode (jobs mount the environment read-only, so their Python
# cannot cache it: each job would compile every module it imports); a failed build removes what
# it made. The last line says how it went.
_DRIVER = r"""
import json, os, shutil, subprocess, sys, time, uuid
build, root, env, version, timeout, index = sys.argv[1:5] + [float(sys.argv[5]), sys.argv[6:]]
uv, deadline, code = "%s/uv/%s/uv" % (root, version), time.monotonic() + timeout, 0
if not os.path.exists(uv):
    if not os.path.exists(build + "/uv"):
        print("\0celery-nb-build " + json.dumps({"uv_missing": True}))
        sys.exit(0)
    os.makedirs(os.path.dirname(uv), exist_ok=True)
    copy = "%s.%s" % (uv, uuid.uuid4().hex)
    shutil.copy(build + "/uv", copy)
    os.rename(copy, uv)  # whole or not at all, whoever else puts it there meanwhile
steps = [[uv, "venv", "--python", sys.executable, "--system-site-packages", env],
         [uv, "pip", "install", "--compile-bytecode", "--python", env + "/bin/python", "-r",
          build + "/requirements.txt"] + index]
for step in steps:
    try:
        code = subprocess.run(step, stderr=subprocess.STDOUT, timeout=max(1, deadline - time.monotonic())).returncode
    except subprocess.TimeoutExpired:
        print("the build took longer than %d s and was stopped" % timeout)
        code = 124
    except OSError as exc:
        print("uv cannot run in this image (%s): it needs a glibc-based Linux image" % exc)
        code = 126
    if code:
        shutil.rmtree(env, ignore_errors=True)
        break
size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(env) for f in files) if not code else 0
sys.stdout.flush()
print("\0celery-nb-build " + json.dumps({"exit": code, "size": size, "python": "%d.%d.%d" % sys.version_info[:3]}))
"""


class BuildProgress(Protocol):
    """What a build tells the job that waits for it."""

    def started(self) -> None:
        """The environment is being built (or another process's build of it is awaited)."""

    def output(self, text: str) -> None:
        """Lines of the installer's output (each ends with a newline)."""

    def cancelled(self) -> bool:
        """Whether the job was cancelled meanwhile (asked now and then while the build runs)."""


@dataclasses.dataclass(frozen=True)
class Environment:
    """A ready environment, named by its image (the base image, pointing into it)."""

    image: str
    base_image: str
    state: str  # "cached": this host had it; "built": built (or its build awaited) for the job

    def container(self, spec: ContainerSpec) -> ContainerSpec:
        """``spec`` (of the base image) running in this environment: warm containers of its own."""
        return dataclasses.replace(spec, image=self.image, environment=VOLUME)


@dataclasses.dataclass(frozen=True)
class EnvironmentInfo:
    """What ``celery-nb envs list`` shows of one environment."""

    image: str
    base_image: str
    requirements: tuple[str, ...]
    python: str
    size: int
    last_used: float  # epoch s: when a job last used it (its image was last tagged)
    path: str  # its directory in the volume
    base_id: str
    in_use: int  # containers of it


@dataclasses.dataclass
class _Remembered:
    environment: Environment
    key: str
    checked: float  # time.monotonic() of the last look at Docker


class Environments:
    """The environments of this worker host: built on demand, remembered by this process (a
    job whose environment is known costs no Docker call), bounded, listed and pruned."""

    def __init__(self, settings: WorkerSettings, policy: WorkerPolicy) -> None:
        self.settings = settings
        self.policy = policy
        self._known: dict[tuple[str, tuple[str, ...]], _Remembered] = {}
        self._lock = threading.Lock()

    def cached(self, base_image: str, requirements: tuple[str, ...]) -> Environment | None:
        """The environment this process knows for (image, requirements), or None: no Docker
        call on the job's path; now and then a background look that it is still there."""
        with self._lock:
            remembered = self._known.get((base_image, requirements))
            if remembered is None:
                return None
            stale = time.monotonic() - remembered.checked > _REFRESH_INTERVAL
            if stale:
                remembered.checked = time.monotonic()
        if stale:
            threading.Thread(target=self._refresh, args=(base_image, remembered), name="celery_nb-env-refresh",
                             daemon=True).start()
        return dataclasses.replace(remembered.environment, state="cached")

    def forget(self, environment: Environment) -> None:
        """Its image is gone (pruned): the next job builds it again."""
        with self._lock:
            for key, remembered in list(self._known.items()):
                if remembered.environment.image == environment.image:
                    del self._known[key]

    def _remember(self, requirements: tuple[str, ...], environment: Environment, key: str) -> None:
        with self._lock:
            self._known[(environment.base_image, requirements)] = _Remembered(environment, key, time.monotonic())

    def _refresh(self, base_image: str, remembered: _Remembered) -> None:
        """Mark the environment as used now (its image tagged again: ``envs list``'s last use and
        the pruning order) and forget it if it is gone or its base image tag moved on."""
        try:
            client = docker_api.connect()
            client.api.tag(remembered.environment.image, REPOSITORY, remembered.key)
            if client.images.get(base_image).id == _labels(client, remembered.environment.image).get(LABEL_BASE_ID):
                return
        except docker.errors.DockerException:
            pass
        log.info("celery_nb: environment %s is gone or its image %r changed; the next job builds it again",
                 remembered.environment.image, base_image)
        self.forget(remembered.environment)

    def ensure(self, base_image: str, requirements: tuple[str, ...], progress: BuildProgress) -> Environment:
        """The environment of ``requirements`` on ``base_image``: remembered, found on this host,
        or built now (once, whoever else asks for it meanwhile). EnvironmentBuildError names
        what failed with the installer's own lines; JobCancelled if the job was cancelled."""
        remembered = self.cached(base_image, requirements)
        if remembered is not None:
            return remembered
        client = docker_api.connect()
        base = _inspect_base(client, base_image, self.policy.pull)
        key = _environment_key(base, requirements, index_arguments(self.settings))
        building = False
        for _attempt in range(3):  # a build another process started may fail: then build it here
            environment = _existing(client, key, base_image)
            if environment is None:
                if not building:
                    progress.started()
                environment = self._build_or_follow(client, base, key, requirements, progress, building)
                building = True
            elif building:  # another process built it while this job waited
                environment = dataclasses.replace(environment, state="built")
            if environment is not None:
                self._remember(requirements, environment, key)
                return environment
        raise EnvironmentBuildError(f"the environment for image {base_image!r} with {' '.join(requirements)} could "
                                    f"not be built: the builds of other workers on this host failed; run the job again")

    def _build_or_follow(self, client: docker.DockerClient, base: dict[str, Any], key: str,
                         requirements: tuple[str, ...], progress: BuildProgress, waiting: bool) -> Environment | None:
        """Build the environment here, or follow the build another process runs (then None:
        look again whether it succeeded); ``waiting``: the job said so already."""
        build = _Build(self.settings, self.policy, client, base, key, requirements, progress)

        def created(ship_uv: bool) -> bool:
            """The build container made, or (False) another process's build of it followed to its end."""
            try:
                build.create(ship_uv)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: the build container's name is taken: a build is running
                    raise EnvironmentBuildError(f"could not start the build of the environment for image "
                                                f"{build.base_image!r}: {exc.explanation or exc}") from None
                if not waiting:
                    progress.output("[environment] another worker on this host is building this environment; "
                                    "waiting for it\n")
                _follow(client, build.name, progress)
                return False
            return True

        if not created(ship_uv=False):  # the volume has uv, but for the host's first build (then _UvMissing)
            return None
        try:
            environment = build.run()
        except _UvMissing:  # the host's first build, or the volume was removed: bring uv along
            if not created(ship_uv=True):  # another process began the build meanwhile
                return None
            environment = build.run()
        threading.Thread(target=self.prune, name="celery_nb-env-prune", daemon=True).start()
        return environment

    def prune(self) -> list[str]:
        """Keep at most CELERY_NB_ENV_CACHE_SIZE environments (see ``prune``)."""
        try:
            return prune(docker_api.connect(), keep=self.settings.env_cache_size)
        except docker.errors.DockerException as exc:
            log.warning("celery_nb: could not prune environments: %s", exc)
            return []


class _Build:
    """One build of one environment in a container of its base image."""

    def __init__(self, settings: WorkerSettings, policy: WorkerPolicy, client: docker.DockerClient,
                 base: dict[str, Any], key: str, requirements: tuple[str, ...], progress: BuildProgress) -> None:
        self.settings = settings
        self.policy = policy
        self.client = client
        self.base = base
        self.base_image = base["name"]
        self.key = key
        self.requirements = requirements
        self.progress = progress
        self.name = f"celery-nb-build-{key}"
        self.path = f"{ENVIRONMENT_DIR}/envs/{key}-{uuid.uuid4().hex[:8]}"
        self.lines: list[str] = []
        self.arguments = index_arguments(settings)
        self.image: str | None = None  # committed (untagged) while it builds

    def create(self, ship_uv: bool) -> None:
        """The build container (its name is the host's lock on this build), with the volume
        mounted, and the CA bundle, the requirements and (``ship_uv``) uv copied in. Raises
        APIError 409 when another build holds the name."""
        environment = {"UV_NO_CONFIG": "1", "UV_PYTHON_DOWNLOADS": "never", "UV_LINK_MODE": "hardlink",
                       "UV_CACHE_DIR": f"{ENVIRONMENT_DIR}/cache", "UV_NO_PROGRESS": "1", "NO_COLOR": "1"}
        if self.settings.build_ca_bundle:
            environment["SSL_CERT_FILE"] = f"{_BUILD_DIR}/ca.crt"
        host_config = self.client.api.create_host_config(
            mem_limit=self.policy.default_memory, memswap_limit=self.policy.default_memory,
            pids_limit=self.policy.pids_limit, cap_drop=["ALL"], security_opt=["no-new-privileges"],
            privileged=False, network_mode="bridge",
            log_config=docker.types.LogConfig(type="json-file"),  # what other processes waiting for it follow
            mounts=[_volume_mount(read_only=False)])
        files = self._files(ship_uv)  # before the container: a missing CA bundle or uv fails with nothing to clean up
        try:
            self.container_id = self.client.api.create_container(
                self.base["id"], name=self.name, user="0", environment=environment, host_config=host_config,
                command=["python3", "-c", _DRIVER, _BUILD_DIR, ENVIRONMENT_DIR, self.path, _uv_version(),
                         str(BUILD_TIMEOUT), *self.arguments],
                labels={LABEL_BUILD: self.key, docker_api.LABEL_OWNER: docker_api.OWNER}, detach=True)["Id"]
            try:
                self.client.api.put_archive(self.container_id, "/", files)
            except BaseException:
                self._discard()
                raise
        finally:
            files.close()

    def _files(self, ship_uv: bool) -> Any:
        """A tar of the build directory: the CA bundle, the requirements, uv if asked."""
        archive = tempfile.TemporaryFile()  # uv is ~40 MB: not in memory
        with tarfile.open(fileobj=archive, mode="w") as tar:
            if ship_uv:
                tar.add(_uv_binary(), f"{_BUILD_DIR.lstrip('/')}/uv")
            if self.settings.build_ca_bundle:
                try:
                    tar.add(self.settings.build_ca_bundle, f"{_BUILD_DIR.lstrip('/')}/ca.crt")
                except OSError as exc:
                    raise EnvironmentBuildError(
                        f"CELERY_NB_BUILD_CA_BUNDLE={self.settings.build_ca_bundle!r} cannot be read on the worker "
                        f"host ({exc.strerror}); point it to a PEM file of CA certificates") from None
            text = "".join(f"{line}\n" for line in self.requirements).encode()
            info = tarfile.TarInfo(f"{_BUILD_DIR.lstrip('/')}/requirements.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
        archive.seek(0)
        return archive

    def run(self) -> Environment:
        """Start the build, relay its output, and tag the environment's image if it succeeded."""
        started = time.monotonic()
        self.progress.output(f"[environment] building it for image {self.base_image!r}: "
                             f"{' '.join(self.requirements)}\n")
        try:
            lines = self.client.api.attach(self.container_id, stdout=True, stderr=True, stream=True, logs=True)
            self.client.api.start(self.container_id)
            self.image = self._image()  # while it builds; tagged only if it succeeds
            done = _relay(lines, self.progress, self.lines, on_cancel=self._discard)
            if done is not None and done.get("uv_missing"):
                raise _UvMissing()
            if done is None or done.get("exit") != 0:
                raise _build_error(self.base_image, self.requirements, self.lines, self.arguments, done)
            self.client.api.tag(self.image, REPOSITORY, self.key)
        except docker.errors.DockerException as exc:
            self._discard()
            raise EnvironmentBuildError(f"the build of the environment for image {self.base_image!r} failed: "
                                        f"{exc}") from None
        except BaseException:
            self._discard()
            raise
        # only now, and off the job's path: its name keeps others waiting until the image is tagged
        threading.Thread(target=_remove_container, args=(self.client, self.container_id), daemon=True).start()
        self.progress.output(f"[environment] ready in {time.monotonic() - started:.1f} s: {REPOSITORY}:{self.key}, "
                             f"{done['size'] / 1e6:.0f} MB\n")
        return Environment(f"{REPOSITORY}:{self.key}", self.base_image, "built")

    def _image(self) -> str:
        """The environment's image, untagged: the base image pointing into the environment, with
        what it holds in its labels (the empty layer of a container never started)."""
        labels = {LABEL_ENVIRONMENT: self.key, LABEL_PATH: self.path, LABEL_BASE: self.base_image,
                  LABEL_BASE_ID: self.base["id"], LABEL_REQUIREMENTS: "\n".join(self.requirements)}
        holder = self.client.api.create_container(self.base["id"], command=["python3"])["Id"]
        try:
            env = [f"PATH={self.path}/bin:{self.base['path']}", f"VIRTUAL_ENV={self.path}"]
            return self.client.api.commit(holder, conf={"Env": env, "Labels": labels})["Id"]
        finally:
            threading.Thread(target=_remove_container, args=(self.client, holder), daemon=True).start()

    def _discard(self) -> None:
        """Remove the build container and the untagged image (a failed build removes its
        directory itself; one that was stopped leaves it to pruning)."""
        _remove_container(self.client, self.container_id)
        if self.image is not None:
            _remove_image(self.client, self.image)


class _UvMissing(Exception):
    """The volume has no uv of this version yet."""


def _volume_mount(read_only: bool) -> docker.types.Mount:
    return docker.types.Mount(ENVIRONMENT_DIR, VOLUME, type="volume", read_only=read_only,
                              labels={LABEL_ENVIRONMENT: "volume"})


def _uv_version() -> str:
    return importlib.metadata.version("uv")


def _relay(chunks: Iterable[bytes], progress: BuildProgress, kept: list[str],
           on_cancel: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """Relay a build's output to ``progress`` as lines with a package counter, keeping them in
    ``kept``, until it ends; its final report, or None if it ended without one. A cancelled job
    stops waiting (``on_cancel``: and stops the build)."""
    lines: queue.Queue[str | None] = queue.Queue()  # None: the output ended
    threading.Thread(target=_read_lines, args=(chunks, lines), name="celery_nb-env-output", daemon=True).start()
    counter = _PackageCounter()
    done = None
    while True:
        batch = _waiting(lines, 0.5)
        shown = []
        for line in batch:
            if line is not None and line.startswith(_DONE):
                done = json.loads(line[len(_DONE):])
            elif line is not None:
                kept.append(line)
                shown.append(counter.label(line))
        if shown:  # one event for what came at once: a burst of lines costs one round trip
            progress.output("".join(shown))
        if None in batch:
            return done
        if progress.cancelled():
            if on_cancel is not None:
                on_cancel()
            raise JobCancelled("cancelled while its environment was being built")


def _waiting(lines: queue.Queue[str | None], timeout: float) -> list[str | None]:
    """What the queue holds, waiting up to ``timeout`` s for a first item."""
    try:
        batch = [lines.get(timeout=timeout)]
    except queue.Empty:
        return []
    while batch[-1] is not None and not lines.empty():
        batch.append(lines.get_nowait())
    return batch


def _read_lines(chunks: Iterable[bytes], lines: queue.Queue[str | None]) -> None:
    pending = b""
    try:
        for chunk in chunks:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                lines.put(line.decode("utf-8", "replace").rstrip("\r"))
    except docker.errors.DockerException:
        pass  # the container went away
    finally:
        if pending:
            lines.put(pending.decode("utf-8", "replace"))
        lines.put(None)


class _PackageCounter:
    """``[environment 3/17 packages]``: packages resolved, and how many of them are ready."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.ready = 0

    def label(self, line: str) -> str:
        match = _UV_LINE.match(line)
        if match and match.group(1) == "Resolved":
            self.total = int(match.group(2).split()[0])
        elif match and match.group(1) == "Downloaded":
            self.ready += 1
        elif match and match.group(1) == "Prepared":
            self.ready = int(match.group(2).split()[0])
        elif line.startswith("Installed "):  # the last of them are in place (cached ones are never "prepared")
            self.ready = self.total or 0
        if self.total is None:
            return f"[environment] {line}\n"
        return f"[environment {min(self.ready, self.total)}/{self.total} packages] {line}\n"


def _follow(client: docker.DockerClient, name: str, progress: BuildProgress) -> None:
    """Relay the output of a build another process runs, and wait until its builder has tagged
    the environment (or given up) and removed the build container. One whose builder died (never
    started, or ended long ago) is removed."""
    relayed = seen = False
    started = time.monotonic()
    while True:
        try:
            state = client.api.inspect_container(name)
        except docker.errors.NotFound:
            if seen or time.monotonic() - started > _NAME_TAKEN:
                return
            time.sleep(0.05)  # its name is taken before it can be inspected: it is being created
            continue
        seen = True
        status = state["State"]["Status"]
        if status == "running" and not relayed:
            _relay(client.api.logs(name, stream=True, follow=True), progress, [])
            relayed = True
            continue
        if (status == "created" and _age(state["Created"]) > _STALE_BUILD
                or status in ("exited", "dead") and _age(state["State"]["FinishedAt"]) > _STALE_BUILD):
            log.warning("celery_nb: removing build container %s, left behind by a builder that died", name)
            _remove_container(client, name)
            return
        if progress.cancelled():
            raise JobCancelled("cancelled while its environment was being built")
        time.sleep(0.2)


def _remove_container(client: docker.DockerClient, container: str | None) -> None:
    if container is not None:
        docker_api.remove([client.containers.prepare_model({"Id": container})])


def _build_error(base_image: str, requirements: tuple[str, ...], lines: list[str], arguments: list[str],
                 done: dict[str, Any] | None) -> EnvironmentBuildError:
    """What failed, in the user's terms: the requirement the installer names (or all of them),
    its own error lines, and what to do."""
    text = "\n".join(lines).lower()
    named = [r for r in requirements if re.search(rf"\b{re.escape(requirement_name(r))}\b", text)] or requirements
    if "uv cannot run in this image" in text:
        hint = f"uv runs in glibc-based Linux images only, and image {base_image!r} is not one: pick another --image"
    elif "distutils" in text:
        hint = (f"uv needs distutils in the Python of image {base_image!r} (Python 3.9 on Debian has it in the "
                f"python3-distutils package): use an image with it, or with Python 3.10 or newer")
    elif "certificate" in text:
        hint = ("the build could not verify the package index's TLS certificate: point CELERY_NB_BUILD_CA_BUNDLE "
                "on the worker to the CA bundle your network's proxy needs")
    elif re.search(r"failed to fetch|dns error|connect|timed out|network", text):
        index = next((a.split("=", 1)[1] for a in arguments if a.startswith("--default-index=")), "uv's default index")
        hint = (f"the build could not reach the package index ({index}): check the worker host's network, or set "
                f"CELERY_NB_PIP_INDEX_URL to an index it can reach")
    else:
        hint = "fix the requirement (pip's specifiers: name, name==1.2.3, name>=1.2) and run the job again"
    how = f"the installer exited with code {done['exit']}" if done else "the build container ended before it finished"
    shown = [line for line in lines if not line.startswith(("Using ", "Creating virtual"))][-30:]
    return EnvironmentBuildError(f"the environment for image {base_image!r} with {' '.join(named)} could not be "
                                 f"built ({how}); uv said:\n" + "\n".join(f"  {line}" for line in shown)
                                 + f"\n{hint}. The job did not run.")


def index_arguments(settings: WorkerSettings) -> list[str]:
    """uv's options for the package indexes of the worker's settings (none: uv's default)."""
    index = [f"--default-index={settings.pip_index_url}"] if settings.pip_index_url else []
    return index + [f"--index={url}" for url in settings.pip_extra_index_url.split()]


def _uv_binary() -> str:
    try:
        import uv
    except ImportError:
        raise EnvironmentBuildError("the worker cannot build environments: the uv package is not installed in its "
                                    "Python (pip install uv, or reinstall celery_nb)") from None
    return uv.find_uv_bin()


_MACHINES = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "amd64": "amd64"}


def _inspect_base(client: docker.DockerClient, base_image: str, pull: str) -> dict[str, Any]:
    """The base image's id, PATH and platform (pulled first if missing and allowed)."""
    try:
        attrs = client.api.inspect_image(base_image)
    except docker.errors.ImageNotFound:
        docker_api.ensure_image(client, base_image, pull)
        attrs = client.api.inspect_image(base_image)
    env = dict(item.split("=", 1) for item in attrs["Config"].get("Env") or [] if "=" in item)
    image_platform = f"{attrs.get('Os', 'linux')}/{attrs.get('Architecture', 'amd64')}"
    mine = f"{platform.system().lower()}/{_MACHINES.get(platform.machine().lower(), platform.machine().lower())}"
    if image_platform != mine:
        raise EnvironmentBuildError(f"image {base_image!r} is for {image_platform}, and this worker's uv runs on "
                                    f"{mine}: send the job to a worker on a {image_platform} host (--queue)")
    return {"name": base_image, "id": attrs["Id"], "platform": image_platform,
            "path": env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")}


def _environment_key(base: dict[str, Any], requirements: tuple[str, ...], arguments: list[str]) -> str:
    """What decides an environment's content, hashed: its name."""
    content = json.dumps({"recipe": _RECIPE, "base": base["id"], "platform": base["platform"],
                          "requirements": sorted(requirements), "index": arguments}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _existing(client: docker.DockerClient, key: str, base_image: str) -> Environment | None:
    """The environment of ``key``, if this host has it complete (its image is tagged)."""
    try:
        client.api.inspect_image(f"{REPOSITORY}:{key}")
    except docker.errors.ImageNotFound:
        return None
    return Environment(f"{REPOSITORY}:{key}", base_image, "cached")


def _labels(client: docker.DockerClient, image: str) -> dict[str, str]:
    return client.api.inspect_image(image)["Config"].get("Labels") or {}


def _age(timestamp: str) -> float:
    """Seconds since a Docker timestamp (RFC 3339, up to nanoseconds)."""
    return time.time() - _epoch(timestamp)


def _epoch(timestamp: str) -> float:
    """A Docker timestamp (RFC 3339, up to nanoseconds) as epoch seconds."""
    trimmed = re.sub(r"\.(\d+)", lambda m: "." + m.group(1)[:6].ljust(6, "0"), timestamp).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(trimmed).timestamp()


def list_environments(client: docker.DockerClient, details: bool = False) -> list[EnvironmentInfo]:
    """The environments on this host, most recently used first; ``details``: their Python
    versions and sizes too (read in the volume by a container)."""
    found = []
    for image in client.images.list(filters={"label": LABEL_PATH}):
        tag = next((t for t in image.tags if t.startswith(f"{REPOSITORY}:")), None)
        if tag is None:
            continue  # not tagged: being built, or left by an interrupted build (see prune)
        labels = image.labels
        users = client.containers.list(all=True, sparse=True, filters={"ancestor": image.id})
        found.append(EnvironmentInfo(
            image=tag, base_image=labels.get(LABEL_BASE, "?"), python="?", size=0,
            requirements=tuple(labels[LABEL_REQUIREMENTS].split("\n")), path=labels[LABEL_PATH], base_id=labels.get(LABEL_BASE_ID, ""), in_use=len(users),
            last_used=_epoch(image.attrs.get("Metadata", {}).get("LastTagTime") or image.attrs["Created"])))
    if details and found:
        described = json.loads(_in_volume(client, found[0].base_id, _DESCRIBE, [json.dumps([i.path for i in found])]))
        found = [dataclasses.replace(info, python=described[info.path][0], size=described[info.path][1])
                 for info in found]
    return sorted(found, key=lambda info: info.last_used, reverse=True)


def prune(client: docker.DockerClient, keep: int | None, download_cache: bool = False) -> list[str]:
    """Remove the least recently used environments beyond ``keep`` (None: all) that no container
    uses, what interrupted builds left behind, and (``download_cache``) uv's download cache.
    Returns what it removed."""
    environments = list_environments(client)
    removed = []
    excess = len(environments) - (keep if keep is not None else 0)
    for info in reversed(environments):  # least recently used first
        if excess <= 0:
            break
        if not info.in_use and _remove_image(client, info.image):
            removed.append(info)
            excess -= 1
    for image in client.images.list(filters={"label": LABEL_PATH, "dangling": True}):  # of interrupted builds
        if _age(image.attrs["Created"]) > BUILD_TIMEOUT + 60:
            _remove_image(client, image.id)
    left = [info for info in environments if info not in removed]
    helper = next((info.base_id for info in [*removed, *left] if info.base_id), None)
    if helper is not None:  # an image with python3 for the clean-up
        _clean_volume(client, helper, [info.path for info in removed], [info.path for info in left], download_cache)
    return [info.image for info in removed] + (["uv's download cache"] if download_cache and helper else [])


def clear_download_cache(client: docker.DockerClient) -> bool:
    """Empty uv's download cache (False if there is no environment whose image can do it)."""
    environments = list_environments(client)
    if not environments:
        return False
    _clean_volume(client, environments[0].base_id, [], [info.path for info in environments], download_cache=True)
    return True


def remove_environment(client: docker.DockerClient, info: EnvironmentInfo) -> bool:
    """Remove one environment, unless a container uses it."""
    if not _remove_image(client, info.image):
        return False
    _clean_volume(client, info.base_id, [info.path], [other.path for other in list_environments(client)])
    return True


def _remove_image(client: docker.DockerClient, image: str) -> bool:
    """Remove an environment's image first: Docker refuses while a container of it exists, so a
    job that starts meanwhile keeps it whole; its directory goes afterwards (_clean_volume)."""
    try:
        client.api.remove_image(image)
    except docker.errors.APIError as exc:
        return exc.status_code == 404
    return True


# Run in a container of an environment's base image with the volume (see _in_volume).
# _CLEAN removes the directories of removed environments, those no image names that are older
# than any build can take (left by an interrupted build), and (argv[3] == "cache") uv's download
# cache; _DESCRIBE prints each environment's Python version and size.
_CLEAN = r"""
import json, os, shutil, sys, time
root, paths, stale = sys.argv[1], json.loads(sys.argv[2]), time.time() - float(sys.argv[4])
envs = os.path.join(root, "envs")
for name in os.listdir(envs) if os.path.isdir(envs) else []:
    path = os.path.join(envs, name)
    if path in paths["remove"] or path not in paths["keep"] and os.stat(path).st_mtime < stale:
        shutil.rmtree(path, ignore_errors=True)
if sys.argv[3] == "cache":
    shutil.rmtree(os.path.join(root, "cache"), ignore_errors=True)
"""
_DESCRIBE = r"""
import json, os, sys
described = {}
for path in json.loads(sys.argv[1]):
    python, size = "?", 0
    try:
        for line in open(os.path.join(path, "pyvenv.cfg")):
            key, _, value = line.partition("=")
            python = value.strip() if key.strip() in ("version_info", "version") else python
        size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)
    except OSError:
        pass
    described[path] = [python, size]
print(json.dumps(described))
"""


def _clean_volume(client: docker.DockerClient, image: str, remove: Sequence[str], keep: Sequence[str],
                  download_cache: bool = False) -> None:
    """Remove the directories of the removed environments (``remove``), those of interrupted
    builds (no environment image names them: ``keep`` are those named now), and
    (``download_cache``) uv's download cache."""
    try:
        _in_volume(client, image, _CLEAN, [ENVIRONMENT_DIR, json.dumps({"remove": remove, "keep": keep}),
                                           "cache" if download_cache else "-", str(BUILD_TIMEOUT + 60)])
    except docker.errors.DockerException as exc:
        log.warning("celery_nb: could not clean the environments' volume %s: %s", VOLUME, exc)


def _in_volume(client: docker.DockerClient, image: str, script: str, arguments: list[str]) -> bytes:
    """What ``script`` prints, run by python3 in a container of ``image`` with the volume mounted
    (as root with no capabilities, no network)."""
    return client.containers.run(
        image, ["python3", "-c", script, *arguments], user="0", network_mode="none", cap_drop=["ALL"],
        security_opt=["no-new-privileges"], remove=True, mounts=[_volume_mount(read_only=False)],
        labels={docker_api.LABEL_OWNER: docker_api.OWNER})


def format_environments(environments: list[EnvironmentInfo]) -> str:
    """``celery-nb envs list``: one line per environment."""
    if not environments:
        return "no environments on this host (jobs with --pip or --requirements build them)"
    rows = [("environment", "image", "python", "size", "last used", "in use", "requirements")]
    now = time.time()
    for info in environments:
        rows.append((info.image, info.base_image, info.python, f"{info.size / 1e6:.1f} MB",
                     f"{(now - info.last_used) / 60:.0f} min ago", str(info.in_use), " ".join(info.requirements)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows)
