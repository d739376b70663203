"""A fill on the S3 driver (``storage/s3.py``): the local file grows as ever, its parts go up as it grows.

``storage/fill.py`` writes the upstream's body into ``DATA/tmp/<alg>-<hex>.partial`` as on the
filesystem driver, and readers in every worker process follow that file (``storage/growing.py``).
:class:`S3Fill` hashes what is written and, in threads of its own, sends each ``chunksize`` range of
that file as soon as it is complete as one part of a multipart upload to the object's final key:
:data:`IN_FLIGHT` parts at most at a time, each read back with ``pread`` (never more than those parts
in memory), so the writer never waits for S3.  Parts start going up once the fill has run
:data:`SEND_AFTER` seconds: a fill faster than that (a fast upstream: the fill is bound by this
host's CPU, which its clients' bytes need too) sends them all after its verdict, one slower overlaps
its uploads with the rest of its body (measured in ``tests/bench/README.md``).  What sends them is
whichever comes first of a write, the end of a part (the next complete range goes up in its place)
and, for a fill that has a complete range before it is :data:`SEND_AFTER` old, a wake-up at that
age in one of its threads: an upstream that stalls then keeps no complete part waiting for its next
bytes.  The three share one lock; :meth:`S3Fill.commit` and :meth:`S3Fill.discard` take the sending
over under it (nothing is sent in the background after that), so parts are numbered in order, each
sent once, all ``chunksize`` bytes but the last, and none after an abort.
:meth:`S3Fill.commit` verifies size and digest, marks the file
:data:`~mirror.storage.filesystem.VERIFIED_MODE` (its readers are then done), sends what is left,
completes the upload and removes the file.  A mismatch or a failure aborts the upload
(:meth:`S3Fill.discard`): nothing is stored, as the driver interface wants (``storage/driver.py``).
A part the store refuses or does not answer (its outage, a policy refusing writes) ends the sending,
not the fill: the body still goes into the local file, hashed, so that every reader of the fill gets
it from the one upstream fetch; the commit verifies it, marks it verified (:attr:`S3Fill.serves_unstored`:
the readers keep that mark) and then raises the store's error.
A fill whose bytes come from another replica that stores the object (``stored_elsewhere``) sends no
part while it does; its commit verifies, marks the file and waits up to :data:`PEER_STORE_WAIT` seconds
for that replica's object; if it takes the fill over, the parts go up from the first byte on.
While the upload is open, ``tmp/<alg>-<hex>.meta-upload`` names it (:func:`write_note`): a writer
killed meanwhile leaves the note beside its unlocked fill file, and the start-up sweep aborts the
upload it names (``S3Store.sweep_tmp``).

Blocking, like every driver method: ``fill.py`` calls it from worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from ..spec.reference import Digest
from .driver import StoreError
from .filehash import FileHash
from .filesystem import VERIFIED_MODE, write_all
from .s3damage import vouch
from .s3notes import abort_left, write_note
from .s3objects import backend_error, content_md5
from .verify import check_written

if TYPE_CHECKING:
    from .s3 import S3Store

#: Parts of one fill being sent at a time.
IN_FLIGHT = 2
#: Seconds a fill runs before its parts start going up (until then, or until its verdict, its clients
#: have the CPU); at that age a slower fill sends the parts it has complete, even if no write comes.
SEND_AFTER = 1.0
#: Seconds a fill stored by another replica waits for that replica's object after verifying its bytes.
PEER_STORE_WAIT = 30.0
log = logging.getLogger("mirror.storage.fill")


class S3Fill:
    """The writer of one fill on the S3 driver (a :class:`~mirror.storage.driver.FillWriter`)."""

    def __init__(self, store: S3Store, digest: Digest, path: Path, fd: int) -> None:
        self.store = store
        self.digest = digest
        self.path = path
        self.fd = fd
        self.expected_size: int | None = None
        self.written = 0
        self.key = store.key(digest)
        self._chunk = store.options.chunksize
        self._hash = FileHash(digest.hasher(), fd)  # beside the writes, for a large body
        self._threads = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="s3-fill")
        self._upload: Future[str] | None = None  # the multipart upload's id, once S3 gave it
        self._sending: list[Future[dict[str, Any]]] = []  # parts on their way, oldest first
        self._parts: list[dict[str, Any]] = []  # parts S3 has
        self._sent_to = 0  # bytes handed to parts so far
        # Sending happens in the writer's thread, at the wake-up and at the end of each part: under this lock.
        self._lock = threading.RLock()
        self._in_pump = False  # a part that ends at once calls _pump back from _send: the loop goes on
        self._over = threading.Event()  # set by commit or discard: they send the rest, nothing else does
        self._wake: Future[None] | None = None  # the wake-up at SEND_AFTER, once a range is complete
        self._done = False
        self._began = time.monotonic()
        self.stored_elsewhere: Callable[[], bool] | None = None
        #: Set once the commit marked the file verified: a failure to store it after that leaves the mark.
        self.serves_unstored = False
        self._broken: OSError | None = None  # the store's refusal of a part: nothing more is sent

    def _elsewhere(self) -> bool:
        return self.stored_elsewhere is not None and self._upload is None and self.stored_elsewhere()

    def write(self, data: bytes | memoryview) -> None:
        write_all(self.fd, data)
        self._hash.update(data)
        self.written += len(data)
        young = SEND_AFTER - (time.monotonic() - self._began)
        if young <= 0:
            self._pump_or_stop()
        elif self._wake is None and self.written >= self._chunk:
            self._wake = self._threads.submit(self._wake_up, young)

    def _pump_or_stop(self) -> None:
        """:meth:`_pump`; a part the store refused (or its upload's start) stops the sending for good."""
        try:
            self._pump(raising=True)
        except OSError as exc:  # StoreUnavailable, or the upload's note (local): the fill goes on
            with self._lock:
                self._over.set()
                if self._broken is None:
                    self._broken = exc
                    log.warning("%s: the store failed after %d bytes of the fill (%s): the rest is written"
                                " here for its readers, not stored", self.digest, self.written, exc)

    def _wake_up(self, delay: float) -> None:
        """Send the complete parts after *delay* seconds (when the fill is :data:`SEND_AFTER` old), unless
        the fill was committed or discarded first."""
        if not self._over.wait(delay):
            self._pump(raising=False)

    def _pump(self, *, raising: bool) -> None:
        """Send complete ``chunksize`` ranges while fewer than :data:`IN_FLIGHT` parts are on their way.

        A part S3 refused is raised if *raising* (the writer), else it stops the sending and is left
        for the next write or the commit to raise.  Nothing once commit or discard took over."""
        with self._lock:
            if self._over.is_set() or self._in_pump:
                return
            self._in_pump = True
            try:
                while True:
                    self._collect(wait=False, raising=raising)
                    if (self._sending and self._sending[0].done()) or len(self._sending) >= IN_FLIGHT:
                        return  # a part refused, or enough on their way
                    if self._sent_to + self._chunk > self.written or self._elsewhere():
                        return
                    self._send(self._chunk)
            finally:
                self._in_pump = False

    def _take_over(self) -> None:
        """From now on only the caller (commit, discard) sends, and the wake-up ends."""
        with self._lock:
            self._over.set()

    def _send(self, length: int) -> None:
        if self._upload is None:
            self._upload = self._threads.submit(self._start)
        number, offset = self._sent_to // self._chunk + 1, self._sent_to
        part = self._threads.submit(self._part, number, offset, length)
        self._sending.append(part)
        self._sent_to += length
        part.add_done_callback(lambda _: self._pump(raising=False))

    def _start(self) -> str:
        upload, note = self.store.started(self.key), self.store.layout.fill_upload(self.digest)
        try:
            abort_left(note, self.store.abort)  # an earlier fill's of this object, left: not written over
            write_note(note, self.key, upload)
        except OSError:
            self.store.abort(self.key, upload)
            raise
        return upload

    def _part(self, number: int, offset: int, length: int) -> dict[str, Any]:
        assert self._upload is not None
        upload = self._upload.result()
        body = _pread_all(self.fd, length, offset)
        try:
            etag = self.store.send.upload_part(Bucket=self.store.bucket, Key=self.key, UploadId=upload,
                                               PartNumber=number, Body=body)["ETag"]
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"part {number} of {self.digest}", self.store.options) from exc
        return {"PartNumber": number, "ETag": etag}

    def _collect(self, *, wait: bool, raising: bool = True) -> None:
        """Take the answers of parts sent (all of them if *wait*); a part S3 refused is raised (if
        *raising*, else it stays first in line)."""
        while self._sending and (wait or self._sending[0].done()):
            if not raising and self._sending[0].exception() is not None:
                return
            self._parts.append(self._sending.pop(0).result())

    def verify(self) -> None:
        check_written(self.digest, self.digest, self.expected_size, self.written, self._hash.hexdigest())

    def commit(self) -> None:
        """Verify, mark the file verified, send the rest and complete the upload; remove the file.

        On a mismatch the upload is aborted and :class:`StoreError` raised; what S3 refuses is
        ``OSError`` (the caller then discards the fill)."""
        self._take_over()
        try:
            self.verify()
        except StoreError:
            self.discard()
            raise
        os.fchmod(self.fd, VERIFIED_MODE)  # the mark readers following this fill look for
        self.serves_unstored = True  # their bytes are verified, stored or not
        if self._broken is not None:
            raise self._broken  # the caller discards the fill: the upload is aborted
        if self._elsewhere():
            self._await_peer()
            return
        client, bucket = self.store.client, self.store.bucket
        try:
            if self._upload is None and self.written <= self._chunk:  # one part at most: one PutObject
                body = _pread_all(self.fd, self.written, 0)
                done = self.store.send.put_object(Bucket=bucket, Key=self.key, Body=body, ContentMD5=content_md5(body))
            else:
                while self._sent_to < self.written:
                    if len(self._sending) >= IN_FLIGHT:
                        self._parts.append(self._sending.pop(0).result())
                    self._send(min(self._chunk, self.written - self._sent_to))
                self._collect(wait=True)
                assert self._upload is not None  # started by the first part
                done = client.complete_multipart_upload(Bucket=bucket, Key=self.key, UploadId=self._upload.result(),
                                                        MultipartUpload={"Parts": self._parts})
        except (BotoCoreError, ClientError) as exc:
            raise backend_error(exc, f"storing {self.digest}", self.store.options) from exc
        vouch(self.store, self.digest, done.get("ETag"))
        self._done = True
        self._threads.shutdown()
        if self._upload is not None:
            self.store.forget(self._upload.result())
            self._drop_note()
        self._unlink()
        self.store.committed(self.written)

    def _await_peer(self) -> None:
        """The object another replica stores, verified here too: wait until it is in the bucket (a
        request then finds it there), at most :data:`PEER_STORE_WAIT` seconds; remove the file."""
        deadline = time.monotonic() + PEER_STORE_WAIT
        while self.store.size(self.digest) is None:
            if time.monotonic() > deadline:
                log.warning("%s: the replica that fetched it has not stored it after %gs", self.digest,
                            PEER_STORE_WAIT)
                break
            time.sleep(0.05)
        self._done = True
        self._threads.shutdown()
        self._unlink()

    def discard(self) -> None:
        """Abort the upload (after the parts on their way) and remove the file; never raises."""
        self._take_over()
        self._hash.close()
        self._threads.shutdown(wait=True, cancel_futures=True)
        if not self._done and self._upload is not None:
            self._done = True
            with contextlib.suppress(Exception):  # no upload was started: nothing to abort
                if self.store.abort(self.key, self._upload.result()):
                    self._drop_note()  # else it stays for the start-up sweep
        self._done = True
        self._unlink()

    def _drop_note(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.store.layout.fill_upload(self.digest))

    def _unlink(self) -> None:
        """Remove the fill's file, if it still is this fill's (a later fill may have taken the name)."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    """Bytes ``offset..offset+length`` of *fd*; ``OSError`` (``EIO``) if the file is shorter."""
    pieces, got = [], 0
    while got < length:
        data = os.pread(fd, length - got, offset + got)
        if not data:
            raise OSError(errno.EIO, f"fill file ended at {offset + got} bytes, {offset + length} expected")
        pieces.append(data)
        got += len(data)
    return b"".join(pieces) if len(pieces) != 1 else pieces[0]
