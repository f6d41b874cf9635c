"""The one bounded scheduler of the bulk paths that do not go through Ray Data: pooled tile
blocks (:mod:`segray.bulk.pool`) and scene tasks (:mod:`segray.bulk.scenes`)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def bounded(
    items: Iterable[Item],
    submit: Callable[[int, Item], Any],
    limit: int,
    failed: Callable[[Item, Exception], Result],
) -> Generator[Result, None, None]:
    """The result of each Ray call ``submit(index, item)`` as it finishes, at most ``limit``
    calls in flight (at least one); a call that raises gives ``failed(item, error)`` instead,
    so one lost task or actor spoils only its own items. Closing the generator cancels the
    calls still running."""
    import ray

    queue = collections.deque(enumerate(items))
    running: dict[Any, Item] = {}
    try:
        while queue or running:
            while queue and len(running) < max(1, limit):
                index, item = queue.popleft()
                running[submit(index, item)] = item
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                item = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task or actor died past its retries
                    result = failed(item, exc)
                yield result
    finally:
        for ref in running:
            ray.cancel(ref)
