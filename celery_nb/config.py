"""Settings: ``%config CeleryNB.default_image = "..."`` in IPython, env variables everywhere.

Every setting is a traitlets trait tagged with its environment variable (``EnvConfigurable``):
a value given to the constructor wins over IPython's config, which wins over the environment
variable, which wins over the default. The worker's settings (celery_nb.worker.settings) work
the same way.
"""
from __future__ import annotations

import os
from typing import Any

from traitlets import Int, TraitError, Unicode
from traitlets.config import Configurable

from celery_nb.options import JobOptions

DEFAULT_IMAGE = "python:3.12-slim"
DEFAULT_QUEUE = "celery_nb"


class EnvConfigurable(Configurable):
    """A Configurable whose traits tagged ``env="NAME"`` default to that environment variable."""

    def __init__(self, **kwargs: Any) -> None:
        for name, trait in self.traits(env=lambda env: env is not None).items():
            raw = os.environ.get(trait.metadata["env"], "")
            if raw == "":  # set but empty counts as unset, as in a compose file's ${VAR:-}
                continue
            try:
                self.set_trait(name, trait.from_string(raw))
            except (TraitError, ValueError) as exc:
                raise ValueError(f"{trait.metadata['env']}={raw!r} is not a valid {type(self).__name__}.{name}: "
                                 f"{exc}") from None
        super().__init__(**kwargs)

    @classmethod
    def env_help(cls) -> str:
        """One paragraph per setting: its variable, its default and what it does."""
        lines = []
        for name, trait in sorted(cls.class_traits(env=lambda env: env is not None).items()):
            default = trait.default_value_repr() if hasattr(trait, "default_value_repr") else repr(trait.default_value)
            lines.append(f"{trait.metadata['env']}  ({cls.__name__}.{name}, default {default})\n"
                         f"    {trait.help}")
        return "\n".join(lines)


class CeleryNB(EnvConfigurable):
    """Kernel-side settings of celery_nb."""

    broker_url = Unicode(
        None, allow_none=True,
        help="Celery broker (redis://... or rediss://...). Unset: run jobs on an embedded worker inside the kernel.",
    ).tag(config=True, env="CELERY_NB_BROKER_URL")
    default_image = Unicode(
        DEFAULT_IMAGE, help="Docker image for cells and functions that do not name one.",
    ).tag(config=True, env="CELERY_NB_DEFAULT_IMAGE")
    default_queue = Unicode(
        DEFAULT_QUEUE, help="Celery queue for jobs that do not name one.").tag(config=True, env="CELERY_NB_QUEUE")
    embedded_workers = Int(4, help="Jobs the embedded worker runs at once.").tag(
        config=True, env="CELERY_NB_EMBEDDED_WORKERS")

    def job_defaults(self) -> JobOptions:
        """What a job that names no image or queue gets."""
        return JobOptions(image=self.default_image, queue=self.default_queue)


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
