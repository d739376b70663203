"""Manifests saved from the event loop: their bytes stored from one of anyio's default threads, then
recorded in the index from one of the index's own (``registry/reads.py``), never both in one thread.

A thread waiting for a locked or slow database must not be one of those that open and write stored
blobs: so a save that was one thread function (store, then index) is now a hop of each kind, in
the same order.  What that function guaranteed still holds:

* **Durable before recorded.**  The index records a manifest only once the store holds it (the
  store's write returned); a store that refuses it leaves the index untouched.
* **Under the collector's reference lock** (``maintenance/gc.py``), held from the first look to the
  last write across the hops (:func:`referencing`): the collector never decides what is unreferenced
  between a check and the record that makes it referenced.
* **To its end once started** (:func:`to_the_end`), as a thread function runs to its end whatever
  happens to its caller: a request cancelled between the hops does not leave bytes stored and their
  record half written (or the lock held).  Errors are the caller's, as raised by the store or the index.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio.to_thread

from ..maintenance.collecting import reference_lock
from ..metadata.driver import Metadata, TagRecord
from ..metadata.records import RecordKind
from ..spec.errors import APIError
from ..spec.manifest import is_nondistributable, references
from ..spec.reference import Digest, ParseError, parse_digest
from ..storage.driver import BlobStore, StoreUnavailable
from ..storage.refusals import refusal
from ..upstream.answers import Manifest
from ..upstream.foreign import with_size
from .manifests import referred_digest
from .reads import IndexReads, in_index_thread
from .referrers import referrer_of

log = logging.getLogger("mirror.registry.pullthrough")

T = TypeVar("T")


async def to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """*work*'s result: run as a task of its own, which goes on to its end (and lets go of what it
    holds) if the caller is cancelled meanwhile; the caller then gets the cancellation."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieved)
    return await asyncio.shield(task)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark the outcome as seen: a caller cancelled meanwhile no longer wants it."""
    if not task.cancelled():
        task.exception()


@asynccontextmanager
async def referencing(store: BlobStore) -> AsyncIterator[None]:
    """The collector's reference lock held (shared) across thread hops: taken from a default thread
    (it waits while a collection runs), let go of on the event loop (a ``close``)."""
    lock = reference_lock(store)
    await anyio.to_thread.run_sync(lock.__enter__)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


async def save_pushed(store: BlobStore, metadata: Metadata, repo: str, reference: str | Digest, digest: Digest,
                      body: bytes, media_type: str, required: list[str], subject: str | None,
                      descriptor: dict[str, Any] | None) -> None:
    """Store a pushed manifest and record it in *repo* (tagged *reference* unless it is its digest),
    with its referrer's *descriptor* of *subject*; ``MANIFEST_BLOB_UNKNOWN`` (400) and nothing written
    when one of the *required* digests is not linked to *repo* or not stored.  What the store or the
    index raises is raised (a refused write is the caller's ``507``)."""

    def record() -> None:
        metadata.put_manifest(str(digest), media_type, len(body))
        metadata.link(repo, [str(digest)])
        if subject and descriptor:
            metadata.add_referrer(repo, subject, descriptor)
        if not isinstance(reference, Digest):
            metadata.set_tag(repo, reference, TagRecord(str(digest), media_type, time.time()))
            # A DELETE of the digest that read the tags before this one was set may have unlinked the
            # manifest since: linked again, as the DELETE links it again if it then finds a tag
            # (``LocalRegistry.delete_manifest``).  Asked of the index itself, not of what it remembers.
            if not metadata.find_records(RecordKind.LINKS, [(repo, str(digest))]):
                metadata.link(repo, [str(digest)])

    async def save() -> None:
        async with referencing(store):  # the collector must not sweep what was just checked
            if missing := await absent(store, metadata, repo, required):
                raise APIError("MANIFEST_BLOB_UNKNOWN", detail={"digests": missing}, status=400)
            await anyio.to_thread.run_sync(store.put_bytes, digest, body)
            await in_index_thread(record)

    await to_the_end(save())


async def absent(store: BlobStore, metadata: Metadata, repo: str, digests: list[str]) -> list[str]:
    """Those of *digests* (in their order) not linked to *repo*, or not stored: one look at the index,
    then one at the store for the linked ones."""
    parsed: dict[str, Digest] = {}
    for digest in digests:
        try:
            parsed[digest] = parse_digest(digest)
        except ParseError:
            continue
    linked = await IndexReads(metadata).ask(lambda: [d for d in parsed if metadata.is_linked(repo, d)])
    stored = await anyio.to_thread.run_sync(lambda: {d for d in linked if store.size(parsed[d]) is not None})
    return [d for d in digests if d not in stored]


async def save_pulled(store: BlobStore, metadata: Metadata, repo: str, manifest: Manifest, tag: str | None) -> bool:
    """Store a manifest fetched for *repo* (as *tag*, if by tag) and record it; False when the store
    (or the index on its filesystem) refused it: what got stored unrecorded is swept by the collector
    after its grace period.  Any other error is raised."""
    key = str(manifest.digest)
    refs = references(manifest.body)
    linked = [key, *(d.digest for d in refs)]
    referrer = referrer_of(manifest.body, manifest.media_type, key)
    foreign = [d for d in refs if d.urls and is_nondistributable(d.media_type)]

    def record() -> None:
        metadata.put_manifest(key, manifest.media_type, len(manifest.body))
        for d in foreign:
            metadata.set_foreign_urls(d.digest, with_size(d.urls, d.size))  # (a URL's body: at most that)
        metadata.link(repo, linked)
        if referrer is not None:  # known even when the upstream is not
            metadata.add_referrer(repo, *referrer)
        if tag is not None:
            metadata.set_tag(repo, tag, TagRecord(key, manifest.media_type, time.time()))

    async def save() -> bool:
        async with referencing(store):  # not while the collector decides what is unreferenced
            try:
                await anyio.to_thread.run_sync(store.put_bytes, manifest.digest, manifest.body)
                await in_index_thread(record)
            except Exception as exc:
                if (reason := refusal(exc)) is None:
                    if not isinstance(exc, StoreUnavailable):
                        raise
                    # The store does not answer: the upstream's copy was verified against its digest.
                    log.warning("store unavailable, manifest %s served without storing it: %s", key, exc)
                    return False
                log.warning("store refused manifest %s (%s): served without storing it", key, reason)
                await anyio.to_thread.run_sync(store.refused, exc, len(manifest.body))
                return False
            return True

    return await to_the_end(save())


async def refresh_tag(store: BlobStore, metadata: Metadata, repo: str, tag: str, digest: str,
                      media_type: str) -> bool:
    """Record that *tag* of *repo* still points to *digest* now, if the manifest is still stored
    (else False: the collector evicted it meanwhile).  What the store or the index raises is raised."""

    async def refresh() -> bool:
        async with referencing(store):
            if not await anyio.to_thread.run_sync(store.exists, referred_digest(digest)):
                return False
            await in_index_thread(metadata.set_tag, repo, tag, TagRecord(digest, media_type, time.time()))
            return True

    return await to_the_end(refresh())
