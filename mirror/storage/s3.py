"""The S3 blob-store driver (``storage/driver.py``): objects in a bucket, at ``<rootdirectory>/blobs/...``.

Keys are ``storage/layout.py``'s :func:`~mirror.storage.layout.object_key` under ``rootdirectory``.
An object is written once, to its final key, by a multipart upload of fixed ``chunksize`` parts
(or one ``PutObject``) completed only after its digest matched (``storage/s3objects.py``): no
temporary object is copied, and correctness relies neither on LIST nor on conditional writes.

The local data directory (``--data``, :attr:`S3Store.layout`) keeps what it keeps for the filesystem
driver but ``blobs/``: fills in progress, which are sent to the bucket as they grow
(``storage/s3fill.py``), uploads being assembled, locks, the auth key, the diskcache index.

Reads are ranged GETs; every reader marks the object as being served in ``tmp/`` (a shared ``flock``
that :meth:`S3Store.serving` sees from any process, so the collector keeps the image), and with
:attr:`S3Store.in_use` a mark in the index that collectors of other hosts see.  A reader
opened before a delete by this process reads on from a local copy that the delete makes first (in
``tmp/``); one open in another process keeps the object, which the delete leaves to the next collection
(readers mark before they look the object up, so none sees it then loses it).  Unfinished uploads older than
``stale_upload`` seconds are aborted by :meth:`S3Store.sweep_tmp` (their writer is gone), never this
process's own nor a push upload's whose local file is still there; it removes the local temp files of
writers that died too.  Push uploads send their parts while they run (``storage/s3uploads.py``).

Configuration keys follow distribution's s3 driver: ``regionendpoint``, ``region``, ``bucket``,
``rootdirectory``, ``accesskey``, ``secretkey``, ``forcepathstyle``, ``chunksize``, ``redirect``.
Every method here blocks: call it from a worker thread in async code, as for the filesystem driver.

Requests go on three clients with timeouts of their own (``s3client.py``): :attr:`S3Store.quick` for small
ones (HEAD, LIST, DELETE, a GET to its headers), :attr:`S3Store.client` for those that send or copy bytes,
:attr:`S3Store.probe` for ``/readyz``: a hung store is reported within seconds.

Errors: what S3 refuses or leaves unanswered is raised as ``StoreUnavailable`` (``EIO``) from botocore's
error (listings too); a missing object is None / False / ``FileNotFoundError`` as the interface says.
Credentials the store refuses and a bucket that does not exist say what to check (``s3client.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from botocore.exceptions import BotoCoreError, ClientError

from ..spec.manifest import MAX_MANIFEST_BYTES
from ..spec.reference import Digest
from .driver import Space, StoredObject, UploadParts
from .layout import PARTIAL, UPLOADS_PREFIX, Layout, object_key, parse_object_key
from .marks import SharedMarks, being_read, unread
from .refusals import RefusalRecord
from .s3client import make_clients
from .s3damage import checked_bytes, checked_copy, read_whole, vouched
from .s3fill import S3Fill
from .s3handout import HandedOut
from .s3notes import abort_again, sweep_notes
from .s3objects import MIN_CHUNK, S3Ingest, S3Reader, backend_error, get_object, head, missing
from .s3options import S3Options
from .s3room import PROBE_KEY, refused, room_error, store_clock, write_problem
from .s3uploads import COPY_LIMIT, COPY_PART, abort_upload, commit_file, commit_upload, send_part
from .verify import put_verified, signed_schema1_named

__all__ = ["MIN_CHUNK", "S3Options", "S3Store"]

#: Seconds a presigned GET stays valid (distribution's default too).
REDIRECT_EXPIRY = 20 * 60
#: Where distribution's s3 driver keeps its store, under the same ``rootdirectory``.
LEGACY = "docker/registry/v2/"
#: Seconds between two tries of the aborts the store refused (it did not answer: a fill broken by an outage).
ABORT_RETRY = 10.0
#: Age in seconds of an unfinished multipart upload whose writer is taken to be gone.
STALE_UPLOAD = 24 * 3600.0

log = logging.getLogger("mirror.storage.s3")


class S3Store:
    """The S3 driver of :class:`~mirror.storage.driver.BlobStore` (see the module docstring)."""

    local = False  # lookups are requests (HEAD, GET)

    def __init__(self, options: S3Options, data: Path, *, stale_upload: float = STALE_UPLOAD,
                 client: Any = None) -> None:
        """*data*: the local data directory (see the module docstring)."""
        if options.chunksize < MIN_CHUNK:
            raise ValueError(f"chunksize must be at least {MIN_CHUNK} bytes, got {options.chunksize}")
        self.options = options
        self.bucket = options.bucket
        self.root = options.rootdirectory.strip("/") + "/" if options.rootdirectory.strip("/") else ""
        self.layout = Layout(data)
        self.stale_upload = stale_upload
        #: Clients for transfers, small requests, ``/readyz`` and sends (*client*, if given, is all four).
        self.client, self.quick, self.probe, self.send = (client,) * 4 if client is not None else make_clients(options)
        self.on_commit: Callable[[int], None] | None = None
        self.on_refused: Callable[[int], None] | None = None
        #: Called with the digest of every object found not to match it on a read (then removed).
        self.on_corrupt: Callable[[Digest], None] | None = None
        #: Marks in the index of the objects this process reads (set by a server whose index hosts share).
        self.in_use: SharedMarks | None = None
        self.condemned: set[Digest] = set()  # found damaged, logged already
        self.vouched: OrderedDict[Digest, str] = OrderedDict()  # ETags of objects seen whole and matching
        self._lock = threading.Lock()
        self._readers: dict[Digest, set[S3Reader]] = {}
        self._uploads: set[str] = set()  # multipart uploads this process has in progress
        self._unaborted: dict[str, str] = {}  # upload id -> key: aborts refused here, asked again (abort)
        self._abort_timer: threading.Timer | None = None
        self.handed_out = HandedOut()  # marks of objects handed out by presigned URLs
        self.refusals = RefusalRecord(self.layout.refused)  # the bucket's last refusal of a write (s3room.py)
        self.clock: Callable[[], float] = lambda: store_clock(self)  # what dates the objects (the collector's grace)
        self.copy_limit, self.copy_part = COPY_LIMIT, COPY_PART  # copies in the bucket (s3uploads.py)
        self.shared_pushes = False  # push uploads' local files may be on other replicas: expired by record, not age

    def key(self, digest: Digest) -> str:
        return self.root + object_key(digest)

    def create(self) -> None:
        """Make the local directories; check that the bucket answers (not created: its policy is the operator's)."""
        for directory in (self.layout.tmp, self.layout.uploads):
            directory.mkdir(parents=True, exist_ok=True)
        self.refusals.open()
        try:
            self.quick.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"access to bucket {self.bucket!r}", self.options) from exc
        try:  # distribution's own layout under the same rootdirectory: a registry:2 configuration carried over
            legacy = self.quick.list_objects_v2(Bucket=self.bucket, Prefix=self.root + LEGACY, MaxKeys=1)
        except (BotoCoreError, ClientError):
            legacy = {}  # a hint only: what needs the bucket says what is wrong with it
        if legacy.get("KeyCount"):
            log.warning("bucket %r holds a registry:2 store under %r: the mirror neither reads nor removes it (its"
                        " images are not served from here; copy them in with skopeo sync, or pull them through)",
                        self.bucket, self.root + LEGACY)

    def sweep_tmp(self) -> int:
        """Remove the local temp files whose writer is gone, and abort unfinished multipart uploads
        older than ``stale_upload`` that this process did not start; return how many went."""
        removed = sweep_notes(self.layout, self._uploads, self.abort)
        removed += sum(path.endswith(PARTIAL) for path in self.layout.abandoned_temps(remove=True))
        for mark in self.layout.reading_entries():
            being_read(mark, remove=True)  # left by readers that died
        cutoff = time.time() - self.stale_upload
        for upload in self._unfinished():
            if upload["UploadId"] in self._uploads or upload["Initiated"].timestamp() > cutoff \
                    or self._pushing(upload["Key"]):
                continue
            self.abort(upload["Key"], upload["UploadId"])
            removed += 1
        return removed

    def _pushing(self, key: str) -> bool:
        """Whether *key* is a push upload's (``uploads/<uuid>/data``) whose local file is still there
        (or, with :attr:`shared_pushes`, may be on another replica)."""
        uuid = key[len(self.root):].removeprefix("uploads/").removesuffix("/data")
        try:
            return key.startswith(self.root + "uploads/") and (self.shared_pushes or self.layout.upload(uuid).exists())
        except ValueError:
            return False

    def _unfinished(self) -> Iterator[dict[str, Any]]:
        """This store's unfinished multipart uploads (objects', push uploads', probe's), not another's in the bucket."""
        pages = self.client.get_paginator("list_multipart_uploads")
        try:
            for prefix in ("blobs/", UPLOADS_PREFIX, PROBE_KEY):
                for page in pages.paginate(Bucket=self.bucket, Prefix=self.root + prefix):
                    yield from page.get("Uploads", [])
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, "listing unfinished multipart uploads", self.options) from exc

    # -- reading --

    def size(self, digest: Digest) -> int | None:
        found = head(self, digest)
        return None if found is None else found[0]

    def exists(self, digest: Digest) -> bool:
        return self.size(digest) is not None

    def open(self, digest: Digest) -> S3Reader | None:
        reader = S3Reader.opened(self, digest)
        if reader is None:
            return None
        with self._lock:
            self._readers.setdefault(digest, set()).add(reader)
        return reader

    def serving(self, digest: Digest) -> bool:
        """Whether a reader of any process is open on the object (its mark in ``tmp/``)."""
        with self._lock:
            if digest in self._readers:
                return True
        return being_read(self.layout.reading(digest))

    def closed(self, reader: S3Reader) -> None:
        with self._lock:
            readers = self._readers.get(reader.digest)
            if readers is not None:
                readers.discard(reader)
                if not readers:
                    del self._readers[reader.digest]

    def get_range(self, digest: Digest, first: int, last: int) -> dict[str, Any]:
        """S3's answer to a GET of bytes ``first..last`` of an object: ``Body`` (a botocore
        ``StreamingBody``) and ``ETag``."""
        return get_object(self, digest, Range=f"bytes={first}-{last}")

    def open_stream(self, digest: Digest) -> BinaryIO:
        return cast(BinaryIO, get_object(self, digest)["Body"])

    def read_bytes(self, digest: Digest) -> bytes | None:
        """The whole object, or None if it is missing or does not match *digest* (then removed)."""
        return checked_bytes(self, digest)

    def redirect_url(self, digest: Digest, source: object = None) -> str | None:
        """A presigned GET of the object when ``redirect`` is on and it may be handed out unread (of
        *source*, an opened reader: only one this process saw match its digest), else None.  The
        reader's marks are then kept a while (``storage/s3handout.py``): no collector deletes the
        object before the client has fetched it."""
        if not self.options.redirect or (isinstance(source, S3Reader) and not vouched(self, digest, source.etag)):
            return None  # served from here, hashed as it goes, and vouched for if it matches
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(digest)}, ExpiresIn=REDIRECT_EXPIRY)
        if isinstance(source, S3Reader):
            self.handed_out.keep(digest, source.handed_out())
        return url

    def objects(self) -> Iterator[StoredObject]:
        """Every key under ``<rootdirectory>/blobs/`` (strays with ``digest`` None); ``location`` is the key."""
        prefix = self.root + "blobs/"
        try:
            for page in self.quick.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    name, digest = parse_object_key(item["Key"][len(prefix):])
                    yield StoredObject(name, int(item["Size"]), item["LastModified"].timestamp(), digest, item["Key"])
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"LIST {prefix}", self.options) from exc

    def matches(self, digest: Digest) -> bool:
        hasher, size = hashlib.new(digest.algorithm), 0
        with self.open_stream(digest) as body:
            while data := body.read(1 << 20):
                hasher.update(data)
                size += len(data)
        if hasher.hexdigest() == digest.hex:
            return True
        whole = read_whole(self, digest) if size <= MAX_MANIFEST_BYTES else None
        return whole is not None and signed_schema1_named(whole, digest)

    # -- removing --

    def delete(self, digest: Digest) -> bool:
        """Remove an object; readers of it in this process read on from a local copy made first.  One
        open in another process keeps it (False; the next collection removes it, unreferenced)."""
        with self._lock:
            readers = list(self._readers.get(digest, ()))
        if readers:
            copy = checked_copy(self, digest)
            if copy is not None:
                with copy:
                    for reader in readers:
                        reader.keep(os.dup(copy.fileno()))
        with unread(self.layout.reading(digest)) as free:
            if not free:
                log.info("kept %s, being read by another process", digest)
                return False
            if not readers and self.size(digest) is None:
                return False
            self._delete_key(self.key(digest))
        return True

    def remove(self, found: StoredObject) -> None:
        self._delete_key(found.location)

    def remove_key(self, key: str) -> None:
        """Delete *key* (gone already: no error), whoever reads it."""
        self._delete_key(key)

    def _delete_key(self, key: str) -> None:
        try:
            self.quick.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            if not missing(exc):
                raise backend_error(exc, f"DELETE {key}", self.options) from exc

    def touch(self, digest: Digest) -> None:
        """Rewrite the object's metadata in place (S3 has no utime): its ``LastModified`` is now."""
        key = self.key(digest)
        try:
            self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                    MetadataDirective="REPLACE", Metadata={"touched": f"{time.time():.3f}"})
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"touch {digest}", self.options) from exc

    # -- writing --

    def ingest(self, digest: Digest, expected_size: int | None = None, *, content: Digest | None = None) -> S3Ingest:
        return S3Ingest(self, digest, expected_size, content)

    def fill_writer(self, digest: Digest, path: Path, fd: int) -> S3Fill:
        """The fill's local file, sent to the bucket as it grows (``storage/s3fill.py``)."""
        return S3Fill(self, digest, path, fd)

    def fill_placed(self, digest: Digest, fd: int) -> bool:
        return False  # the bytes are sent: the local file never is the object

    def put_bytes(self, digest: Digest, data: bytes) -> None:
        put_verified(self, digest, data)

    def commit_file(self, path: Path, digest: Digest, known_hex: str | None = None) -> None:
        """Upload a finished local file as *digest* once it matched (hashed here, or *known_hex*)."""
        commit_file(self, path, digest, known_hex)

    def upload_part_size(self) -> int | None:
        return self.options.chunksize

    def send_upload_part(self, uuid: str, path: Path, parts: UploadParts | None) -> UploadParts:
        return send_part(self, uuid, path, parts)

    def commit_upload(self, uuid: str, path: Path, digest: Digest, known_hex: str | None,
                      parts: UploadParts | None) -> None:
        commit_upload(self, uuid, path, digest, known_hex, parts)

    def abort_upload(self, uuid: str, parts: UploadParts | None) -> None:
        abort_upload(self, uuid, parts)

    def committed(self, size: int) -> None:
        self.refusals.wrote()  # a refusal of the bucket's is over
        if self.on_commit is not None:
            try:
                self.on_commit(size)
            except Exception as exc:  # noqa: BLE001 (the object is stored; usage is recounted by the collector)
                log.warning("could not account for a stored object of %d bytes: %s", size, exc)

    def started(self, key: str) -> str:
        """A new multipart upload of *key*; the store answers: the aborts it refused before are asked again."""
        try:
            upload_id: str = self.quick.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"an upload to {key}", self.options) from exc
        with self._lock:
            self._uploads.add(upload_id)
            unaborted = list(self._unaborted.items())
        abort_again(self.layout, unaborted, self.abort)
        return upload_id

    def abort(self, key: str, upload_id: str) -> bool:
        """Abort a multipart upload; False (logged) if the store refused or did not answer (one
        already gone is no error): its note then stays, and it is asked again every
        :data:`ABORT_RETRY` seconds, and when this process starts another upload (:meth:`started`)."""
        try:
            self.quick.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, BotoCoreError) or str(exc.response.get("Error", {}).get("Code")) != "NoSuchUpload":
                log.warning("could not abort upload %s of %s: %s", upload_id, key, exc)
                with self._lock:
                    self._unaborted[upload_id] = key
                    if self._abort_timer is None:  # one at a time; a daemon: it never holds up an exit
                        self._abort_timer = threading.Timer(ABORT_RETRY, self._abort_again)
                        self._abort_timer.daemon = True
                        self._abort_timer.start()
                return False
        finally:
            self.forget(upload_id)
        with self._lock:
            self._unaborted.pop(upload_id, None)
        return True

    def _abort_again(self) -> None:
        with self._lock:
            self._abort_timer = None
            unaborted = list(self._unaborted.items())
        abort_again(self.layout, unaborted, self.abort)

    def forget(self, upload_id: str) -> None:
        """The upload is no longer in progress here (completed or aborted)."""
        with self._lock:
            self._uploads.discard(upload_id)

    # -- room --

    def space(self) -> Space | None:
        return None  # a bucket has no fixed size

    def room_error(self, size: int | None) -> OSError | None:
        return room_error(self, size)

    def refused(self, exc: BaseException, needed: int | None) -> None:
        refused(self, exc, needed)

    def write_problem(self, *, probe: bool = False) -> str | None:
        return write_problem(self, probe=probe)


if TYPE_CHECKING:
    from .driver import BlobStore

    def _is_a_driver(store: S3Store) -> BlobStore:  # mypy checks that S3Store implements the interface
        return store
