"""Push uploads on the S3 driver (``storage/s3.py``): parts sent while the upload runs, the object
copied to its digest's key once verified.

An upload's bytes arrive in its local file ``uploads/<uuid>`` (``registry/uploads.py``).  Once that
file holds a whole part past what was sent (``chunksize`` bytes), :func:`send_part` sends it,
streamed from the file, as the next part of a multipart upload of the upload's own key
``<rootdirectory>/uploads/<uuid>/data`` (:func:`~mirror.storage.layout.upload_key`): the final key
names a digest, which is only known at the end.  Where the parts are (an
:class:`~mirror.storage.driver.UploadParts`) is kept in the index by the caller, so that a restarted
process continues the upload; a part already in the index is punched out of the local file (a hole:
offsets in the file stay the upload's, its size the bytes received), so the file holds at most two
parts and a write batch.

:func:`commit_upload` sends the rest as the last part, completes the multipart upload at the
upload's key, checks the digest, and only then copies the object to the digest's key inside the
bucket (``CopyObject``; ``UploadPartCopy`` ranges of a multipart upload above ``copy_limit``, as S3
copies at most 5 GiB at once): no byte goes through the mirror, and no object is ever visible under
a digest it does not match.  The upload's object is deleted last.  A retried finish finds the upload
completed already (its object has the size received) and goes on from there.

The running hash: Python's ``hashlib`` cannot save a hash's state, so the process that saw every
byte of an upload gives its digest (*known_hex*, as for ``commit_file``); after a restart, or when
another worker took part of the upload, the completed object is read back once, streamed, and hashed
before it is copied.

:class:`S3UploadTails` keeps an upload's unsent tail in ``<rootdirectory>/uploads/<uuid>/tail`` between two
requests, for the replicas of a cluster (``registry/roaming.py``), and lists the tails and the upload objects
left in the bucket, for their sweep and ``mirror fsck``.

Errors: what S3 refuses is ``OSError`` (``EIO``, :func:`~mirror.storage.s3objects.backend_error`);
:class:`~mirror.storage.driver.DigestMismatch` when the bytes are not the digest's (the caller then
:func:`abort_upload`\\ s); :class:`~mirror.storage.driver.UploadLost` when the multipart upload is gone.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from ..spec.reference import Digest
from .driver import DigestMismatch, UploadKeys, UploadLost, UploadParts
from .layout import UPLOAD_ID_RE, UPLOADS_PREFIX, upload_key, upload_tail_key
from .s3damage import vouch
from .s3objects import backend_error, missing

if TYPE_CHECKING:
    from .s3 import S3Store

#: Bytes above which the object is copied in ranges (S3's limit for one ``CopyObject``), and their size.
COPY_LIMIT = 5 << 30
COPY_PART = 1 << 30
_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE (linux/falloc.h)

log = logging.getLogger("mirror.storage.s3")


class FileSlice(io.RawIOBase):
    """Bytes ``start..start + size - 1`` of the file open as *fd*, as a seekable file object (a part's
    body: botocore reads it in pieces, and seeks back to sign or to retry)."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._size - self._pos, 1 << 20)
        if count <= 0:
            return 0
        data = os.pread(self._fd, count, self._start + self._pos)
        if not data:
            raise OSError(errno.EIO, f"the upload's file ended at {self._start + self._pos}")
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def punch_hole(fd: int, start: int, size: int) -> None:
    """Free the disk blocks of bytes ``start..start + size - 1`` of the file (they read as zeros);
    a filesystem that cannot (``EOPNOTSUPP``) keeps them, which only costs room."""
    if size <= 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, _PUNCH_HOLE, start, size) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS):
            log.debug("could not free %d bytes of an upload's file: %s", size, os.strerror(code))


def send_part(store: S3Store, uuid: str, path: Path, parts: UploadParts | None) -> UploadParts:
    """Send bytes ``parts.sent`` on (``part_size`` of them) of the local file *path* as the next part
    of the upload *uuid*; return the new parts.  What *parts* holds (recorded in the index by now) is
    punched out of the file first.  With *parts* None, only start the multipart upload (no part yet):
    it is recorded before anything is sent to it."""
    key = store.root + upload_key(uuid)
    if parts is None:
        try:
            upload_id = store.client.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"an upload to {key}", store.options) from exc
        return UploadParts(upload_id, store.options.chunksize)
    fd = os.open(path, os.O_RDWR)
    try:
        punch_hole(fd, 0, parts.sent)
        etag = _upload_part(store, key, parts.upload_id, len(parts.etags) + 1, fd, parts.sent, parts.part_size)
    finally:
        os.close(fd)
    return UploadParts(parts.upload_id, parts.part_size, (*parts.etags, etag))


def _upload_part(store: S3Store, key: str, upload_id: str, number: int, fd: int, start: int, size: int) -> str:
    try:
        etag: str = store.send.upload_part(Bucket=store.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                           Body=FileSlice(fd, start, size), ContentLength=size)["ETag"]
    except (BotoCoreError, ClientError) as exc:
        raise _lost(exc, key) or backend_error(exc, f"part {number} of {key}", store.options) from exc
    return etag


def _lost(exc: Exception, key: str) -> UploadLost | None:
    """:class:`UploadLost` when S3 says the multipart upload is gone (``NoSuchUpload``), else None."""
    if isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) == "NoSuchUpload":
        return UploadLost(f"the object store no longer holds the multipart upload of {key} (NoSuchUpload: aborted,"
                          " by a lifecycle rule for incomplete uploads, say)")
    return None


def commit_file(store: S3Store, path: Path, digest: Digest, known_hex: str | None) -> None:
    """Upload the finished local file *path* as *digest* once it matched (hashed on its way, or
    *known_hex*).  An object stored already under *digest* is replaced (see :func:`_replaced`)."""
    if known_hex is not None and known_hex != digest.hex:
        raise DigestMismatch(f"content does not match {digest} (got {digest.algorithm}:{known_hex})")
    size = os.stat(path).st_size
    stored = store.size(digest)
    writer = store.ingest(digest, size)
    try:
        with open(path, "rb") as handle:
            while data := handle.read(store.options.chunksize):
                writer.write(data)
        writer.commit()  # counts *size* bytes stored
    finally:
        writer.close()
    if stored is not None:
        _replaced(store, digest, stored, size)
    os.unlink(path)


def _replaced(store: S3Store, digest: Digest, stored: int, size: int) -> None:
    """The object of *stored* bytes under *digest* was replaced by the *size* verified bytes of a push:
    count only the difference (the commit counted them all).  Replaced, not kept: it may be damaged
    (truncated, written over), and a blob pushed again is young again for the collector's grace
    (its manifest is still to come)."""
    if stored != size:
        log.warning("%s: the stored object had %d bytes, not the %d pushed: replaced by the pushed bytes, which"
                    " match the digest", digest, stored, size)
    store.committed(-stored)


def commit_upload(store: S3Store, uuid: str, path: Path, digest: Digest, known_hex: str | None,
                  parts: UploadParts | None) -> None:
    """Store the upload as *digest* (see the module docstring); :class:`DigestMismatch` leaves the
    upload's object for :func:`abort_upload`."""
    if parts is None:  # smaller than a part: one PutObject from the local file
        commit_file(store, path, digest, known_hex)
        return
    if known_hex is not None and known_hex != digest.hex:
        raise DigestMismatch(f"content does not match {digest} (got {digest.algorithm}:{known_hex})")
    size = os.stat(path).st_size
    key = store.root + upload_key(uuid)
    if _size(store, key) != size:
        _complete(store, key, path, size, parts)
    if known_hex is None:
        known_hex = _hash_object(store, key, digest.algorithm)
        if known_hex != digest.hex:
            raise DigestMismatch(f"content does not match {digest} (got {digest.algorithm}:{known_hex})")
    stored = store.size(digest)
    vouch(store, digest, _copy(store, key, store.key(digest), size))  # stored already: see _replaced
    store.committed(size)
    if stored is not None:
        _replaced(store, digest, stored, size)
    store.remove_key(key)
    os.unlink(path)


def abort_upload(store: S3Store, uuid: str, parts: UploadParts | None) -> None:
    """Abort the upload's multipart upload and delete its object (completed by a finish that failed)."""
    if parts is not None:
        key = store.root + upload_key(uuid)
        store.abort(key, parts.upload_id)
        store.remove_key(key)


def _size(store: S3Store, key: str) -> int | None:
    try:
        return int(store.client.head_object(Bucket=store.bucket, Key=key)["ContentLength"])
    except (BotoCoreError, ClientError) as exc:
        if missing(exc):
            return None
        raise backend_error(exc, f"HEAD {key}", store.options) from exc


def _complete(store: S3Store, key: str, path: Path, size: int, parts: UploadParts) -> None:
    """Send the bytes after the parts as the last one, and complete the multipart upload at *key*."""
    etags = parts.etags
    if size > parts.sent:
        fd = os.open(path, os.O_RDONLY)
        try:
            etags += (_upload_part(store, key, parts.upload_id, len(etags) + 1, fd, parts.sent, size - parts.sent),)
        finally:
            os.close(fd)
    listed = [{"PartNumber": number, "ETag": etag} for number, etag in enumerate(etags, 1)]
    try:
        store.client.complete_multipart_upload(Bucket=store.bucket, Key=key, UploadId=parts.upload_id,
                                               MultipartUpload={"Parts": listed})
    except (BotoCoreError, ClientError) as exc:
        raise _lost(exc, key) or backend_error(exc, f"completing {key}", store.options) from exc


def _hash_object(store: S3Store, key: str, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    try:
        body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"]
        with body:
            while data := body.read(1 << 20):
                hasher.update(data)
    except (BotoCoreError, ClientError) as exc:
        raise backend_error(exc, f"GET {key}", store.options) from exc
    return hasher.hexdigest()


def _copy(store: S3Store, source: str, target: str, size: int) -> str | None:
    """Copy *source* to *target* in the bucket; the new object's ETag."""
    client, bucket, origin = store.client, store.bucket, {"Bucket": store.bucket, "Key": source}
    try:
        if size <= store.copy_limit:
            answer = client.copy_object(Bucket=bucket, Key=target, CopySource=origin)
            return str(answer["CopyObjectResult"].get("ETag") or "") or None
        upload_id = store.started(target)
        try:
            listed = []
            for number, start in enumerate(range(0, size, store.copy_part), 1):
                end = min(start + store.copy_part, size) - 1
                copied = client.upload_part_copy(Bucket=bucket, Key=target, UploadId=upload_id, PartNumber=number,
                                                 CopySource=origin, CopySourceRange=f"bytes={start}-{end}")
                listed.append({"PartNumber": number, "ETag": copied["CopyPartResult"]["ETag"]})
            done = client.complete_multipart_upload(Bucket=bucket, Key=target, UploadId=upload_id,
                                                    MultipartUpload={"Parts": listed})
        except BaseException:
            store.abort(target, upload_id)
            raise
        store.forget(upload_id)
        return str(done.get("ETag") or "") or None
    except (BotoCoreError, ClientError) as exc:
        raise backend_error(exc, f"copying {source} to {target}", store.options) from exc


class S3UploadTails:
    """The unsent tails of push uploads as objects of the bucket (:class:`~mirror.storage.driver.UploadTails`):
    one ``PutObject`` streamed from the local file at the end of a request, one ranged ``GetObject`` by the
    next replica that continues the upload."""

    def __init__(self, store: S3Store) -> None:
        self.store = store

    def put(self, uuid: str, fd: int, start: int, size: int) -> None:
        key = self.store.root + upload_tail_key(uuid)
        try:
            self.store.send.put_object(Bucket=self.store.bucket, Key=key, Body=FileSlice(fd, start, size),
                                       ContentLength=size)
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"PUT {key}", self.store.options) from exc

    def fetch(self, uuid: str, fd: int, start: int, size: int) -> None:
        key, at = self.store.root + upload_tail_key(uuid), start
        try:
            body = self.store.client.get_object(Bucket=self.store.bucket, Key=key, Range=f"bytes=0-{size - 1}")["Body"]
            with body:
                while at < start + size and (data := body.read(min(1 << 20, start + size - at))):
                    at += os.pwrite(fd, data, at)
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"GET {key}", self.store.options) from exc
        if at != start + size:
            raise OSError(errno.EIO, f"{key} holds {at - start} bytes, not the {size} of the upload's record")

    def remove(self, uuid: str) -> None:
        self.store.remove_key(self.store.root + upload_tail_key(uuid))

    def remove_object(self, uuid: str) -> None:
        self.store.remove_key(self.store.root + upload_key(uuid))

    def listed(self) -> UploadKeys:
        prefix = self.store.root + UPLOADS_PREFIX
        found = UploadKeys({}, {})
        kinds = {"tail": found.tails, "data": found.objects}
        try:
            for page in self.store.quick.get_paginator("list_objects_v2").paginate(Bucket=self.store.bucket,
                                                                                    Prefix=prefix):
                for item in page.get("Contents", []):
                    uuid, _, rest = item["Key"][len(prefix):].partition("/")
                    if rest in kinds and UPLOAD_ID_RE.fullmatch(uuid):
                        kinds[rest][uuid] = item["LastModified"].timestamp()
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"LIST {prefix}", self.store.options) from exc
        return found
