"""What the pull-through policy (``registry/pullthrough.py``) keeps of manifests besides the index.

* :class:`ManifestBodies`: bodies of stored manifests recently read, in memory (content-addressed, so
  never stale): under load a thread hop per request waits for the GIL and costs more than the rest of
  the request.
* :class:`PeerFlights`: on replicas of a cluster (``registry/cluster.py``), or the worker processes of
  one host, one upstream request for a manifest (by tag or digest) across all of them.  The one that
  takes the index's lease ``manifest:<key>`` asks the upstream and records the answer; the others wait
  for the lease to be given up, then look again, and find that answer in the index.  A holder that
  takes longer than the lease's TTL is not waited for; the lease of a worker process of this host
  gone meanwhile (killed: it could not give it up) is released for the next to take.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio.to_thread

from ..metadata.driver import Metadata
from ..spec.errors import APIError
from ..spec.reference import Digest, ParseError, parse_digest
from ..storage.driver import BlobStore, StoreUnavailable
from .reads import in_index_thread

T = TypeVar("T")
log = logging.getLogger("mirror.registry.manifests")

#: Bytes of manifest bodies kept in memory per process.
MANIFEST_MEMORY = 8 << 20
#: Seconds after a read the store did not answer during which fetched manifests are not stored.
STORE_QUIET = 10.0
#: Seconds between two tries of a replica waiting for another's manifest request.
PEER_POLL = 0.02
#: Seconds between two looks at whether the worker process holding the lease is still there.
HOLDER_LOOK = 1.0


class ManifestBodies:
    """Stored manifests' bytes by digest, the oldest dropped first past :data:`MANIFEST_MEMORY`."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._failed_at = -STORE_QUIET
        self._failure: StoreUnavailable | None = None  # the last read's failure
        self._bodies: dict[str, bytes] = {}
        self._size = 0

    async def read(self, digest: str) -> bytes | None:
        """The stored manifest *digest*'s bytes, or None if it is not stored (or not a digest), or the
        store does not answer (the caller then fetches the upstream's copy, which is served unstored)."""
        body = self._bodies.get(digest)
        if body is not None:
            return body
        try:
            parsed = parse_digest(digest)
        except ParseError:
            return None
        try:
            body = await anyio.to_thread.run_sync(self.store.read_bytes, parsed)
        except StoreUnavailable as exc:
            log.info("manifest %s not read from the store (%s): asking the upstream", digest, exc)
            self._failed_at, self._failure = time.monotonic(), exc
            return None
        if body is not None and digest not in self._bodies:
            self._bodies[digest] = body
            self._size += len(body)
            while self._size > MANIFEST_MEMORY:
                self._size -= len(self._bodies.pop(next(iter(self._bodies))))
        return body

    def unread(self, recorded: object) -> StoreUnavailable | None:
        """What to answer when the upstream cannot give a manifest the index has a record of (*recorded*:
        its tag's or manifest's record, or None) that the store did not answer for: the store's failure
        (``503`` "object store unavailable"), not the upstream's "unknown" or "unavailable and no cached
        copy", which tell a client a preloaded image does not exist.  None: the upstream's answer stands."""
        return self._failure if recorded is not None and self.failing() else None

    def failing(self) -> bool:
        """Whether a read failed for the store in the last :data:`STORE_QUIET` seconds: a manifest
        fetched meanwhile is served without being stored (the write would wait for the store too)."""
        return time.monotonic() - self._failed_at < STORE_QUIET


class PeerFlights:
    """One replica at a time asks the upstream for a manifest *key* (see the module's docstring).
    *site* names this host (a replica's ``cluster.advertise``, else the host's name); a lease's holder
    is ``<site> pid <worker's pid>``."""

    def __init__(self, metadata: Metadata, site: str, ttl: float) -> None:
        self.metadata, self.site, self.ttl = metadata, site, ttl
        self.replica = f"{site} pid {os.getpid()}"

    async def run(self, key: str, ask: Callable[[], Awaitable[T]]) -> T:
        """*ask* (which looks in the index first, then asks the upstream) under the lease of *key*,
        once another replica asking for it is done.  ``MetadataUnavailable`` while the index is down."""
        name = f"manifest:{key}"
        loop = asyncio.get_running_loop()
        give_up, look = loop.time() + self.ttl, loop.time() + HOLDER_LOOK
        while (lease := await in_index_thread(self.metadata.take_lease, name, self.replica, self.ttl)) is None:
            if loop.time() > give_up:
                return await ask()
            if loop.time() > look:
                look = loop.time() + HOLDER_LOOK
                await in_index_thread(self._free_if_gone, name)
            await asyncio.sleep(PEER_POLL)
        try:
            return await ask()
        finally:
            await asyncio.shield(in_index_thread(self.metadata.release_lease, lease))

    def _free_if_gone(self, name: str) -> None:
        """Release the lease *name* if a worker process of this host that is gone holds it, for one of
        those waiting to take it next (blocking)."""
        current = self.metadata.current_lease(name)
        site, _, pid = ("", "", "") if current is None else current.holder.rpartition(" pid ")
        if current is None or site != self.site or not pid.isdigit():
            return
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if self.metadata.release_lease(current):
                log.warning("%s: the worker process %s asking the upstream for it is gone: asked again", name, pid)
        except OSError:  # another user's process: there
            pass


def referred_digest(value: str) -> Digest:
    """A digest a stored record or manifest refers to; ``MANIFEST_INVALID`` when it is not one."""
    try:
        return parse_digest(value)
    except ParseError as exc:
        raise APIError("MANIFEST_INVALID", detail=f"index refers to an invalid digest {value!r}") from exc
