"""The Celery app shared by kernels (to send jobs) and workers (to run them)."""
from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.signals import celeryd_after_setup, task_revoked, worker_shutdown

from celery_nb.config import DEFAULT_QUEUE
from celery_nb.blobs import BlobStore
from celery_nb.jobstore import JobStore
from celery_nb.signing import Signer
from celery_nb.worker.containers import ContainerPool, PoolSettings, connect
from celery_nb.worker.policy import WorkerPolicy
from celery_nb.worker.tasks import WorkerServices, report_revoked, run_job

TASK_NAME = "celery_nb.run_job"
EMBEDDED_BROKER = "memory://"


def make_app(broker_url: str | None, store: JobStore, blobs: BlobStore, policy: WorkerPolicy | None = None,
             worker_name: str | None = None, signer: Signer | None = None) -> Celery:
    """A Celery app on ``broker_url`` (None: in-process memory transport for the embedded worker).

    ``worker_name`` is what jobs report as their worker (default: the Celery node name).
    ``app.celery_nb_pool`` is the worker's warm container pool.
    """
    app = Celery("celery_nb", broker=broker_url or EMBEDDED_BROKER, set_as_current=False)
    app.conf.update(
        # JSON only: the worker never unpickles what arrives from the broker
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # results travel in the job's event stream
        task_default_queue=DEFAULT_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a long cell must not hold back jobs another worker could run
        # task events (for Flower) cost round trips on every job: on with `celery-nb worker -E`
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=broker_url is not None,
    )
    if broker_url is None:
        # the memory transport polls; its 1 s default would add up to a second per job
        app.conf.broker_transport_options = {"polling_interval": 0.005}  # ~1% of a core while idle
    pool = ContainerPool(worker_name or "", PoolSettings.from_env())
    services = WorkerServices(store, blobs, policy or WorkerPolicy.from_env(), pool, signer or Signer())
    app.celery_nb_pool = pool

    @app.task(name=TASK_NAME, bind=True, shared=False)  # per app: each has its own store
    def run(task: Task, request: dict[str, Any]) -> dict[str, Any]:
        return run_job(request, services, worker=worker_name or task.request.hostname)

    @task_revoked.connect(weak=False)
    def _report_revoked(sender: Any, request: Any, **_kwargs: Any) -> None:
        if getattr(sender, "name", None) == TASK_NAME and sender.app is app:
            report_revoked(store, request.id, worker_name or request.hostname)

    @celeryd_after_setup.connect(weak=False)
    def _name_pool(sender: str, instance: Any, **_kwargs: Any) -> None:
        if instance.app is app and not worker_name:
            pool.worker = sender
            pool.remove_leftovers(connect)  # from an earlier run of a worker with this name

    @worker_shutdown.connect(weak=False)
    def _empty_pool(sender: Any, **_kwargs: Any) -> None:
        if getattr(sender, "app", app) is app:
            pool.shutdown()

    return app
