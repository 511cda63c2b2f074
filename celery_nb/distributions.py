"""Which installed distributions provide a module, and their versions in this Python: the
kernel's side of ``--pip auto`` and of the tables that explain a value that does not load
because the kernel and the job's environment hold different versions of a package.
"""
from __future__ import annotations

import importlib.metadata
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from packaging.utils import canonicalize_name

# travel with the runtime into every container: never installed into an environment
RUNTIME_PACKAGES = frozenset({"celery_nb", "celery_nb_runtime", "cloudpickle"})
_REINDEX_AFTER = 30.0  # s; a module no distribution provides is looked up again after this (installed meanwhile)
_index: dict[str, list[str]] = {}
_indexed_at: float | None = None
_lock = threading.Lock()


def installable(module: str) -> bool:
    """Whether top-level ``module`` could come from a package index: not the standard library,
    not celery_nb's own packages, not the notebook itself."""
    return bool(module) and module not in sys.stdlib_module_names and module not in RUNTIME_PACKAGES \
        and module not in ("__main__", "builtins")


def distributions_of(module: str) -> list[str]:
    """The canonical names of the installed distributions that provide ``module`` (its top-level
    package counts); [] for the standard library and modules no distribution installed."""
    top = module.partition(".")[0]
    if not installable(top):
        return []
    namesake = _provider_named_like(top)  # most are (numpy, pandas): no need to index them all
    if namesake is not None:
        return [namesake]
    global _index, _indexed_at
    with _lock:
        if _indexed_at is None or (top not in _index and time.monotonic() - _indexed_at > _REINDEX_AFTER):
            _index = importlib.metadata.packages_distributions()
            _indexed_at = time.monotonic()
        return sorted({canonicalize_name(name) for name in _index.get(top, ())})


def _provider_named_like(module: str) -> str | None:
    """The distribution named like ``module``, if it is installed and provides it."""
    try:
        distribution = importlib.metadata.distribution(module)
    except importlib.metadata.PackageNotFoundError:
        return None
    top_level = distribution.read_text("top_level.txt")
    if top_level is not None:
        provided = set(top_level.split())
    else:
        provided = {file.parts[0].removesuffix(".py") for file in distribution.files or () if file.parts}
    return canonicalize_name(distribution.metadata["Name"]) if module in provided else None


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_table(environment: Mapping[str, str | None], python: Sequence[int] | None = None) -> str:
    """The packages of ``environment`` (top-level module -> its version in the job's
    environment, None where it is not installed there) next to the kernel's versions, and how to
    make them match; ``python``: the environment's Python version, when it is what differs."""
    rows: list[tuple[str, str | None, str | None]] = []
    if python is not None:
        rows.append(("python", ".".join(map(str, sys.version_info[:2])), ".".join(map(str, python[:2]))))
    for module, theirs in sorted(environment.items()):
        if installable(module):
            rows.extend((name, installed_version(name), theirs) for name in distributions_of(module) or [module])
    if not rows:
        return ""
    width = max(len("package"), *(len(row[0]) for row in rows))
    table = [f"  {'package':<{width}}  {'kernel':<14}environment"]
    table += [f"  {name:<{width}}  {mine or '-':<14}{theirs or '-'}{'' if mine == theirs else '   <- differs'}"
              for name, mine, theirs in rows]
    return "\n".join(["the packages involved (- : not installed):", *table, *_fixes(rows)])


def _fixes(rows: list[tuple[str, str | None, str | None]]) -> list[str]:
    differ = [row for row in rows if row[1] != row[2]]
    fixes = []
    python = next((row for row in differ if row[0] == "python"), None)
    if python is not None:
        fixes.append(f"fix: use an image with Python {python[1]}: --pip cannot change the image's Python")
    pins = [f"{name}=={mine}" for name, mine, _theirs in differ if mine and name != "python"]
    if pins:
        fixes.append(f"fix: run the job with --pip auto (pip=\"auto\" for submit and remote) to install the kernel's "
                     f"versions, or pin them: --pip \"{' '.join(pins)}\"")
    missing = [f"{name}=={theirs}" for name, mine, theirs in differ if not mine and theirs]
    if missing:
        fixes.append(f"fix: install the environment's versions in the kernel: pip install {' '.join(missing)}")
    return fixes
