"""The objects' side of ``mirror migrate`` (``migrate.py``): what the source store holds, the objects
a target store holds that the source does not, which objects the index records as manifests, and
lookups of one object at a time in either store, a few running at once.

Memory is bounded whatever the number of objects: no step keeps a listing.  Each one lists the
store again (:meth:`~mirror.storage.driver.BlobStore.objects` is a generator: a directory's entries
at a time on the filesystem, a page of keys at a time on S3) and holds no more than
:data:`~mirror.metadata.transfer.BATCH` objects, and the lookups of a window, at once.  The source
is locked for the whole migration, so every listing of it finds the same objects.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TypeVar

from ..metadata.driver import Metadata
from ..metadata.records import RecordKind
from ..metadata.transfer import BATCH, Tally
from ..spec.manifest import MAX_MANIFEST_BYTES
from ..spec.reference import Digest, ParseError, parse_digest
from ..storage.driver import BlobStore, StoredObject

__all__ = ["Census", "StoredDigests", "census", "digested", "foreign", "looked_up", "with_manifests"]

T = TypeVar("T")
R = TypeVar("R")
#: Lookups handed to the pool at once, per worker (one waiting behind each running: a store that
#: answers after a round trip is kept busy).
AHEAD = 2


@dataclass
class Census:
    """What a store holds: ``objects`` (with a well-formed digest) and their ``bytes``, and
    ``strays``, the files or keys under ``blobs/`` that are not objects."""

    objects: int = 0
    bytes: int = 0
    strays: int = 0


def census(store: BlobStore) -> Census:
    """Count what *store* holds (one listing)."""
    out = Census()
    for found in store.objects():
        if found.digest is None:
            out.strays += 1
        else:
            out.objects += 1
            out.bytes += found.size
    return out


def digested(store: BlobStore) -> Iterator[tuple[Digest, StoredObject]]:
    """Each object of *store* with a well-formed digest, and that digest (one listing; strays left out)."""
    for found in store.objects():
        if found.digest is not None:
            yield found.digest, found


def looked_up(pool: Executor | None, look: Callable[[T], R], items: Iterable[T],
              workers: int) -> Iterator[tuple[T, R]]:
    """``(item, look(item))`` for each of *items*, in their order, with ``workers * AHEAD`` lookups
    handed to *pool* at once (all made in this thread when *pool* is None: a lookup that is a local
    system call costs less than handing it to a thread).  What *look* raises is raised here, for its
    item; lookups not started when this stops are cancelled."""
    if pool is None:
        for item in items:
            yield item, look(item)
        return
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(look, item)))
            if len(pending) >= workers * AHEAD:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        for _, future in pending:  # the caller stopped early: what has not started never does
            future.cancel()


def foreign(target: BlobStore, source: BlobStore, pool: Executor | None, workers: int, *,
            remove: bool = False) -> Tally:
    """The objects of *target* (by digest) that *source* does not hold, described by their digest:
    none for an empty target or a copy, complete or not, of *source*.  Lists *target* once and looks
    each of its objects up in *source* (in *pool* unless *source* answers with local system calls).
    *remove*: delete them from *target* (a copy of *source* made before it dropped them)."""
    found = Tally()
    digests = (digest for digest, _ in digested(target))
    for digest, held in looked_up(None if source.local else pool, source.exists, digests, workers):
        if not held:
            found.add(str(digest))
            if remove:
                target.delete(digest)
    return found


def with_manifests(objects: Iterable[StoredObject], index: Metadata) -> Iterator[tuple[StoredObject, bool]]:
    """Each of *objects* and whether *index* has a manifest record of it, looked up :data:`BATCH`
    objects at a time (those larger than a manifest can be are not looked up)."""
    iterator = iter(objects)
    while batch := list(itertools.islice(iterator, BATCH)):
        small = [(str(found.digest),) for found in batch if found.size <= MAX_MANIFEST_BYTES]
        manifests = index.find_records(RecordKind.MANIFESTS, small)
        for found in batch:
            yield found, (str(found.digest),) in manifests


class StoredDigests:
    """The digests (``<algorithm>:<hex>``) of the objects a store holds, looked up a batch at a time
    (:meth:`among`), each digest one lookup (a ``stat``, or a ``HEAD`` of an object store), with
    *workers* of them at once in *pool* (None: one after another in the calling thread, for a store
    on local disk).  Raises what the store raises (``OSError``)."""

    def __init__(self, store: BlobStore, pool: Executor | None = None, workers: int = 1) -> None:
        self.store, self.pool, self.workers = store, pool, workers

    def among(self, digests: Iterable[str]) -> set[str]:
        """Those of *digests* the store holds (a string that is not a digest is not held)."""
        return {digest for digest, held in looked_up(self.pool, self._holds, digests, self.workers) if held}

    def _holds(self, digest: str) -> bool:
        try:
            parsed = parse_digest(digest)
        except ParseError:
            return False
        return self.store.exists(parsed)
