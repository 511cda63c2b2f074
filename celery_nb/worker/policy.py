"""What a worker allows: its settings (celery_nb.worker.settings) applied to a job's
``JobOptions``. A client may ask for anything; the policy decides, and a ``PolicyError`` names
the rule a request breaks.

Whatever the request, containers never run privileged, get no host mounts and no devices but
the GPUs the policy allows, drop all capabilities and set no-new-privileges (see
docker_api.start_container).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
from dataclasses import dataclass

from celery_nb.errors import OptionError, PolicyError
from celery_nb.options import AUTO, JobOptions, format_memory, gpu_count, parse_gpus, parse_memory
from celery_nb.worker.settings import WorkerSettings


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
    environment: str | None = None  # the volume of the host's environments (worker.environments), read-only

    @property
    def pool_key(self) -> str:
        fields = "|".join(f"{name}={value!r}" for name, value in dataclasses.asdict(self).items())
        return hashlib.sha256(fields.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class JobPlan:
    """How one job runs: in a container of ``container``, for at most ``timeout`` s, in a
    brand-new container (``fresh``) or a warm one, with ``env`` in its process's environment."""

    container: ContainerSpec
    timeout: float | None
    fresh: bool
    env: dict[str, str]
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
        container = ContainerSpec(
            image=image, memory=memory, nano_cpus=int(cpus * 1e9) if cpus else None, pids=self.pids_limit,
            network=network, read_only=self.read_only, user=self.user,
            gpus=self._check_gpus(options.gpus) if options.gpus else None)
        return JobPlan(container=container, timeout=timeout, fresh=bool(options.fresh), env=options.env,
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
        if self.max_gpus == 0:
            raise PolicyError(f"--gpus {gpus}: this worker allows no GPUs (CELERY_NB_GPUS is unset or 0); "
                              f"send the job to a GPU worker's queue with --queue")
        wanted = gpu_count(gpus)
        if self.max_gpus is not None and (wanted is None or wanted > self.max_gpus):
            raise PolicyError(f"--gpus {gpus} exceeds this worker's maximum of {self.max_gpus} "
                              f"(CELERY_NB_GPUS={self.max_gpus}); ask for at most {self.max_gpus}")
        return gpus


def _words(value: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in value.split(",") if word.strip())


def _max_gpus(value: str) -> int | None:
    """CELERY_NB_GPUS: 'all' (None), a count, or 0 (no GPUs)."""
    value = value.strip().lower() or "0"
    if value == "all":
        return None
    if not value.isdigit():
        raise ValueError(f"CELERY_NB_GPUS={value!r}: use all, a number of GPUs, or 0 for none")
    return int(value)
