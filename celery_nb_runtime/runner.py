"""The container's main process: a fork server that runs jobs in forked children.

The worker writes REQUEST frames to the container's stdin. A forked child waits for each: it
runs the job, so modules the server imported are warm while the job's globals, threads and
subprocesses die with it; the server then writes an END frame saying how the child ended and
forks the next. A child whose job had a process key and left the process as it found it stays
for the next job of that key (END says it is kept): the worker sends it only those, and a
RETIRE frame before any other. A one-shot server (a --fresh container) runs a single job.

fd 1 carries frames only; a job's fd 1 and 2 (and so any subprocess it starts) are pipes
whose bytes are relayed as log frames. A job's last frame is its RESULT or ERROR.
"""
from __future__ import annotations

import builtins
import json
import linecache
import gc
import mmap
import os
import pickle
import re
import resource
import select
import signal
import struct
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import celery_nb_runtime
from celery_nb_runtime import cell, events, protocol, rich_output, versions, workdir

CELL_BUILTINS = tuple(cell.BUILTINS)  # names every cell has, unless the kernel sends a variable of that name
FILE_THRESHOLD = 1 << 20  # results from this size go into a file the worker hands over, where it does
_HANDOVER_TIMEOUT = 120.0  # s a job's process waits for a file it asked for
_READ_CHUNK = 65536
_MEMORY_SAMPLE_INTERVAL = 0.01  # s between two looks at the container's memory while a job runs
_JOINED = 1 << 16  # bytes of frames written at once (the rest piece by piece, never copied)
_EXIT_POLL_INTERVAL = 0.01  # s between two looks for a job's end, where no pidfd tells it
_SHARED = struct.Struct("Q")  # between the server and a job's process: the peak the job added


class JobFailed(Exception):
    """A failure to report as an ERROR frame: kind is one of input/output/version/remote."""

    def __init__(self, kind: str, message: str, exc: Optional[BaseException] = None,
                 tb_text: Optional[str] = None, **details: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.exc_type = type(exc).__name__ if exc is not None else None
        # where the kernel finds the class, to raise an error that is an instance of it
        self.exc_module = type(exc).__module__ if exc is not None else None
        self.exc_qualname = type(exc).__qualname__ if exc is not None else None
        self.tb_text = tb_text
        self.details = details  # "packages": {module: version here}, "python": [3, 9]: for the kernel's table

    def as_json(self) -> Dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "exc_type": self.exc_type,
                "exc_module": self.exc_module, "exc_qualname": self.exc_qualname, "traceback": self.tb_text,
                **self.details}


def _packages_of(sections: List[memoryview], indexes: List[int]) -> Dict[str, Optional[str]]:
    """The packages a pickled value that did not load refers to, with their versions here."""
    return versions.installed_versions(protocol.pickled_modules(sections[indexes[0]]))


class FrameWriter:
    """Writes whole frames to a file descriptor; safe to share between threads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd

    def write(self, kind: int, *pieces: Any) -> None:
        self.write_frames([(kind, pieces)])

    def write_frames(self, frames: List[Tuple[int, Sequence[Any]]]) -> None:
        """Frames (kind, pieces) in order: up to _JOINED bytes in one write, so that their reader
        wakes once for them (a write per piece cost the server a relay round each)."""
        parts: List[Any] = []
        for kind, pieces in frames:
            parts.append(protocol.frame_header(kind, sum(memoryview(p).nbytes for p in pieces)))
            parts.extend(pieces)
        if sum(memoryview(p).nbytes for p in parts) <= _JOINED:
            parts = [b"".join(parts)]
        with self._lock:
            for part in parts:
                _write_all(self._fd, part)

    def write_raw(self, data: Any) -> None:
        """Bytes that are already (part of) a frame."""
        with self._lock:
            _write_all(self._fd, data)

    def event(self, obj: Dict[str, Any]) -> None:
        self.write(protocol.FRAME_EVENT, json.dumps(obj, separators=(",", ":")).encode())


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        view = view[os.write(fd, view):]


class _JobImports:
    """The job's imports, as the import system finds them: the top-level modules it imports
    (whose versions go with its result), and these modules patched once loaded: tqdm's bars
    also send progress events, pyplot's show() and IPython's display() send display events.

    Done at import time so jobs that never use them pay nothing (looking through sys.modules
    after the job would touch, and so copy, a page of the server's memory for each module).
    """

    def __init__(self) -> None:
        self.top_level: List[str] = []
        self._patches = {"tqdm.std": lambda module: _patch_tqdm(module.tqdm),
                         "matplotlib.pyplot": rich_output.patch_pyplot,
                         "IPython.core.display_functions": rich_output.patch_ipython_display,
                         "IPython.core.display": rich_output.patch_ipython_display,
                         "IPython.display": rich_output.patch_ipython_display}

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib API
        if path is None:
            self.top_level.append(fullname)
        patch = self._patches.pop(fullname, None)
        if patch is None:
            return None
        import importlib.util
        sys.meta_path.remove(self)  # find the module's own spec
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001
            original_exec(module)
            patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_job_imports = _JobImports()  # installed in the job's process (_prepare_child)


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
    """The traceback of the job's own code, also of chained exceptions: the runtime's frames
    (the runner's, %time's) dropped, and those of the event loop that ran the cell."""
    report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    parts = [report]
    while parts:
        part = parts.pop()
        frames = [frame for frame in part.stack if frame.filename not in (__file__, cell.__file__)]
        while frames and cell.is_event_loop_file(frames[0].filename):  # before the cell's first frame
            del frames[0]
        part.stack = traceback.StackSummary.from_list(frames)
        parts += [chained for chained in (part.__cause__, part.__context__) if chained is not None]
    return "".join(report.format())


def _load_inputs(header: Dict[str, Any], sections: List[memoryview]) -> Dict[str, Any]:
    namespace: Dict[str, Any] = {}
    for name, indexes in header.get("inputs", {}).items():
        try:
            namespace[name] = protocol.load_value(sections, indexes)
        except Exception as exc:
            raise JobFailed("input", "input variable %r could not be loaded in the container: %s: %s"
                            % (name, type(exc).__name__, exc), exc,
                            packages=_packages_of(sections, indexes)) from None
    return namespace


def _run_cell(header: Dict[str, Any], sections: List[memoryview]) -> Dict[str, Any]:
    # Pad with blank lines for what precedes the cell body (the magic line) so that line
    # numbers in tracebacks match the notebook editor.
    source = "\n" * (header["first_line"] - 1) + header["source"]
    linecache.cache[protocol.CELL_FILENAME] = (len(source), None, source.splitlines(True), protocol.CELL_FILENAME)
    namespace = dict(cell.BUILTINS)
    namespace.update(_load_inputs(header, sections))
    namespace.update({"__name__": "__main__", "__builtins__": builtins})
    try:
        cell.run_cell(source, protocol.CELL_FILENAME, namespace, timed=header.get("timed", False))
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
            "travel as source and work with any Python 3.9+)." % (kernel_python + sys.version_info[:2] + kernel_python),
            python=list(sys.version_info[:2]))
    try:
        fn, args, kwargs = protocol.load_value(sections, header["call"])
    except Exception as exc:
        raise JobFailed("input", "the function or its arguments could not be loaded in the container: "
                        "%s: %s" % (type(exc).__name__, exc), exc,
                        packages=_packages_of(sections, header["call"])) from None
    try:
        return {protocol.RETURN_VALUE: fn(*args, **kwargs)}
    except BaseException as exc:
        raise JobFailed("remote", "%s: %s" % (type(exc).__name__, exc), exc,
                        _format_remote_traceback(exc)) from None


def _dumps(value: Any, protocol: int, buffer_callback: Callable[[pickle.PickleBuffer], None]) -> bytes:
    """Plain pickle where it works (as cloudpickle would for importable things), cloudpickle for
    what only it can pickle (functions and classes the job defined): a cold container then
    never imports cloudpickle for plain results."""
    buffers: List[pickle.PickleBuffer] = []  # handed on only from the pickling that succeeds
    try:
        stream = pickle.dumps(value, protocol=protocol, buffer_callback=buffers.append)
    except Exception:
        import cloudpickle  # copied into the container next to this package

        buffers.clear()
        stream = cloudpickle.dumps(value, protocol=protocol, buffer_callback=buffers.append)
    for buffer in buffers:
        buffer_callback(buffer)
    return stream


def _required_outputs(header: Dict[str, Any]) -> List[str]:
    """The outputs that fail the job if they cannot travel: a function's return value and a cell's
    --out names. Other outputs a cell assigned are skipped (and named) instead."""
    if header["kind"] != "cell":
        return [protocol.RETURN_VALUE]
    return list(header["outputs"]) if header.get("outputs_explicit") else []


def _encode_result(outputs: Dict[str, Any], required: List[str], files: List[Tuple[str, Any]]) -> List[Any]:
    """The result bundle: the outputs, pickled (those not ``required`` that cannot be are skipped
    and named), and ``files`` (path, contents) the job downloads."""
    writer = protocol.ValueWriter(_dumps)
    index, skipped = {}, {}
    for name, value in outputs.items():
        try:
            index[name] = writer.add(value)
        except Exception as exc:
            if name not in required:
                skipped[name] = "%s: %s" % (type(value).__name__, exc)
                continue
            if name == protocol.RETURN_VALUE:
                what, advice = "the function's return value", "return plain data (a list rather than a generator, say)"
            else:
                what, advice = "output variable %r" % name, "leave it out of --out, or assign it plain data"
            raise JobFailed("output", "%s (%s) cannot be pickled to send it back: %s: %s; %s"
                            % (what, type(value).__name__, type(exc).__name__, exc, advice), exc) from None
    header: Dict[str, Any] = {"outputs": index, "required": required, "skipped": skipped,
                              "types": {name: type(outputs[name]).__name__ for name in index},
                              "versions": versions.loaded_versions(_job_imports.top_level)}
    if files:
        header["files"] = [[path, len(writer.sections) + i] for i, (path, _data) in enumerate(files)]
    return protocol.pack_bundle(header, writer.sections + [data for _path, data in files])


def _prepare_child(frames: FrameWriter) -> None:
    """What the job's process needs whatever the job, done before its request arrives."""
    os.setsid()  # its own process group, so the server can kill whatever the job left running
    os.environ["MPLBACKEND"] = "Agg"  # figures are drawn to PNG and shown in the notebook (the job's env may differ)
    events.sink = frames.event
    sys.meta_path.insert(0, _job_imports)


class _JobProcess:
    """A forked process that runs jobs: its first request's, and then, as long as each job leaves
    it as it found it, the next jobs of the same process key (the worker's: one kernel's jobs with
    the same env and local modules). Modules a job imported stay imported for the next, as in an
    ipyparallel engine or a Dask worker; a job with no key, a failed one, or one that leaves a
    thread, a process, a timer, a tracer or profiler, changed environment variables, sys.path or
    sys.stdout behind ends the process, and the next job gets a new one."""

    def __init__(self, frames: FrameWriter, status_w: int, next_r: int, memory: _JobMemory) -> None:
        self._frames = frames
        self._status_w = status_w  # to the server: _STARTED
        self._next_r = next_r  # from the server: each job's directory once made, then a kept process's requests
        self._memory = memory
        self._key: Optional[str] = None  # of its jobs
        self._jobs_run = 0
        self._stdio = (sys.stdout, sys.stderr)
        self._peak: Optional[_PeakMemory] = None  # once it may run a second job

    def serve(self, requests_fd: int) -> int:
        """Run the request that comes on the worker's channel ``requests_fd``, and those the server
        hands on while the process stays; returns its exit code."""
        _prepare_child(self._frames)
        message = _next_request(requests_fd)
        # the job reads nothing from the worker's channel (the next job's request)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, requests_fd)
        os.close(devnull)
        if message is None:
            return _EXIT_NO_MORE_REQUESTS
        job_dir: Optional[workdir.JobDirectory] = None
        name = _read_exactly(self._next_r, workdir.NAME_SIZE)
        kind, request = message
        if kind == protocol.FRAME_RETIRE or name is None:
            return _EXIT_RETIRED
        os.write(self._status_w, _STARTED)  # (the server knows when it hands on a request)
        while True:
            job_dir = workdir.JobDirectory(name.decode(), code=None if job_dir is None else job_dir.code)
            if not self._run(memoryview(request), job_dir):
                return 0
            self._jobs_run += 1
            name = _read_exactly(self._next_r, workdir.NAME_SIZE)  # made while it waits for its request
            message = None if name is None else _next_request(self._next_r)
            if message is None:  # the worker retired it
                return _EXIT_RETIRED
            request = message[1]  # (a REQUEST: the server reads a RETIRE itself)

    def _run(self, request: memoryview, job_dir: workdir.JobDirectory) -> bool:
        """The job, in ``job_dir``, with fd 1/2 the log pipes; whether the process stays (its last
        frames then say so to the server)."""
        usage = None if self._peak is None else _JobUsage(self._peak)  # (a first job's are its process's)
        outer, (payload, *code) = protocol.unpack_bundle(request)
        kept_for, self._key = self._key, outer.get("process")
        os.environ.update(outer["env"])
        environ, path = None, None
        try:
            if self._jobs_run and self._key != kept_for:  # (the worker sends a kept process only its key's jobs)
                raise JobFailed("container", "celery_nb's worker sent this job to a process kept for other jobs, "
                                             "so it did not run; run it again, and please report this as a bug")
            if outer.get("payload_file"):
                payload = _payload_from_worker(self._frames)
            header, sections = protocol.unpack_bundle(payload)
            job_dir.enter(header, sections, code)
            environ, path = dict(os.environ), list(sys.path)  # as the job found them
            run = _run_cell if header["kind"] == "cell" else _run_call
            try:
                outputs = run(header, sections)
            finally:  # the figures a job drew are shown, as in Jupyter, also when it failed
                rich_output.send_figures()
            downloads = job_dir.downloads(header)
            result = _encode_result(outputs, _required_outputs(header), downloads.files)
            downloads.announce()
            kind: int = protocol.FRAME_RESULT
        except JobFailed as failure:
            kind, result = protocol.FRAME_ERROR, [json.dumps(failure.as_json()).encode()]
        except workdir.WorkdirError as failure:  # its uploads could not be written, or its downloads read
            kind, result = protocol.FRAME_ERROR, [json.dumps(JobFailed(failure.kind, str(failure)).as_json()).encode()]
        sys.stdout.flush()
        sys.stderr.flush()  # the job's output is in the pipes before its last frame
        if "asyncio" in sys.modules:  # a loop it set (asyncio.run, a cell's await) is not the next job's
            sys.modules["asyncio"].set_event_loop_policy(None)
        size = sum(memoryview(piece).nbytes for piece in result)
        if (kind == protocol.FRAME_RESULT and outer.get("files") and size >= FILE_THRESHOLD
                and _result_to_worker(self._frames, result, size)):
            kind, result = protocol.FRAME_RESULT_FILE, [json.dumps({"size": size}).encode()]
        stays = (self._key is not None and kind != protocol.FRAME_ERROR
                 and (sys.stdout, sys.stderr) == self._stdio and dict(os.environ) == environ and sys.path == path
                 and threading.active_count() == 1 and signal.getitimer(signal.ITIMER_REAL)[0] == 0
                 and sys.gettrace() is None and sys.getprofile() is None
                 and _alone_with_server() and self._measures_each_job())
        added = self._memory.peak()
        used = usage.used(added) if usage is not None else _usage(
            [resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)], added)
        self._frames.write_frames([(protocol.FRAME_USAGE, [json.dumps(used).encode()]), (kind, result)]
                                  + ([(protocol.FRAME_KEPT, [])] if stays else []))
        return stays

    def _measures_each_job(self) -> bool:
        """Whether this process can tell a next job's peak memory from its earlier jobs'."""
        if self._peak is None:
            self._peak = _PeakMemory()
        return self._peak.resets


def _alone_with_server() -> bool:
    """Whether no process but this one and the server is left in the container (a job's
    subprocess, or one it left running, would be)."""
    ours = (str(os.getpid()), str(os.getppid()))
    return all(name in ours for name in os.listdir("/proc") if name.isdigit())


def _file_from_worker(frames: FrameWriter, wanted: Dict[str, Any]) -> Optional[int]:
    """Ask the worker for a file (a FILE_WANTED frame) and receive its descriptor on a unix socket
    this process listens on in the container's /dev/shm (None: the worker has none to give). Only
    a process outside the container, whose pid is 0 here, can be the worker: others are ignored."""
    import socket  # (as in _worker_channel: not in a one-shot container's start)

    path = os.path.join(protocol.SHARED_DIR, "celery_nb-%s.sock" % os.urandom(16).hex())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(4)
        listener.settimeout(_HANDOVER_TIMEOUT)
        frames.write(protocol.FRAME_FILE_WANTED, json.dumps(dict(wanted, socket=path, pid=os.getpid())).encode())
        while True:
            connection, _address = listener.accept()
            with connection:
                credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                if struct.unpack("3i", credentials)[0] != 0:
                    continue  # a process of this container
                _message, fds, _flags, _address = socket.recv_fds(connection, 1, 1, socket.MSG_CMSG_CLOEXEC)
                return fds[0] if fds else None
    finally:
        listener.close()
        if os.path.exists(path):
            os.unlink(path)


def _payload_from_worker(frames: FrameWriter) -> mmap.mmap:
    """The job's payload, handed over by the worker as a file: mapped, not read. Privately, so
    the values loaded from it in place are writable (a page is copied when written)."""
    try:
        fd = _file_from_worker(frames, {"for": "payload"})
    except OSError as exc:
        raise JobFailed("input", "the job's payload did not arrive from the worker: %s" % exc) from None
    if fd is None:
        raise JobFailed("input", "the worker handed over no payload for the job")
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _result_to_worker(frames: FrameWriter, result: List[Any], size: int) -> bool:
    """Write the result bundle into a file the worker hands over (allocated by the worker, so the
    result does not count against this container's memory once the job has ended); False if it
    gives none, and the result goes through the frame stream."""
    try:
        fd = _file_from_worker(frames, {"for": "result", "size": size})
    except OSError:
        return False
    if fd is None:
        return False
    try:
        protocol.write_pieces(fd, result)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _usage(rusages: List[Any], added: int) -> Dict[str, Any]:
    """What a job's process that has ended used, from its rusage (with the subprocesses it waited
    for): their CPU time, and as peak memory the largest process's high-water mark (ru_maxrss,
    KiB) or what its processes side by side ``added`` to the container, whichever is more."""
    return {"cpu_seconds": round(sum(r.ru_utime + r.ru_stime for r in rusages), 3),
            "peak_memory": max(max(r.ru_maxrss for r in rusages) * 1024, added)}


class _PeakMemory:
    """This process's resident high-water mark (VmHWM), set back to what it holds now at each job's
    start (/proc/self/clear_refs), so that a process that runs several jobs reports each one's
    own peak. Where the kernel refuses (``resets`` False) the process runs one job only."""

    def __init__(self) -> None:
        try:
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
            self._status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
            self.resets = True
        except OSError:
            self.resets = False

    def reset(self) -> None:
        if self.resets:
            try:
                os.write(self._clear, b"5")  # 5: the peak RSS only (see proc(5))
            except OSError:
                self.resets = False

    def high_water(self) -> int:
        """The high-water mark since the last reset (or the start)."""
        status = os.pread(self._status, 4096, 0) if self.resets else b""
        found = re.search(rb"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
        return int(found.group(1)) * 1024 if found else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _JobUsage:
    """What a job uses in a process that ran earlier jobs, from its start: its CPU time and that
    of the subprocesses it waited for, and as peak memory its process's high-water mark, or a
    subprocess's (those of earlier jobs are kept apart as far as rusage allows: one that peaked no
    higher than an earlier job's is seen in what the job ``added``), or what its processes side by
    side added to the container, whichever is more."""

    def __init__(self, peak: _PeakMemory) -> None:
        self._peak = peak
        peak.reset()
        self._start = [resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)]

    def used(self, added: int) -> Dict[str, Any]:
        now = [resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)]
        cpu = sum(end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime for start, end in zip(self._start, now))
        children = now[1].ru_maxrss if now[1].ru_maxrss > self._start[1].ru_maxrss else 0
        return {"cpu_seconds": round(cpu, 3), "peak_memory": max(self._peak.high_water(), children * 1024, added)}


class _CgroupCounter:
    """A figure of this container's cgroup (v2 or v1; 0 if unknown): the sum of the numbers that
    ``pattern`` matches in the first of ``files`` that opens.

    The file stays open and is read into one buffer: the kernel allocates the buffer of a read
    of it (charged to the container) when the file is first read, not at every look, and no
    Python file object is made per look (its pages, shared with the job's process, would be
    copied at each job). A look while the job held all of its --memory limit had the OOM
    killer, which had just killed the job, kill the server too, and so the container before it
    could report the job."""

    def __init__(self, files: Sequence[str], pattern: bytes) -> None:
        self._fd = -1
        for path in files:
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            break
        self._pattern = re.compile(pattern, re.MULTILINE)
        self._buffer = bytearray(1 << 16)

    def value(self) -> int:
        if self._fd < 0:
            return 0
        try:
            size = os.preadv(self._fd, [self._buffer], 0)
        except OSError:
            return 0
        return sum(int(value) for value in self._pattern.findall(self._buffer, 0, size))


def _memory_in_use() -> _CgroupCounter:
    """Bytes of anonymous and shared (tmpfs) memory in this container's memory cgroup: what its
    processes hold, without the page cache the kernel may reclaim."""
    return _CgroupCounter(("/sys/fs/cgroup/memory.stat", "/sys/fs/cgroup/memory/memory.stat"),
                          rb"^(?:anon|rss|shmem) (\d+)$")  # (cgroup v2 says anon, v1 rss)


def _oom_kills() -> _CgroupCounter:
    """How often the kernel's OOM killer struck in this container's memory cgroup."""
    return _CgroupCounter(("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"),
                          rb"^oom_kill (\d+)$")


class _JobMemory:
    """How much a job's processes together added to the container's memory: sampled by the
    server while the job runs, every _MEMORY_SAMPLE_INTERVAL from its start (a job that ends
    sooner costs no sample), and read by the job's process when it reports its usage. (The
    kernel's high-water mark is per process: a job's subprocesses running side by side add up.)"""

    def __init__(self) -> None:
        self._shared = mmap.mmap(-1, _SHARED.size)  # anonymous and shared with the forked job's process
        self._in_use = _memory_in_use()
        self._baseline = 0
        self._next_sample: Optional[float] = None  # (monotonic) once the job runs

    def start(self) -> None:
        """In the server, once the job's process is forked and before it may start: what the
        container holds without the job, read as a sample reads it. The pages a sample writes
        are shared with the job's process until written, and the first write to each copies it:
        copied now, the server's later samples seldom need a page, which they could not get while
        the job holds all of its --memory limit (the OOM killer, having killed the job, then
        killed the server too, and so the container before it could report the job)."""
        self._next_sample = None
        _SHARED.pack_into(self._shared, 0, 0)
        self._baseline = self._in_use.value()
        self._note(self._baseline)

    def running(self) -> None:
        """In the server, once the job's process has its request (a process waiting in an idle
        container costs no reads)."""
        self._next_sample = time.monotonic() + _MEMORY_SAMPLE_INTERVAL

    def sample_in(self) -> Optional[float]:
        """Seconds until the next sample is due (None: none is, the job is not running)."""
        return None if self._next_sample is None else max(0.0, self._next_sample - time.monotonic())

    def sample(self) -> None:
        if self._next_sample is not None and time.monotonic() >= self._next_sample:
            self._next_sample = time.monotonic() + _MEMORY_SAMPLE_INTERVAL
            self._note(self._in_use.value())

    def _note(self, in_use: int) -> None:
        peak, = _SHARED.unpack_from(self._shared)
        _SHARED.pack_into(self._shared, 0, max(peak, in_use - self._baseline))

    def peak(self) -> int:
        return _SHARED.unpack_from(self._shared)[0]


_STARTED = b"s"  # a job's process to the server: its first job's request has come


class _ChildRelay:
    """The server's side of one job's process: relays its output pipes as log frames and its
    frame pipe verbatim, never splitting a frame, so all of a job's output precedes its last frame.
    What one read brought goes on in one write (the worker wakes once for a job's last frames
    and, when its process stays, the END that says so).

    It also watches the request channel (``requests_fd``) for the worker hanging up: the
    worker died (or dropped the container), so nobody will hear of the job again, and another
    worker may run it; the job is killed at once (``orphaned``). While the process stays for the
    next job of its key, the server reads that job's request there and hands it on (``next_w``,
    which also tells the process each job's directory): the process never holds the channel
    while a job runs, so nothing a job leaves behind reads another's request. It waits for
    something to happen, not in turns: output, frames (the last of a job whose process stays
    says so: FRAME_KEPT), its first job's start on its status pipe, its exit (a pidfd), a
    request or a hang-up, or a memory sample due."""

    def __init__(self, frames: FrameWriter, pid: int, stdout_r: int, stderr_r: int, frames_r: int,
                 requests_fd: int, status_r: int, next_w: int, memory: _JobMemory) -> None:
        self._frames = frames
        self._pid = pid
        self._memory = memory
        self._logs = {stdout_r: protocol.FRAME_STDOUT, stderr_r: protocol.FRAME_STDERR}
        self._frames_r = frames_r
        self._status_r = status_r
        self._next_w = next_w
        self._requests_fd = requests_fd
        self._kept = False  # the process waits for the next request of its key, which the server hands on
        self._stays = False  # its job's last frames said it stays (FRAME_KEPT): END is to follow them
        self._out: List[Any] = []  # frame bytes to write to the worker, in order
        self._out_size = 0
        self._frame_left = 0  # bytes of the child's current frame still to relay
        self._head = b""  # a partial frame header from the child
        self._poll = select.poll()
        for fd in (stdout_r, stderr_r, frames_r, status_r):
            self._poll.register(fd, select.POLLIN)
        self._poll.register(requests_fd, 0)  # hang-ups only: a request waiting there is not read
        self._exit_fd = _exit_descriptor(pid)
        if self._exit_fd is not None:
            self._poll.register(self._exit_fd, select.POLLIN)
        self.orphaned = False
        for fd in (stdout_r, stderr_r, frames_r):
            os.set_blocking(fd, False)

    def _close(self, fd: int) -> None:
        self._poll.unregister(fd)
        os.close(fd)

    def next_job(self, job_dir: workdir.JobDirectory) -> None:
        """Tell the process its next job's directory, made; then it may start the job."""
        try:
            os.write(self._next_w, job_dir.name.encode())
        except BrokenPipeError:
            pass  # it has ended already: no request came, or it died

    def keep(self, end: bytes) -> None:
        """The process stays for the next job of its key: the END frame ``end`` goes to the worker
        in one write with the job's last frames, and the next request is to be handed on."""
        self._stays = False
        self._queue(protocol.frame_header(protocol.FRAME_END, len(end)), end)
        self._flush()
        self._kept = True
        self._poll.modify(self._requests_fd, select.POLLIN)

    def _queue(self, *pieces: Any) -> None:
        """Frame bytes for the worker, written by _flush (at once, past _JOINED bytes: a job's
        output piles up in the server no further)."""
        self._out.extend(pieces)
        self._out_size += sum(memoryview(piece).nbytes for piece in pieces)
        if self._out_size > _JOINED:
            self._flush()

    def _flush(self) -> None:
        if self._out:
            self._frames.write_raw(b"".join(self._out) if len(self._out) > 1 else self._out[0])
            self._out, self._out_size = [], 0

    def _hand_on_request(self) -> None:
        """The worker's next frame, to the kept process: a REQUEST is copied to it; a RETIRE
        ends it (end of file), and leaves the request that follows for the next process."""
        self._kept = False
        self._poll.modify(self._requests_fd, 0)
        header = _read_exactly(self._requests_fd, protocol.FRAME_HEADER_SIZE)
        if header is None:  # the worker hung up
            self.orphaned = True
            _kill_group(self._pid)
            return
        left = protocol.frame_size(header)
        if header[len(protocol.FRAME_MAGIC)] == protocol.FRAME_RETIRE:
            os.close(self._next_w)
            self._next_w = -1
            return
        self._memory.running()
        piece: Any = header
        while True:
            try:
                _write_all(self._next_w, piece)
            except BrokenPipeError:
                pass  # it died meanwhile (its END says so): the rest of the request is read all the same
            if not left:
                return
            piece = os.read(self._requests_fd, min(left, _READ_CHUNK))
            if not piece:
                return  # the worker hung up: seen at the next poll
            left -= len(piece)

    def _drain_logs(self) -> None:
        for fd, kind in list(self._logs.items()):
            while True:
                try:
                    chunk = os.read(fd, _READ_CHUNK)
                except BlockingIOError:
                    break
                if not chunk:
                    self._close(fd)
                    del self._logs[fd]
                    break
                self._queue(protocol.frame_header(kind, len(chunk)), chunk)

    def _read_frames(self) -> None:
        """Relay what the frame pipe holds now (the job's last frames, when its process stays,
        wait for the END that keep adds)."""
        try:
            chunk = os.read(self._frames_r, _READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            self._close(self._frames_r)
            self._frames_r = -1
        else:
            self._relay_frames(chunk)
        if not self._stays:
            self._flush()

    def _relay_frames(self, chunk: bytes) -> None:
        """Queue the child's frame bytes as they came, but a KEPT frame (the server's: the job's
        process stays); log output is drained in between frames only."""
        view = memoryview(chunk)
        start = pos = 0  # bytes before ``start`` are queued
        while pos < view.nbytes:
            if self._frame_left == 0:
                if not self._head:  # a frame boundary
                    if pos > start:
                        self._queue(view[start:pos])
                        start = pos
                    self._drain_logs()  # what the child printed before this frame goes first
                piece = view[pos:pos + protocol.FRAME_HEADER_SIZE - len(self._head)]
                self._head += bytes(piece)
                pos += piece.nbytes
                if len(self._head) < protocol.FRAME_HEADER_SIZE:
                    return  # the rest of the header comes with the next chunk
                self._frame_left = protocol.frame_size(self._head)
                if self._head[len(protocol.FRAME_MAGIC)] == protocol.FRAME_KEPT:
                    self._stays = True
                    start = pos
                elif pos - start != protocol.FRAME_HEADER_SIZE:  # the header began in an earlier chunk
                    self._queue(self._head)
                    start = pos
                self._head = b""
                continue
            take = min(self._frame_left, view.nbytes - pos)
            self._frame_left -= take
            pos += take
        if pos > start:
            self._queue(view[start:pos])

    def _wait_ms(self, deadline: Optional[float]) -> int:
        """How long to wait for the next event: until a memory sample or the deadline is due;
        without a pidfd, _EXIT_POLL_INTERVAL at the most (the job's end is then looked for)."""
        waits = [self._memory.sample_in(), None if deadline is None else deadline - time.monotonic(),
                 _EXIT_POLL_INTERVAL if self._exit_fd is None else None]
        due = [wait for wait in waits if wait is not None]
        return -1 if not due else max(0, int(min(due) * 1000 + 0.999))

    def run(self) -> Optional[Tuple[int, Any]]:
        """Relay until the job ends: None if its process stays for the next job (``run`` relays
        that one too), else, once the process has exited and its pipes are closed, its wait status
        and rusage (with the subprocesses it waited for). The job's memory is sampled meanwhile."""
        status = rusage = None
        deadline = None
        while self._logs or self._frames_r >= 0:
            events = dict(self._poll.poll(self._wait_ms(deadline)))
            ready = events.keys()
            between_frames = self._frame_left == 0 and not self._head
            if self._frames_r in ready:
                self._read_frames()
                if self._stays:  # (its last frames wait for keep's END)
                    return None
            elif ready & self._logs.keys() and between_frames:
                self._drain_logs()
                self._flush()
            if self._status_r >= 0 and self._status_r in ready:
                said = os.read(self._status_r, 64)
                if not said:  # the process has ended
                    self._close(self._status_r)
                    self._status_r = -1
                if _STARTED in said:
                    self._memory.running()
            if self._kept and events.get(self._requests_fd, 0) & select.POLLIN:
                self._hand_on_request()
            elif self._requests_fd in ready and not self.orphaned:
                self.orphaned = True
                self._poll.unregister(self._requests_fd)
                _kill_group(self._pid)
            if status is None and (self._exit_fd is None or self._exit_fd in ready):
                done, status, rusage = os.wait4(self._pid, os.WNOHANG)
                if done:
                    _kill_group(self._pid)  # background processes the job started
                    deadline = time.monotonic() + 1.0
                    if self._exit_fd is not None:
                        self._close(self._exit_fd)
                        self._exit_fd = None
                else:
                    status = None
            self._memory.sample()
            if deadline is not None and time.monotonic() > deadline:
                break  # something outside the job's process group holds a pipe open
        for fd in [*self._logs, self._frames_r, self._status_r, self._next_w, self._exit_fd]:
            if fd is not None and fd >= 0:
                os.close(fd)
        if status is None:
            _pid, status, rusage = os.wait4(self._pid, 0)
        return status, rusage


def _exit_descriptor(pid: int) -> Optional[int]:
    """A pidfd of child ``pid``, readable once it has exited (None where the kernel, or the
    container's seccomp profile, has none: the relay then looks every _EXIT_POLL_INTERVAL)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _kill_group(pid: int) -> None:
    """Kill the process group of job process ``pid``: the job and whatever it started."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass  # gone already


def _read_exactly(fd: int, size: int) -> Optional[bytearray]:
    """``size`` bytes from ``fd``, read into one buffer (None at end of file)."""
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        read = os.readv(fd, [view[got:]])
        if not read:
            return None
        got += read
    return data


def _next_request(fd: int) -> Optional[Tuple[int, bytearray]]:
    """Read exactly one frame from the worker, REQUEST or RETIRE, as (kind, body) (never more:
    the next may belong to the next process); None at end of file."""
    header = _read_exactly(fd, protocol.FRAME_HEADER_SIZE)
    body = None if header is None else _read_exactly(fd, protocol.frame_size(header))
    return None if header is None or body is None else (header[len(protocol.FRAME_MAGIC)], body)


_EXIT_NO_MORE_REQUESTS = 99
_EXIT_RETIRED = 98  # a kept process the worker retired: the next request is a new process's


def _worker_channel(stdin: int) -> Optional[int]:
    """The worker's connection to protocol.SERVER_SOCKET, if it connects within
    SERVER_SOCKET_WAIT s and before a request comes on ``stdin`` (None: requests come on stdin,
    frames go to stdout). The socket is gone before any job runs. A byte says the connection is
    taken: a worker connecting as the wait ends may otherwise not know."""
    import socket  # (not in one-shot containers: ~3 ms of their start)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            listener.bind(protocol.SERVER_SOCKET)
        except OSError:  # no /dev/shm to listen in: stdin it is
            return None
        listener.listen(1)
        ready, _, _ = select.select([listener, stdin], [], [], protocol.SERVER_SOCKET_WAIT)
        if listener not in ready:
            return None
        connection, _address = listener.accept()
        connection.sendall(b".")
        # stdin is no channel any more: a job reading it gets end of file, as with requests there
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, stdin)
        os.close(devnull)
        return connection.detach()
    finally:
        listener.close()
        try:
            os.unlink(protocol.SERVER_SOCKET)
        except OSError:
            pass


def serve(requests_fd: int = 0, one_shot: bool = False) -> int:
    """Keep one forked child on standby: it takes the next request from the worker's
    channel (stdin, or the connection of _worker_channel), runs it and exits, or stays for the
    next job of its key (_JobProcess); this process relays its output, reports how each job
    ended, and forks the next child once one has ended.

    ``one_shot``: a container for a single job, so nothing is prepared for later jobs; after the
    job the server waits for stdin to close, keeping the container there until the worker is
    done with it.
    """
    channel = None if one_shot else _worker_channel(requests_fd)
    if channel is None:
        frames = FrameWriter(os.dup(1))
    else:  # (a job's process reads it through a descriptor of its own, as stdin)
        frames, requests_fd = FrameWriter(channel), channel
    if not one_shot:
        import cloudpickle  # noqa: F401  (imported once here, warm in every job)

        gc.freeze()  # objects that exist now are never touched by the children's GC: fewer copy-on-write faults
    memory = _JobMemory()
    previous: Optional[workdir.JobDirectory] = None
    oom_counter = _oom_kills()
    oom_kills = oom_counter.value()  # so far: a job's END says how many struck while it ran
    while True:
        job_dir = workdir.JobDirectory()  # the next job's
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        frames_r, frames_w = os.pipe()
        status_r, status_w = os.pipe()  # _STARTED
        next_r, next_w = os.pipe()  # each job's directory, once made
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                for fd in (stdout_r, stderr_r, frames_r, status_r, next_w):
                    os.close(fd)
                if frames.fileno() != requests_fd:  # the server's frames to the worker are not the job's to write
                    os.close(frames.fileno())
                os.dup2(stdout_w, 1)
                os.dup2(stderr_w, 2)
                os.close(stdout_w)
                os.close(stderr_w)
                code = _JobProcess(FrameWriter(frames_w), status_w, next_r, memory).serve(requests_fd)
            except BaseException:  # a bug here must still end the job, not the server
                traceback.print_exc()
            finally:
                os._exit(code)
        for fd in (stdout_w, stderr_w, frames_w, status_w, next_r):
            os.close(fd)
        relay = _ChildRelay(frames, pid, stdout_r, stderr_r, frames_r, requests_fd, status_r, next_w, memory)
        while True:  # the process's jobs
            memory.start()
            job_dir.make(previous)  # while the job's process waits for its request (then it may start)
            previous = job_dir
            relay.next_job(job_dir)
            ended = relay.run()
            if ended is not None:
                break
            job_dir = job_dir.for_next_job()
            oom_kills, before = oom_counter.value(), oom_kills
            relay.keep(json.dumps({"kept": True, "oom_kills": oom_kills - before}).encode())
        status, rusage = ended
        while True:  # we are PID 1: reap whatever was reparented to us
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        exited = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if relay.orphaned or exited == _EXIT_NO_MORE_REQUESTS:
            return 0
        if exited == _EXIT_RETIRED:
            continue  # (no END: the next process runs the request that follows)
        oom_kills, before = oom_counter.value(), oom_kills
        frames.write(protocol.FRAME_END, json.dumps({
            "exit": exited,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "oom_kills": oom_kills - before,
            "usage": _usage([rusage], memory.peak()),
        }).encode())
        if one_shot:
            job_dir.remove()
            while os.read(requests_fd, _READ_CHUNK):
                pass
            return 0
