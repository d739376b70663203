"""The filesystem blob-store driver (``storage/driver.py``): objects under ``DATA/blobs/`` (``storage/layout.py``).

A file reaches ``blobs/`` only through :meth:`Ingest.commit` or :meth:`Store.commit_file`: digest (and size)
checked, fsync, ``os.replace``; it is then read-only (:data:`VERIFIED_MODE`).  An object is named by the digest
registries give it, which is the hash of its bytes for everything but a signed schema 1 manifest: that one is
named by the hash of its payload (``schema1.py``), stored byte for byte under that name, and checked that way
(:func:`object_matches`).  Every temp file is flock'ed by the process writing it, so the start-up sweep removes
exactly the leftovers of writers that died.  With ``blobs/`` itself gone (a volume not mounted), a look for an
object raises ``StoreUnavailable`` (:func:`~mirror.storage.driver.missing_root`), not "absent".

Readers get a :class:`StoredBlob`: an open descriptor (``sendfile`` sends from it), which keeps the object
readable whatever the collector deletes meanwhile, and a shared ``flock`` on it that marks it as being served
(:meth:`Store.serving`).  The fetch that clients follow as it grows is ``storage/fill.py``'s, on temp files.

When the filesystem refuses a write (full, over quota, read-only: :func:`refusal`), callers record it
with :meth:`Store.refused`; :meth:`Store.write_problem` then reports the store as unable to take writes
until there is room again (what ``/readyz`` answers, in every worker process).

All methods do blocking file I/O: call them from a worker thread in async code.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..spec.manifest import MAX_MANIFEST_BYTES
from ..spec.reference import Digest
from .driver import DigestMismatch, Space, StoredObject, StoreError, UploadParts, missing_root
from .filehash import FileHash
from .layout import PARTIAL, Layout
from .marks import being_read
from .reads import read_chunks
from .refusals import Refusal, RefusalRecord, probe_writes, refusal_errno
from .verify import check_written, put_verified, signed_schema1_named

CHUNK = 1024 * 1024
#: Verified objects are read-only; a fill's temp file gets this mode just before it is moved into place.
VERIFIED_MODE = 0o444
#: Free bytes a fill must leave on the filesystem (the index and temp files need some too).
ROOM_MARGIN = 1 << 20
#: How long a refused write keeps the store reported as unable to take writes, unless renewed.
REFUSAL_MEMORY = 60.0

log = logging.getLogger("mirror.storage.filesystem")


@dataclass
class StoredBlob:
    """Verified content already in the store; ``fd`` keeps it readable whatever GC does."""

    fd: int
    size: int

    def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``start..end`` (inclusive; None: to the end)."""
        stop = self.size if end is None else end + 1
        return read_chunks(self.fd, start, stop - start)

    def close(self) -> None:
        os.close(self.fd)


class Store:
    """The filesystem driver of :class:`~mirror.storage.driver.BlobStore`, rooted at the data directory."""

    local = True  # lookups are a stat or an open
    clock = staticmethod(time.time)  # files are dated by this host's clock

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = Layout(root)
        #: Called with the size of every object newly placed in ``blobs/`` (usage accounting).
        self.on_commit: Callable[[int], None] | None = None
        #: Called (from any thread) with the bytes to free when a write was refused for lack of room.
        self.on_refused: Callable[[int], None] | None = None
        self._refusals = RefusalRecord(self.layout.refused)

    def create(self) -> None:
        for d in self.layout.directories():
            d.mkdir(parents=True, exist_ok=True)
        self._refusals.open()

    # -- reading --

    def size(self, digest: Digest) -> int | None:
        """Size of a stored object, or None when it is not in the store."""
        try:
            return os.stat(self.layout.blob(digest)).st_size
        except FileNotFoundError:
            missing_root(self.layout)
            return None

    def exists(self, digest: Digest) -> bool:
        return self.size(digest) is not None

    def open(self, digest: Digest) -> StoredBlob | None:
        """The stored object, marked as being served (a shared ``flock`` until it is closed), or None.

        The collector does not evict an image while one of its objects is marked (``maintenance/gc.py``).
        """
        try:
            fd = os.open(self.layout.blob(digest), os.O_RDONLY)
        except FileNotFoundError:
            missing_root(self.layout)
            return None
        with contextlib.suppress(BlockingIOError):  # the collector looking at it this instant: serve anyway
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return StoredBlob(fd, os.fstat(fd).st_size)

    def serving(self, digest: Digest) -> bool:
        """True while a reader in any process holds the stored object marked (see :meth:`open`)."""
        return being_read(self.layout.blob(digest))

    def read_bytes(self, digest: Digest) -> bytes | None:
        """A small object (a manifest) in full, or None when absent."""
        try:
            return self.layout.blob(digest).read_bytes()
        except FileNotFoundError:
            missing_root(self.layout)
            return None

    def open_stream(self, digest: Digest) -> BinaryIO:
        return open(self.layout.blob(digest), "rb")

    def redirect_url(self, digest: Digest, source: object = None) -> str | None:
        return None  # served from the local file

    def objects(self) -> Iterator[StoredObject]:
        """Every file under ``blobs/`` (strays with ``digest`` None); ``location`` is its path."""
        missing_root(self.layout)
        for found in self.layout.blob_entries():
            try:
                st = found.entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield StoredObject(found.name, st.st_size, st.st_mtime, found.digest, found.path)

    def matches(self, digest: Digest) -> bool:
        return object_matches(self.layout.blob(digest), digest)

    # -- removing --

    def delete(self, digest: Digest) -> bool:
        try:
            os.unlink(self.layout.blob(digest))
        except FileNotFoundError:
            return False
        return True

    def remove(self, found: StoredObject) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(found.location)

    def touch(self, digest: Digest) -> None:
        os.utime(self.layout.blob(digest))

    # -- writing --

    def ingest(self, digest: Digest, expected_size: int | None = None, *, content: Digest | None = None) -> Ingest:
        """A new object to be stored as *digest*, whose bytes hash to *content* (default: *digest*)."""
        path = self.layout.temp("ingest")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return Ingest(self, digest, path, fd, expected_size, content)

    def fill_writer(self, digest: Digest, path: Path, fd: int) -> Ingest:
        """The fill's own file, moved into ``blobs/`` by its commit."""
        return Ingest(self, digest, path, fd, None)

    def fill_placed(self, digest: Digest, fd: int) -> bool:
        try:
            return os.stat(self.layout.blob(digest)).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store a small object given in full (a manifest), verified like any other: *digest* is the hash
        of *data*, or for a signed schema 1 manifest that of its payload (else :class:`DigestMismatch`)."""
        put_verified(self, digest, data)

    def commit_file(self, path: Path, digest: Digest, known_hex: str | None = None) -> None:
        """Move a finished upload into the store, verified (hashed again unless *known_hex* is given); it
        replaces an object stored already (damaged, maybe; and young again for the collector's grace).

        Raises :class:`DigestMismatch` and leaves *path* where it is when the bytes do not match.
        """
        with open(path, "rb") as handle:
            actual = known_hex if known_hex is not None else hash_file(path, digest.algorithm)
            if actual != digest.hex:
                raise DigestMismatch(f"content does not match {digest} (got {digest.algorithm}:{actual})")
            os.fchmod(handle.fileno(), VERIFIED_MODE)
            try:
                os.fsync(handle.fileno())
                final = self.layout.blob(digest)
                size = os.fstat(handle.fileno()).st_size
                stored = _size_of(final)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, final)
            except OSError:
                os.fchmod(handle.fileno(), 0o644)  # still an upload, to finish again
                raise
        if stored is not None and stored != size:
            log.warning("%s: the stored object had %d bytes, not the %d pushed: replaced by the pushed bytes,"
                        " which match the digest", digest, stored, size)
        self.committed(size - (stored or 0))

    def upload_part_size(self) -> int | None:
        return None  # an upload is one local file, moved into place by commit_upload

    def send_upload_part(self, uuid: str, path: Path, parts: UploadParts | None) -> UploadParts:
        raise NotImplementedError("the filesystem driver sends no parts")

    def commit_upload(self, uuid: str, path: Path, digest: Digest, known_hex: str | None,
                      parts: UploadParts | None) -> None:
        self.commit_file(path, digest, known_hex)

    def abort_upload(self, uuid: str, parts: UploadParts | None) -> None:
        pass  # nothing of it is anywhere but its local file

    def committed(self, size: int) -> None:
        self._refusals.wrote()
        if self.on_commit is not None:
            try:
                self.on_commit(size)
            except Exception as exc:  # noqa: BLE001 (the object is stored; usage is recounted by the collector)
                log.warning("could not account for a stored object of %d bytes: %s", size, exc)

    # -- room --

    def space(self) -> Space:
        """The filesystem holding the store (``statvfs``)."""
        fs = os.statvfs(self.root)
        return Space(fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize)

    def free_bytes(self) -> int:
        """Bytes available to this process on the store's filesystem (``statvfs``)."""
        fs = os.statvfs(self.root)
        return fs.f_bavail * fs.f_frsize

    def room_error(self, size: int | None) -> OSError | None:
        """The error storing an object of *size* bytes would meet now (``ENOSPC``: too little free
        space, :data:`ROOM_MARGIN` kept), or None."""
        if size is None or size + ROOM_MARGIN <= self.free_bytes():
            return None
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def refused(self, exc: BaseException, needed: int | None) -> None:
        """Record that a write was refused (*exc*, a :func:`refusal`); asks for room (``on_refused``)."""
        code = refusal_errno(exc)
        if code is None:
            return
        try:
            free = self.free_bytes()
        except OSError:
            free = 0
        self._refusals.write(Refusal(time.time(), needed, free, code))
        if self.on_refused is not None and code != errno.EROFS:
            self.on_refused(max((needed or 0) + ROOM_MARGIN - free, ROOM_MARGIN))

    def write_problem(self, *, probe: bool = False) -> str | None:
        """Why the store cannot take writes now, or None (blocking).

        A small file is written to ``tmp/`` as a probe; a write refused lately (:meth:`refused`, by
        any process) counts until the filesystem has room for what it needed (and :data:`ROOM_MARGIN`),
        or :data:`REFUSAL_MEMORY` seconds pass; one of unknown size, also until an object is stored.
        """
        if not self.layout.blobs.is_dir():
            return f"not writable: {self.layout.blobs} is missing"
        problem = probe_writes(self.layout.temp("readyz"))
        if problem is not None:
            return problem
        last = self._refusals.read()
        if last is None:
            return None
        try:
            free = self.free_bytes()
        except OSError:
            free = 0
        want = (last.needed if last.needed is not None else last.free) + ROOM_MARGIN
        # A read-only filesystem that took the probe is writable again; a full one needs room.
        if last.errno == errno.EROFS or free >= want or time.time() - last.at > REFUSAL_MEMORY:
            self._refusals.write(None)
            return None
        needed = f"{last.needed + ROOM_MARGIN} bytes needed with the reserve, " if last.needed is not None else ""
        return f"{last.reason} ({needed}{free} bytes free)"

    def sweep_tmp(self) -> int:
        """Remove temp files whose writer is gone; return how many were removed."""
        return sum(path.endswith(PARTIAL) for path in self.layout.abandoned_temps(remove=True))


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of *data* to *fd* (``os.write`` may take less at a time)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def object_matches(path: str | os.PathLike[str], digest: Digest) -> bool:
    """True if the stored object at *path* is what its name *digest* says (the rule is above)."""
    if hash_file(path, digest.algorithm) == digest.hex:
        return True
    if os.stat(path).st_size > MAX_MANIFEST_BYTES:
        return False
    with open(path, "rb") as handle:
        return signed_schema1_named(handle.read(), digest)


def hash_file(path: str | os.PathLike[str], algorithm: str) -> str:
    """Hex digest of a file's content, read 1 MiB at a time."""
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while data := handle.read(CHUNK):
            hasher.update(data)
    return hasher.hexdigest()


class Ingest:
    """A temp file being written: hashed as bytes arrive, committed only when verified."""

    def __init__(self, store: Store, digest: Digest, path: Path, fd: int, expected_size: int | None,
                 content: Digest | None = None) -> None:
        self.store = store
        self.digest = digest
        #: What the bytes must hash to: the name, but for a signed schema 1 manifest (see above).
        self.content = content or digest
        self.path = path
        self.fd = fd
        self.expected_size = expected_size
        self.written = 0
        self.stored_elsewhere: Callable[[], bool] | None = None  # replicas need a shared store: ignored here
        self.serves_unstored = False  # a file whose fsync or rename failed may not read back as written
        self._hash = FileHash(self.content.hasher(), fd)  # beside the writes, for a large body
        self._closed = False

    def write(self, data: bytes | memoryview) -> None:
        write_all(self.fd, data)
        self._hash.update(data)
        self.written += len(data)

    def verify(self) -> None:
        check_written(self.digest, self.content, self.expected_size, self.written, self._hash.hexdigest())

    def commit(self) -> None:
        """Verify, flush to disk and move into place.  Raises and leaves nothing behind on mismatch."""
        try:
            self.verify()
        except StoreError:
            self.discard()
            raise
        os.fchmod(self.fd, VERIFIED_MODE)  # the mark readers following this fill look for
        os.fsync(self.fd)
        final = self.store.layout.blob(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, final)
        self.store.committed(self.written)

    def discard(self) -> None:
        self._hash.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Release the temp file; an uncommitted one is removed."""
        if self._closed:
            return
        self._closed = True
        self._hash.close()
        if os.path.exists(self.path):
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)


if TYPE_CHECKING:
    from .driver import BlobStore

    def _is_a_driver(store: Store) -> BlobStore:  # mypy checks that Store implements the interface
        return store


def _size_of(path: Path) -> int | None:
    """The size of the file at *path*, or None if there is none."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None
