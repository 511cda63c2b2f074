"""The runtime's bootstrap: a container's command is ``python3 -c BOOTSTRAP <sources>``, which
imports celery_nb_runtime (and cloudpickle) from the sources in its argv. Nothing is written
into the image and no put_archive is needed: any image with python3 runs it.
"""
from __future__ import annotations

import base64
import functools
import json
import os
import zlib

import cloudpickle

import celery_nb_runtime

# Runs in the container: import the runtime (and cloudpickle) from the sources in argv[1], then
# serve jobs ("serve") or run exactly one ("one-shot"). Only cheap stdlib modules here: importlib.abc
# and base64 would add ~20 ms to every cold start.
_BOOTSTRAP = """\
import binascii, importlib.machinery, json, sys, zlib
sources = json.loads(zlib.decompress(binascii.a2b_base64(sys.argv.pop(1))))
class SourceImporter:
    def find_spec(self, name, path, target=None):
        stem = name.replace(".", "/")
        for filename in (stem + "/__init__.py", stem + ".py"):
            if filename in sources:
                spec = importlib.machinery.ModuleSpec(
                    name, self, origin="/celery_nb/" + filename, is_package=filename.endswith("__init__.py"))
                spec.has_location = True
                return spec
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        source = sources[module.__spec__.origin[len("/celery_nb/"):]]
        exec(compile(source, module.__spec__.origin, "exec"), module.__dict__)
sys.meta_path.insert(0, SourceImporter())
from celery_nb_runtime.runner import serve
sys.exit(serve(one_shot=sys.argv[1] == "one-shot"))
"""


@functools.lru_cache(maxsize=1)
def _packed_sources() -> str:
    """The sources of celery_nb_runtime and cloudpickle, compressed for the command line."""
    sources = {}
    for package in (celery_nb_runtime, cloudpickle):
        folder = os.path.dirname(package.__file__)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    sources[f"{package.__name__}/{name}"] = f.read()
    return base64.b64encode(zlib.compress(json.dumps(sources).encode(), 9)).decode("ascii")


def runtime_command(one_shot: bool) -> list[str]:
    """python3 -c BOOTSTRAP <packed sources> serve|one-shot. A one-shot runtime (a --fresh
    container) skips what only pays off over many jobs and exits after its job."""
    return ["python3", "-u", "-c", _BOOTSTRAP, _packed_sources(), "one-shot" if one_shot else "serve"]
