"""The private names of Celery, kombu and redis-py that celery_nb relies on (no Docker).

pyproject.toml bounds celery and kombu (and redis) at the versions tested; when a new version
is tried, this test says at once which name it lost, and where celery_nb uses it."""
from __future__ import annotations

import inspect

import celery._state
import kombu
import kombu.transport.memory
import kombu.transport.redis
import redis

from celery_nb.broker import celery_app

# (object, attribute, what celery_nb does with it)
CLASS_NAMES = [
    (kombu.transport.redis.Channel, "_connparams", "broker.patient_redis_transport: connection retries"),
    (kombu.transport.redis.Channel, "_put", "broker.patient_redis_transport: a message with other commands"),
    (kombu.transport.redis.Channel, "_q_for_pri", "broker.patient_redis_transport: the queue's key"),
    (kombu.transport.redis.Channel, "_get_message_priority", "broker.patient_redis_transport: the queue's key"),
    (kombu.transport.redis.Channel, "conn_or_acquire", "broker and worker.leases: a client of the channel"),
    (kombu.transport.redis.Channel, "unacked_key", "worker.leases.BrokerMessages: the unacked messages"),
    (kombu.transport.redis.Channel, "unacked_index_key", "worker.leases.BrokerMessages: their delivery times"),
    (kombu.transport.redis.QoS, "restore_by_tag", "worker.leases.BrokerMessages: a dead worker's message back"),
    (kombu.transport.redis, "dumps", "broker.patient_redis_transport: the message as kombu stores it"),
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
]


def test_the_private_names_celery_nb_uses_are_there(redis_url: str) -> None:
    missing = [f"{getattr(owner, '__qualname__', owner.__name__)}.{name} ({why})"
               for owner, name, why in CLASS_NAMES if not hasattr(owner, name)]
    missing += [f"{fn.__qualname__}{inspect.signature(fn)} (expected parameters {params})"
                for fn, params in SIGNATURES if list(inspect.signature(fn).parameters) != params]
    # names only instances have
    with celery_app(redis_url).connection_for_write() as connection:
        channel = connection.default_channel
        if not isinstance(getattr(channel, "_expires", None), dict):
            missing.append("kombu.transport.redis.Channel()._expires (broker.patient_redis_transport: queue expiry)")
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
