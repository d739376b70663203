"""The blob-store driver interface: content by digest, written once, verified before it is visible.

Every driver (today the filesystem one, :class:`mirror.storage.filesystem.Store`, under ``--data``) keeps these
rules, and ``tests/test_blobstore_contract.py`` checks them for each:

* An object is visible under its digest (:meth:`BlobStore.size`, :meth:`~BlobStore.open`,
  :meth:`~BlobStore.objects`) only once :meth:`BlobWriter.commit` verified that its bytes hash to
  that digest (and have the size announced): a mismatch raises :class:`DigestMismatch` or
  :class:`SizeMismatch` and leaves nothing behind.  An object store can meet this with a
  multipart upload of fixed parts, hashed as they pass, completed only after the digest matched.
* Concurrent ingests of one digest end with one valid object, whichever commits last.
* Reads take a byte range (:meth:`BlobReader.chunks`); a reader opened before a delete reads the
  whole object still (the filesystem keeps an open file; an object store reads a version it
  pinned when opened, or serves the rest from its own copy).
* :meth:`BlobStore.objects` lists what is stored with the size and time the collector needs; it
  may lag behind writes, never show an object that was not verified.

Errors: :class:`StoreError` (and its subclasses below) for content that does not match; ``OSError``
for what the backend refuses (``storage/refusals.py`` tells a full or read-only store from other failures).

All methods but :meth:`BlobReader.chunks` block: call them from a worker thread in async code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from ..spec.reference import Digest


class StoreError(Exception):
    """Base of the store's errors."""


class DigestMismatch(StoreError):
    """The bytes do not hash to the digest they were to be stored under."""


class SizeMismatch(StoreError):
    """The bytes are not as many as announced."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object found by :meth:`BlobStore.objects`.

    ``name`` is ``<algorithm>:<hex>`` as stored; ``digest`` is None for something that is not a
    well-formed object (a stray: ``mirror fsck`` reports it).  ``size`` in bytes, ``mtime`` in
    seconds since the epoch (when it was stored, or last made young by :meth:`BlobStore.touch`);
    ``location`` says where it is, for messages (a path, a key).
    """

    name: str
    size: int
    mtime: float
    digest: Digest | None
    location: str


@dataclass(frozen=True, slots=True)
class Space:
    """Bytes of the backend holding the store: its ``total`` size and what is ``available``."""

    total: int
    available: int


class BlobReader(Protocol):
    """A stored object opened for reading; :meth:`close` it.  ``fd`` is a file descriptor for
    zero-copy sends (``sendfile``), or None when the bytes do not come from a local file."""

    @property
    def size(self) -> int: ...

    @property
    def fd(self) -> int | None: ...

    def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``start..end`` (inclusive; None: to the end of the object)."""
        ...

    def close(self) -> None: ...


class BlobWriter(Protocol):
    """An object being written: hashed as bytes arrive, visible only after :meth:`commit`."""

    @property
    def digest(self) -> Digest: ...

    @property
    def expected_size(self) -> int | None: ...

    @property
    def written(self) -> int:
        """Bytes written so far."""
        ...

    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self) -> None:
        """Verify size and digest, make durable and visible under ``digest``; on a mismatch raise
        (:class:`SizeMismatch`, :class:`DigestMismatch`) and leave nothing behind."""
        ...

    def close(self) -> None:
        """Release what the writer holds; an object not committed is discarded."""
        ...


class BlobStore(Protocol):
    """A content-addressed store of blobs and manifests (see the module docstring for the rules)."""

    #: Called with the size of every object newly stored (usage accounting).
    on_commit: Callable[[int], None] | None
    #: Called (from any thread) with the bytes to free when a write was refused for lack of room.
    on_refused: Callable[[int], None] | None

    def create(self) -> None:
        """Make the store ready for use (idempotent)."""
        ...

    def sweep_tmp(self) -> int:
        """Remove what writers that died left behind (temp files, unfinished multipart uploads), never
        a write in progress; return how many were removed.  Run at start-up."""
        ...

    # -- reading --

    def size(self, digest: Digest) -> int | None:
        """Size of a stored object, or None when it is not stored."""
        ...

    def exists(self, digest: Digest) -> bool: ...

    def open(self, digest: Digest) -> BlobReader | None:
        """A reader of a stored object, or None; the object counts as being served until it is closed."""
        ...

    def read_bytes(self, digest: Digest) -> bytes | None:
        """A small object (a manifest) in full, or None when absent."""
        ...

    def open_stream(self, digest: Digest) -> BinaryIO:
        """The object's bytes from its start, as a file object for sequential copies (exports);
        ``FileNotFoundError`` when it is not stored."""
        ...

    def redirect_url(self, digest: Digest) -> str | None:
        """Where a client may fetch the object itself (a presigned URL), or None: serve it from here."""
        ...

    def objects(self) -> Iterator[StoredObject]:
        """Every object stored, strays included (see :class:`StoredObject`)."""
        ...

    def matches(self, digest: Digest) -> bool:
        """Whether the stored object's bytes are what its name says (re-reads the whole object)."""
        ...

    # -- writing --

    def ingest(self, digest: Digest, expected_size: int | None = None, *,
               content: Digest | None = None) -> BlobWriter:
        """A new object to be stored as *digest*, whose bytes hash to *content* (default: *digest*;
        it differs only for a signed schema 1 manifest, see ``storage/filesystem.py``)."""
        ...

    def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store a small object given in full, verified; :class:`DigestMismatch` if it is not *digest*."""
        ...

    def commit_file(self, path: Path, digest: Digest, known_hex: str | None = None) -> None:
        """Store a finished local file (an upload, a staged blob) as *digest*, verified (hashed again
        unless *known_hex* is given); :class:`DigestMismatch` leaves *path* where it is.  The file is
        gone from *path* once this returns."""
        ...

    def delete(self, digest: Digest) -> bool:
        """Remove a stored object; False if it was not there."""
        ...

    def remove(self, found: StoredObject) -> None:
        """Remove something :meth:`objects` listed (a stray too)."""
        ...

    def touch(self, digest: Digest) -> None:
        """Make a stored object young again (its ``mtime``: the collector's grace period starts over)."""
        ...

    # -- room --

    def space(self) -> Space | None:
        """Size and free bytes of what holds the store, or None when it has no fixed size."""
        ...

    def room_error(self, size: int | None) -> OSError | None:
        """The error storing an object of *size* bytes would meet now, or None."""
        ...

    def refused(self, exc: BaseException, needed: int | None) -> None:
        """Record that a write was refused (*exc*), needing *needed* bytes; asks for room (``on_refused``)."""
        ...

    def write_problem(self) -> str | None:
        """Why the store cannot take writes now (what ``/readyz`` says), or None."""
        ...
