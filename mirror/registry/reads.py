"""The index's reads for code on the event loop: in place when they are local, else from a worker thread.

With the ``diskcache`` driver a read is a lookup in a database file on local disk, a few
microseconds: a hop to a worker thread would cost more, and wait its turn behind every other
request's.  With ``postgres`` a read is a round trip to a server: made on the event loop, it would
hold up every other request for as long as the network and the server take (a lock, a slow disk).
:class:`IndexReads` picks by :attr:`Metadata.local <mirror.metadata.driver.Metadata.local>`, and
for the three reads every request makes first (a name's kind, a link, a manifest record) asks the
driver's memory before a thread (:meth:`~mirror.metadata.driver.Metadata.known_link`): a warm
request then waits on no query and no thread.  Writes are made from worker threads in any case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread

from ..metadata.driver import ManifestRecord, Metadata

__all__ = ["IndexReads"]

T = TypeVar("T")


class IndexReads:
    """Reads of *metadata* for ``async`` code; each raises what the driver's read raises
    (``MetadataUnavailable`` while a database server cannot be reached)."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata

    async def ask(self, read: Callable[..., T], *args: object) -> T:
        """``read(*args)``, a read of the index: in place when the driver is local, else from a worker thread."""
        if self.metadata.local:
            return read(*args)
        return await anyio.to_thread.run_sync(read, *args)

    async def is_linked(self, repo: str, digest: str) -> bool:
        metadata = self.metadata
        if metadata.local:
            return metadata.is_linked(repo, digest)
        return metadata.known_link(repo, digest) or await anyio.to_thread.run_sync(metadata.is_linked, repo, digest)

    async def is_local(self, name: str) -> bool:
        metadata = self.metadata
        if metadata.local:
            return metadata.is_local(name)
        known = metadata.known_local(name)
        return known if known is not None else await anyio.to_thread.run_sync(metadata.is_local, name)

    async def get_manifest(self, digest: str) -> ManifestRecord | None:
        metadata = self.metadata
        if metadata.local:
            return metadata.get_manifest(digest)
        known = metadata.known_manifest(digest)
        return known if known is not None else await anyio.to_thread.run_sync(metadata.get_manifest, digest)
