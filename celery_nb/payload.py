"""The job payload (kernel -> container) and the result (container -> kernel).

Cells travel as source text, so the image's Python need not match the kernel's; only the
values are pickled (cloudpickle, protocol 5, buffers out-of-band). Each value is pickled
on its own so a failure names the variable.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Sequence

import cloudpickle

from celery_nb.distributions import version_table
from celery_nb.errors import InputError, OutputError
from celery_nb_runtime import protocol


def _pickle_or_raise(writer: protocol.ValueWriter, value: Any, describe: Callable[[Exception], str]) -> list[int]:
    try:
        return writer.add(value)
    except Exception as exc:
        raise InputError(describe(exc)) from exc


def cell_payload(source: str, first_line: int, inputs: Mapping[str, Any],
                 outputs: Sequence[str], outputs_explicit: bool) -> bytes:
    writer = protocol.ValueWriter(cloudpickle.dumps)
    index = {
        name: _pickle_or_raise(writer, value, lambda exc, name=name: (
            f"input variable {name!r} ({type(value).__name__}) cannot be pickled to send it to the "
            f"container: {exc}. Leave it out with --in, or turn it into plain data first."))
        for name, value in inputs.items()
    }
    header = protocol.cell_header(source, first_line, index, list(outputs), outputs_explicit)
    return b"".join(protocol.pack_bundle(header, writer.sections))


def call_payload(fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> bytes:
    writer = protocol.ValueWriter(cloudpickle.dumps)
    name = getattr(fn, "__qualname__", repr(fn))
    call = _pickle_or_raise(writer, (fn, args, dict(kwargs)), lambda exc: (
        f"function {name!r} or its arguments cannot be pickled to send them to the container: {exc}"))
    header = {"v": protocol.PROTOCOL_VERSION, "kind": "call", "call": call,
              "python": list(sys.version_info[:2]), "function": name}
    return b"".join(protocol.pack_bundle(header, writer.sections))


def load_result(data: bytes) -> dict[str, Any]:
    """Unpickle the outputs of a job; a failure names the variable."""
    header, sections = protocol.unpack_bundle(data)
    outputs = {}
    for name, indexes in header["outputs"].items():
        try:
            outputs[name] = protocol.load_value(sections, indexes)
        except Exception as exc:
            theirs = header.get("versions", {})  # the environment's versions of what its job imported
            modules = protocol.pickled_modules(sections[indexes[0]])
            table = version_table({module: theirs.get(module) for module in modules})
            raise OutputError(
                f"output variable {name!r} came back from the container but cannot be loaded in the "
                f"kernel: {type(exc).__name__}: {exc}. Install the module it needs in the kernel, or "
                f"leave the variable out with --out." + (f"\n{table}" if table else "")) from exc
    return outputs
