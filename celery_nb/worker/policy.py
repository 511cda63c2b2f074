"""What a worker allows: its settings (celery_nb.worker.settings) applied to a job's
``JobOptions``. A client may ask for anything; the policy decides, and a ``PolicyError`` names
the rule a request breaks.

Whatever the request, containers never run privileged, get no host folder but the mounts the
policy offers by name and no devices but the GPUs it allows, drop all capabilities and set
no-new-privileges (see docker_api.start_container).
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
from dataclasses import dataclass

from celery_nb.errors import OptionError, PolicyError
from celery_nb.options import AUTO, MOUNT_NAME, JobOptions, format_memory, gpu_count, parse_gpus, parse_memory
from celery_nb.worker.settings import WorkerSettings

# Environment variables that act when a process starts, not when a running one changes them:
# read by the Python interpreter (PYTHONPATH, PYTHONHASHSEED, ...), the C library and the dynamic
# loader (LD_*, MALLOC_*, GLIBC_*, LANG, LC_*, TZ), the NVIDIA container runtime (NVIDIA_*), and the thread
# pools of CUDA and numerical libraries, which read them once, when they load (OMP_NUM_THREADS, ...).
# A job's such variables are its container's environment (part of its ContainerSpec, so of the
# warm pool's key); its other variables are set in the job's own process.
START_ENV_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_", "LC_", "NVIDIA_", "CUDA_", "OMP_", "GOMP_", "KMP_",
                      "MKL_", "OPENBLAS_", "BLIS_", "NUMEXPR_")
START_ENV_NAMES = frozenset({"LANG", "LANGUAGE", "TZ", "VECLIB_MAXIMUM_THREADS"})


def acts_at_start(name: str) -> bool:
    """Whether environment variable ``name`` acts only when a process starts (see START_ENV_PREFIXES)."""
    return name in START_ENV_NAMES or name.startswith(START_ENV_PREFIXES)


@dataclass(frozen=True)
class DataMount:
    """A host folder the worker offers jobs (CELERY_NB_MOUNTS), mounted at /mnt/``name``."""

    name: str
    source: str  # the host path
    read_only: bool

    @property
    def target(self) -> str:
        return f"/mnt/{self.name}"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a container is created with: two containers of the same spec are
    interchangeable, so the spec is the warm pool's key."""

    image: str
    memory: int
    nano_cpus: int | None
    pids: int
    network: str
    read_only: bool
    user: str | None
    gpus: str | None  # an options.parse_gpus spec: docker's device request
    env: tuple[tuple[str, str], ...] = ()  # the job's variables that act at start (acts_at_start), sorted
    mounts: tuple[DataMount, ...] = ()
    environment: str | None = None  # the volume of the host's environments (worker.environments), read-only

    @functools.cached_property  # asked several times a job
    def pool_key(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:24]  # (the dataclass's repr: every field)


@dataclass(frozen=True)
class JobPlan:
    """How one job runs: in a container of ``container``, for at most ``timeout`` s, in a
    brand-new container (``fresh``) or a warm one, in a process of its own (``new_process``) or
    one its kernel's previous job ran in, with ``env`` (its variables that do not act at start:
    those are the container's) in its process's environment."""

    container: ContainerSpec
    timeout: float | None
    fresh: bool
    env: dict[str, str]
    new_process: bool = False
    requirements: tuple[str, ...] = ()  # installed on top of container.image: the job's environment (sorted)


@dataclass(frozen=True)
class WorkerPolicy:
    allowed_images: tuple[str, ...] = ("*",)
    default_memory: int = 2 * 1024**3
    max_memory: int | None = None
    max_cpus: float | None = None
    max_timeout: float | None = None
    pids_limit: int = 512
    pull: str = "missing"  # or "never": images missing on this host are not pulled
    networks: tuple[str, ...] = ("bridge", "none")
    read_only: bool = False
    user: str | None = None
    max_gpus: int | None = 0  # None: any request, even --gpus all
    mounts: tuple[DataMount, ...] = ()
    allow_pip: bool = True

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> WorkerPolicy:
        def parse(name: str, value: str) -> int:
            try:
                return parse_memory(name, value)
            except OptionError as exc:
                raise ValueError(str(exc)) from None

        return cls(
            allowed_images=_words(settings.allowed_images),
            default_memory=parse("CELERY_NB_DEFAULT_MEMORY", settings.default_memory),
            max_memory=parse("CELERY_NB_MAX_MEMORY", settings.max_memory) if settings.max_memory else None,
            max_cpus=settings.max_cpus,
            max_timeout=settings.max_timeout,
            pids_limit=settings.pids_limit,
            pull=settings.pull,
            networks=_words(settings.networks),
            read_only=settings.read_only,
            user=settings.user or None,
            max_gpus=_max_gpus(settings.gpus),
            mounts=_data_mounts(settings.mounts),
            allow_pip=settings.allow_pip,
        )

    def plan(self, options: JobOptions) -> JobPlan:
        """How the job of ``options`` runs here; PolicyError names the rule it breaks."""
        image = options.image
        if image is None or not any(fnmatch.fnmatchcase(image, pattern) for pattern in self.allowed_images):
            raise PolicyError(f"image {image!r} is not allowed on this worker (allowed: "
                              f"{', '.join(self.allowed_images)}); ask the worker's operator or pick another image")
        memory = options.memory or min(self.default_memory, self.max_memory or self.default_memory)
        if self.max_memory is not None and memory > self.max_memory:
            raise PolicyError(f"--memory {format_memory(memory)} exceeds this worker's maximum of "
                              f"{format_memory(self.max_memory)}")
        cpus = options.cpus
        if cpus is not None and self.max_cpus is not None and cpus > self.max_cpus:
            raise PolicyError(f"--cpus {cpus:g} exceeds this worker's maximum of {self.max_cpus:g}")
        timeout = options.timeout or self.max_timeout
        if timeout is not None and self.max_timeout is not None and timeout > self.max_timeout:
            raise PolicyError(f"--timeout {timeout:g}s exceeds this worker's maximum of {self.max_timeout:g}s")
        network = options.network or self.networks[0]
        if network not in self.networks:
            raise PolicyError(f"--network {network} is not allowed on this worker (allowed: {', '.join(self.networks)})")
        start_env = {name: value for name, value in options.env.items() if acts_at_start(name)}
        self._check_visible_devices(start_env.get("NVIDIA_VISIBLE_DEVICES", ""))
        container = ContainerSpec(
            image=image, memory=memory, nano_cpus=int(cpus * 1e9) if cpus else None, pids=self.pids_limit,
            network=network, read_only=self.read_only, user=self.user,
            gpus=self._check_gpus(options.gpus) if options.gpus else None, env=tuple(sorted(start_env.items())),
            mounts=self._check_mounts(options.mount or ()))
        return JobPlan(container=container, timeout=timeout, fresh=bool(options.fresh),
                       env={name: value for name, value in options.env.items() if name not in start_env},
                       new_process=bool(options.new_process),
                       requirements=self._check_requirements(options))

    def _check_requirements(self, options: JobOptions) -> tuple[str, ...]:
        """The packages the job's environment needs on top of its image (--pip, --requirements)."""
        wanted = tuple(sorted({*(options.pip or ()), *(options.requirements or ())}))
        if wanted and not self.allow_pip:
            raise PolicyError(f"--pip/--requirements ({' '.join(wanted)}): this worker builds no environments "
                              f"(CELERY_NB_ALLOW_PIP is off); use an image that has the packages, or ask the "
                              f"worker's operator")
        if AUTO in wanted:
            raise PolicyError("--pip auto reached the worker unresolved: the kernel pins it (celery_nb.requirements); "
                              "send the job from a celery_nb kernel, or name the packages")
        return wanted

    def _check_gpus(self, requested: str) -> str:
        try:
            gpus = parse_gpus("--gpus", requested)
        except OptionError as exc:
            raise PolicyError(str(exc)) from None
        self._allow_gpus(f"--gpus {gpus}", gpu_count(gpus))
        return gpus

    def _check_visible_devices(self, visible: str) -> None:
        """NVIDIA_VISIBLE_DEVICES gives a container GPUs as --gpus does (the NVIDIA runtime reads it):
        the same rule applies."""
        visible = visible.strip().lower()
        if visible not in ("", "none", "void"):
            self._allow_gpus(f"--env NVIDIA_VISIBLE_DEVICES={visible}",
                             None if visible == "all" else len(visible.split(",")))

    def _allow_gpus(self, asked: str, wanted: int | None) -> None:
        """PolicyError unless this worker allows ``wanted`` GPUs (None: all the host has)."""
        if self.max_gpus == 0:
            raise PolicyError(f"{asked}: this worker allows no GPUs (CELERY_NB_GPUS is unset or 0); "
                              f"send the job to a GPU worker's queue with --queue")
        if self.max_gpus is not None and (wanted is None or wanted > self.max_gpus):
            raise PolicyError(f"{asked} exceeds this worker's maximum of {self.max_gpus} "
                              f"(CELERY_NB_GPUS={self.max_gpus}); ask for at most {self.max_gpus}")

    def _check_mounts(self, names: tuple[str, ...]) -> tuple[DataMount, ...]:
        offered = {mount.name: mount for mount in self.mounts}
        for name in names:
            if name not in offered:
                which = (f"it offers {', '.join(sorted(offered))}; pick one of those" if offered
                         else "it offers none: its CELERY_NB_MOUNTS is unset")
                raise PolicyError(f"--mount {name}: this worker offers no mount of that name ({which}), or ask "
                                  f"the worker's operator to add it to CELERY_NB_MOUNTS")
        return tuple(offered[name] for name in sorted(set(names)))


def _words(value: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in value.split(",") if word.strip())


def _data_mounts(value: str) -> tuple[DataMount, ...]:
    """CELERY_NB_MOUNTS: NAME=HOST_PATH[:ro|:rw], comma-separated."""
    mounts = {}
    for entry in _words(value):
        name, _, target = entry.partition("=")
        name = name.strip()
        path, _, mode = target.rpartition(":") if target.endswith((":ro", ":rw")) else (target, "", "ro")
        if not MOUNT_NAME.match(name) or not os.path.isabs(path) or name in mounts:
            raise ValueError(f"CELERY_NB_MOUNTS: {entry!r} is not NAME=/host/path:ro or NAME=/host/path:rw "
                             f"(NAME: letters, digits, _ . -, each name once)")
        mounts[name] = DataMount(name, path, mode == "ro")
    return tuple(mounts.values())


def _max_gpus(value: str) -> int | None:
    """CELERY_NB_GPUS: 'all' (None), a count, or 0 (no GPUs)."""
    value = value.strip().lower() or "0"
    if value == "all":
        return None
    if not value.isdigit():
        raise ValueError(f"CELERY_NB_GPUS={value!r}: use all, a number of GPUs, or 0 for none")
    return int(value)
