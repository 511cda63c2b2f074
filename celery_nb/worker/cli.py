"""``celery-nb worker``: a Celery worker that runs celery_nb jobs in containers.

Thin over ``celery worker``: any option it does not know is passed to Celery.
"""
from __future__ import annotations

import argparse
import os
import sys

from celery_nb.blobs import blob_store_for
from celery_nb.config import DEFAULT_QUEUE
from celery_nb.jobstore import RedisJobStore
from celery_nb.worker.app import worker_app
from celery_nb.worker.settings import WorkerSettings

WORKER_PATIENCE = 300.0  # s a worker keeps retrying while Redis is away


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="celery-nb",
        description="Run celery_nb jobs in Docker containers. Unknown options go to `celery worker`.")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="start a worker")
    worker.add_argument("--broker", default=os.environ.get("CELERY_NB_BROKER_URL"),
                        help="broker URL, e.g. redis://host:6379/0 (default: $CELERY_NB_BROKER_URL)")
    worker.add_argument("-Q", "--queues", default=DEFAULT_QUEUE,
                        help=f"comma-separated queues to consume (default: {DEFAULT_QUEUE})")
    worker.add_argument("-c", "--concurrency", type=int, default=4,
                        help="jobs (containers) run at once (default: 4)")
    worker.add_argument("-l", "--loglevel", default="INFO")
    worker.add_argument("--help-all", action="store_true",
                        help="list the worker's settings (environment variables) and exit")
    args, celery_args = parser.parse_known_args(argv)
    if args.help_all:
        print(f"{worker.format_help()}\nWorker settings (environment variables on the worker host):\n\n"
              f"{WorkerSettings.env_help()}")
        return 0
    if not args.broker:
        parser.error("no broker: pass --broker redis://HOST:6379/0 or set CELERY_NB_BROKER_URL")
    # a job's events and blobs wait out a Redis restart rather than fail the job
    app = worker_app(args.broker, RedisJobStore(args.broker, patience=WORKER_PATIENCE),
                     blob_store_for(args.broker, patience=WORKER_PATIENCE), broker_patience=WORKER_PATIENCE)
    # Jobs wait on Docker, not on the CPU: threads are enough and start instantly. Gossip and
    # mingle (worker-to-worker chatter at start and on every event) cost every job latency and
    # celery_nb needs neither.
    app.worker_main(["worker", "--pool=threads", f"--concurrency={args.concurrency}",
                     f"--queues={args.queues}", f"--loglevel={args.loglevel}", "--without-gossip",
                     "--without-mingle", *celery_args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
