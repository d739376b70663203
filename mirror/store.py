"""The content-addressed file store.

Disk layout, produced by the methods of :class:`Store` and nowhere else::

    DATA/
      blobs/<algorithm>/<hex[:2]>/<hex>   verified content (layers, configs, manifests) by digest
      tmp/                                ingest in progress, on the same filesystem as blobs/
        <algorithm>-<hex>.partial         a shared fetch of one digest; its writer holds flock on it
        <algorithm>-<hex>.meta            {"ino", "size"} of that fetch, for readers that follow it
        ingest-<random>.partial           any other ingest (manifests, uploads); flock'ed by its writer
      index/                              metadata (see ``metadata.py``)
      uploads/<uuid>                      a client's blob upload in progress (survives restarts)
      refused                             the last write the filesystem refused (``refusals.py``)
      auth.key                            the key signing the login tokens (``auth.py``), mode 0600

A file reaches ``blobs/`` only through :meth:`Ingest.commit` or :meth:`Store.commit_file`:
digest (and size) checked, fsync, ``os.replace``.  An object is named by the digest registries
give it, which is the hash of its bytes for everything but a signed schema 1 manifest: that one
is named by the hash of its payload (``schema1.py``), stored byte for byte under that name, and
checked that way (:func:`object_matches`).  Every temp file is flock'ed by the process writing it, so the
start-up sweep removes exactly the leftovers of writers that died.

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
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from . import schema1
from .manifest import MAX_MANIFEST_BYTES
from .reference import Digest
from .refusals import Refusal, RefusalRecord, refusal, refusal_errno

CHUNK = 1024 * 1024
#: Verified objects are read-only; a fill's temp file gets this mode just before it is moved into place.
VERIFIED_MODE = 0o444
UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")
#: Free bytes a fill must leave on the filesystem (the index and temp files need some too).
ROOM_MARGIN = 1 << 20
#: How long a refused write keeps the store reported as unable to take writes, unless renewed.
REFUSAL_MEMORY = 60.0

log = logging.getLogger("mirror.store")


def new_upload_id() -> str:
    return secrets.token_hex(16)


class StoreError(Exception):
    """Base of the store's errors."""


class DigestMismatch(StoreError):
    pass


class SizeMismatch(StoreError):
    pass


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.index = root / "index"
        self.uploads = root / "uploads"
        self.gc_lock = root / "gc.lock"
        self.auth_key = root / "auth.key"
        #: Called with the size of every object newly placed in ``blobs/`` (usage accounting).
        self.on_commit: Callable[[int], None] | None = None
        #: Called (from any thread) with the bytes to free when a write was refused for lack of room.
        self.on_refused: Callable[[int], None] | None = None
        self._refusals = RefusalRecord(root / "refused")

    def create(self) -> None:
        for d in (self.blobs, self.tmp, self.index, self.uploads):
            d.mkdir(parents=True, exist_ok=True)
        self._refusals.open()

    def upload_path(self, uuid: str) -> Path:
        """Where a blob upload's bytes collect; *uuid* must come from :func:`new_upload_id`."""
        if not UPLOAD_ID_RE.fullmatch(uuid):
            raise ValueError(f"invalid upload id {uuid!r}")
        return self.uploads / uuid

    # -- paths: only ever built from a validated Digest --

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def fill_path(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.algorithm}-{digest.hex}.partial"

    def fill_meta_path(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.algorithm}-{digest.hex}.meta"

    # -- reading --

    def size(self, digest: Digest) -> int | None:
        """Size of a stored object, or None when it is not in the store."""
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            return None

    def exists(self, digest: Digest) -> bool:
        return self.size(digest) is not None

    def read_bytes(self, digest: Digest) -> bytes | None:
        """A small object (a manifest) in full, or None when absent."""
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None

    # -- writing --

    def ingest(self, digest: Digest, expected_size: int | None = None, *, content: Digest | None = None) -> Ingest:
        """A new object to be stored as *digest*, whose bytes hash to *content* (default: *digest*)."""
        path = self.tmp / f"ingest-{secrets.token_hex(12)}.partial"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return Ingest(self, digest, path, fd, expected_size, content)

    def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store a small object given in full (a manifest), verified like any other.

        *digest* is the hash of *data*, or for a signed schema 1 manifest that of its payload;
        raises :class:`DigestMismatch` when it is neither.
        """
        if self.exists(digest):
            return
        content = Digest.of(data, digest.algorithm)
        if content != digest and not _signed_schema1_named(data, digest):
            raise DigestMismatch(f"content does not match {digest} (got {content})")
        ingest = self.ingest(digest, len(data), content=content)
        try:
            ingest.write(data)
            ingest.commit()
        finally:
            ingest.close()

    def commit_file(self, path: Path, digest: Digest, known_hex: str | None = None) -> None:
        """Move a finished upload into the store, verified (hashed again unless *known_hex* is given).

        Raises :class:`DigestMismatch` and leaves *path* where it is when the bytes do not match.
        """
        with open(path, "rb") as handle:
            actual = known_hex if known_hex is not None else hash_file(path, digest.algorithm)
            if actual != digest.hex:
                raise DigestMismatch(f"content does not match {digest} (got {digest.algorithm}:{actual})")
            os.fchmod(handle.fileno(), VERIFIED_MODE)
            try:
                os.fsync(handle.fileno())
                final = self.blob_path(digest)
                if final.exists():
                    os.unlink(path)
                    return
                final.parent.mkdir(parents=True, exist_ok=True)
                size = os.fstat(handle.fileno()).st_size
                os.replace(path, final)
            except OSError:
                os.fchmod(handle.fileno(), 0o644)  # still an upload, to finish again
                raise
        self.committed(size)

    def committed(self, size: int) -> None:
        self._refusals.wrote()
        if self.on_commit is not None:
            try:
                self.on_commit(size)
            except Exception as exc:  # noqa: BLE001 (the object is stored; usage is recounted by the collector)
                log.warning("could not account for a stored object of %d bytes: %s", size, exc)

    # -- room --

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

    def write_problem(self) -> str | None:
        """Why the store cannot take writes now, or None (blocking).

        A small file is written to ``tmp/`` as a probe; a write refused lately (:meth:`refused`, by
        any process) counts until the filesystem has room for what it needed (and :data:`ROOM_MARGIN`),
        or :data:`REFUSAL_MEMORY` seconds pass; one of unknown size, also until an object is stored.
        """
        probe = self.tmp / f"readyz-{secrets.token_hex(8)}.partial"
        try:
            if not self.blobs.is_dir():
                raise FileNotFoundError(f"{self.blobs} is missing")
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ready")
            finally:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):  # a starting worker's sweep may have taken it
                    os.unlink(probe)
        except OSError as exc:
            return refusal(exc) or f"not writable: {exc.strerror or exc}" + (
                f": {exc.filename}" if exc.filename else "")
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
        return sum(path.endswith(".partial") for path in self.abandoned_temps(remove=True))

    def abandoned_temps(self, *, remove: bool = False) -> list[str]:
        """Temp files whose writer is gone (no flock held), removed while locked if *remove*."""
        found = []
        try:
            entries = list(os.scandir(self.tmp))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.name.endswith(".partial"):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                found.append(entry.path)
                if remove:  # still under our lock: no new writer can have taken it over
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        for entry in list(os.scandir(self.tmp)):
            base, meta, _ = entry.path.partition(".meta")
            if meta and (base + ".partial" in found or not os.path.exists(base + ".partial")):
                found.append(entry.path)
                if remove:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
        return found


def object_matches(path: str | os.PathLike[str], digest: Digest) -> bool:
    """True if the stored object at *path* is what its name *digest* says (the rule is above)."""
    if hash_file(path, digest.algorithm) == digest.hex:
        return True
    if os.stat(path).st_size > MAX_MANIFEST_BYTES:
        return False
    with open(path, "rb") as handle:
        return _signed_schema1_named(handle.read(), digest)


def _signed_schema1_named(data: bytes, digest: Digest) -> bool:
    if not schema1.looks_signed(data):
        return False
    try:
        return schema1.digest(data, digest.algorithm) == digest
    except schema1.Schema1Error:
        return False


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
        self._hasher = self.content.hasher()
        self._closed = False

    def write(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.written += len(data)

    def verify(self) -> None:
        if self.expected_size is not None and self.written != self.expected_size:
            raise SizeMismatch(f"{self.digest}: got {self.written} bytes, expected {self.expected_size}")
        actual = self._hasher.hexdigest()
        if actual != self.content.hex:
            raise DigestMismatch(f"content does not match {self.content} (got {self.content.algorithm}:{actual})")

    def commit(self) -> None:
        """Verify, flush to disk and move into place.  Raises and leaves nothing behind on mismatch."""
        try:
            self.verify()
        except StoreError:
            self.discard()
            raise
        os.fchmod(self.fd, VERIFIED_MODE)  # the mark readers following this fill look for
        os.fsync(self.fd)
        final = self.store.blob_path(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, final)
        self.store.committed(self.written)

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Release the temp file; an uncommitted one is removed."""
        if self._closed:
            return
        self._closed = True
        if os.path.exists(self.path):
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
