"""The index from code on the event loop: reads in place when they are local, else (and every
write) from a worker thread of the index's own.

With the ``diskcache`` driver a read is a lookup in a database file on local disk, a few
microseconds: a hop to a worker thread would cost more, and wait its turn behind every other
request's.  With ``postgres`` a read is a round trip to a server: made on the event loop, it would
hold up every other request for as long as the network and the server take (a lock, a slow disk).
:class:`IndexReads` picks by :attr:`Metadata.local <mirror.metadata.driver.Metadata.local>`, and
for the three reads every request makes first (a name's kind, a link, a manifest record) asks the
driver's memory before a thread (:meth:`~mirror.metadata.driver.Metadata.known_link`): a warm
request then waits on no query and no thread.

Writes (and reads not worth making in place) go to a worker thread with either driver
(:func:`in_index_thread`): a write to diskcache locks and syncs its file.  Every thread that waits
on the index is counted apart from anyio's default ones, which open, size, read and write stored
blobs (:func:`index_threads`, :data:`INDEX_THREADS` per event loop): a database that is slow or
locked ties up only the requests that wait for it, never a pull of a stored blob.  So a thread
function touches either the index or the store, not both: work that needs both (saving a manifest:
its bytes stored, then recorded) makes one hop of each kind, in that order (``registry/records.py``).
The few jobs that read both in one call and are not worth splitting (the figures of ``/metrics`` and
of the cache page, the sweep of expired uploads) run on a third kind of thread, a few of their own
(:func:`in_mixed_thread`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar
from weakref import WeakKeyDictionary

import anyio.to_thread
from anyio import CapacityLimiter

from ..metadata.driver import ManifestRecord, Metadata

__all__ = ["INDEX_THREADS", "MIXED_THREADS", "IndexReads", "in_index_thread", "in_mixed_thread", "index_threads"]

T = TypeVar("T")

#: Worker threads waiting on the index at once per event loop, besides anyio's default ones (40):
#: calls beyond them wait their turn without a thread, and the connection pool bounds the queries.
INDEX_THREADS = 40
#: Worker threads per event loop for the few jobs that read both the index and the store in one call
#: (the figures of ``/metrics`` and of the cache page, the sweep of expired uploads): a thread kind of
#: their own, so such jobs waiting on a locked database hold neither the index's threads nor the
#: default ones; more wait their turn without a thread.
MIXED_THREADS = 4
_limiters: dict[str, WeakKeyDictionary[asyncio.AbstractEventLoop, CapacityLimiter]] = {}


def loop_limiter(kind: str, size: int) -> CapacityLimiter:
    """This event loop's limiter of the worker threads of *kind*, *size* of them: one per event
    loop and kind, made on first use (an anyio limiter belongs to the loop it was made in)."""
    loop = asyncio.get_running_loop()
    made = _limiters.setdefault(kind, WeakKeyDictionary())
    limiter = made.get(loop)
    if limiter is None:
        limiter = made[loop] = CapacityLimiter(size)
    return limiter


def index_threads() -> CapacityLimiter:
    """This event loop's limiter of worker threads calling the index (one per loop, made on first use)."""
    return loop_limiter("index", INDEX_THREADS)


async def in_mixed_thread(call: Callable[..., T], *args: object) -> T:
    """``call(*args)`` from one of :data:`MIXED_THREADS` worker threads per event loop: for a job
    that reads the index and the store together and is not worth splitting in two.  Returns what
    *call* returns and raises what it raises."""
    return await anyio.to_thread.run_sync(call, *args, limiter=loop_limiter("mixed", MIXED_THREADS))


async def in_index_thread(call: Callable[..., T], *args: object) -> T:
    """``call(*args)`` from a worker thread counted by :func:`index_threads`, whatever the driver.

    For every write to the index from the event loop (and reads better not made in place, or made
    together), so that calls waiting for a locked or slow database never hold the default threads
    that store work needs.  *call* should touch the index only: store work goes to anyio's default
    threads (``anyio.to_thread.run_sync``).  Returns what *call* returns and raises what it raises
    (``MetadataUnavailable`` while a database server cannot be reached).  Like any
    ``anyio.to_thread.run_sync``, a call once started runs to its end even if the caller is cancelled.
    """
    return await anyio.to_thread.run_sync(call, *args, limiter=index_threads())


class IndexReads:
    """Reads of *metadata* for ``async`` code; each raises what the driver's read raises
    (``MetadataUnavailable`` while a database server cannot be reached)."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata

    async def ask(self, read: Callable[..., T], *args: object) -> T:
        """``read(*args)``, a read of the index: in place when the driver is local, else from a
        worker thread (:func:`in_index_thread`)."""
        if self.metadata.local:
            return read(*args)
        return await in_index_thread(read, *args)

    async def is_linked(self, repo: str, digest: str) -> bool:
        return self.metadata.known_link(repo, digest) or await self.ask(self.metadata.is_linked, repo, digest)

    async def is_local(self, name: str) -> bool:
        known = self.metadata.known_local(name)
        return known if known is not None else await self.ask(self.metadata.is_local, name)

    async def get_manifest(self, digest: str) -> ManifestRecord | None:
        known = self.metadata.known_manifest(digest)
        return known if known is not None else await self.ask(self.metadata.get_manifest, digest)
