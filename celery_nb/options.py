"""``JobOptions``: every option of a job, validated once, in one place.

The magic's flags are generated from the fields' metadata; ``submit``, ``remote``, the
``Executor`` and ``%config CeleryNB`` defaults all build a ``JobOptions``; the request carries
it to the worker (``to_request`` / ``from_request``), whose policy decides what it allows.
Stdlib only: the kernel, the worker and the tests import it cheaply.

Adding an option: a field here (its flag, help and parser), and its handling on the worker
(``celery_nb.worker.policy``).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from celery_nb.errors import InputError, OptionError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_GPUS = re.compile(r"^(all|[1-9]\d*|device=\d+(?:,\d+)*)$")
AUTO = "auto"  # --pip auto: the kernel pins what the job imports (celery_nb.requirements)
_DISTRIBUTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_INCLUDE = re.compile(r"^(-r|--requirement)(\s+|=)(\S.*)$")


def parse_memory(what: str, value: str | int) -> int:
    """'512m', '2g', '1.5GiB' or a number of bytes -> bytes (Docker's binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise OptionError(f"{what} {value!r} is not a size: use e.g. 512m or 2g")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        raise OptionError(f"{what} {value!r} is not a size: use e.g. 512m or 2g")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_memory(size: int) -> str:
    for unit in ("t", "g", "m", "k"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}b"


def format_size(size: int) -> str:
    """A measured size for people: 980 B, 12.3 KiB, 208 MiB, 2.0 GiB."""
    for unit in ("t", "g", "m", "k"):
        if size >= _UNITS[unit]:
            value = size / _UNITS[unit]
            return f"{value:.1f} {unit.upper()}iB" if value < 100 else f"{value:.0f} {unit.upper()}iB"
    return f"{size} B"


def parse_gpus(flag: str, value: str | int) -> str:
    """GPUs a job asks for, as ``docker run --gpus`` takes them: 'all', a count, 'device=0,1'."""
    spec = str(value).strip().strip('"').lower()
    if not _GPUS.match(spec):
        raise OptionError(f"{flag} {value!r} is not a GPU request: use all, a count (e.g. 2) or device=0,1")
    return spec


def gpu_count(spec: str) -> int | None:
    """How many GPUs a parse_gpus spec asks for (None: all the host has)."""
    if spec == "all":
        return None
    return len(spec[len("device="):].split(",")) if spec.startswith("device=") else int(spec)


def _unquoted(text: str) -> str:
    """A magic's argument as typed: IPython keeps the quotes around ``--pip "a b"``."""
    text = text.strip()
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def _requirement(flag: str, text: str) -> str:
    """One requirement specifier (PEP 508, as pip takes them), normalised so that equal
    requirements read alike: the canonical name, extras and version specifiers sorted."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        requirement = Requirement(text)
    except InvalidRequirement as exc:
        raise OptionError(f"{flag} {text!r} is not a requirement specifier as pip takes them (e.g. pandas==2.2.3 "
                          f"or numpy>=2): {exc}") from None
    if requirement.url and requirement.url.startswith("file:"):
        raise OptionError(f"{flag} {text!r} names a file on the kernel's machine, which the worker cannot read: "
                          f"publish the package to an index, or give a URL the worker can reach")
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    version = f"@{requirement.url}" if requirement.url else str(requirement.specifier)
    marker = f"; {requirement.marker}" if requirement.marker else ""
    return f"{canonicalize_name(requirement.name)}{extras}{version}{marker}"


def requirement_name(specifier: str) -> str:
    """The distribution a normalised specifier is about (its canonical name), or "auto"."""
    match = _DISTRIBUTION_NAME.match(specifier)
    return match.group(0) if match else specifier


def add_requirements(earlier: Iterable[str], later: Iterable[str]) -> tuple[str, ...]:
    """``earlier`` then ``later``, the specifiers of ``earlier`` about a distribution that
    ``later`` names left out: the later ones win (a job's own over the defaults)."""
    later = tuple(later)
    named = {requirement_name(specifier) for specifier in later}
    return tuple(dict.fromkeys([*(s for s in earlier if requirement_name(s) not in named), *later]))


def _pip(flag: str, value: str | Iterable[str]) -> tuple[str, ...] | None:
    """--pip: specifiers separated by spaces, as on pip's command line, in one string or several
    (the flag is repeatable); the word auto asks the kernel to pin what the job imports."""
    specifiers = []
    for piece in [value] if isinstance(value, str) else list(value):
        if not isinstance(piece, str):
            raise OptionError(f"{flag}: {piece!r} is not a requirement specifier; give strings such as 'numpy==2.1.3'")
        for word in _unquoted(piece).split():
            if word.lower() == AUTO:
                specifiers.append(AUTO)
                continue
            specifier = _requirement(flag, word)
            if ";" in specifier:
                raise OptionError(f"{flag} {word!r}: an environment marker needs spaces, which {flag} takes as "
                                  f"separators; put the line in a --requirements file instead")
            specifiers.append(specifier)
    return tuple(dict.fromkeys(specifiers)) or None


def _requirements(flag: str, value: str | os.PathLike[str] | Iterable[str]) -> tuple[str, ...] | None:
    """--requirements PATH: a requirements file, read here (on the kernel's side: its lines travel
    to the worker, not the path); or its lines, as a request carries them."""
    if isinstance(value, (str, os.PathLike)):
        lines = _read_requirements(flag, Path(_unquoted(os.fspath(value))), ())
    else:
        lines = list(value)
        for line in lines:
            if not isinstance(line, str):
                raise OptionError(f"{flag}: {line!r} is not a requirement line; give a file's path, or its lines "
                                  f"as strings")
    return tuple(dict.fromkeys(_requirement(flag, line) for line in lines)) or None


def _read_requirements(flag: str, path: Path, including: tuple[Path, ...]) -> list[str]:
    """The requirement lines of a requirements file: comments and blank lines dropped, continued
    lines joined, ``-r other.txt`` read in place (relative to the file). Options that choose an
    index or a build are the worker's to decide, and refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OptionError(f"{flag} {str(path)!r}: cannot read it ({exc.strerror or exc}); the file is read "
                          f"on the kernel's side, give its path there") from None
    lines = []
    for line in re.sub(r"\\\r?\n", "", text).splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        include = _INCLUDE.match(line)
        if include:
            nested = (path.parent / include.group(3).strip()).resolve()
            if nested in including:
                raise OptionError(f"{flag} {str(path)!r} includes {str(nested)!r} again (a loop of -r lines)")
            lines.extend(_read_requirements(flag, nested, (*including, path.resolve())))
        elif line.startswith("-") or " --" in line:
            raise OptionError(f"{flag} {str(path)!r}: {line!r} is a pip option, which celery_nb does not take from "
                              f"a requirements file (the worker picks the index: CELERY_NB_PIP_INDEX_URL); keep "
                              f"only requirement lines")
        elif line:
            lines.append(line)
    return lines


def _positive(flag: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{flag} {value!r} is not a number") from None
    if not number > 0:
        raise OptionError(f"{flag} must be positive, got {value!r}")
    return number


def _env(flag: str, value: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    """A mapping, or ``K=V`` strings as the magic's ``--env`` gives them."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = []
        for pair in value:
            key, sep, val = str(pair).partition("=")
            if not sep:
                raise OptionError(f"{flag} {pair!r} is not KEY=VALUE")
            pairs.append((key, val))
    env = {}
    for key, val in pairs:
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise OptionError(f"{flag}: {key!r} is not an environment variable name")
        if not isinstance(val, str):
            raise OptionError(f"{flag} {key}: the value must be a string, got {type(val).__name__}")
        env[key] = val
    return env


def _text(flag: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"{flag} {value!r}: give a non-empty name")
    return value.strip()


def _strings(flag: str, value: str | os.PathLike | Iterable[str | os.PathLike], what: str) -> tuple[str, ...] | None:
    """One string (or path) or several, as the magic's repeatable flags and keyword options give
    them; the magic keeps the quotes of ``--flag "a b"``, which are taken off."""
    values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    strings = []
    for item in values:
        item = os.fspath(item) if isinstance(item, os.PathLike) else item
        if isinstance(item, str) and len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            item = item[1:-1]
        if not isinstance(item, str) or not item.strip():
            raise OptionError(f"{flag} {item!r}: give {what}")
        strings.append(item)
    return tuple(strings) or None


def _uploads(flag: str, value: Any) -> tuple[str, ...] | None:
    """Paths in the kernel; whether they exist is checked when a job is submitted (celery_nb.files)."""
    return _strings(flag, value, "a file or folder path")


def _downloads(flag: str, value: Any) -> tuple[str, ...] | None:
    patterns = _strings(flag, value, "a glob pattern, e.g. 'out/*.csv'")
    for pattern in patterns or ():
        if os.path.isabs(pattern) or pattern.startswith("~") or ".." in pattern.split("/"):
            raise InputError(f"{flag} {pattern!r} would reach outside the job's working directory: a pattern is "
                             f"relative to it and stays inside it (no absolute path, no '..'), e.g. 'out/*.csv'")
    return patterns


MOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _mounts(flag: str, value: Any) -> tuple[str, ...] | None:
    """Names the worker's CELERY_NB_MOUNTS offers: a job never names a host path."""
    names = _strings(flag, value, "the name of a mount the worker offers (CELERY_NB_MOUNTS)")
    for name in names or ():
        if not MOUNT_NAME.match(name):
            raise OptionError(f"{flag} {name!r} is not a mount name: a job names a mount the worker offers "
                              f"(its CELERY_NB_MOUNTS, e.g. datasets), never a host path")
    return names


def _switch(flag: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{flag} takes True or False, got {value!r}")
    return value


def _option(flag: str, help: str, parse: Callable[[str, Any], Any], *, short: str | None = None,
            metavar: str | None = None, kind: str = "value", default: Any = None) -> Any:
    """A JobOptions field: how the magic spells it, and ``parse(flag, value)``, which turns what
    a user may give (a string from the magic, or a Python value) into the field's value or
    raises OptionError (InputError: a download that would escape the job's directory).
    ``kind``: "value" (``--flag X``), "append" (repeatable, adds up), "switch" (``--flag`` alone)."""
    metadata = {"flag": flag, "short": short, "metavar": metavar, "help": help, "kind": kind, "parse": parse}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobOptions:
    """What a job asks for. ``None`` (or empty) means "not set": a default fills it in
    (``with_defaults``), and the worker's policy decides what is allowed."""

    image: str | None = _option(
        "--image", "Docker image to run in (default: CeleryNB.default_image). Any image with python3 "
                   "(3.9+) works; nothing needs to be installed in it.", _text, short="-i")
    memory: int | None = _option(
        "--memory", "memory limit, e.g. 512m or 2g (default: the worker's)", parse_memory, short="-m",
        metavar="SIZE")
    cpus: float | None = _option("--cpus", "CPU limit, e.g. 1.5", _positive, metavar="N")
    timeout: float | None = _option(
        "--timeout", "kill the container after this long", _positive, short="-t", metavar="SECONDS")
    queue: str | None = _option(
        "--queue", "Celery queue, to pick a group of workers, e.g. gpu for workers started with "
                   "`celery-nb worker -Q gpu` (default: CeleryNB.default_queue)", _text, short="-q")
    env: dict[str, str] = _option(
        "--env", "environment variable in the container; repeatable", _env, short="-e", metavar="K=V",
        kind="append", default={})
    network: str | None = _option(
        "--network", "the container's network, e.g. none to cut it off; the worker's policy says which "
                     "are allowed (CELERY_NB_NETWORKS)", _text, metavar="MODE")
    gpus: str | None = _option(
        "--gpus", "GPUs for the container, as `docker run --gpus` takes them: all, a count (2) or "
                  "device=0,1; only a worker whose policy allows GPUs (CELERY_NB_GPUS) runs such a job: "
                  "send it to their queue with --queue", parse_gpus, metavar="GPUS")
    fresh: bool | None = _option(
        "--fresh", "run in a brand-new container instead of a warm one from the worker's pool", _switch,
        kind="switch")
    new_process: bool | None = _option(
        "--new-process", "run in a process of its own; by default a job may run in the process that the previous "
                         "job of this kernel ran in (in the same warm container, with the same --env and local "
                         "modules), where the modules it imported are still imported", _switch, kind="switch")
    upload: tuple[str, ...] | None = _option(
        "--upload", "file or folder to copy into the job's working directory; a relative path keeps its layout "
                    "(data/train.csv is data/train.csv in the job), another lands there by its name; repeatable",
        _uploads, metavar="PATH", kind="append")
    download: tuple[str, ...] | None = _option(
        "--download", "glob of files in the job's working directory (e.g. 'out/*.png', a folder, '**/*.csv') "
                      "to copy into the kernel's working directory at the same paths once the job succeeds; "
                      "repeatable", _downloads, metavar="PATTERN", kind="append")
    mount: tuple[str, ...] | None = _option(
        "--mount", "a data folder the worker offers by name (its CELERY_NB_MOUNTS), mounted at /mnt/NAME; "
                   "repeatable", _mounts, metavar="NAME", kind="append")
    pip: tuple[str, ...] | None = _option(
        "--pip", "packages the job needs, as on pip's command line: --pip \"pandas==2.2.3 scikit-learn\"; "
                 "repeatable (adds up). auto: the packages the cell imports (or the function uses), pinned to "
                 "this kernel's versions; an explicit specifier wins over auto. The worker installs them on top of "
                 "the image (any image with python3) once per host and caches the environment",
        _pip, metavar="SPECIFIERS", kind="append")
    requirements: tuple[str, ...] | None = _option(
        "--requirements", "a requirements file, read here in the kernel (its lines travel, not the path); "
                          "installed as --pip is", _requirements, metavar="PATH")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                object.__setattr__(self, field.name, field.metadata["parse"](field.metadata["flag"], value))

    # -- building -----------------------------------------------------------------------
    @classmethod
    def build(cls, options: JobOptions | None = None, **fields: Any) -> JobOptions:
        """``options`` with ``fields`` (keyword options of submit/remote) set on top."""
        unknown = sorted(set(fields) - _FIELD_NAMES)
        if unknown:
            raise OptionError(f"unknown job option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                              f"the options are: {', '.join(sorted(_FIELD_NAMES))}")
        given = {k: v for k, v in fields.items() if v is not None}
        return dataclasses.replace(options, **given) if options is not None else cls(**given)

    @classmethod
    def from_flags(cls, parsed: Mapping[str, Any]) -> JobOptions:
        """From the magic's parsed arguments (the flags ``magic_arguments`` generated)."""
        return cls.build(**{name: parsed[name] for name in _FIELD_NAMES if parsed.get(name) is not None})

    def with_defaults(self, defaults: JobOptions) -> JobOptions:
        """Unset fields taken from ``defaults``; environment variables, requirements and the
        lists of files and mounts add up (these win: a requirement about the same distribution)."""
        merged = {}
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(defaults, field.name)
            if isinstance(mine, dict):
                merged[field.name] = {**theirs, **mine}
            elif isinstance(mine, tuple) and isinstance(theirs, tuple):  # the job's own over the defaults
                merged[field.name] = (add_requirements(theirs, mine) if field.name in ("pip", "requirements")
                                      else tuple(dict.fromkeys([*theirs, *mine])))
            else:
                merged[field.name] = theirs if mine is None else mine
        return JobOptions(**merged)

    # -- wire format --------------------------------------------------------------------
    def to_request(self) -> dict[str, Any]:
        """The set options as JSON values, for the job's request."""
        return {field.name: value for field in dataclasses.fields(self)
                if (value := getattr(self, field.name)) is not None and value != {}}

    @classmethod
    def from_request(cls, data: Mapping[str, Any]) -> JobOptions:
        """Parse (and validate again: it came over the network) a request's options."""
        if not isinstance(data, Mapping):
            raise OptionError(f"the request's options are not an object: {data!r}")
        if isinstance(data.get("requirements"), str):  # a path: read on the kernel's side only, never here
            raise OptionError("the request's requirements are a path, not the lines of a requirements file")
        return cls.build(**data)

    # -- the magic's flags --------------------------------------------------------------
    @classmethod
    def magic_arguments(cls) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
        """``(flags, argparse keywords)`` per field, for IPython's ``@argument``."""
        arguments = []
        for field in dataclasses.fields(cls):
            meta = field.metadata
            flags = tuple(f for f in (meta["flag"], meta["short"]) if f)
            kwargs: dict[str, Any] = {"dest": field.name, "help": meta["help"]}
            if meta["kind"] == "switch":
                kwargs.update(action="store_const", const=True, default=None)
            else:
                if meta["kind"] == "append":
                    kwargs["action"] = "append"
                if meta["metavar"]:
                    kwargs["metavar"] = meta["metavar"]
            arguments.append((flags, kwargs))
        return arguments


_FIELD_NAMES = frozenset(field.name for field in dataclasses.fields(JobOptions))

