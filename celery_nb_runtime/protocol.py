"""Wire formats shared by the kernel, the worker and the container runtime.

Stdlib only and Python 3.9 compatible: this module is copied into arbitrary images.

Bundle: a JSON header plus binary sections, used for the job payload (kernel -> container)
and the result (container -> kernel). Values are pickled with protocol 5; large buffers
(numpy arrays, bytes) travel out-of-band as their own sections, so they are never copied
into an intermediate pickle stream and can be loaded zero-copy from a memoryview.

Frames: the container's real stdout carries only frames (the cell's own fd 1/2 go to pipes
that the runtime wraps into log frames), so the worker can demultiplex logs, progress,
errors and the result from one byte stream. Requests reach the container's stdin as frames too
(or, from a worker on the container's host, the server's own socket: SERVER_SOCKET).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

PROTOCOL_VERSION = 1
PICKLE_PROTOCOL = 5
CELL_FILENAME = "<cell>"  # a cell's code object's filename, in tracebacks (kernel and container alike)
RETURN_VALUE = "return"  # a function's return value among a result's outputs (no variable has that name)

_BUNDLE_MAGIC = b"CNB\x02"
_BUNDLE_HEAD = struct.Struct(">4sII")  # magic, header length, section count
_SECTION_LEN = struct.Struct(">Q")
# sections start at multiples of this from the bundle's start (zero bytes between), so that the
# arrays loaded in place from a bundle that starts aligned (a mapped file, a fetched blob) are aligned
_SECTION_ALIGN = 64

FRAME_MAGIC = b"CNBF"
_FRAME_HEAD = struct.Struct(">4sBQ")  # magic, kind, body length
FRAME_STDOUT = 1
FRAME_STDERR = 2
FRAME_EVENT = 3  # JSON: progress, display, ...
FRAME_RESULT = 4  # bundle
FRAME_ERROR = 5  # JSON: {"kind", "message", "exc_type", "traceback"}
# JSON: how the job's process ended {"exit", "signal", "oom_kills", "usage"}, or {"kept": true, "oom_kills"}:
# it stays for the next job of the same process key; the server is ready again
FRAME_END = 6
# worker -> container (stdin, or the server's socket): bundle {"env", "files", "payload_file", "process"}
# + [job payload, code bundles...]; "process": the job may run in the process kept by an earlier job
# of this key (its kernel's, with the same env and modules), and its own process may be kept
FRAME_REQUEST = 7
FRAME_RESULT_FILE = 8  # JSON {"size"}: the result bundle, written into the file the worker handed over
FRAME_USAGE = 9  # JSON {"cpu_seconds", "peak_memory"}: what the job used, just before its RESULT or ERROR
# JSON {"for": "payload" or "result", "size" (a result's), "socket", "pid"}: the job's process asks the
# worker for a file, to be handed over on the unix socket it listens on (a path in the container)
FRAME_FILE_WANTED = 10
FRAME_RETIRE = 11  # worker -> container, empty, before a REQUEST: the kept process ends, a new one takes it
# a job's process -> its server only, empty, right after its job's last frame (in the same write): the
# process stays for the next job of its key; the server sends END {"kept": true} with those frames
FRAME_KEPT = 12
FRAME_KINDS = (FRAME_STDOUT, FRAME_STDERR, FRAME_EVENT, FRAME_RESULT, FRAME_ERROR, FRAME_END, FRAME_REQUEST,
               FRAME_RESULT_FILE, FRAME_USAGE, FRAME_FILE_WANTED, FRAME_RETIRE, FRAME_KEPT)
OUT_OF_BAND_MIN = 1 << 16  # bytes and bytearrays from this size travel as out-of-band buffers

# The container's folder that a worker on its host reaches through /proc/<pid>/root: the server's
# socket and those that jobs' processes take files on (FRAME_FILE_WANTED) are there.
SHARED_DIR = "/dev/shm"
# A pooled container's server listens here, for SERVER_SOCKET_WAIT s at its start, for its worker to
# connect through /proc/<pid>/root (a worker on the container's host): then requests and frames go
# over that connection instead of stdin and stdout, which Docker relays (the "attach" stream); a
# request on stdin, or none within the wait, keeps them there.
SERVER_SOCKET = SHARED_DIR + "/celery_nb-server.sock"
SERVER_SOCKET_WAIT = 2.0


class ProtocolError(ValueError):
    """Bytes that are not a valid bundle or frame stream."""


Buffer = Any  # bytes, bytearray, memoryview or pickle.PickleBuffer


def pack_bundle(header: Dict[str, Any], sections: List[Buffer]) -> List[Buffer]:
    """Return the pieces of a bundle; write them in order (or b"".join them)."""
    head_json = json.dumps(header, separators=(",", ":")).encode("utf-8")
    sizes = [memoryview(s).nbytes for s in sections]
    pieces: List[Buffer] = [_BUNDLE_HEAD.pack(_BUNDLE_MAGIC, len(head_json), len(sections)), head_json]
    pieces.extend(_SECTION_LEN.pack(size) for size in sizes)
    pos = _BUNDLE_HEAD.size + len(head_json) + len(sections) * _SECTION_LEN.size
    for section, size in zip(sections, sizes):
        padding = -pos % _SECTION_ALIGN
        if padding:
            pieces.append(bytes(padding))
        pieces.append(section)
        pos += padding + size
    return pieces


def cell_header(source: str, first_line: int, inputs: Dict[str, List[int]], outputs: List[str],
                outputs_explicit: bool, timed: bool = False) -> Dict[str, Any]:
    """The header of a cell's payload bundle (its sections: the pickled inputs). ``timed``: the
    cell began with ``%%time``."""
    return {"v": PROTOCOL_VERSION, "kind": "cell", "source": source, "first_line": first_line, "inputs": inputs,
            "outputs": list(outputs), "outputs_explicit": outputs_explicit, "timed": timed,
            "python": list(sys.version_info[:2])}


def pack_request(payload: Optional[Buffer], env: Dict[str, str], files: bool, code: Sequence[Buffer] = (),
                 process: Optional[str] = None) -> bytes:
    """The body of a REQUEST frame: the job's environment, its payload bundle (None: the job's
    process asks the worker for it as a file), the code bundles of the kernel's local modules it
    needs, whether the worker hands over ``files`` (a big result goes into one it gives), and the
    key of the ``process`` it may share with jobs of that key (None: a process of its own)."""
    header = {"env": env, "files": files, "payload_file": payload is None, "process": process}
    return b"".join(pack_bundle(header, [b"" if payload is None else payload, *code]))


def write_pieces(fd: int, pieces: Sequence[Buffer]) -> None:
    """Write the concatenation of ``pieces`` to file descriptor ``fd`` (gathered, not joined)."""
    views = [memoryview(piece).cast("B") for piece in pieces]
    views = [view for view in views if view.nbytes]
    while views:
        written = os.writev(fd, views[:1024])  # IOV_MAX
        while views and written >= views[0].nbytes:
            written -= views.pop(0).nbytes
        if written:
            views[0] = views[0][written:]


class _OutOfBand:
    """Pickles as the bytes or bytearray it holds, whose contents travel as an out-of-band buffer
    (pickle copies those of bytes into the stream, and picklers cannot be told otherwise)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        return type(self.value), (pickle.PickleBuffer(self.value),)


def out_of_band(value: Any) -> Any:
    """``value``, or what pickles as it with its contents out-of-band: a big bytes or bytearray
    (loaded with one copy instead of two)."""
    return _OutOfBand(value) if type(value) in (bytes, bytearray) and len(value) >= OUT_OF_BAND_MIN else value


def code_bundle(files: Dict[str, Buffer]) -> List[Buffer]:
    """The pieces of a code bundle: one module or package of the kernel, as source files by their
    path relative to the folder it was imported from (e.g. "mylib/__init__.py")."""
    paths = sorted(files)
    return pack_bundle({"files": [[path, i] for i, path in enumerate(paths)]}, [files[path] for path in paths])


def unpack_bundle(data: Buffer) -> Tuple[Dict[str, Any], List[memoryview]]:
    """Split a bundle into its header and zero-copy section views."""
    view = memoryview(data).cast("B")
    if view.nbytes < _BUNDLE_HEAD.size:
        raise ProtocolError("bundle is truncated (%d bytes)" % view.nbytes)
    magic, head_len, count = _BUNDLE_HEAD.unpack_from(view, 0)
    if magic != _BUNDLE_MAGIC:
        raise ProtocolError("not a celery_nb bundle (magic %r)" % bytes(magic))
    pos = _BUNDLE_HEAD.size
    lengths_end = pos + head_len + count * _SECTION_LEN.size
    if lengths_end > view.nbytes:
        raise ProtocolError("bundle header is truncated")
    try:
        header = json.loads(bytes(view[pos:pos + head_len]).decode("utf-8"))
    except ValueError as exc:
        raise ProtocolError("bundle header is not JSON: %s" % exc) from None
    if not isinstance(header, dict):
        raise ProtocolError("bundle header is not a JSON object")
    pos += head_len
    lengths = [_SECTION_LEN.unpack_from(view, pos + i * _SECTION_LEN.size)[0] for i in range(count)]
    pos = lengths_end
    sections = []
    for length in lengths:
        pos += -pos % _SECTION_ALIGN
        if pos + length > view.nbytes:
            raise ProtocolError("bundle section is truncated")
        sections.append(view[pos:pos + length])
        pos += length
    return header, sections


class ValueWriter:
    """Pickles named values into bundle sections, buffers out-of-band."""

    def __init__(self, dumps: Callable[..., bytes]) -> None:
        self._dumps = dumps
        self.sections: List[Buffer] = []

    def add(self, value: Any) -> List[int]:
        """Pickle one value; return the indexes of its sections (pickle stream first)."""
        buffers: List[pickle.PickleBuffer] = []
        stream = self._dumps(out_of_band(value), protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
        first = len(self.sections)
        self.sections.append(stream)
        for buf in buffers:
            self.sections.append(buf.raw())
        return list(range(first, len(self.sections)))


_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def pickled_modules(stream: Buffer) -> List[str]:
    """The top-level modules a pickle stream imports from (its GLOBAL and STACK_GLOBAL opcodes):
    the packages a value needs, to name them when it does not load. Best effort: a module
    named only through the memo is still found where the stream first names it."""
    import pickletools  # only when a value failed to load

    modules = set()
    memo: Dict[int, Optional[str]] = {}
    pushed: List[Optional[str]] = [None, None]  # the last two strings pushed (None: something else)
    try:
        for opcode, arg, _position in pickletools.genops(bytes(stream)):
            if opcode.name == "GLOBAL":
                modules.add(str(arg).split(" ")[0])
            elif opcode.name == "STACK_GLOBAL" and pushed[0]:
                modules.add(pushed[0])
            if opcode.name == "MEMOIZE":
                memo[len(memo)] = pushed[1]
            elif opcode.name in _MEMO_PUTS:
                memo[arg] = pushed[1]
            elif opcode.name in _STRING_OPS or opcode.name in _MEMO_GETS:
                pushed = [pushed[1], arg if opcode.name in _STRING_OPS else memo.get(arg)]
            else:
                pushed = [pushed[1], None]
    except Exception:  # a truncated or corrupt stream: what was found so far
        pass
    return sorted({module.split(".")[0] for module in modules if isinstance(module, str)})


def load_value(sections: List[memoryview], indexes: List[int]) -> Any:
    """Inverse of ValueWriter.add: out-of-band buffers are used in place, not copied."""
    stream, *buffers = (sections[i] for i in indexes)
    return pickle.loads(stream, buffers=buffers)


FRAME_HEADER_SIZE = _FRAME_HEAD.size


def frame_header(kind: int, size: int) -> bytes:
    return _FRAME_HEAD.pack(FRAME_MAGIC, kind, size)


def frame_size(header: bytes) -> int:
    """Body length from a frame header (validated)."""
    magic, kind, size = _FRAME_HEAD.unpack(header)
    if magic != FRAME_MAGIC or kind not in FRAME_KINDS:
        raise ProtocolError("not a frame header: %r" % header)
    return size


class FrameDecoder:
    """Incremental decoder: feed() arbitrary chunks, get complete (kind, body) frames."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need: Optional[Tuple[int, int]] = None  # (kind, length) of the frame being read

    def feed(self, chunk: bytes) -> Iterable[Tuple[int, bytes]]:
        self._buf += chunk
        frames = []
        while True:
            if self._need is None:
                if len(self._buf) < _FRAME_HEAD.size:
                    break
                magic, kind, length = _FRAME_HEAD.unpack_from(self._buf, 0)
                if magic != FRAME_MAGIC or kind not in FRAME_KINDS:
                    raise ProtocolError(
                        "unexpected bytes on the runtime's frame channel: %r" % bytes(self._buf[:40]))
                del self._buf[:_FRAME_HEAD.size]
                self._need = (kind, length)
            kind, length = self._need
            if len(self._buf) < length:
                break
            body = bytes(self._buf[:length])
            del self._buf[:length]
            self._need = None
            frames.append((kind, body))
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered (non-zero at EOF means truncation)."""
        return len(self._buf) + (_FRAME_HEAD.size if self._need else 0)
