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
from celery_nb.files import Uploads, read_upload
from celery_nb_runtime import protocol


def _pickle_or_raise(writer: protocol.ValueWriter, value: Any, describe: Callable[[Exception], str]) -> list[int]:
    try:
        return writer.add(value)
    except Exception as exc:
        raise InputError(describe(exc)) from exc


def cell_payload(source: str, first_line: int, inputs: Mapping[str, Any],
                 outputs: Sequence[str], outputs_explicit: bool, timed: bool = False, uploads: Uploads | None = None,
                 download: Sequence[str] = (), dumps: Callable[..., bytes] = cloudpickle.dumps) -> list[Any]:
    """The pieces of a cell's payload bundle (bytes-like: the inputs' buffers as they are, not
    joined). ``dumps`` pickles the inputs (e.g. a local_code.ReferenceRecorder)."""
    writer = protocol.ValueWriter(dumps)
    index = {
        name: _pickle_or_raise(writer, value, lambda exc, name=name: (
            f"input variable {name!r} ({type(value).__name__}) cannot be pickled to send it to the "
            f"container: {exc}. Leave it out with --in, or turn it into plain data first."))
        for name, value in inputs.items()
    }
    header = protocol.cell_header(source, first_line, index, list(outputs), outputs_explicit, timed)
    _add_files(writer, header, uploads, download)
    return protocol.pack_bundle(header, writer.sections)


def call_payload(fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], uploads: Uploads | None = None,
                 download: Sequence[str] = (), dumps: Callable[..., bytes] = cloudpickle.dumps) -> list[Any]:
    """The pieces of a call's payload bundle (as cell_payload). ``dumps`` pickles the function and
    its arguments (e.g. a local_code.ReferenceRecorder)."""
    writer = protocol.ValueWriter(dumps)
    name = getattr(fn, "__qualname__", repr(fn))
    arguments = (tuple(map(protocol.out_of_band, args)), {key: protocol.out_of_band(v) for key, v in kwargs.items()})
    call = _pickle_or_raise(writer, (fn, *arguments), lambda exc: (
        f"function {name!r} or its arguments cannot be pickled to send them to the container: {exc}"))
    header = {"v": protocol.PROTOCOL_VERSION, "kind": "call", "call": call,
              "python": list(sys.version_info[:2]), "function": name}
    _add_files(writer, header, uploads, download)
    return protocol.pack_bundle(header, writer.sections)


def _add_files(writer: protocol.ValueWriter, header: dict[str, Any], uploads: Uploads | None,
               download: Sequence[str]) -> None:
    """The job's uploads as sections of its payload, and its download patterns, in ``header``."""
    if uploads is None and not download:
        return
    files: dict[str, Any] = {"download": list(download)}
    if uploads is not None:
        files["folders"] = list(uploads.folders)
        files["upload"] = []
        for upload in uploads.files:
            files["upload"].append([upload.path, len(writer.sections), upload.mode])
            writer.sections.append(read_upload(upload))
    header["files"] = files


def result_files(data: Any) -> list[tuple[str, memoryview]]:
    """The files a job's result brings back (its --download): (path, contents)."""
    header, sections = protocol.unpack_bundle(data)
    return [(path, sections[index]) for path, index in header.get("files", ())]


def load_result(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """Unpickle the outputs of a job: ``(outputs, skipped)``. An output that must land (a function's
    return value, a --out name) and cannot be loaded raises OutputError naming it; any other is
    skipped, and ``skipped`` says for each its type and why (also for those the container could not
    pickle)."""
    header, sections = protocol.unpack_bundle(data)
    skipped = dict(header["skipped"])
    outputs = {}
    for name, indexes in header["outputs"].items():
        try:
            outputs[name] = protocol.load_value(sections, indexes)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if name not in header["required"]:
                skipped[name] = f"{header['types'][name]}: cannot be loaded in the kernel, {reason}"
                continue
            theirs = header.get("versions", {})  # the environment's versions of what its job imported
            table = version_table({module: theirs.get(module) for module in protocol.pickled_modules(sections[indexes[0]])})
            versions = f"\n{table}" if table else ""
            if name == protocol.RETURN_VALUE:
                raise OutputError(
                    f"the function's return value came back from the container but cannot be loaded in the "
                    f"kernel: {reason}. Install the module it needs in the kernel.{versions}") from exc
            raise OutputError(
                f"output variable {name!r} came back from the container but cannot be loaded in the "
                f"kernel: {reason}. Install the module it needs in the kernel, or leave the variable "
                f"out with --out.{versions}") from exc
    return outputs, skipped


def skipped_outputs_note(skipped: Mapping[str, str]) -> str:
    """One line naming the outputs a cell assigned that did not come back, with their types and why."""
    listed = "; ".join(f"{name} ({' '.join(reason.split())})" for name, reason in skipped.items())
    return (f"[celery_nb] not brought back to the kernel: {listed}. The cell's other variables are there; "
            f"assign plain data to bring these back too.")
