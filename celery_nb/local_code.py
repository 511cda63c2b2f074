"""The kernel's own modules that a job needs, shipped with it by value.

A module or package is *local* when the kernel finds it outside the standard library and
site-packages/dist-packages: next to the notebook, on a path added to ``sys.path``, an
editable install. A job needs the local modules its cell imports (any import statement in it),
those its values refer to (the modules of the functions and classes cloudpickle pickles by
reference, and module objects: ``ReferenceRecorder`` notes them while the payload is pickled),
those a function imports in its body, and, in turn, those these modules import. Each travels
as a code bundle of its ``.py`` files, stored once in the blob store under its content hash: an
unchanged module is not sent again. The worker fetches a bundle only when it has not got it
yet; the container writes it into the job's directory, first on the job's ``sys.path``, so it
imports as in the kernel.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.machinery
import importlib.util
import io
import os
import site
import sys
import sysconfig
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from celery_nb import analysis
from celery_nb.blobs import BlobStore
from celery_nb.errors import InputError
from celery_nb.options import format_size
from celery_nb_runtime import protocol

SOURCE_CAP = 20 << 20  # bytes of source a job may ship
# in the container already (the runtime brings them), or meaningless there (the kernel's side)
NEVER_SHIPPED = frozenset({"__main__", "celery_nb", "celery_nb_runtime", "cloudpickle"})


@dataclass(frozen=True)
class LocalModule:
    """One top-level module or package of the kernel, packed as a code bundle."""

    name: str
    sizes: tuple[tuple[str, int], ...]  # (file in the kernel, bytes) per source file
    bundle: bytes
    digest: str  # sha256 of the bundle: its name in the blob store
    imports: frozenset[str]  # the top-level modules its files import

    @property
    def size(self) -> int:
        return sum(size for _path, size in self.sizes)


class _RecordingPickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, modules: set[str], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._modules = modules

    def reducer_override(self, obj: Any) -> Any:
        reduced = super().reducer_override(obj)
        # what cloudpickle leaves to pickle's save_global, by module and name: the container imports it
        if reduced is NotImplemented and isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType,
                                                           types.ModuleType)):
            module = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
            if isinstance(module, str):
                self._modules.add(module.partition(".")[0])
        elif isinstance(obj, types.FunctionType):  # sent by value (the notebook's): what it imports when it runs
            self._modules |= analysis.modules_imported_by_code(obj.__code__)
        return reduced


class ReferenceRecorder:
    """``cloudpickle.dumps`` that notes in ``modules`` the top-level modules of what it pickles
    by reference (functions and classes importable from a module, module objects) and those that
    the functions it pickles by value import in their bodies (a function of the notebook's, held
    by another value: a joblib batch, a functools.partial)."""

    def __init__(self) -> None:
        self.modules: set[str] = set()

    def __call__(self, obj: Any, protocol: int | None = None,
                 buffer_callback: Callable[..., Any] | None = None) -> bytes:
        with io.BytesIO() as file:
            _RecordingPickler(file, self.modules, protocol=protocol, buffer_callback=buffer_callback).dump(obj)
            return file.getvalue()


class LocalCode:
    """Finds the local modules a job needs and sends their code bundles where missing. A
    module is packed again only when one of its files changed (size or modification time)."""

    def __init__(self) -> None:
        self._packed: dict[str, tuple[tuple[Any, ...], LocalModule]] = {}  # name -> (files' stat, module)
        self._stored: dict[str, dict[str, Any]] = {}  # digest -> its blob reference

    def for_cell(self, source: str, first_line: int, referenced: Iterable[str]) -> list[LocalModule]:
        """The local modules the cell ``source`` needs, whose inputs ``referenced`` modules (a
        ReferenceRecorder's)."""
        return self._with_imports(analysis.imported_modules(source, first_line) | set(referenced))

    def for_call(self, fn: Callable[..., Any], referenced: Iterable[str]) -> list[LocalModule]:
        """The local modules a call of ``fn`` needs, whose pickle ``referenced`` modules."""
        imported = analysis.modules_imported_by_code(fn.__code__) if isinstance(fn, types.FunctionType) else frozenset()
        return self._with_imports(imported | set(referenced))

    def send(self, modules: Iterable[LocalModule], blobs: BlobStore) -> list[dict[str, Any]]:
        """What a request names the modules by: their code bundles in ``blobs``, stored first
        where missing (never stored, or expired since)."""
        refs = []
        for module in modules:
            ref = self._stored.get(module.digest)
            if ref is None or not blobs.touch(ref):
                ref = self._stored[module.digest] = blobs.put([module.bundle], name=f"code-{module.digest}")
            refs.append({"module": module.name, "digest": module.digest, "ref": ref})
        return refs

    def _with_imports(self, names: Iterable[str]) -> list[LocalModule]:
        """The local modules among ``names`` and those they import in turn, within SOURCE_CAP."""
        found: dict[str, LocalModule] = {}
        seen: set[str] = set()
        pending = list(names)
        while pending:
            name = pending.pop()
            if name in seen or name in NEVER_SHIPPED:
                continue
            seen.add(name)
            module = self._module(name)
            if module is not None:
                found[name] = module
                pending.extend(module.imports)
        modules = sorted(found.values(), key=lambda m: m.name)
        if sum(m.size for m in modules) > SOURCE_CAP:
            raise InputError(_over_cap(modules))
        return modules

    def _module(self, name: str) -> LocalModule | None:
        """Top-level module ``name`` packed, if it is local and has source files."""
        files = _source_files(name)
        if not files:
            return None
        try:
            stats = tuple((path, os.stat(path)) for _in_bundle, path in files)
        except OSError as exc:
            raise InputError(f"local module {name!r} cannot be shipped with the job: {exc}") from None
        key = tuple((path, info.st_size, info.st_mtime_ns) for path, info in stats)
        packed = self._packed.get(name)
        if packed is None or packed[0] != key:
            packed = self._packed[name] = (key, _pack(name, files))
        return packed[1]



@functools.lru_cache(maxsize=1)
def _installed_folders() -> tuple[str, ...]:
    """The standard library's folders and the site-packages ones."""
    paths = sysconfig.get_paths()
    folders = {paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    folders.update(site.getsitepackages())
    folders.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.abspath(folder), "") for folder in folders if folder)


@functools.lru_cache(maxsize=4096)
def _is_local(path: str) -> bool:
    """Whether ``path`` (a module's file or a package's folder) is the user's own code."""
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not os.path.join(path, "").startswith(_installed_folders())


def _spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec the kernel has (or would import) top-level module ``name`` with."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__spec__", None)
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _source_files(name: str) -> list[tuple[str, str]]:
    """(path in the bundle, file in the kernel) of the ``.py`` files of top-level module
    ``name``, if it is local: a package's whole folder, caches and hidden folders left out."""
    spec = _spec(name)
    if spec is None:
        return []
    if spec.submodule_search_locations is None:
        origin = spec.origin
        return [(f"{name}.py", origin)] if origin and origin.endswith(".py") and _is_local(origin) else []
    files = []
    for location in spec.submodule_search_locations:
        if not _is_local(location):
            continue
        for folder, subfolders, names in os.walk(location):
            subfolders[:] = sorted(d for d in subfolders if d != "__pycache__" and not d.startswith("."))
            for file in sorted(names):
                if file.endswith(".py"):
                    path = os.path.join(folder, file)
                    files.append((f"{name}/{os.path.relpath(path, location).replace(os.sep, '/')}", path))
    return files


def _pack(name: str, files: list[tuple[str, str]]) -> LocalModule:
    sources: dict[str, bytes] = {}
    imports: set[str] = set()
    for in_bundle, path in files:
        try:
            with open(path, "rb") as f:
                sources[in_bundle] = f.read()
        except OSError as exc:
            raise InputError(f"local module {name!r} cannot be shipped with the job: {exc}") from None
        try:
            imports |= analysis.modules_imported_by(ast.parse(sources[in_bundle], path))
        except (SyntaxError, ValueError):
            pass  # it cannot be imported in the kernel either; the container will say so if it is
    bundle = b"".join(protocol.code_bundle(sources))
    return LocalModule(name=name, sizes=tuple((path, len(sources[b])) for b, path in files), bundle=bundle,
                       digest=hashlib.sha256(bundle).hexdigest(), imports=frozenset(imports - {name}))


def _over_cap(modules: list[LocalModule]) -> str:
    sizes = sorted((size, path) for module in modules for path, size in module.sizes)[::-1]
    biggest = ", ".join(f"{path} ({format_size(size)})" for size, path in sizes[:5])
    total = sum(size for size, _path in sizes)
    return (f"the local modules this job needs ({', '.join(m.name for m in modules)}) have {format_size(total)} "
            f"of Python source, more than the {format_size(SOURCE_CAP)} a job may ship; the biggest files: "
            f"{biggest}. Move generated code or data out of those folders, or install the package (not "
            f"editable) in the kernel and in the image, so that it is not shipped.")

