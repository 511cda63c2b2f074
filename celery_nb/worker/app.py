"""A worker's Celery app: the shared app (celery_nb.broker) plus the task that runs jobs, the
warm pool, the policy, the leases and the signal handlers that look after them. Kernels on a
broker never build this; the embedded worker does.
"""
from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.signals import celeryd_after_setup, task_revoked, worker_shutdown
from celery.worker.control import inspect_command

from celery_nb.blobs import BlobStore
from celery_nb.broker import TASK_NAME, celery_app
from celery_nb.jobstore import DEFAULT_PATIENCE, JobStore, RedisJobStore
from celery_nb.signing import Signer
from celery_nb.worker.codecache import CodeCache
from celery_nb.worker.environments import Environments
from celery_nb.worker.leases import BrokerMessages, LeaseKeeper
from celery_nb.worker.policy import WorkerPolicy
from celery_nb.worker.pool import ContainerPool
from celery_nb.worker.presence import WorkerPresence
from celery_nb.worker.settings import WorkerSettings
from celery_nb.worker.tasks import WorkerServices, report_revoked, run_job

WORKER_SLOTS_COMMAND = "celery_nb_slots"


@inspect_command(name=WORKER_SLOTS_COMMAND)
def worker_slots(state: Any) -> dict[str, Any]:
    """A worker's answer to a kernel that asks how many jobs the workers run at once
    (Client.worker_slots; joblib's n_jobs=-1): its concurrency, and the queues it takes jobs from."""
    consumer = state.consumer
    queues = consumer.task_consumer.queues if consumer.task_consumer else ()
    return {"concurrency": consumer.pool.num_processes, "queues": sorted(queue.name for queue in queues)}


def worker_app(broker_url: str | None, store: JobStore, blobs: BlobStore, settings: WorkerSettings | None = None,
               worker_name: str | None = None, signer: Signer | None = None,
               broker_patience: float = DEFAULT_PATIENCE) -> Celery:
    """A Celery app on ``broker_url`` (None: the embedded worker's memory transport) whose
    workers run celery_nb jobs.

    ``worker_name`` is what jobs report as their worker (default: the Celery node name).
    ``broker_patience``: seconds its broker commands retry while Redis is away.
    ``app.celery_nb_pool`` is the worker's warm container pool.
    """
    settings = settings or WorkerSettings()
    app = celery_app(broker_url, broker_patience)
    pool = ContainerPool(worker_name or "", settings)
    policy = WorkerPolicy.from_settings(settings)
    leases = LeaseKeeper(store, BrokerMessages(app) if broker_url else None, after_takeover=pool.remove_orphans)
    services = WorkerServices(store, blobs, policy, pool, signer or Signer(), leases, CodeCache(blobs),
                              Environments(settings, policy), acks_with_finish=app.celery_nb_redis_queues)
    app.celery_nb_pool = pool

    @app.task(name=TASK_NAME, bind=True, shared=False)  # per app: each has its own store
    def run(task: Task, request: dict[str, Any]) -> dict[str, Any]:
        delivery_tag = (task.request.properties or {}).get("delivery_tag")
        return run_job(request, services, worker=worker_name or task.request.hostname, delivery_tag=delivery_tag)

    _connect_signals(app, services, worker_name)
    return app


def _connect_signals(app: Celery, services: WorkerServices, worker_name: str | None) -> None:
    """Cancelled queued jobs are reported, the pool is named, swept and emptied with the worker,
    the worker takes over the jobs of dead workers from its start, and tells kernels of itself."""
    pool = services.pool
    presence: list[WorkerPresence] = []  # once it runs

    @task_revoked.connect(weak=False)
    def _report_revoked(sender: Any, request: Any, **_kwargs: Any) -> None:
        if getattr(sender, "name", None) == TASK_NAME and sender.app is app:
            args = getattr(request, "args", None) or [None]  # the job request, if Celery decoded it
            report_revoked(services, request.id, worker_name or request.hostname,
                           args[0] if isinstance(args[0], dict) else None)

    @celeryd_after_setup.connect(weak=False)
    def _name_pool(sender: str, instance: Any, **_kwargs: Any) -> None:
        if instance.app is not app:
            return
        if not worker_name:
            pool.worker = sender
            pool.remove_leftovers()  # from an earlier run of a worker with this name
            pool.watch_for_orphans()
        services.leases.start()
        if isinstance(services.store, RedisJobStore):  # kernels of the embedded worker know it
            presence.append(WorkerPresence(services.store, worker_name or sender,
                                           lambda: list(instance.app.amqp.queues.consume_from),
                                           pool.settings.kernel_shared_memory))
            presence[0].start()

    @worker_shutdown.connect(weak=False)
    def _stop(sender: Any, **_kwargs: Any) -> None:
        if getattr(sender, "app", app) is app:
            for running in presence:
                running.stop()
            services.leases.stop()
            pool.shutdown()
