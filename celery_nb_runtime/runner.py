"""Runs one job inside the container: ``python3 -u -m celery_nb_runtime PAYLOAD_FILE``.

fd 1 is kept for frames only; the job's fd 1 and 2 (and so any subprocess it starts) are
pipes whose bytes are relayed as log frames. The last frame is the result or the error.
"""
from __future__ import annotations

import builtins
import importlib.abc
import json
import linecache
import os
import sys
import threading
import traceback
from typing import Any, Dict, List, Optional

import celery_nb_runtime
from celery_nb_runtime import protocol

CELL_FILENAME = "<cell>"
_READ_CHUNK = 65536


class JobFailed(Exception):
    """A failure to report as an ERROR frame: kind is one of input/output/version/remote."""

    def __init__(self, kind: str, message: str, exc: Optional[BaseException] = None,
                 tb_text: Optional[str] = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.exc_type = type(exc).__name__ if exc is not None else None
        self.tb_text = tb_text

    def as_json(self) -> Dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "exc_type": self.exc_type,
                "traceback": self.tb_text}


class FrameWriter:
    """Writes whole frames to a file descriptor; safe to share between threads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def write(self, kind: int, *pieces: Any) -> None:
        size = sum(memoryview(p).nbytes for p in pieces)
        with self._lock:
            for piece in (protocol.frame_header(kind, size), *pieces):
                view = memoryview(piece).cast("B")
                while view.nbytes:
                    written = os.write(self._fd, view)
                    view = view[written:]

    def event(self, obj: Dict[str, Any]) -> None:
        self.write(protocol.FRAME_EVENT, json.dumps(obj, separators=(",", ":")).encode())


class OutputCapture:
    """Points fd 1 and 2 at pipes and relays what arrives as STDOUT/STDERR frames."""

    def __init__(self, frames: FrameWriter) -> None:
        self._frames = frames
        self._threads: List[threading.Thread] = []

    def start(self) -> None:
        for fd, kind in ((1, protocol.FRAME_STDOUT), (2, protocol.FRAME_STDERR)):
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            thread = threading.Thread(target=self._relay, args=(read_end, kind), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _relay(self, read_end: int, kind: int) -> None:
        while True:
            chunk = os.read(read_end, _READ_CHUNK)
            if not chunk:
                break
            self._frames.write(kind, chunk)
        os.close(read_end)

    def stop(self, grace: float = 1.0) -> None:
        """Flush and close our ends; wait briefly so all output precedes the final frame.

        A background subprocess that inherited the pipes may keep them open: we do not
        wait for it beyond ``grace``.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        for thread in self._threads:
            thread.join(grace)


class _TqdmMirror(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """When the job imports tqdm, patch its bars to also send progress events.

    Done lazily at import time so jobs that never use tqdm pay nothing.
    """

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib API
        if fullname != "tqdm.std":
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001
            original_exec(module)
            _patch_tqdm(module.tqdm)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _patch_tqdm(tqdm_cls: Any) -> None:
    original_display = tqdm_cls.display
    original_close = tqdm_cls.close

    def reporter(bar: Any) -> celery_nb_runtime.ProgressReporter:
        rep = bar.__dict__.get("_celery_nb_reporter")
        if rep is None:
            rep = celery_nb_runtime.ProgressReporter(bar.total, bar.desc or None)
            bar.__dict__["_celery_nb_reporter"] = rep
        rep.total = bar.total
        return rep

    def display(self, *args, **kwargs):  # noqa: ANN001, ANN202
        reporter(self).update(self.n)
        return original_display(self, *args, **kwargs)

    def close(self):  # noqa: ANN001, ANN202
        if not getattr(self, "disable", False):
            reporter(self).update(self.n, force=True)
        return original_close(self)

    tqdm_cls.display = display
    tqdm_cls.close = close


def _format_remote_traceback(exc: BaseException) -> str:
    """The traceback from the first frame of the job's own code (runner frames dropped)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _load_inputs(header: Dict[str, Any], sections: List[memoryview]) -> Dict[str, Any]:
    namespace: Dict[str, Any] = {}
    for name, indexes in header.get("inputs", {}).items():
        try:
            namespace[name] = protocol.load_value(sections, indexes)
        except Exception as exc:
            raise JobFailed("input", "input variable %r could not be loaded in the container: %s: %s"
                            % (name, type(exc).__name__, exc), exc) from None
    return namespace


def _run_cell(header: Dict[str, Any], sections: List[memoryview]) -> Dict[str, Any]:
    # Pad with blank lines for what precedes the cell body (the magic line) so that line
    # numbers in tracebacks match the notebook editor.
    source = "\n" * (header["first_line"] - 1) + header["source"]
    linecache.cache[CELL_FILENAME] = (len(source), None, source.splitlines(True), CELL_FILENAME)
    code = compile(source, CELL_FILENAME, "exec")
    namespace = _load_inputs(header, sections)
    namespace.update({"__name__": "__main__", "__builtins__": builtins})
    try:
        exec(code, namespace)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from the cell are failures too
        raise JobFailed("remote", "%s: %s" % (type(exc).__name__, exc), exc,
                        _format_remote_traceback(exc)) from None
    wanted: List[str] = header["outputs"]
    if header.get("outputs_explicit"):
        missing = [name for name in wanted if name not in namespace]
        if missing:
            raise JobFailed("output", "--out names %s, but the cell never assigned %s"
                            % (", ".join(missing), "it" if len(missing) == 1 else "them"))
    return {name: namespace[name] for name in wanted if name in namespace}


def _run_call(header: Dict[str, Any], sections: List[memoryview]) -> Dict[str, Any]:
    kernel_python = tuple(header["python"][:2])
    if kernel_python != sys.version_info[:2]:
        raise JobFailed(
            "version",
            "functions travel with cloudpickle, which needs the same Python minor version in the "
            "kernel and the image: the kernel runs Python %d.%d, this image runs Python %d.%d. "
            "Use an image with Python %d.%d, or run the code as a %%%%celery_docker cell (cells "
            "travel as source and work with any Python 3.9+)." % (kernel_python + sys.version_info[:2] + kernel_python))
    try:
        fn, args, kwargs = protocol.load_value(sections, header["call"])
    except Exception as exc:
        raise JobFailed("input", "the function or its arguments could not be loaded in the container: "
                        "%s: %s" % (type(exc).__name__, exc), exc) from None
    try:
        return {"return": fn(*args, **kwargs)}
    except BaseException as exc:
        raise JobFailed("remote", "%s: %s" % (type(exc).__name__, exc), exc,
                        _format_remote_traceback(exc)) from None


def _encode_result(outputs: Dict[str, Any]) -> List[Any]:
    import cloudpickle  # copied into the container next to this package

    writer = protocol.ValueWriter(cloudpickle.dumps)
    index = {}
    for name, value in outputs.items():
        try:
            index[name] = writer.add(value)
        except Exception as exc:
            raise JobFailed("output", "output variable %r cannot be pickled to send it back: %s: %s"
                            % (name, type(exc).__name__, exc), exc) from None
    return protocol.pack_bundle({"outputs": index}, writer.sections)


def main(argv: List[str]) -> int:
    frames = FrameWriter(os.dup(1))
    capture = OutputCapture(frames)
    capture.start()
    celery_nb_runtime._emit_event = frames.event
    sys.meta_path.insert(0, _TqdmMirror())
    try:
        with open(argv[1], "rb") as f:
            data = f.read()
        os.unlink(argv[1])
        header, sections = protocol.unpack_bundle(data)
        run = _run_cell if header["kind"] == "cell" else _run_call
        result = _encode_result(run(header, sections))
    except JobFailed as failure:
        capture.stop()
        frames.write(protocol.FRAME_ERROR, json.dumps(failure.as_json()).encode())
        return 0
    capture.stop()
    frames.write(protocol.FRAME_RESULT, *result)
    return 0
