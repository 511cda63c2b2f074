"""The baseline: plain Celery tasks on the same Redis, with the pickle serializer."""
from __future__ import annotations

import os
import socket
import threading

import numpy as np
from celery import Celery

from benchmarks.fork_server import ask

BROKER_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
FORK_SERVER_SOCKET = os.environ.get("BENCH_FORK_SERVER_SOCKET", "")  # of benchmarks/fork_server.py in a container
app = Celery("raw_celery", broker=BROKER_URL, backend=BROKER_URL)
app.conf.update(task_serializer="pickle", result_serializer="pickle", accept_content=["pickle", "json"],
                worker_prefetch_multiplier=1)


@app.task
def echo(value: object) -> object:
    return value


@app.task
def ones(nbytes: int) -> np.ndarray:
    return np.ones(nbytes // 8)


@app.task
def size_of(data: bytes) -> int:
    return len(data)


_connection = threading.local()  # each worker thread's own, to the fork server


@app.task
def echo_in_container(value: object) -> object:
    """echo, run in a fresh process of a warm container (benchmarks/fork_server.py)."""
    conn = getattr(_connection, "socket", None)
    if conn is None:
        conn = _connection.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(FORK_SERVER_SOCKET)
    return ask(conn, value)
