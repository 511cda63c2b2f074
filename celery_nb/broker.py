"""The Celery app as kernels and workers both configure it: transports, serialisation, acks,
and the one task name. A kernel on a broker only publishes with it; a worker adds the task
(celery_nb.worker.app).
"""
from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import urllib.parse
import uuid
from queue import Empty
from typing import Any

import redis
from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu.transport import memory as kombu_memory
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

from celery_nb.config import DEFAULT_QUEUE
from celery_nb.jobstore import DEFAULT_PATIENCE, REDIS_TIMEOUTS, RENEW_INTERVAL, redis_retry

TASK_NAME = "celery_nb.run_job"
EMBEDDED_BROKER = "memory://"
# The backstop: a message whose worker died before its job took a lease is handed out again
# after about this long (a running job's is, seconds after its lease ends: celery_nb.worker.leases).
# A live worker keeps its jobs' messages younger than this, however long they run. Generous: the
# clocks of kernels and workers may differ.
DEFAULT_VISIBILITY_TIMEOUT = 300.0


def visibility_timeout() -> float:
    """CELERY_NB_VISIBILITY_TIMEOUT (s): set the same on workers and kernels (any of them may
    hand a message back to the queue)."""
    raw = os.environ.get("CELERY_NB_VISIBILITY_TIMEOUT", str(DEFAULT_VISIBILITY_TIMEOUT))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"CELERY_NB_VISIBILITY_TIMEOUT={raw!r} is not a number of seconds") from None
    if value < 2 * RENEW_INTERVAL + 1:
        raise ValueError(f"CELERY_NB_VISIBILITY_TIMEOUT={value:g} is too short: a live worker renews its jobs "
                         f"every {RENEW_INTERVAL:g} s; use at least {2 * RENEW_INTERVAL + 1:g} s")
    return value


def task_message(app: Celery, request: dict[str, Any], task_id: str, queue: str, shadow: str,
                 argsrepr: str) -> bytes:
    """The message of a run_job task of ``request`` on ``queue``, as kombu's Redis transport
    keeps it in the queue's list: the message Celery's ``send_task`` would publish (protocol 2,
    JSON, in kombu's envelope; tests/test_pinned.py compares them), built without that
    machinery, which costs a kernel more CPU per job than all the rest of a submit."""
    body = json.dumps([[request], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    headers = {"lang": "py", "task": TASK_NAME, "id": task_id, "shadow": shadow, "eta": None, "expires": None,
               "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
               "parent_id": None, "argsrepr": argsrepr, "kwargsrepr": "{}", "origin": _ORIGIN, "ignore_result": None,
               "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}
    properties = {"correlation_id": task_id, "reply_to": app.thread_oid, "argsrepr": argsrepr, "delivery_mode": 2,
                  "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                  "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}
    return kombu_redis.dumps({"body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
                              "content-type": "application/json", "headers": headers,
                              "properties": properties}).encode()


_ORIGIN = anon_nodename()  # who sent a task, as Celery names a process that is no worker


def unacked_records(delivery_tag: str) -> tuple[str, str, str]:
    """Where kombu's Redis transport records a delivered message until it is acked: its hash of
    messages, its index of delivery times (their keys), and the message's tag (JobStore.finish)."""
    return kombu_redis.Channel.unacked_key, kombu_redis.Channel.unacked_index_key, delivery_tag


def acked_with_its_job(delivery_tag: str) -> None:
    """The records of message ``delivery_tag`` went in the round trip that ended its job
    (JobStore.finish with its unacked_records): Celery's ack of it then costs no second one."""
    with _acked_lock:
        _acked.add(delivery_tag)


_acked: set[str] = set()
_acked_lock = threading.Lock()


def patient_redis_transport(patience: float) -> type[kombu_redis.Transport]:
    """kombu's Redis transport whose plain commands retry for ``patience`` s while Redis is away.

    kombu takes a message off the queue (BRPOP), then records it as unacked with a second
    command: were that one to fail, the message would be lost. Acks, publishes and restores go
    through the same connections. The consumer's own (BRPOP) connection still fails at once,
    so that the worker notices and reconnects. A message whose records went with its job's end
    (acked_with_its_job) is acked without a round trip.
    """
    retry = redis_retry(patience)

    class AckedWithItsJobQoS(kombu_redis.QoS):
        def ack(self, delivery_tag: str) -> None:
            with _acked_lock:
                already = delivery_tag in _acked
                _acked.discard(delivery_tag)
            if already:  # (see acked_with_its_job) kombu's own book-keeping only
                kombu_virtual.QoS.ack(self, delivery_tag)
            else:
                super().ack(delivery_tag)

    class Channel(kombu_redis.Channel):
        QoS = AckedWithItsJobQoS
        _plain_client: redis.Redis | None = None

        def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
            params = super()._connparams(asynchronous)
            if not asynchronous:
                params["retry"] = retry
            return params

        def _create_client(self, asynchronous: bool = False) -> redis.Redis:
            # kombu makes a client per command (an ack, a delivery's record), and redis-py builds
            # its table of reply parsers with each: one client of the channel's pool does
            if asynchronous:
                return super()._create_client(asynchronous)
            client = self._plain_client
            if client is None or client.connection_pool is not self.pool:
                client = self._plain_client = super()._create_client()
            return client

    class Transport(kombu_redis.Transport):
        pass

    Transport.Channel = Channel
    return Transport


class _Arrivals(threading.Condition):
    """Rings when a message is put on, or acked from, the in-memory queues of this process."""

    count = 0

    def ring(self) -> None:
        with self:
            self.count += 1
            self.notify_all()


_arrivals = _Arrivals()  # process-wide, as kombu's in-memory queues are


class _PromptMemoryChannel(kombu_memory.Channel):
    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        super()._put(queue, message, **kwargs)
        _arrivals.ring()

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str | None = None,
                    **kwargs: Any) -> None:
        super()._put_fanout(exchange, message, routing_key, **kwargs)
        _arrivals.ring()

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)
        _arrivals.ring()  # a consumer held back by its prefetch limit may take the next one


class PromptMemoryTransport(kombu_memory.Transport):
    """kombu's in-memory transport (the embedded worker's), whose consumer is woken when a
    message arrives instead of polling the queues: polling every 5 ms cost a round trip 2.5 ms
    on average and an idle kernel 1% of a core. polling_interval remains the longest wait
    between two looks."""

    Channel = _PromptMemoryChannel

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with _arrivals:
                seen = _arrivals.count
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                remaining = self.polling_interval if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout() from None
                with _arrivals:
                    _arrivals.wait_for(lambda: _arrivals.count != seen, min(remaining, self.polling_interval))


def celery_app(broker_url: str | None, broker_patience: float = DEFAULT_PATIENCE) -> Celery:
    """A Celery app on ``broker_url`` (None: the in-process memory transport of the embedded
    worker). ``broker_patience``: seconds its broker commands retry while Redis is away.
    ``app.celery_nb_redis_queues``: its queues are Redis lists (see task_message)."""
    app = Celery("celery_nb", broker=broker_url or EMBEDDED_BROKER, set_as_current=False)
    app.celery_nb_redis_queues = False
    app.conf.update(
        # JSON only: the worker never unpickles what arrives from the broker
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # results travel in the job's event stream
        task_default_queue=DEFAULT_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # a lost broker connection must not stop running jobs: their messages come back after
        # the visibility timeout, and the job store drops those of finished jobs (JobStore.claim)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_prefetch_multiplier=1,  # a long cell must not hold back jobs another worker could run
        # task events (for Flower) cost round trips on every job: on with `celery-nb worker -E`
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=broker_url is not None,
    )
    if broker_url is None:
        app.conf.broker_transport = PromptMemoryTransport
        app.conf.broker_transport_options = {"polling_interval": 0.1}  # see PromptMemoryTransport
        return app
    timeout = visibility_timeout()
    app.conf.broker_transport_options = {
        "visibility_timeout": timeout,
        # kombu looks for messages to hand out again every interval x throttle s (100 s by default)
        "unacked_restore_interval": max(1.0, min(10.0, timeout / 5)),
        "unacked_restore_throttle": 1,
        **REDIS_TIMEOUTS,
    }
    if broker_url.startswith(("redis://", "rediss://")):  # (sentinel:// has a transport of its own)
        app.conf.broker_transport = patient_redis_transport(broker_patience)
        app.celery_nb_redis_queues = True
    if broker_url.startswith("rediss://"):
        app.conf.broker_use_ssl = tls_options(broker_url)
    return app


def tls_options(url: str) -> dict[str, Any]:
    """The TLS settings in a rediss:// URL's query, as redis-py reads them there (ssl_cert_reqs,
    ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_check_hostname), for the broker's connections:
    the server's certificate is verified unless the URL says ssl_cert_reqs=none."""
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    options: dict[str, Any] = {"ssl_cert_reqs": query.get("ssl_cert_reqs", "required")}
    options.update({name: query[name] for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if name in query})
    if "ssl_check_hostname" in query:
        options["ssl_check_hostname"] = query["ssl_check_hostname"].lower() not in ("false", "0", "no")
    return options
