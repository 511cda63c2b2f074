"""``--pip auto``: the distributions a job needs, pinned to the versions this kernel has.

A cell needs what it imports (its syntax tree) and what the values it reads from the kernel are
made of; a function needs its module, the modules its globals and closure name, what its body
imports, and what its arguments are made of. Each module maps to the distributions that
installed it (``importlib.metadata.packages_distributions()``); each of those, and the ones it
depends on, is pinned to the kernel's version, so that the environment loads what the kernel
sends and the kernel what comes back. The standard library and celery_nb's own packages are
left out, and a specifier the job gives for a distribution wins over its pin.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import re
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from celery_nb import analysis
from celery_nb.distributions import distributions_of, installable, installed_version
from celery_nb.options import AUTO, JobOptions, requirement_name

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def pin_auto(options: JobOptions, imports: Callable[[], Iterable[str]] | None) -> JobOptions:
    """``options`` with ``auto`` in its ``pip`` replaced by the kernel's versions of the
    distributions that provide the modules ``imports()`` names, and of their dependencies."""
    if not options.pip or AUTO not in options.pip:
        return options
    explicit = tuple(specifier for specifier in options.pip if specifier != AUTO)
    named = {requirement_name(specifier) for specifier in (*explicit, *(options.requirements or ()))}
    pins = pins_for(frozenset(imports() if imports else ()))
    return dataclasses.replace(options, pip=(*explicit, *(p for p in pins if requirement_name(p) not in named)) or None)


@functools.lru_cache(maxsize=128)  # a cell run again, or a function mapped in many chunks, resolves once
def pins_for(modules: frozenset[str]) -> tuple[str, ...]:
    """``name==version`` of the distributions providing ``modules`` and their dependencies."""
    pinned: dict[str, str] = {}
    for module in sorted(modules):
        providers = distributions_of(module)
        if not providers and installable(module):
            warnings.warn(f"--pip auto: no distribution installed in this kernel provides module {module!r} (a local "
                          f"file, or not installed), so auto cannot pin it and the job's environment will not have "
                          f"it; name its package with --pip", stacklevel=2)
        for name in providers:
            _pin_with_dependencies(name, pinned)
    return tuple(f"{name}=={version}" for name, version in sorted(pinned.items()))


def _pin_with_dependencies(name: str, pinned: dict[str, str]) -> None:
    if name in pinned:
        return
    version = installed_version(name)
    if version is None or _installed_from_a_local_path(name):
        return  # an index does not have it: a pin would fail the build
    pinned[name] = version.partition("+")[0]  # a local build (2.1.0+cpu) pins its public release
    for line in importlib.metadata.requires(name) or ():
        dependency = Requirement(line)
        if dependency.marker is None or (_about_python_only(dependency.marker) and dependency.marker.evaluate()):
            _pin_with_dependencies(canonicalize_name(dependency.name), pinned)


def _about_python_only(marker: Marker) -> bool:
    """Whether a dependency's marker asks only about the Python version, so that the kernel's
    answer holds for the job's environment too; one about the platform or an extra is left to
    the installer (a Windows kernel's pywin32 has no place in a Linux container)."""
    words = set(re.findall(r"[a-z_]+", _QUOTED.sub("", str(marker)))) - {"and", "or", "in", "not"}
    return words <= {"python_version", "python_full_version"}


def _installed_from_a_local_path(name: str) -> bool:
    """Installed from a directory or file of this machine (``pip install -e .``, a local wheel)."""
    try:
        origin = json.loads(importlib.metadata.distribution(name).read_text("direct_url.json") or "{}")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return "dir_info" in origin or str(origin.get("url", "")).startswith("file:")


def cell_modules(source: str, first_line: int, values: Iterable[Any]) -> set[str]:
    """The top-level modules a cell imports, and those its input ``values`` are made of."""
    return set(analysis.imported_modules(source, first_line)) | _modules_of_values(values)


def function_modules(fn: Callable[..., Any], values: Iterable[Any], referenced: Iterable[str] = ()) -> set[str]:
    """The top-level modules ``fn`` needs: its own, those its globals and closure name, those its
    body imports; those its arguments ``values`` are made of; and ``referenced``, the modules
    the job's pickle refers to (a local_code.ReferenceRecorder's), which are all that says what a
    callable object such as a joblib batch holds: the functions and classes of its calls."""
    if not isinstance(fn, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type)):
        found = {type(fn).__module__}  # a callable object: its class is pickled by reference
    # cloudpickle sends a function of an importable module by reference: that module must be there too
    elif "<locals>" not in getattr(fn, "__qualname__", "<locals>"):
        found = {_module_of(fn)}
    else:
        found = set()
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        namespace = getattr(fn, "__globals__", {})
        for nested in analysis.code_objects(code):
            found |= {_module_of(namespace[name]) for name in nested.co_names if name in namespace}
        found |= analysis.modules_imported_by_code(code)
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                found.add(_module_of(cell.cell_contents))
            except ValueError:  # a cell not yet filled
                continue
    return {module.partition(".")[0] for module in (*found, *referenced) if module} | _modules_of_values(values)


def _module_of(value: Any) -> str:
    if isinstance(value, types.ModuleType):
        return value.__name__
    module = getattr(value, "__module__", None)
    return module if isinstance(module, str) else type(value).__module__


def _modules_of_values(values: Iterable[Any]) -> set[str]:
    """The modules of the values' types, and of the items of those that are plain containers."""
    found = set()
    for value in values:
        found.add(type(value).__module__)
        if isinstance(value, (list, tuple, set, frozenset)):
            found |= {type(item).__module__ for item in value}
        elif isinstance(value, dict):
            found |= {type(item).__module__ for item in value.values()}
    return {module.partition(".")[0] for module in found}
