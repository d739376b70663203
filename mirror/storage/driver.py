"""The blob-store driver interface: content by digest, written once, verified before it is visible.

Every driver (the filesystem one, :class:`mirror.storage.filesystem.Store`, under ``--data``, and the S3 one,
:class:`mirror.storage.s3.S3Store`) keeps these rules, and ``tests/test_blobstore_contract.py`` checks them for each:

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

Whatever the driver, the local data directory (:attr:`BlobStore.layout`) holds the work in progress:
fills clients follow as they grow (``storage/fill.py``: a driver gives the writer of each,
:meth:`BlobStore.fill_writer`), uploads being assembled, locks and the record of refused writes.
A driver may send a push upload's bytes on while it runs, in parts of :meth:`BlobStore.upload_part_size`
bytes (:meth:`~BlobStore.send_upload_part`; where they went is an :class:`UploadParts`, which the
caller keeps in the index); :meth:`~BlobStore.commit_upload` then stores the upload under its digest,
verified like every other write.

Errors: :class:`StoreError` (and its subclasses below) for content that does not match; ``OSError``
for what the backend refuses (``storage/refusals.py`` tells a full or read-only store from other failures).

All methods but :meth:`BlobReader.chunks` block: call them from a worker thread in async code, except
where :attr:`BlobStore.local` says lookups are local system calls, and :meth:`BlobStore.room_error`
(a ``statvfs``), which async code calls directly.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from ..spec.reference import Digest
from .layout import Layout


class StoreError(Exception):
    """Base of the store's errors."""


class StoreUnavailable(OSError):
    """The object store does not answer now, or refuses a request (``EIO``; the message names the
    store and the request): nothing stored was changed, and a later call may succeed.  The HTTP edge
    answers it with ``503 UNAVAILABLE`` (RFC 9110 section 15.6.4).  Its ``str()`` is the message alone
    (without ``[Errno 5]``): it goes to logs and command lines as it is."""

    def __str__(self) -> str:
        return self.strerror if isinstance(self.strerror, str) else super().__str__()


def missing_root(layout: Layout) -> None:
    """Raise :class:`StoreUnavailable` if the store's ``blobs/`` directory itself is gone (its volume
    not mounted, say): an object missing from it is then not known to be absent (no ``404``, no fetch
    written into nowhere, no collection that counts the store empty)."""
    if not layout.blobs.is_dir():
        raise StoreUnavailable(errno.EIO, f"the store's directory {layout.blobs} is missing: is its volume mounted?")


class StoreSetupError(ValueError):
    """The store's client cannot be made from its settings and the environment (the AWS SDK's
    ``AWS_PROFILE`` naming no profile, an ``AWS_CONFIG_FILE`` it cannot parse): nothing was asked of the
    store.  The message says what to check; commands print it in one line and exit 2."""


class UploadLost(StoreError):
    """The object store no longer holds what an upload sent to it (its multipart upload was aborted
    behind the mirror's back: a bucket lifecycle rule for incomplete uploads, say): the upload cannot
    go on, and its client must push the blob again."""


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
class UploadParts:
    """Where the first bytes of a push upload went in the backend: the multipart upload ``upload_id``
    (S3) and the ETags of its parts, in order, each ``part_size`` bytes; they hold the upload's
    bytes ``0..sent - 1``."""

    upload_id: str
    part_size: int
    etags: tuple[str, ...] = ()

    @property
    def sent(self) -> int:
        return self.part_size * len(self.etags)


@dataclass(frozen=True, slots=True)
class UploadKeys:
    """What a listing of the store's push uploads found: uuid -> the last write (``time.time()``) of the
    upload's kept tail (``tails``) and of its completed object (``objects``; one in progress has none)."""

    tails: dict[str, float]
    objects: dict[str, float]


class UploadTails(Protocol):
    """Where the replicas of a cluster keep a push upload's unsent tail (its bytes past the parts sent,
    less than a part) between two of its requests, so that any replica continues it: one object per
    upload, written whole at the end of a request (``registry/roaming.py``).  Errors: ``OSError``."""

    def put(self, uuid: str, fd: int, start: int, size: int) -> None:
        """Keep bytes ``start..start + size - 1`` of the file open as *fd* as the tail of *uuid*."""
        ...

    def fetch(self, uuid: str, fd: int, start: int, size: int) -> None:
        """Write the first *size* bytes of the tail of *uuid* into the file open as *fd* at *start*;
        ``OSError`` (``EIO``) if it holds fewer."""
        ...

    def remove(self, uuid: str) -> None:
        """Delete the tail of *uuid* (none is no error)."""
        ...

    def listed(self) -> UploadKeys:
        """Every upload with a tail kept or a completed object (``uploads/<uuid>/data``) in the store, from
        one listing.  For the sweep of what ended uploads left behind, never for an upload's own state."""
        ...

    def remove_object(self, uuid: str) -> None:
        """Delete the completed object of *uuid* (none is no error)."""
        ...


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


class FillWriter(Protocol):
    """The writer of a fill (``storage/fill.py``): the upstream's bytes go to the local file ``path``
    (open as ``fd``, flock'ed by the fill) that readers follow, hashed as they arrive (a large body's
    beside the writes, read back: ``storage/filehash.py``); :meth:`commit`
    verifies them, marks the file :data:`~mirror.storage.filesystem.VERIFIED_MODE` and stores the
    object (the file itself, moved into place, or its bytes, sent elsewhere); :meth:`discard` removes
    the file and whatever was sent of it.  ``fd`` stays the fill's to close.

    *stored_elsewhere*, when given (by the fetch's download, ``registry/cluster.py``), says whether
    another replica stores the object now: while it does, the S3 driver's writer sends nothing, and
    its commit verifies and waits for that replica's object instead (the filesystem driver ignores it:
    replicas need a shared store).

    *serves_unstored*: the verified mark stays for the readers if storing fails after it (the S3
    driver's, whose file is never the object; the filesystem's file may not be durable)."""

    digest: Digest
    path: Path
    fd: int
    expected_size: int | None
    written: int
    stored_elsewhere: Callable[[], bool] | None
    serves_unstored: bool

    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self) -> None:
        """Verify, mark verified and store; on a mismatch (:class:`StoreError`) discard and raise."""
        ...

    def discard(self) -> None: ...


class BlobStore(Protocol):
    """A content-addressed store of blobs and manifests (see the module docstring for the rules)."""

    #: Called with the size of every object newly stored (usage accounting).
    on_commit: Callable[[int], None] | None
    #: Called (from any thread) with the bytes to free when a write was refused for lack of room.
    on_refused: Callable[[int], None] | None
    #: True when :meth:`size`, :meth:`exists` and :meth:`open` are system calls on local files
    #: (microseconds: async code makes them on its event loop); False when they are requests.
    local: bool
    #: Now, in seconds since the epoch, by the clock that dates the stored objects (the collector's
    #: ``gc.grace`` cutoff): this host's for files; the object store's for S3 (its ``LastModified``).
    clock: Callable[[], float]

    @property
    def layout(self) -> Layout:
        """The local data directory (``--data``): temp files and fills, uploads, locks, the auth key,
        the diskcache index.  Its ``blobs/`` is the filesystem driver's own: no other code uses it."""
        ...

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

    def serving(self, digest: Digest) -> bool:
        """Whether a reader :meth:`open` gave, or one of a fill that stored it, is open on the object, in
        any process of this host (the filesystem driver: a ``flock`` on the object's file; an object store:
        on its mark in ``tmp/``)."""
        ...

    def read_bytes(self, digest: Digest) -> bytes | None:
        """A small object (a manifest) in full, or None when absent."""
        ...

    def open_stream(self, digest: Digest) -> BinaryIO:
        """The object's bytes from its start, as a file object for sequential copies (exports);
        ``FileNotFoundError`` when it is not stored."""
        ...

    def redirect_url(self, digest: Digest, source: object = None) -> str | None:
        """Where a client may fetch the object itself (a presigned URL), or None: serve it from here
        (*source*, the reader the object was opened with, may say it must be read here first)."""
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

    def fill_writer(self, digest: Digest, path: Path, fd: int) -> FillWriter:
        """The writer of the fill of *digest* into the local file *path* (``layout.fill(digest)``), open as *fd*."""
        ...

    def fill_placed(self, digest: Digest, fd: int) -> bool:
        """Whether the object stored as *digest* is the local file open as *fd* itself (a fill the
        filesystem driver moved into place); always False for a driver that sends the bytes elsewhere."""
        ...

    def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store a small object given in full, verified; :class:`DigestMismatch` if it is not *digest*."""
        ...

    def commit_file(self, path: Path, digest: Digest, known_hex: str | None = None) -> None:
        """Store a finished local file (an upload, a staged blob) as *digest*, verified (hashed again
        unless *known_hex* is given); :class:`DigestMismatch` leaves *path* where it is.  The file is
        gone from *path* once this returns."""
        ...

    def upload_part_size(self) -> int | None:
        """Bytes of each part a push upload sends to the backend as soon as it holds them, or None:
        an upload stays in its local file until :meth:`commit_upload`."""
        ...

    def send_upload_part(self, uuid: str, path: Path, parts: UploadParts | None) -> UploadParts:
        """Send the next part of the upload *uuid* (bytes ``parts.sent`` on, ``part_size`` of them)
        from its local file *path*, which may then stop holding the parts sent before; return where its
        parts are now.  With *parts* None, only start where they go (no part is sent)."""
        ...

    def commit_upload(self, uuid: str, path: Path, digest: Digest, known_hex: str | None,
                      parts: UploadParts | None) -> None:
        """Store the upload *uuid* as *digest* (its first bytes in *parts*, the rest in *path*), as
        :meth:`commit_file` does: verified, :class:`DigestMismatch` otherwise; *path* is gone once
        this returns, and so are *parts*."""
        ...

    def abort_upload(self, uuid: str, parts: UploadParts | None) -> None:
        """Discard what an upload sent to the backend (nothing there is no error)."""
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
        """The error a fill of *size* bytes would meet now (its local file, and the object), or None.
        Local system calls only (``statvfs``), never a request: called on the event loop."""
        ...

    def refused(self, exc: BaseException, needed: int | None) -> None:
        """Record that a write was refused (*exc*), needing *needed* bytes; asks for room (``on_refused``)."""
        ...

    def write_problem(self, *, probe: bool = False) -> str | None:
        """Why the store cannot take writes now (what ``/readyz`` says), or None.  *probe*: an object
        store is tried with a write although none was refused yet (``mirror serve``'s start)."""
        ...
