"""The private names of Celery, kombu and redis-py that celery_nb relies on (no Docker).

pyproject.toml bounds celery and kombu (and redis) at the versions tested; when a new version
is tried, this test says at once which name it lost, and where celery_nb uses it."""
from __future__ import annotations

import base64
import inspect
import json

import celery._state
import kombu
import kombu.transport.memory
import kombu.transport.redis
import kombu.transport.virtual
import redis

from celery_nb.broker import TASK_NAME, celery_app, task_message

# (object, attribute, what celery_nb does with it)
CLASS_NAMES = [
    (kombu.transport.redis.Channel, "_connparams", "broker.patient_redis_transport: connection retries"),
    (kombu.transport.redis.Channel, "_create_client", "broker.patient_redis_transport: one client per channel"),
    (kombu.transport.redis.Channel, "pool", "broker.patient_redis_transport: one client per channel"),
    (kombu.transport.redis.Channel, "conn_or_acquire", "broker and worker.leases: a client of the channel"),
    (kombu.transport.redis.Channel, "unacked_key", "worker.leases.BrokerMessages: the unacked messages"),
    (kombu.transport.redis.Channel, "unacked_index_key", "worker.leases.BrokerMessages: their delivery times"),
    (kombu.transport.redis.QoS, "restore_by_tag", "worker.leases.BrokerMessages: a dead worker's message back"),
    (kombu.transport.redis.QoS, "ack", "broker.patient_redis_transport: a message acked with its job's end"),
    (kombu.transport.redis.Channel, "QoS", "broker.patient_redis_transport: a message acked with its job's end"),
    (kombu.transport.virtual.QoS, "ack", "broker.patient_redis_transport: kombu's book-keeping of an ack"),
    (kombu.transport.redis, "dumps", "broker.task_message: the message as kombu stores it"),
    (kombu.transport.memory.Channel, "_put", "broker.PromptMemoryTransport: wakes the embedded worker"),
    (kombu.transport.memory.Channel, "_put_fanout", "broker.PromptMemoryTransport: wakes the embedded worker"),
    (kombu.transport.memory.Transport, "_deliver", "broker.PromptMemoryTransport.drain_events"),
    (kombu.transport.memory.Transport, "polling_interval", "broker.PromptMemoryTransport.drain_events"),
    (celery._state, "_set_task_join_will_block", "client: the kernel may wait on other Celery results"),
    (redis.connection.Connection, "send_packed_command", "blobs._BulkIO: values sent as they are"),
]
SIGNATURES = [
    (kombu.transport.redis.QoS.restore_by_tag, ["self", "tag", "client", "leftmost"]),
    (redis.connection.Connection.send_packed_command, ["self", "command", "check_health"]),
    (kombu.transport.redis.Channel._create_client, ["self", "asynchronous"]),
    (kombu.transport.redis.QoS.ack, ["self", "delivery_tag"]),
    (kombu.transport.virtual.QoS.ack, ["self", "delivery_tag"]),
]


def test_the_private_names_celery_nb_uses_are_there(redis_url: str) -> None:
    missing = [f"{getattr(owner, '__qualname__', owner.__name__)}.{name} ({why})"
               for owner, name, why in CLASS_NAMES if not hasattr(owner, name)]
    missing += [f"{fn.__qualname__}{inspect.signature(fn)} (expected parameters {params})"
                for fn, params in SIGNATURES if list(inspect.signature(fn).parameters) != params]
    # names only instances have
    if not hasattr(kombu.Connection("memory://").transport, "cycle"):
        missing.append("kombu.transport.memory.Transport().cycle (broker.PromptMemoryTransport.drain_events)")
    client = redis.Redis.from_url(redis_url)
    connection = client.connection_pool.get_connection()
    try:
        if not hasattr(connection, "_sock") or connection._sock is None:
            missing.append("redis.connection.Connection()._sock of a connected connection (blobs._BulkIO: reads)")
    finally:
        client.connection_pool.release(connection)
    assert not missing, ("celery_nb relies on private names of Celery, kombu or redis-py that these versions "
                         f"(celery {celery.__version__}, kombu {kombu.__version__}, redis {redis.__version__}) "
                         "no longer have; adapt the code named, then raise the bound in pyproject.toml:\n  "
                         + "\n  ".join(missing))


def test_the_task_message_a_kernel_builds_is_the_one_celery_would_send(redis_url: str) -> None:
    """Kernels put a job's task message on its queue's list themselves (broker.task_message): it
    must be the message that Celery's send_task publishes through kombu's Redis transport, which
    the workers' Celery reads, but for its delivery tag (a new uuid each)."""
    app = celery_app(redis_url)
    request = {"job_id": "0" * 32, "kind": "call", "options": {"image": "local/py311"}, "payload": "AAEC"}
    queue = "celery_nb_pinned_test"
    client = redis.Redis.from_url(redis_url)
    client.delete(queue)
    app.send_task(TASK_NAME, args=[request], task_id=request["job_id"], queue=queue, shadow="call: f()",
                  argsrepr="{'image': 'local/py311'}")
    sent = json.loads(client.rpop(queue))
    built = json.loads(task_message(app, request, request["job_id"], queue, "call: f()", "{'image': 'local/py311'}"))
    assert sent["properties"].pop("delivery_tag") != built["properties"].pop("delivery_tag")
    assert built == sent, "broker.task_message no longer builds the message Celery sends: adapt it"
    assert base64.b64decode(built["body"]) == base64.b64decode(sent["body"])
