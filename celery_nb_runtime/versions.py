"""The versions of the packages a job's environment holds, in the container: sent along with a
value that does not load, and with every result, so that the kernel can put them next to its
own versions when a value fails to load on either side (celery_nb.distributions.version_table).

Stdlib only and Python 3.9 compatible, like the rest of the runtime.
"""
from __future__ import annotations

import sys
from typing import Dict, Iterable, Optional


def installed_versions(modules: Iterable[str]) -> Dict[str, Optional[str]]:
    """Top-level module -> the version of the distribution that installed it here (None: none did)."""
    import importlib.metadata  # only when a value failed to load

    try:
        providers = importlib.metadata.packages_distributions()
    except AttributeError:  # Python 3.9: guess the distribution named like the module
        providers = {}
    versions: Dict[str, Optional[str]] = {}
    for module in modules:
        versions[module] = None
        for name in providers.get(module, [module]):
            try:
                versions[module] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def loaded_versions(modules: Iterable[str]) -> Dict[str, str]:
    """The ``__version__`` of every installed package (not the standard library) among the
    top-level ``modules`` the job imported: what its results can refer to. Cheap: no metadata
    is read."""
    versions = {}
    for name in modules:
        module = sys.modules.get(name)
        if module is None:  # it did not import after all
            continue
        path = getattr(module, "__file__", None) or ""
        if "site-packages" in path or "dist-packages" in path:
            version = getattr(module, "__version__", None)
            if isinstance(version, str):
                versions[name] = version
    return versions
