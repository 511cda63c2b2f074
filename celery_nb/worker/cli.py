"""``celery-nb``: ``worker`` starts a Celery worker that runs celery_nb jobs in containers (thin
over ``celery worker``: any option it does not know is passed to Celery); ``config`` keeps
settings in the settings file; ``envs`` lists and prunes this host's job environments (--pip).
"""
from __future__ import annotations

import argparse
import os
import sys

from celery_nb.blobs import blob_store_for
from celery_nb.config import DEFAULT_QUEUE, CeleryNB, settings_file, write_setting
from celery_nb.errors import DockerUnavailableError
from celery_nb.jobstore import RedisJobStore
from celery_nb.worker import docker_api, environments
from celery_nb.worker.app import worker_app
from celery_nb.worker.settings import WorkerSettings

WORKER_PATIENCE = 300.0  # s a worker keeps retrying while Redis is away


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="celery-nb", description="Run celery_nb jobs in Docker containers; keep celery_nb's settings.")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="start a worker (options it does not know go to `celery worker`)")
    worker.add_argument("--broker", default=os.environ.get("CELERY_NB_BROKER_URL"),
                        help="broker URL, e.g. redis://host:6379/0 (default: $CELERY_NB_BROKER_URL)")
    worker.add_argument("-Q", "--queues", default=DEFAULT_QUEUE,
                        help=f"comma-separated queues to consume (default: {DEFAULT_QUEUE})")
    worker.add_argument("-c", "--concurrency", type=int, default=4,
                        help="jobs (containers) run at once (default: 4)")
    worker.add_argument("-l", "--loglevel", default="INFO")
    worker.add_argument("--help-all", action="store_true",
                        help="list the worker's settings (environment variables) and exit")
    config = sub.add_parser("config", help="show the settings file, or keep a setting in it")
    config.add_argument("assignments", nargs="*", metavar="SECTION.NAME=VALUE",
                        help="e.g. CeleryNB.default_image=python:3.12-slim or WorkerSettings.pool_size=8")
    envs = sub.add_parser("envs", help="this host's job environments (built for --pip and --requirements)")
    envs.add_argument("action", choices=["list", "prune"],
                      help="list: what each holds, its size, when it was last used, whether a container uses it; "
                           "prune: remove the least recently used beyond CELERY_NB_ENV_CACHE_SIZE and what failed "
                           "builds left behind")
    envs.add_argument("--all", action="store_true",
                      help="prune every environment no container uses, and uv's download cache")
    args, celery_args = parser.parse_known_args(argv)
    if args.command in ("config", "envs") and celery_args:
        parser.error(f"unrecognized arguments: {' '.join(celery_args)}")
    if args.command == "config":
        return _config(args.assignments)
    if args.command == "envs":
        return _envs(args.action, args.all)
    if args.help_all:
        print(f"{worker.format_help()}\nWorker settings (environment variables on the worker host, or the "
              f"WorkerSettings section of {settings_file()}):\n\n{WorkerSettings.env_help()}")
        return 0
    if not args.broker:
        parser.error("no broker: pass --broker redis://HOST:6379/0 or set CELERY_NB_BROKER_URL")
    return _worker(args.broker, args.queues, args.concurrency, args.loglevel, celery_args)


def _worker(broker: str, queues: str, concurrency: int, loglevel: str, celery_args: list[str]) -> int:
    # a job's events and blobs wait out a Redis restart rather than fail the job
    app = worker_app(broker, RedisJobStore(broker, patience=WORKER_PATIENCE),
                     blob_store_for(broker, patience=WORKER_PATIENCE), broker_patience=WORKER_PATIENCE)
    # Jobs wait on Docker, not on the CPU: threads are enough and start instantly. Gossip and
    # mingle (worker-to-worker chatter at start and on every event) cost every job latency and
    # celery_nb needs neither.
    app.worker_main(["worker", "--pool=threads", f"--concurrency={concurrency}", f"--queues={queues}",
                     f"--loglevel={loglevel}", "--without-gossip", "--without-mingle", *celery_args])
    return 0


def _envs(action: str, everything: bool) -> int:
    """``celery-nb envs list|prune``, on this host's Docker."""
    try:
        client = docker_api.connect()
    except DockerUnavailableError as exc:
        print(f"celery-nb envs: {exc}", file=sys.stderr)
        return 1
    if action == "list":
        print(environments.format_environments(environments.list_environments(client, details=True)))
        return 0
    keep = None if everything else WorkerSettings().env_cache_size
    removed = environments.prune(client, keep=keep, download_cache=everything)
    print("\n".join(f"removed {what}" for what in removed) or "nothing to remove")
    return 0


def _config(assignments: list[str]) -> int:
    """``celery-nb config``: print the settings file; with SECTION.NAME=VALUE, keep those first."""
    sections = {cls.__name__: cls for cls in (CeleryNB, WorkerSettings)}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in sections:
            print(f"celery-nb config: {assignment!r} is not SECTION.NAME=VALUE with SECTION one of "
                  f"{', '.join(sections)}", file=sys.stderr)
            return 2
        try:
            write_setting(sections[section], name, raw)
        except ValueError as exc:
            print(f"celery-nb config: {exc}", file=sys.stderr)
            return 2
    path = settings_file()
    print(f"{path}:\n{path.read_text(encoding='utf-8') if path.exists() else '(no settings file)'}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
