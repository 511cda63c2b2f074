"""What a worker allows. Configured on the worker (env variables), never by the client:
a client may ask for limits, the worker's policy decides.

| env variable                 | meaning                                   | default     |
|------------------------------|-------------------------------------------|-------------|
| CELERY_NB_ALLOWED_IMAGES     | comma-separated fnmatch patterns          | *           |
| CELERY_NB_DEFAULT_MEMORY     | memory limit when the job names none      | 2g          |
| CELERY_NB_MAX_MEMORY         | largest memory limit a job may ask for    | unlimited   |
| CELERY_NB_MAX_CPUS           | most CPUs a job may ask for               | unlimited   |
| CELERY_NB_MAX_TIMEOUT        | longest --timeout (s); also the default   | unlimited   |
| CELERY_NB_PIDS_LIMIT         | processes per container                   | 512         |
| CELERY_NB_PULL               | pull missing images: missing or never     | missing     |
| CELERY_NB_NETWORKS           | network modes jobs may ask for; the first | bridge,none |
|                              | is the default                            |             |
| CELERY_NB_READ_ONLY          | 1: read-only root filesystem, tmpfs /tmp  | 0           |
| CELERY_NB_USER               | run jobs as this user (e.g. 65534:65534)  | the image's |
| CELERY_NB_GPUS               | GPUs a job may ask for (--gpus): all or a | none        |
|                              | count; unset or 0 refuses every request   |             |

Whatever the request, containers never run privileged, get no host mounts and no devices but
the GPUs the policy allows, drop all capabilities and set no-new-privileges (see
containers.start_container).
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Any

from celery_nb.config import format_memory, gpu_count, parse_gpus, parse_memory
from celery_nb.errors import PolicyError


@dataclass(frozen=True)
class ContainerLimits:
    memory: int
    nano_cpus: int | None
    pids: int
    timeout: float | None
    network: str = "bridge"
    read_only: bool = False
    user: str | None = None
    gpus: str | None = None  # a config.parse_gpus spec: docker's device request


@dataclass(frozen=True)
class WorkerPolicy:
    allowed_images: tuple[str, ...] = ("*",)
    default_memory: int = 2 * 1024**3
    max_memory: int | None = None
    max_cpus: float | None = None
    max_timeout: float | None = None
    pids_limit: int = 512
    pull: str = "missing"
    networks: tuple[str, ...] = ("bridge", "none")
    read_only: bool = False
    user: str | None = None
    max_gpus: int | None = 0  # None: any request, even --gpus all

    @classmethod
    def from_env(cls) -> WorkerPolicy:
        env = os.environ

        def optional(name: str, parse: Any) -> Any:
            return parse(env[name]) if env.get(name) else None

        return cls(
            allowed_images=tuple(p.strip() for p in env.get("CELERY_NB_ALLOWED_IMAGES", "*").split(",") if p.strip()),
            default_memory=parse_memory(env.get("CELERY_NB_DEFAULT_MEMORY", "2g"), "CELERY_NB_DEFAULT_MEMORY"),
            max_memory=optional("CELERY_NB_MAX_MEMORY", lambda v: parse_memory(v, "CELERY_NB_MAX_MEMORY")),
            max_cpus=optional("CELERY_NB_MAX_CPUS", float),
            max_timeout=optional("CELERY_NB_MAX_TIMEOUT", float),
            pids_limit=int(env.get("CELERY_NB_PIDS_LIMIT", "512")),
            pull=env.get("CELERY_NB_PULL", "missing"),
            networks=tuple(n.strip() for n in env.get("CELERY_NB_NETWORKS", "bridge,none").split(",") if n.strip()),
            read_only=env.get("CELERY_NB_READ_ONLY", "0") not in ("", "0", "false", "no"),
            user=env.get("CELERY_NB_USER") or None,
            max_gpus=_max_gpus(env.get("CELERY_NB_GPUS", "")),
        )

    def limits_for(self, image: str, requested: dict[str, Any]) -> ContainerLimits:
        """The limits a job runs with; PolicyError names the rule a request breaks."""
        if not any(fnmatch.fnmatchcase(image, pattern) for pattern in self.allowed_images):
            raise PolicyError(f"image {image!r} is not allowed on this worker (allowed: "
                              f"{', '.join(self.allowed_images)}); ask the worker's operator or pick another image")
        memory = requested.get("memory") or min(self.default_memory, self.max_memory or self.default_memory)
        if self.max_memory is not None and memory > self.max_memory:
            raise PolicyError(f"--memory {format_memory(memory)} exceeds this worker's maximum of "
                              f"{format_memory(self.max_memory)}")
        cpus = requested.get("cpus")
        if cpus is not None and self.max_cpus is not None and cpus > self.max_cpus:
            raise PolicyError(f"--cpus {cpus:g} exceeds this worker's maximum of {self.max_cpus:g}")
        timeout = requested.get("timeout") or self.max_timeout
        if timeout is not None and self.max_timeout is not None and timeout > self.max_timeout:
            raise PolicyError(f"--timeout {timeout:g}s exceeds this worker's maximum of {self.max_timeout:g}s")
        network = requested.get("network") or self.networks[0]
        if network not in self.networks:
            raise PolicyError(f"--network {network} is not allowed on this worker (allowed: {', '.join(self.networks)})")
        gpus = self._check_gpus(requested["gpus"]) if requested.get("gpus") else None
        return ContainerLimits(memory=memory, nano_cpus=int(cpus * 1e9) if cpus else None,
                               pids=self.pids_limit, timeout=timeout, network=network,
                               read_only=self.read_only, user=self.user, gpus=gpus)

    def _check_gpus(self, requested: str) -> str:
        try:
            gpus = parse_gpus(requested)
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
        if self.max_gpus == 0:
            raise PolicyError(f"--gpus {gpus}: this worker allows no GPUs (CELERY_NB_GPUS is unset or 0); "
                              f"send the job to a GPU worker's queue with --queue")
        wanted = gpu_count(gpus)
        if self.max_gpus is not None and (wanted is None or wanted > self.max_gpus):
            raise PolicyError(f"--gpus {gpus} exceeds this worker's maximum of {self.max_gpus} "
                              f"(CELERY_NB_GPUS={self.max_gpus}); ask for at most {self.max_gpus}")
        return gpus


def _max_gpus(value: str) -> int | None:
    """CELERY_NB_GPUS: 'all' (None), a count, or unset/0 (no GPUs)."""
    value = value.strip().lower() or "0"
    if value == "all":
        return None
    if not value.isdigit():
        raise ValueError(f"CELERY_NB_GPUS={value!r}: use all, a number of GPUs, or 0 for none")
    return int(value)
