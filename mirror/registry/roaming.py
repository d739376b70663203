"""Blob uploads that continue on any replica of a cluster (``registry/cluster.py``): no load balancer
stickiness is needed for a push.

On one host an upload's bytes past the parts it sent (its *tail*, less than a part) live in its local
file ``uploads/<uuid>`` only (``registry/uploads.py``).  A replica keeps them in the bucket as well:

* **One request at a time, cluster-wide.**  A request that writes to an upload (``PATCH``, ``PUT``,
  ``DELETE``) first takes the lease ``upload:<uuid>`` in the index (:class:`~mirror.metadata.driver.Lease`,
  ``cluster.lease_ttl``, renewed every third of it while the request runs), waiting while another
  request, on any replica, holds it, as a worker of one host waits for the file's ``flock``; after
  :func:`~mirror.registry.cluster.stall_limit` it gives up with ``416 BLOB_UPLOAD_INVALID``.  Then the
  chunk's ``Content-Range`` is checked against the upload's offset as on one host (``416`` if it does
  not start there).  Every write to the record is fenced: the lease must still be this request's
  (same token, unexpired), else the request fails without writing.
* **The tail in the bucket.**  At the end of a ``PATCH`` (and before a ``PUT`` completes), the bytes past
  the last part sent are written whole to ``<rootdirectory>/uploads/<uuid>/tail``
  (:class:`~mirror.storage.driver.UploadTails`) and the record says how many (``UploadRecord.tail``), so the
  upload's offset is ``parts.sent + tail``.  A part sent sets the record's tail to 0 first, and a tail is
  written only after the record's, so the record's tail is always a prefix of the object: a replica that
  dies at any point leaves a record that is true.
* **Continuing.**  The replica taking the next request rebuilds its local file from the record: nothing
  to fetch if it wrote the record's offset itself last (this process's memory, :attr:`RoamingUploads._local`),
  else one ranged ``GET`` of the tail, written at ``parts.sent`` of a sparse file.  From there it goes on as
  on one host: whole parts sent as they fill, the ``PUT`` completing, verifying (the running hash if this
  process saw every byte, else the object read back once) and copying to the digest's key.
* **Expiry** goes by the record's last write (``UploadRecord.written_at``), on every replica: an upload
  untouched for ``push.upload_ttl`` loses its parts, its tail, its record and this replica's file; a
  replica's stale file of an upload that went on elsewhere is only deleted.

A paused process whose lease expired could still overwrite the tail between its fencing check and its
write (S3 has no conditional write to refuse it): such bytes never reach a digest's key, as the ``PUT``
verifies the whole upload against its digest (``DIGEST_INVALID`` then).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from dataclasses import replace

import anyio.to_thread

from ..maintenance.leftovers import remove_left_behind
from ..metadata.driver import Lease, Metadata, UploadRecord
from ..observe.metrics import Metrics
from ..spec.errors import APIError
from ..spec.reference import Digest
from ..storage.driver import BlobStore, UploadTails
from ..storage.layout import ORPHAN_GRACE
from .reads import in_index_thread
from .records import to_the_end
from .replica import stall_limit
from .repository import UploadState
from .uploads import Uploads, upload_headers

log = logging.getLogger("mirror.uploads")

#: Seconds between two attempts at an upload's lease while another request holds it.
WAIT_INTERVAL = 0.05


def lease_name(uuid: str) -> str:
    """The lease a request holds on the upload *uuid* while it writes to it."""
    return f"upload:{uuid}"


def offset_of(record: UploadRecord) -> int:
    """Where the upload ends by its record: the parts sent and the tail kept."""
    return (record.parts.sent if record.parts is not None else 0) + record.tail


class RoamingUploads(Uploads):
    """The uploads of a replica (see the module's docstring); *replica* names it in leases, *ttl* is
    ``cluster.lease_ttl``."""

    records_end = True

    def __init__(self, store: BlobStore, metadata: Metadata, upload_ttl: float, metrics: Metrics,
                 tails: UploadTails, replica: str, ttl: float) -> None:
        super().__init__(store, metadata, upload_ttl, metrics)
        self.tails = tails
        self.replica = replica
        self.ttl = ttl
        # uuid -> the lease of the request of this process writing to the upload, and its heartbeat.
        self._leases: dict[str, Lease] = {}
        self._beats: dict[str, asyncio.Task[None]] = {}
        # uuid -> (offset, written_at) of the record this process wrote or read last: while the record
        # is still that one, its local file holds the upload up to the offset.
        self._local: dict[str, tuple[int, float | None]] = {}

    def _new_record(self, name: str, uuid: str) -> UploadRecord:
        now = time.time()
        self._local[uuid] = (0, now)
        return UploadRecord(name, now, written_at=now)

    def _record(self, name: str, uuid: str) -> UploadRecord:
        return self._known(name, uuid)  # its local file, if any, may be behind: rebuilt by _acquire

    async def status(self, name: str, uuid: str) -> UploadState:
        return UploadState(uuid, offset_of(await self._asked(name, uuid)))

    async def cancel(self, name: str, uuid: str) -> None:
        await self._asked(name, uuid)
        await self._take(name, uuid)
        try:
            await to_the_end(self._discard(uuid))
        finally:
            await self._release(uuid)

    # -- one request at a time --

    async def _take(self, name: str, uuid: str) -> Lease:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + stall_limit(self.ttl)
        while True:
            lease = await in_index_thread(self.metadata.take_lease, lease_name(uuid), self.replica, self.ttl)
            if lease is not None:
                self._leases[uuid] = lease
                return lease
            if loop.time() > give_up:
                offset = offset_of(await self._asked(name, uuid))
                raise APIError("BLOB_UPLOAD_INVALID", "another request is writing to this upload", status=416,
                               headers=upload_headers(name, uuid, offset))
            await asyncio.sleep(WAIT_INTERVAL)

    async def _release(self, uuid: str) -> None:
        beat = self._beats.pop(uuid, None)
        if beat is not None:
            beat.cancel()
        lease = self._leases.pop(uuid, None)
        if lease is not None:
            with contextlib.suppress(Exception):  # it expires anyway
                await asyncio.shield(in_index_thread(self.metadata.release_lease, lease))

    async def _beat(self, uuid: str) -> None:
        """Renew the request's lease every third of its TTL until cancelled."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            lease = self._leases.get(uuid)
            if lease is None:
                return
            try:
                renewed = await in_index_thread(self.metadata.renew_lease, lease, self.ttl)
            except Exception as exc:  # noqa: BLE001 (the index is down: try again; the fence refuses writes)
                log.warning("upload %s: cannot renew its lease: %s", uuid, exc)
                continue
            if renewed is None:
                log.warning("upload %s: its lease expired or was taken over: this request stops", uuid)
                return
            self._leases[uuid] = renewed

    def _fence(self, uuid: str) -> None:
        """Go on writing only while the request's lease is still the one granted (its token, unexpired)."""
        lease = self._leases.get(uuid)
        renewed = None if lease is None else self.metadata.renew_lease(lease, self.ttl)
        if renewed is None:
            raise APIError("BLOB_UPLOAD_INVALID", "another request took this upload over", status=416,
                           detail={"uuid": uuid})
        self._leases[uuid] = renewed

    def _keep(self, uuid: str, record: UploadRecord) -> UploadRecord:
        """Write *record*, stamped with this write's time (what tells the processes that a record
        changed: see :meth:`_rebuild`), if the request still holds the upload's lease."""
        record = replace(record, written_at=time.time())
        self._fence(uuid)
        self.metadata.put_upload(uuid, record)
        return record

    # -- the local file, rebuilt from the record; the tail kept --

    async def _acquire(self, name: str, uuid: str) -> tuple[int, UploadRecord]:
        await self._take(name, uuid)
        try:
            record = await self.reads.ask(self._record, name, uuid)
            fd = await anyio.to_thread.run_sync(self._rebuild, uuid, record)
        except BaseException:
            await self._release(uuid)
            raise
        self._beats[uuid] = asyncio.create_task(self._beat(uuid))
        return fd, record

    def _rebuild(self, uuid: str, record: UploadRecord) -> int:
        """The local file, open and locked, holding the upload up to *record*'s offset from
        ``parts.sent`` on (a hole before)."""
        fd = os.open(self.store.layout.upload(uuid), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            sent, offset = offset_of(record) - record.tail, offset_of(record)
            size = os.fstat(fd).st_size
            if self._local.get(uuid) == (offset, record.written_at) and size >= offset:
                if size > offset:  # bytes of a request that failed here
                    os.ftruncate(fd, offset)
                return fd
            # Another process wrote to the upload since: this one did not see every byte.
            self._local.pop(uuid, None)
            self._hashers.pop(uuid, None)
            os.ftruncate(fd, 0)  # what the parts hold is not kept here: a hole up to them
            os.ftruncate(fd, sent)
            if record.tail:
                self.tails.fetch(uuid, fd, sent, record.tail)
            self._local[uuid] = (offset, record.written_at)
            return fd
        except BaseException:
            os.close(fd)
            raise

    async def _written(self, uuid: str, fd: int, offset: int, record: UploadRecord) -> None:
        async def keep() -> None:  # the index's work and the bucket's from threads of their own (registry/reads.py)
            sent = offset_of(record) - record.tail
            tail = offset - sent
            await in_index_thread(self._fence, uuid)
            if tail and tail != record.tail:  # else nothing came past what the bucket holds
                await anyio.to_thread.run_sync(self.tails.put, uuid, fd, sent, tail)
            kept = await in_index_thread(self._keep, uuid, replace(record, tail=tail))
            self._local[uuid] = (offset, kept.written_at)

        await to_the_end(keep())

    async def _let_go(self, uuid: str, fd: int) -> None:
        os.close(fd)
        await self._release(uuid)

    async def _completed(self, name: str, uuid: str, digest: Digest) -> None:
        await super()._completed(name, uuid, digest)
        self._local.pop(uuid, None)
        try:
            await anyio.to_thread.run_sync(self.tails.remove, uuid)
        except OSError as exc:  # the blob is stored: only a small object is left behind
            log.warning("upload %s: could not delete its tail: %s", uuid, exc)

    async def _discard(self, uuid: str) -> None:
        await anyio.to_thread.run_sync(self.tails.remove, uuid)
        self._local.pop(uuid, None)
        await super()._discard(uuid)

    def _drop_upload(self, uuid: str) -> None:
        self.tails.remove(uuid)
        self._local.pop(uuid, None)
        super()._drop_upload(uuid)

    # -- expiry --

    def sweep(self) -> int:
        """Drop the uploads whose last write is older than ``push.upload_ttl`` (by their record, on
        any replica); delete this replica's files of uploads finished elsewhere (after
        :data:`ORPHAN_GRACE`: a file comes before its record) and its stale files of uploads that
        went on elsewhere, and the tails and objects ended uploads left in the bucket
        (``maintenance/leftovers.py``); return how many uploads were dropped.
        An upload a request holds is left for the next sweep."""
        now = time.time()
        cutoff = now - self.upload_ttl
        files: dict[str, float] = {}
        for entry in self.store.layout.upload_entries():
            with contextlib.suppress(FileNotFoundError):
                files[entry.name] = entry.stat().st_mtime
        removed = 0
        for uuid in sorted(set(files) | set(self.metadata.upload_ids())):
            try:
                record = self.metadata.get_upload(uuid)
                written = files.get(uuid, now)
                if record is None:  # a file left behind (the upload ended): only removed
                    drop, go = False, written < now - ORPHAN_GRACE
                else:
                    drop = (record.written_at or record.started_at) < cutoff
                    go = drop or written < cutoff  # an upload alive elsewhere: only this replica's file
                if go and self._sweep_one(uuid, drop) and drop:
                    removed += 1
            except (OSError, ValueError) as exc:  # the store does not answer: swept next time
                log.warning("could not remove the expired upload %s: %s", uuid, exc)
        remove_left_behind(self.tails, self.metadata)  # tails and objects whose delete failed as their upload ended
        return removed

    def _sweep_one(self, uuid: str, drop: bool) -> bool:
        """Drop the upload (*drop*), or only this replica's file of it, unless a request holds it."""
        lease = self.metadata.take_lease(lease_name(uuid), self.replica, self.ttl)
        if lease is None:
            return False
        try:
            if drop:
                self._drop_upload(uuid)
            else:
                self._local.pop(uuid, None)
                self.store.layout.upload(uuid).unlink(missing_ok=True)
        finally:
            self.metadata.release_lease(lease)
        return True
