"""The index's reads for code on the event loop: in place when they are local, else from a worker thread.

With the ``diskcache`` driver a read is a lookup in a database file on local disk, a few
microseconds: a hop to a worker thread would cost more, and wait its turn behind every other
request's.  With ``postgres`` a read is a round trip to a server: made on the event loop, it would
hold up every other request for as long as the network and the server take (a lock, a slow disk).
:class:`IndexReads` picks by :attr:`Metadata.local <mirror.metadata.driver.Metadata.local>`, and
for the three reads every request makes first (a name's kind, a link, a manifest record) asks the
driver's memory before a thread (:meth:`~mirror.metadata.driver.Metadata.known_link`): a warm
request then waits on no query and no thread.  Those threads are counted apart from the ones that
open and size stored blobs (:data:`INDEX_THREADS`): a database that is slow or locked ties up only
requests that read it.  Writes are made from worker threads in any case.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar
from weakref import WeakKeyDictionary

import anyio.to_thread
from anyio import CapacityLimiter

from ..metadata.driver import ManifestRecord, Metadata

__all__ = ["INDEX_THREADS", "IndexReads"]

T = TypeVar("T")

#: Worker threads reading a database server at once per process, besides anyio's default ones (40):
#: reads beyond them wait their turn without a thread, and the connection pool bounds the queries.
INDEX_THREADS = 40
_limiters: WeakKeyDictionary[asyncio.AbstractEventLoop, CapacityLimiter] = WeakKeyDictionary()


def _threads() -> CapacityLimiter:
    """This event loop's limiter of index reads (one per process's loop, made on first use)."""
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = CapacityLimiter(INDEX_THREADS)
    return limiter


class IndexReads:
    """Reads of *metadata* for ``async`` code; each raises what the driver's read raises
    (``MetadataUnavailable`` while a database server cannot be reached)."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata

    async def ask(self, read: Callable[..., T], *args: object) -> T:
        """``read(*args)``, a read of the index: in place when the driver is local, else from a worker thread."""
        if self.metadata.local:
            return read(*args)
        return await anyio.to_thread.run_sync(read, *args, limiter=_threads())

    async def is_linked(self, repo: str, digest: str) -> bool:
        return self.metadata.known_link(repo, digest) or await self.ask(self.metadata.is_linked, repo, digest)

    async def is_local(self, name: str) -> bool:
        known = self.metadata.known_local(name)
        return known if known is not None else await self.ask(self.metadata.is_local, name)

    async def get_manifest(self, digest: str) -> ManifestRecord | None:
        known = self.metadata.known_manifest(digest)
        return known if known is not None else await self.ask(self.metadata.get_manifest, digest)
