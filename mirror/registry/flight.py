"""Single flight: concurrent callers asking for the same thing share one execution of the work.

Within one process only; across worker processes a blob fetch is shared through its temp file
(``storage/fill.py``), a manifest fetch through a lease of the index (``registry/manifests.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """The executions in progress, by key."""

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[T]] = {}

    async def run(self, key: K, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Concurrent callers with the same key share one execution of ``work``: its result, and
        whether this caller followed another one's.  A cancelled execution cancels its followers;
        an exception reaches them all."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending), True
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if no one waits
        self._inflight[key] = future
        try:
            result = await work()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            del self._inflight[key]


class SharedTasks(Generic[K, T]):
    """Concurrent callers asking for the same key await one task running ``work(key)``.  Unlike
    :class:`SingleFlight`, a caller that stops waiting (its own time-out, its client gone) leaves the
    task running for the others; its exception reaches each of them."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[T]] = {}

    async def run(self, work: Callable[[K], Awaitable[T]], key: K) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = asyncio.ensure_future(work(key))
            task.add_done_callback(lambda done: self._ended(key, done))
        return await asyncio.shield(task)

    def _ended(self, key: K, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved, even if no one waits any more
