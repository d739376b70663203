"""One object of the S3 driver (``storage/s3.py``): a GET, a reader, a writer.

:class:`S3Ingest` writes an object to its final key: bytes are hashed as they pass and collected in
a buffer of ``chunksize`` bytes (never more); each full buffer is one part of a multipart upload
(all parts but the last the same size; S3 wants at least 5 MiB each), completed only by a
:meth:`~S3Ingest.commit` that verified size and digest, aborted otherwise.  An object smaller than
``chunksize`` is one ``PutObject`` after it was verified.  No temporary object is ever copied.

:class:`S3Reader` reads with ranged GETs, or from a local copy once its object was deleted
(``S3Store.delete``).  While it is open it holds a shared ``flock`` on ``tmp/<alg>-<hex>.reading``
(``storage/marks.py``), so that a collector in any process sees the object being served
(``being_read``); the last reader to let go removes the file.  With ``S3Store.in_use`` set, it holds
the object's mark in the index as well, for the collectors of other hosts.  The client is boto3's:
thread-safe, with a pool of connections; every call here blocks but :meth:`S3Reader.chunks`,
which runs them in worker threads (the body in a thread of its own, ``storage/s3reads.py``).

The clients and their timeouts are ``storage/s3client.py``'s.

Errors: what S3 refuses is ``OSError`` (``EIO``) raised from botocore's error.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from botocore.exceptions import BotoCoreError, ClientError

from ..config.sections import S3_MIN_CHUNK
from ..spec.reference import Digest
from .driver import StoreError, StoreUnavailable
from .marks import SharedMarks, mark_reading, unmark_reading
from .reads import ShortFile, read_chunks
from .s3client import BODY_READ, settings_problem, unreachable
from .s3damage import CorruptObject, mismatched, verify_whole, vouch, vouched
from .s3notes import IngestNote
from .s3options import S3Options
from .s3reads import ReadAhead
from .verify import check_written

if TYPE_CHECKING:
    from .s3 import S3Store

#: S3's smallest part but the last (``chunksize`` may not be less).
MIN_CHUNK = S3_MIN_CHUNK
_MISSING = {"404", "NoSuchKey", "NotFound"}

log = logging.getLogger("mirror.storage.s3")


def missing(exc: Exception) -> bool:
    """Whether S3 answered that the object (or upload) is not there."""
    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in _MISSING


def content_md5(body: bytes | bytearray | memoryview) -> str:
    """The ``Content-MD5`` header of a ``PutObject`` of *body* (RFC 1864: the base64 of its MD5).  The
    store refuses an object whose bytes received differ (``BadDigest``): a body cut short, by a writer
    killed in the middle of its request say, is never left under a digest's key, empty or in part."""
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode("ascii")


#: Requests that write or delete an object: ``AccessDenied`` to one of them, from a bucket that lets the key
#: read, is a bucket that takes no writes (a read-only policy), not keys it refuses.
WRITES = frozenset({"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "PutObject", "CopyObject",
                    "DeleteObject"})
#: Answers of a store that takes no more bytes (Ceph RGW's quota, MinIO's bucket quota).
OVER_QUOTA = frozenset({"QuotaExceeded", "XMinioAdminBucketQuotaExceeded"})


class WritesRefused(StoreUnavailable):
    """The bucket refuses to store objects (``EROFS``: to the fills and pushes, a read-only store),
    while it may still serve what it holds.  Its ``reason`` (``refusals.refusal``) is its message."""

    @property
    def reason(self) -> str:
        return str(self.strerror)


def backend_error(exc: Exception, what: str, options: S3Options) -> StoreUnavailable:
    """What to raise for botocore's *exc*: the store refused the credentials or has no such bucket
    (:func:`~mirror.storage.s3client.settings_problem`: what to check), refused a write
    (:class:`WritesRefused`), did not answer (a connection error, with the endpoint's setting to check
    (``s3client.unreachable``); a timeout: botocore's retries are spent) or refused otherwise (an S3 error answer)."""
    if isinstance(exc, ClientError) and exc.operation_name in WRITES \
            and (code := str(exc.response.get("Error", {}).get("Code"))) in ("AccessDenied", *OVER_QUOTA):
        why = "is over its quota" if code in OVER_QUOTA else "lets the key read but not write"
        return WritesRefused(errno.EROFS, f"bucket {options.bucket!r} takes no writes ({code}, {what}): it {why}:"
                                          " check that storage.s3's key may write and delete objects (s3:PutObject,"
                                          " s3:DeleteObject, multipart uploads) under storage.s3.rootdirectory,"
                                          " and the bucket's quota")
    problem = settings_problem(exc, options, what)
    if problem is not None:
        return StoreUnavailable(errno.EIO, problem)
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if status >= 500:  # not a refusal: the store failed (starting, stopping, overloaded), retries spent
            return StoreUnavailable(errno.EIO, f"object store failed ({what}): HTTP {status}, a server error: {exc}")
        return StoreUnavailable(errno.EIO, f"object store refused {what}: {exc}")
    return StoreUnavailable(errno.EIO, f"object store does not answer ({what}): {unreachable(exc, options) or exc}")


def head(store: S3Store, digest: Digest) -> tuple[int, str | None] | None:
    """The object's size and ``ETag`` (a HEAD), or None if it is not stored."""
    try:
        answer = store.quick.head_object(Bucket=store.bucket, Key=store.key(digest))
    except (BotoCoreError, ClientError) as exc:
        if missing(exc):
            return None
        raise backend_error(exc, f"HEAD {digest}", store.options) from exc
    return int(answer["ContentLength"]), answer.get("ETag")


def get_object(store: S3Store, digest: Digest, **extra: str) -> dict[str, Any]:
    """S3's answer to a GET of the object (*extra*: a ``Range``): asked as a small request, its body
    then read with :data:`BODY_READ` seconds per read.  ``FileNotFoundError`` when it is not stored."""
    try:
        answer: dict[str, Any] = store.quick.get_object(Bucket=store.bucket, Key=store.key(digest), **extra)
    except (BotoCoreError, ClientError) as exc:
        if missing(exc):
            raise FileNotFoundError(errno.ENOENT, f"{digest} is not stored") from exc
        raise backend_error(exc, f"GET {digest}", store.options) from exc
    answer["Body"].set_socket_timeout(BODY_READ)  # urllib3 sets the request's own again on the next one
    return answer


def _read(body: Any, count: int, *, hasher: Any) -> bytes:
    """Up to *count* bytes of *body*, hashed into *hasher* (if any) in the same thread
    (``hashlib`` lets go of the GIL: the event loop never waits for it)."""
    try:
        data: bytes = body.read(count)
    except BotoCoreError as exc:  # the store went away mid-body: cut the transfer short
        raise ShortFile(errno.EIO, f"object store stopped sending: {exc}") from exc
    if hasher is not None:
        hasher.update(data)
    return data


class _ReadState:
    """What one ranged read learnt from its GET: the object's ETag, and the hasher its bytes go
    through when they must be checked (None: vouched, or a range checked whole first)."""

    __slots__ = ("etag", "hasher")

    def __init__(self) -> None:
        self.etag: str | None = None
        self.hasher: Any = None


class S3Reader:
    """An object opened for reading: ranged GETs, or a local spool copy once this process deleted it."""

    fd: int | None = None  # bytes come over HTTP: no zero-copy

    def __init__(self, store: S3Store, digest: Digest, size: int, mark: int | None,
                 shared: SharedMarks | None = None, etag: str | None = None) -> None:
        """A reader of *size* bytes holding *mark* (:func:`mark_reading`) and the index's mark held by
        *shared*, both taken before the object was looked up; *etag*: the object's when looked up."""
        self._store, self.digest, self.size, self.etag = store, digest, size, etag
        self._spool: int | None = None
        self._marked = store.layout.reading(digest)
        self._mark = mark
        self._shared = shared

    @classmethod
    def opened(cls, store: S3Store, digest: Digest) -> S3Reader | None:
        """A reader of the object, or None if it is not stored.  The mark comes before the HEAD: a
        delete in any process (:func:`unread`) then keeps the object, or ends before the HEAD."""
        marked = store.layout.reading(digest)
        mark = mark_reading(marked)
        shared, found = None, None
        try:
            if store.in_use is not None:
                store.in_use.hold(digest)
                shared = store.in_use
            found = head(store, digest)
        finally:
            if found is None:
                if mark is not None:
                    unmark_reading(marked, mark)
                if shared is not None:
                    shared.release(digest)
        return None if found is None else cls(store, digest, found[0], mark, shared, found[1])

    def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``start..end`` (inclusive; None: to the end of the object)."""
        stop = self.size if end is None else end + 1
        if self._spool is not None:
            return read_chunks(self._spool, start, stop - start)
        return self._ranged(start, stop)

    async def _ranged(self, start: int, stop: int) -> AsyncIterator[bytes]:
        """Ranged GETs, read ahead of the client in a thread (``storage/s3reads.py``).

        The bytes are served as they are only from an object whose ``ETag`` this process has seen
        with content matching the digest (:func:`vouched`: it stored the object or read it whole).
        Otherwise a whole-object read is hashed as it passes, its last byte held back until the
        digest matched (:class:`CorruptObject` if not), and a range waits for the object to be
        read whole first (:func:`verify_whole`): a tampered object never reaches a client whole."""
        if stop <= start:
            return
        whole, state = start == 0 and stop == self.size, _ReadState()
        got = 0
        async for data in self._pieces(start, stop, whole, state):
            got += len(data)
            hasher = state.hasher
            if hasher is None or got < stop - start:
                yield data
                continue
            if len(data) > 1:
                yield data[:-1]
            got_hex = hasher.hexdigest()
            if got_hex != self.digest.hex and await anyio.to_thread.run_sync(
                    mismatched, self._store, self.digest, self.size, got_hex, state.etag):
                raise CorruptObject(errno.EIO, f"{self.digest}: the object in the bucket does not match it")
            vouch(self._store, self.digest, state.etag)
            yield data[-1:]

    async def _pieces(self, start: int, stop: int, whole: bool, state: _ReadState) -> AsyncIterator[bytes]:
        """Bytes ``start..stop - 1`` of the object (*state*: its ETag, and the hasher they go through
        when they must be checked).  A delete by this process (:meth:`keep`) may come at any point of
        the read, even between the look-up and the GET: the rest then comes from its local copy, which
        matched the digest."""
        offset = start
        try:
            answer = await anyio.to_thread.run_sync(self._store.get_range, self.digest, start, stop - 1)
            body, state.etag = answer["Body"], answer.get("ETag")
            trusted = vouched(self._store, self.digest, state.etag)
            state.hasher = self.digest.hasher() if not trusted and whole else None
            ahead = ReadAhead(functools.partial(_read, body, hasher=state.hasher), stop - start, body.close)
            try:
                if state.hasher is None and not trusted:
                    await anyio.to_thread.run_sync(verify_whole, self._store, self.digest, state.etag)
                async for data in ahead:
                    offset += len(data)
                    yield data
            finally:
                ahead.close()
        except (FileNotFoundError, ShortFile) as exc:
            if self._spool is None or isinstance(exc, CorruptObject):
                raise
            async for data in read_chunks(self._spool, offset, stop - offset):
                if state.hasher is not None:
                    state.hasher.update(data)
                yield data

    def keep(self, spool: int) -> None:
        """Read from here on from *spool* (a descriptor of a local copy, now this reader's): the object
        is no longer needed, its mark is let go."""
        self._spool = spool
        self._unmark()

    def handed_out(self) -> Callable[[], None]:
        """Close the reader but keep its marks (the object handed out by a presigned URL, see
        ``storage/s3handout.py``): they go when the function returned is called."""
        held = S3Reader(self._store, self.digest, self.size, self._mark, self._shared, self.etag)
        self._mark = self._shared = None
        self.close()
        return held._unmark

    def close(self) -> None:
        self._store.closed(self)
        if self._spool is not None:
            os.close(self._spool)
            self._spool = None
        self._unmark()

    def _unmark(self) -> None:
        if self._mark is not None:
            unmark_reading(self._marked, self._mark)
            self._mark = None
        if self._shared is not None:
            self._shared.release(self.digest)
            self._shared = None


class S3Ingest:
    """An object being written to its final key: hashed as bytes arrive, parts of ``chunksize``
    bytes sent as they fill, the upload completed only by a :meth:`commit` that verified it."""

    def __init__(self, store: S3Store, digest: Digest, expected_size: int | None, content: Digest | None) -> None:
        self.store = store
        self.digest = digest
        #: What the bytes must hash to: the name, but for a signed schema 1 manifest.
        self.content = content or digest
        self.expected_size = expected_size
        self.written = 0
        self.key = store.key(digest)
        self._hasher = self.content.hasher()
        self._buffer = bytearray()
        self._upload: str | None = None
        self._note: IngestNote | None = None  # for the start-up sweep, if the process dies
        self._parts: list[dict[str, Any]] = []
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        self.written += len(data)
        self._buffer += data
        chunk = self.store.options.chunksize
        while len(self._buffer) >= chunk:
            self._send_part(memoryview(self._buffer)[:chunk])
            del self._buffer[:chunk]

    def _send_part(self, part: memoryview) -> None:
        if self._upload is None:
            self._upload = self.store.started(self.key)
            self._note = IngestNote(self.store.layout, self.key, self._upload)
        number = len(self._parts) + 1
        try:
            etag = self.store.send.upload_part(Bucket=self.store.bucket, Key=self.key, UploadId=self._upload,
                                               PartNumber=number, Body=bytes(part))["ETag"]
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"part {number} of {self.digest}", self.store.options) from exc
        finally:
            part.release()
        self._parts.append({"PartNumber": number, "ETag": etag})

    def verify(self) -> None:
        check_written(self.digest, self.content, self.expected_size, self.written, self._hasher.hexdigest())

    def commit(self) -> None:
        """Verify, then complete the upload (or put a small object); on a mismatch abort and raise."""
        try:
            self.verify()
        except StoreError:
            self.close()
            raise
        client, bucket = self.store.client, self.store.bucket
        try:
            if self._upload is None:
                body = bytes(self._buffer)
                done = self.store.send.put_object(Bucket=bucket, Key=self.key, Body=body, ContentMD5=content_md5(body))
            else:
                if self._buffer or not self._parts:
                    self._send_part(memoryview(self._buffer))
                done = client.complete_multipart_upload(Bucket=bucket, Key=self.key, UploadId=self._upload,
                                                        MultipartUpload={"Parts": self._parts})
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"storing {self.digest}", self.store.options) from exc
        vouch(self.store, self.digest, done.get("ETag"))
        self._finish()
        self.store.committed(self.written)

    def _finish(self) -> None:
        self._done = True
        self._buffer = bytearray()
        if self._upload is not None:
            self.store.forget(self._upload)
        self._drop_note()

    def _drop_note(self) -> None:
        if self._note is not None:
            self._note.close()
            self._note = None

    def close(self) -> None:
        """Release the buffer; an upload not completed is aborted."""
        if self._done:
            return
        self._done = True
        self._buffer = bytearray()
        if self._upload is not None and not self.store.abort(self.key, self._upload) and self._note is not None:
            self._note.release()  # the start-up sweep aborts it
        self._drop_note()
