"""ipyparallel and Dask, the peers a user compares celery_nb with, when they are installed
(`pip install ipyparallel 'dask[distributed]'`): two engines / two single-threaded worker
processes on this machine, as their own quick starts set them up."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import Any, Protocol


def identity(value: Any) -> Any:
    return value


class Peer(Protocol):
    """A peer's round trip of one call, and ``count`` calls of ``identity`` sent at once."""

    name: str

    def round_trip(self) -> None: ...

    def many(self, count: int) -> None: ...


class IPyParallel:
    name = "ipyparallel"

    def __init__(self, client: Any) -> None:
        self._direct = client[0]
        self._balanced = client.load_balanced_view()

    def round_trip(self) -> None:
        self._direct.apply_sync(identity, 1)

    def many(self, count: int) -> None:
        for result in [self._balanced.apply_async(identity, i) for i in range(count)]:
            result.get()


class Dask:
    name = "Dask"

    def __init__(self, client: Any) -> None:
        self._client = client

    def round_trip(self) -> None:
        self._client.submit(identity, 1, pure=False).result()

    def many(self, count: int) -> None:
        self._client.gather([self._client.submit(identity, i, pure=False) for i in range(count)])


@contextlib.contextmanager
def running_peers() -> Iterator[list[Peer]]:
    """The installed peers, started (and stopped afterwards)."""
    with contextlib.ExitStack() as stack:
        peers: list[Peer] = []
        if importlib.util.find_spec("ipyparallel"):
            import ipyparallel

            cluster = ipyparallel.Cluster(n=2, log_level=40)
            client = cluster.start_and_connect_sync()
            stack.callback(cluster.stop_cluster_sync)
            peers.append(IPyParallel(client))
        if importlib.util.find_spec("distributed"):
            from distributed import Client, LocalCluster

            local = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                     dashboard_address=None, silence_logs=logging.CRITICAL))
            peers.append(Dask(stack.enter_context(Client(local))))
        yield peers

