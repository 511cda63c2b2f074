"""The part of celery_nb that runs inside the container (stdlib + cloudpickle only).

Cells import ``progress`` from here to drive the notebook's progress bar::

    from celery_nb_runtime import progress
    for item in progress(items, desc="training"):
        ...

and ``display(obj)`` (a cell has it as a builtin) to show rich output - HTML, images - in the
cell; pyplot figures are shown without asking.

Outside a celery_nb container ``progress`` simply yields the items.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from celery_nb_runtime import events
from celery_nb_runtime.rich_output import display

T = TypeVar("T")

_bar_ids = itertools.count(1)
MIN_INTERVAL = 0.1  # seconds between progress events of one bar


class ProgressReporter:
    """Throttled progress events for one bar; first and last updates are always sent."""

    def __init__(self, total: Optional[float], desc: Optional[str]) -> None:
        self.bar = next(_bar_ids)
        self.total = total
        self.desc = desc
        self._last_sent = 0.0

    def update(self, n: float, force: bool = False) -> None:
        if events.sink is None:  # outside a container: progress() is a pass-through
            return
        now = time.monotonic()
        if force or now - self._last_sent >= MIN_INTERVAL:
            self._last_sent = now
            events.sink({"type": "progress", "bar": self.bar, "n": n,
                         "total": self.total, "desc": self.desc})


def progress(iterable: Iterable[T], total: Optional[float] = None, desc: Optional[str] = None) -> Iterator[T]:
    """Yield from ``iterable`` while reporting how many items were consumed."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    reporter = ProgressReporter(total, desc)
    n = 0
    reporter.update(n, force=True)
    try:
        for item in iterable:
            yield item
            n += 1
            reporter.update(n)
    finally:  # also when the loop breaks early: the bar shows where it stopped
        reporter.update(n, force=True)


def map_chunk(fn: Callable[..., Any], items: list, star: bool = False) -> list:
    """Run ``fn`` over one chunk of a map, counting items on the progress bar; ``star``: each
    item is a tuple of arguments (a map over several iterables)."""
    return [fn(*item) if star else fn(item) for item in progress(items)]


__all__ = ["display", "map_chunk", "progress"]
