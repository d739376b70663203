"""Blob uploads of pushed repositories (distribution-spec, "Pushing blobs").

Uploads collect in ``DATA/uploads/<uuid>`` with their state in the index, so an upload can be continued by any worker
process and after a restart; requests on one upload are serialised with ``flock`` on its file. A store that takes
parts (S3, :meth:`~mirror.storage.driver.BlobStore.upload_part_size`) is sent each whole part as soon as the file
holds it, and where the parts went is recorded in the upload's record (:class:`~mirror.metadata.driver.UploadRecord`)
before the next part goes; a part the store does not take now (``StoreUnavailable``) waits in the file for the next
request. Finishing an upload verifies the digest (with the hash kept while the chunks arrived when this process saw
them all, else by reading the bytes again) before the blob is stored, like every other ingest. An upload cancelled,
failed or expired (``push.upload_ttl`` after its last write) discards its parts too, and gives its name back if
nothing landed in it. Replicas of a cluster keep the tail in the bucket too and continue an upload on any of them
(``registry/roaming.py``, through the hooks :meth:`_acquire`, :meth:`_written`, :meth:`_let_go` and :meth:`_keep`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import anyio.to_thread

from ..maintenance.leftovers import bucket_uploads, remove_left_behind
from ..metadata.driver import Metadata, UploadRecord, local_repo
from ..metadata.holders import held_elsewhere, leases_of
from ..observe.metrics import Metrics
from ..spec.chunks import chunk_range
from ..spec.errors import APIError
from ..spec.reference import Digest
from ..storage.driver import BlobStore, DigestMismatch, StoreUnavailable, UploadLost
from ..storage.layout import new_upload_id
from ..storage.refusals import refusal
from .reads import IndexReads, in_index_thread
from .records import to_the_end
from .repository import UploadState
from .sharedsecret import instance

log = logging.getLogger("mirror.uploads")

WRITE_BATCH = 1024 * 1024


def upload_headers(name: str, uuid: str, offset: int) -> dict[str, str]:
    """Where an upload of repository *name* continues and what it holds (``Range``, inclusive)."""
    return {
        "Location": f"/v2/{name}/blobs/uploads/{uuid}",
        "Docker-Upload-UUID": uuid,
        "Range": f"0-{max(offset - 1, 0)}",
    }


class Uploads:
    """The uploads in progress, by uuid; each belongs to the repository name it was started for."""

    def __init__(self, store: BlobStore, metadata: Metadata, upload_ttl: float, metrics: Metrics) -> None:
        self.store = store
        self.metadata = metadata
        self.reads = IndexReads(metadata)
        self.upload_ttl = upload_ttl
        self.metrics = metrics
        # uuid -> (offset, hasher) while this process has seen every byte of the upload.
        self._hashers: dict[str, tuple[int, Any]] = {}
        self._fileless: set[str] = set()  # upload records the last sweep found without a file

    async def start(self, name: str) -> UploadState:
        uuid = new_upload_id()

        def create() -> None:
            fd = os.open(self.store.layout.upload(uuid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)

        async def started() -> None:  # the file, then its record (a hop of each kind: registry/reads.py)
            await anyio.to_thread.run_sync(create)
            await in_index_thread(self.metadata.put_upload, uuid, self._new_record(name, uuid))

        await to_the_end(started())
        self._hashers[uuid] = (0, Digest("sha256", "").hasher())
        return UploadState(uuid, 0)

    def _new_record(self, name: str, uuid: str) -> UploadRecord:
        return UploadRecord(name, time.time(), holder=instance())

    async def _asked(self, name: str, uuid: str) -> UploadRecord:
        """:meth:`_record`, for code on the event loop (``registry/reads.py``)."""
        return await self.reads.ask(self._record, name, uuid)

    def _record(self, name: str, uuid: str) -> UploadRecord:
        record = self._known(name, uuid)
        if not self.store.layout.upload(uuid).exists():
            raise APIError("BLOB_UPLOAD_UNKNOWN", detail={"uuid": uuid})
        return record

    def _known(self, name: str, uuid: str) -> UploadRecord:
        """The record of the upload *uuid* of *name*; ``BLOB_UPLOAD_UNKNOWN`` if there is none."""
        try:
            self.store.layout.upload(uuid)
        except ValueError:
            raise APIError("BLOB_UPLOAD_UNKNOWN", detail={"uuid": uuid}) from None
        record = self.metadata.get_upload(uuid)
        if record is None or record.name != name:
            raise APIError("BLOB_UPLOAD_UNKNOWN", detail={"uuid": uuid})
        return record

    async def status(self, name: str, uuid: str) -> UploadState:
        await self._asked(name, uuid)
        try:
            size = await anyio.to_thread.run_sync(lambda: os.stat(self.store.layout.upload(uuid)).st_size)
        except FileNotFoundError:  # expired or cancelled since its record was read
            raise APIError("BLOB_UPLOAD_UNKNOWN", detail={"uuid": uuid}) from None
        return UploadState(uuid, size)

    async def append(self, name: str, uuid: str, body: AsyncIterator[bytes],
                     content_range: str | None = None, length: int | None = None) -> UploadState:
        """Add a chunk at the end of the upload (:meth:`_check_range`)."""
        await self._asked(name, uuid)
        fd, record = await self._acquire(name, uuid)
        try:
            offset = os.fstat(fd).st_size
            self._check_range(name, uuid, offset, content_range, length)
            offset, record = await self._write(uuid, fd, offset, body, record)
            await self._written(uuid, fd, offset, record)
        except UploadLost as exc:
            raise await self._lost(uuid, exc) from exc
        finally:
            await self._let_go(uuid, fd)
        return UploadState(uuid, offset)

    #: Whether :meth:`_written` records where the upload ends outside this host's file (a cluster's
    #: uploads, ``registry/roaming.py``): a request failing after it is then not undone by shortening it.
    records_end = False

    async def _lost(self, uuid: str, exc: UploadLost) -> APIError:
        """Discard an upload whose parts the store lost: ``BLOB_UPLOAD_UNKNOWN`` (404), so that its
        client starts the blob's push again, rather than a 503 for ever."""
        log.warning("upload %s: %s: discarded", uuid, exc)
        await to_the_end(self._discard(uuid))
        self.metrics.upload_failed()
        return APIError("BLOB_UPLOAD_UNKNOWN", f"upload lost: {exc}", detail={"uuid": uuid})

    async def _acquire(self, name: str, uuid: str) -> tuple[int, UploadRecord]:
        """The upload's local file, open and locked for this request alone (:meth:`_lock_upload`), and
        its record as it is now that no one else writes it."""
        fd = await anyio.to_thread.run_sync(self._lock_upload, uuid)
        try:
            return fd, await self.reads.ask(self._record, name, uuid)
        except BaseException:
            os.close(fd)
            raise

    async def _written(self, uuid: str, fd: int, offset: int, record: UploadRecord) -> None:
        """A chunk is in: the upload ends at *offset* (nothing more to keep: the file holds it)."""

    async def _let_go(self, uuid: str, fd: int) -> None:
        """The request on the upload is over: close its file (and give the upload up to the others)."""
        os.close(fd)

    def _check_range(self, name: str, uuid: str, offset: int, content_range: str | None,
                     length: int | None) -> None:
        """A chunk's ``Content-Range`` must start where the upload ends and span its *length* (its
        ``Content-Length``, when given): else ``416`` with the ``Range`` the upload holds and nothing is
        written (distribution-spec, "Pushing a blob in chunks"; distribution refuses both the same way)."""
        if not content_range:
            return
        try:
            start, end = chunk_range(content_range)
        except APIError as exc:  # malformed: the client learns where the upload is too
            exc.headers = {**exc.headers, **upload_headers(name, uuid, offset)}
            raise
        wrong = f"chunk starts at {start}, upload is at {offset}" if start != offset else None
        if length is not None and length != end - start + 1:
            wrong = f"Content-Length {length} is not the {end - start + 1} bytes of Content-Range {content_range!r}"
        if wrong:
            raise APIError("BLOB_UPLOAD_INVALID", wrong, status=416, headers=upload_headers(name, uuid, offset))

    async def finish(self, name: str, uuid: str, digest: Digest, body: AsyncIterator[bytes],
                     content_range: str | None = None, length: int | None = None) -> None:
        """Append the last bytes (if any; ``Content-Range`` as for :meth:`append`), verify the digest
        and move the blob into the store."""
        await self._asked(name, uuid)
        path = self.store.layout.upload(uuid)
        fd, record = await self._acquire(name, uuid)
        try:
            before = os.fstat(fd).st_size
            self._check_range(name, uuid, before, content_range, length)
            written = False
            try:
                offset, record = await self._write(uuid, fd, before, body, record)
                record = await to_the_end(self._send_parts(uuid, record, offset))  # any left behind
                await self._written(uuid, fd, offset, record)
                written = True
                known = self._hashers.get(uuid)
                known_hex = known[1].hexdigest() if known and known[0] == offset and digest.algorithm == "sha256" \
                    else None
                await anyio.to_thread.run_sync(self.store.commit_upload, uuid, path, digest, known_hex, record.parts)
            except DigestMismatch as exc:
                await to_the_end(self._discard(uuid))
                self.metrics.upload_failed()
                raise APIError("DIGEST_INVALID", detail=str(exc)) from exc
            except UploadLost as exc:
                raise await self._lost(uuid, exc) from exc
            except OSError as exc:
                undone = isinstance(exc, StoreUnavailable) and not (written and self.records_end)
                if (refusal(exc) is not None or undone) and os.path.exists(path):
                    # As it was before this request (but the parts sent since): a client repeating it
                    # (a 503 says to) sends the same bytes from the same offset.
                    self._hashers.pop(uuid, None)
                    current: UploadRecord | None = await self.reads.ask(self.metadata.get_upload, uuid)
                    await anyio.to_thread.run_sync(os.ftruncate, fd, max(before, _sent(current or record)))
                raise
            self._hashers.pop(uuid, None)
            self.metrics.upload_finished(offset)
            await to_the_end(self._completed(name, uuid, digest))
        finally:
            await self._let_go(uuid, fd)

    async def _completed(self, name: str, uuid: str, digest: Digest) -> None:
        """The blob is stored: link it to the repository and forget the upload."""
        await in_index_thread(self._linked_upload_done, name, uuid, digest)

    def _linked_upload_done(self, name: str, uuid: str, digest: Digest) -> None:
        self.metadata.link(local_repo(name), [str(digest)])
        self.metadata.delete_upload(uuid)

    async def cancel(self, name: str, uuid: str) -> None:
        """Discard the upload, once a request writing to it (a ``PATCH`` or ``PUT`` under way) is done."""
        await self._asked(name, uuid)
        fd, _ = await self._acquire(name, uuid)
        try:
            await to_the_end(self._discard(uuid))
        finally:
            await self._let_go(uuid, fd)

    async def _discard(self, uuid: str) -> None:
        """:meth:`_drop_upload` for a request: the store's work and the index's from threads of their own."""
        self._hashers.pop(uuid, None)
        record = await self.reads.ask(self.metadata.get_upload, uuid)
        if record is not None and record.parts is not None:
            await anyio.to_thread.run_sync(self.store.abort_upload, uuid, record.parts)
        await in_index_thread(self._forget, uuid, record)
        await anyio.to_thread.run_sync(self._remove_file, uuid)

    def _drop_upload(self, uuid: str) -> None:
        """Discard the upload: its parts, its record, its file (blocking; :meth:`_discard` for requests)."""
        self._hashers.pop(uuid, None)
        record = self.metadata.get_upload(uuid)
        if record is not None and record.parts is not None:
            self.store.abort_upload(uuid, record.parts)
        self._forget(uuid, record)
        self._remove_file(uuid)

    def _forget(self, uuid: str, record: UploadRecord | None) -> None:
        """Delete the upload's record; give its name back if nothing landed in it (``metadata/releases.py``)."""
        self.metadata.delete_upload(uuid)
        if record is not None and self.metadata.release_local(record.name):
            log.info("%s is no pushed repository any more: its pushes ended before any content landed", record.name)

    def _remove_file(self, uuid: str) -> None:
        self.store.layout.upload(uuid).unlink(missing_ok=True)

    def _lock_upload(self, uuid: str) -> int:
        """The upload's file, open and locked (waiting while another request on it holds it)."""
        try:
            fd = os.open(self.store.layout.upload(uuid), os.O_RDWR)
        except FileNotFoundError:
            raise APIError("BLOB_UPLOAD_UNKNOWN", detail={"uuid": uuid}) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def _send_parts(self, uuid: str, record: UploadRecord, offset: int) -> UploadRecord:
        """Send every whole part the file holds past the parts sent (none if the store takes no
        parts), recording each in the index before the next; return the record as it is then.
        Run it to its end (``to_the_end``): a part sent is no longer in the file, only in its record."""
        part_size = record.parts.part_size if record.parts is not None else self.store.upload_part_size()
        while part_size and offset - _sent(record) >= part_size:
            parts = await anyio.to_thread.run_sync(self.store.send_upload_part, uuid, self.store.layout.upload(uuid),
                                                   record.parts)
            # A tail kept (registry/roaming.py) is in the part sent now (none when it was only started).
            tail = 0 if parts.sent > _sent(record) else record.tail
            record = await in_index_thread(self._keep, uuid, replace(record, parts=parts, tail=tail))
        return record

    def _keep(self, uuid: str, record: UploadRecord) -> UploadRecord:
        """Write the upload's record; the record as written."""
        self.metadata.put_upload(uuid, record)
        return record

    async def _write(self, uuid: str, fd: int, offset: int, body: AsyncIterator[bytes],
                     record: UploadRecord) -> tuple[int, UploadRecord]:
        """Write the request body at *offset*, 1 MiB per thread hop, sending whole parts as they fill
        (:meth:`_send_parts`; a bucket that refuses them is a refused write); return the new end and record."""
        known = self._hashers.get(uuid)
        hasher = known[1] if known and known[0] == offset else None
        if hasher is None:
            self._hashers.pop(uuid, None)
        sending = True

        def write(data: bytes, at: int) -> None:
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            if hasher is not None:
                hasher.update(data)

        async def flush(data: bytes, at: int, record: UploadRecord) -> UploadRecord:
            nonlocal sending
            await anyio.to_thread.run_sync(write, data, at)
            if sending:
                try:
                    return await self._send_parts(uuid, record, at + len(data))
                except StoreUnavailable as exc:  # the bytes are safe here: the parts go later
                    if refusal(exc) is not None:
                        raise  # a bucket that takes no writes (a refusal, not an outage): 507 as a full disk
                    log.warning("upload %s keeps its parts for later: %s", uuid, exc)
                    sending = False
                    return await self.reads.ask(self.metadata.get_upload, uuid) or record
            return record

        pending: list[bytes] = []
        pending_size = 0
        start = offset
        try:
            async for chunk in body:
                if not chunk:
                    continue
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= WRITE_BATCH:
                    record = await to_the_end(flush(b"".join(pending), offset, record))
                    offset += pending_size
                    pending, pending_size = [], 0
            if pending:
                record = await to_the_end(flush(b"".join(pending), offset, record))
                offset += pending_size
        except OSError as exc:
            if refusal(exc) is not None:  # the upload stays as it was before this request (but parts sent)
                self._hashers.pop(uuid, None)
                await anyio.to_thread.run_sync(os.ftruncate, fd, max(start, _sent(record)))
            raise
        if hasher is not None:
            self._hashers[uuid] = (offset, hasher)
        return offset, record

    def sweep(self) -> int:
        """Remove upload files untouched for ``push.upload_ttl``, their records and the parts they sent;
        return how many.

        A file without a record is swept by the same rule, not at once: another worker may be
        creating it (the file comes before its record) or finishing it (the record goes first).
        A record without a file (its process ended between storing the blob, which takes the file,
        and forgetting the upload) is dropped at the next sweep that still finds it so: no request
        can continue it, and it would keep its name a pushed repository for good.  One whose file another
        running mirror may hold (``metadata/holders.py``: pods on one index) goes once older than the TTL.
        On an object store, the objects ended uploads left there go too (``maintenance/leftovers.py``).
        """
        removed, files = 0, set()
        cutoff = time.time() - self.upload_ttl
        for entry in self.store.layout.upload_entries():
            files.add(entry.name)
            try:
                stale = entry.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if stale and self._swept(entry.name):
                removed += 1
        seen, self._fileless = self._fileless, {uuid for uuid in set(self.metadata.upload_ids()) - files
                                                 if not self._elsewhere(uuid)}
        for uuid in sorted(seen & self._fileless):
            log.info("upload %s has no file left (its process ended as it finished): its record dropped", uuid)
            if self._swept(uuid):
                removed += 1
        if (tails := bucket_uploads(self.store)) is not None:  # an object store: what ended uploads left there
            remove_left_behind(tails, self.metadata)
        return removed

    def _elsewhere(self, uuid: str) -> bool:  # its file maybe another running mirror's
        record = self.metadata.get_upload(uuid)
        return record is not None and held_elsewhere(record, self.upload_ttl, instance(),
                                                     leases_of(self.metadata, self.store.local))

    def _swept(self, uuid: str) -> bool:
        try:
            self._drop_upload(uuid)
        except (OSError, ValueError) as exc:  # the store does not answer: swept next time
            log.warning("could not remove the expired upload %s: %s", uuid, exc)
            return False
        return True


def _sent(record: UploadRecord) -> int:
    return record.parts.sent if record.parts is not None else 0
