"""Settings: ``%config CeleryNB.default_image = "..."`` in IPython, env variables everywhere,
and a settings file for what a machine always wants (``celery-nb config``).

Every setting is a traitlets trait tagged with its environment variable (``EnvConfigurable``).
A value given to the constructor wins over IPython's config, which wins over the environment
variable, which wins over the settings file (``CELERY_NB_CONFIG``, default
``~/.config/celery_nb/config.json``: ``{"CeleryNB": {"default_image": "..."}}``), which wins
over the default. The worker's settings (celery_nb.worker.settings) work the same way.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from traitlets import Int, TraitError, Unicode, validate
from traitlets.config import Configurable

from celery_nb.errors import OptionError
from celery_nb.options import JobOptions

DEFAULT_IMAGE = "python:3.12-slim"
# a function travels with cloudpickle: its image needs the kernel's Python minor version
DEFAULT_FUNCTION_IMAGE = f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
DEFAULT_QUEUE = "celery_nb"


def settings_file() -> Path:
    return Path(os.environ.get("CELERY_NB_CONFIG") or Path.home() / ".config/celery_nb/config.json")


def read_settings_file() -> dict[str, dict[str, Any]]:
    """The settings file's sections ({} when there is none)."""
    path = settings_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ValueError(f"the celery_nb settings file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"the celery_nb settings file {path} must hold {{\"CeleryNB\": {{...}}, ...}}")
    return data


class EnvConfigurable(Configurable):
    """A Configurable whose traits tagged ``env="NAME"`` default to that environment variable,
    else to the settings file's section named after the class."""

    def __init__(self, **kwargs: Any) -> None:
        from_file = read_settings_file().get(type(self).__name__, {})
        unknown = sorted(set(from_file) - set(self.trait_names(config=True)))
        if unknown:
            raise ValueError(f"{settings_file()}: {type(self).__name__} has no setting {', '.join(unknown)}")
        for name, trait in self.traits(env=lambda env: env is not None).items():
            raw = os.environ.get(trait.metadata["env"], "")
            try:
                if raw != "":  # set but empty counts as unset, as in a compose file's ${VAR:-}
                    self.set_trait(name, trait.from_string(raw))
                elif name in from_file:
                    self.set_trait(name, from_file[name])
            except (TraitError, ValueError) as exc:
                where = f"{trait.metadata['env']}={raw!r}" if raw else f"{settings_file()}: {name}={from_file[name]!r}"
                raise ValueError(f"{where} is not a valid {type(self).__name__}.{name}: {exc}") from None
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
        DEFAULT_IMAGE, help="Docker image for cells that do not name one (any image with python3).",
    ).tag(config=True, env="CELERY_NB_DEFAULT_IMAGE")
    default_function_image = Unicode(
        DEFAULT_FUNCTION_IMAGE, help="Docker image for functions that do not name one: it needs the kernel's "
                                     "Python minor version (functions travel with cloudpickle).",
    ).tag(config=True, env="CELERY_NB_DEFAULT_FUNCTION_IMAGE")
    default_queue = Unicode(
        DEFAULT_QUEUE, help="Celery queue for jobs that do not name one.").tag(config=True, env="CELERY_NB_QUEUE")
    embedded_workers = Int(4, help="Jobs the embedded worker runs at once.").tag(
        config=True, env="CELERY_NB_EMBEDDED_WORKERS")
    default_pip = Unicode(
        "", help="Packages every job gets, as --pip takes them (e.g. 'auto', or 'numpy==2.1.3 tqdm'); a job's own "
                 "--pip adds to them and wins for a package both name.",
    ).tag(config=True, env="CELERY_NB_DEFAULT_PIP")

    @validate("default_pip")
    def _check_pip(self, proposal: Any) -> str:
        try:
            JobOptions(pip=proposal.value or None)
        except OptionError as exc:
            raise TraitError(str(exc)) from None
        return proposal.value

    def job_defaults(self, kind: str) -> JobOptions:
        """What a job (``kind``: "cell" or "call") that names no image or queue gets."""
        image = self.default_image if kind == "cell" else self.default_function_image
        return JobOptions(image=image, queue=self.default_queue, pip=self.default_pip or None)


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


def write_setting(settings_class: type[EnvConfigurable], name: str, raw: str) -> Path:
    """Keep ``settings_class.name`` = ``raw`` (as on a command line) in the settings file."""
    traits = settings_class.class_traits(config=True)
    if name not in traits:
        raise ValueError(f"{settings_class.__name__} has no setting {name!r}; it has: {', '.join(sorted(traits))}")
    try:
        value = traits[name].from_string(raw)
        traits[name].validate(None, value)
    except (TraitError, ValueError) as exc:
        raise ValueError(f"{raw!r} is not a valid {settings_class.__name__}.{name}: {exc}") from None
    data = read_settings_file()
    data.setdefault(settings_class.__name__, {})[name] = value
    path = settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
