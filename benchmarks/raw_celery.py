"""The baseline: plain Celery tasks on the same Redis, with the pickle serializer."""
from __future__ import annotations

import os

import numpy as np
from celery import Celery

BROKER_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
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
