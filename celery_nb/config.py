"""Settings: ``%config CeleryNB.default_image = "..."`` in IPython, env variables everywhere.

| setting            | env variable                | default              |
|--------------------|-----------------------------|----------------------|
| broker_url         | CELERY_NB_BROKER_URL        | unset: embedded worker in the kernel |
| default_image      | CELERY_NB_DEFAULT_IMAGE     | python:3.12-slim     |
| default_queue      | CELERY_NB_QUEUE             | celery_nb            |
| embedded_workers   | CELERY_NB_EMBEDDED_WORKERS  | 4                    |
"""
from __future__ import annotations

import os
import re

from traitlets import Int, Unicode, default
from traitlets.config import Configurable

DEFAULT_IMAGE = "python:3.12-slim"
DEFAULT_QUEUE = "celery_nb"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_memory(value: str | int, what: str = "--memory") -> int:
    """'512m', '2g', '1.5GiB' or a number of bytes -> bytes (Docker's binary units)."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{what} {value!r} is not a size: use e.g. 512m or 2g")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


_GPUS = re.compile(r"^(all|[1-9]\d*|device=\d+(?:,\d+)*)$")


def parse_gpus(value: str | int) -> str:
    """GPUs a job asks for, as ``docker run --gpus`` takes them: 'all', a count, 'device=0,1'."""
    spec = str(value).strip().strip('"').lower()
    if not _GPUS.match(spec):
        raise ValueError(f"--gpus {value!r} is not a GPU request: use all, a count (e.g. 2) or device=0,1")
    return spec


def gpu_count(spec: str) -> int | None:
    """How many GPUs a parse_gpus spec asks for (None: all the host has)."""
    if spec == "all":
        return None
    return len(spec[len("device="):].split(",")) if spec.startswith("device=") else int(spec)


def format_memory(size: int) -> str:
    for unit in ("t", "g", "m", "k"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}b"


class CeleryNB(Configurable):
    """Kernel-side settings of celery_nb."""

    broker_url = Unicode(
        None, allow_none=True,
        help="Celery broker (redis://...). Unset: run jobs on an embedded worker inside the kernel.",
    ).tag(config=True)
    default_image = Unicode(help="Docker image for cells and functions that do not name one.").tag(config=True)
    default_queue = Unicode(help="Celery queue for jobs that do not name one.").tag(config=True)
    embedded_workers = Int(help="Jobs the embedded worker runs at once.").tag(config=True)

    @default("broker_url")
    def _broker_url_default(self) -> str | None:
        return os.environ.get("CELERY_NB_BROKER_URL") or None

    @default("default_image")
    def _default_image_default(self) -> str:
        return os.environ.get("CELERY_NB_DEFAULT_IMAGE", DEFAULT_IMAGE)

    @default("default_queue")
    def _default_queue_default(self) -> str:
        return os.environ.get("CELERY_NB_QUEUE", DEFAULT_QUEUE)

    @default("embedded_workers")
    def _embedded_workers_default(self) -> int:
        return int(os.environ.get("CELERY_NB_EMBEDDED_WORKERS", "4"))


_settings: CeleryNB | None = None


def settings() -> CeleryNB:
    """The settings in use: the extension's configurable inside IPython, else one from env."""
    global _settings
    if _settings is None:
        _settings = CeleryNB()
    return _settings


def use_settings(config: CeleryNB) -> None:
    global _settings
    _settings = config
