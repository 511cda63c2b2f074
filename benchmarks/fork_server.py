"""Runs in a container: the least a warm container must do to run each call in a fresh process.

The baseline "raw Celery + container" of benchmarks/run.py: a plain Celery task hands its value to
this server over a unix socket and returns the reply. For each connection (a Celery worker
thread) a process keeps one forked child on standby, which reads the next request, unpickles and
pickles it back, replies and exits, as celery_nb's runtime does per job, without the job's
output, events, limits, working directory, usage or code. Standard library only.

    python3 fork_server.py SOCKET_PATH [MODULE ...]

MODULEs are imported first (and the heap frozen for the garbage collector), as celery_nb's
server imports cloudpickle and its runtime: what these alone cost every forked process.
"""
import gc
import importlib
import os
import pickle
import socket
import struct
import sys

HEADER = struct.Struct("!I")


def read_exactly(conn: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = conn.recv(size)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def ask(conn: socket.socket, value: object) -> object:
    """The caller's side, on a connection to this server: ``value`` sent, its reply returned."""
    request = pickle.dumps(value)
    conn.sendall(HEADER.pack(len(request)) + request)
    (size,) = HEADER.unpack(read_exactly(conn, HEADER.size))
    return pickle.loads(read_exactly(conn, size))


def _answer_one(conn: socket.socket) -> None:
    try:
        (size,) = HEADER.unpack(read_exactly(conn, HEADER.size))
        reply = pickle.dumps(pickle.loads(read_exactly(conn, size)))
        conn.sendall(HEADER.pack(len(reply)) + reply)
        code = 0
    except EOFError:  # the connection closed: no more requests
        code = 1
    os._exit(code)


def _serve_connection(conn: socket.socket) -> None:
    while True:
        pid = os.fork()
        if pid == 0:
            _answer_one(conn)
        if os.waitpid(pid, 0)[1] != 0:
            os._exit(0)


def main(path: str, preload: list[str]) -> None:
    for module in preload:
        importlib.import_module(module)
    if preload:
        gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # appears once it listens
    listener.listen(64)
    while True:
        conn, _address = listener.accept()
        if os.fork() == 0:
            listener.close()
            _serve_connection(conn)
        conn.close()
        while True:  # reap the connections' processes that ended
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
