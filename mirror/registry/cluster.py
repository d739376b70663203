"""Replicas of one mirror on a shared bucket and database: one upstream fetch per digest across all of them.

On every replica a missing blob is filled as on one host (``storage/fill.py``: one local fill per
digest, followed by every local reader); :class:`ClusterFetch` decides where that fill's bytes come from.

* The first replica to miss the digest takes the lease ``fill:<digest>`` in the index (a :class:`Lease`:
  expiry by the database's clock, ``cluster.lease_ttl``) and fetches from the upstream, storing the
  object as usual.  A heartbeat renews the lease every third of its TTL (one that expired while the
  index did not answer is granted again if no replica took it); once the upstream's last byte is in,
  the lease must still be this replica's, else the fill fails.  It is released once the fill ended.
* Any other replica finds the lease held and streams the fill from its holder (the lease names it by
  its ``cluster.advertise`` URL): ``GET /_mirror/cluster/fills/<digest>``, signed (``registry/peers.py``),
  with ``Range: bytes=<offset>-`` from what it has.  The holder answers from its own fill as its local
  clients get it, the last byte held back until the digest is verified (``api/cluster.py``).  This
  replica's fill then stores nothing (``FillWriter.stored_elsewhere``): it verifies the bytes too, and
  its commit waits for the holder's object in the bucket.
* A stream that breaks (the holder died, or restarted) is asked for again from the byte reached;
  once the dead holder's lease expired, the first follower to take it asks the upstream for the rest
  (``registry/takeover.py``) and stores the object itself: its clients see a pause, never an error.  A
  holder that hangs is given up after :func:`read_limit` without a byte, and taken over the same way;
  resumed, it finds its lease's token changed, fails its fill (storing nothing, cutting its clients
  off) and counts it fenced; the taker aborts the multipart upload it left once it stored the object.
  No progress for :func:`stall_limit` seconds while another replica holds the lease fails the fill,
  and so does a holder that refuses this replica's signature (``cluster.secret_file`` differs): before
  the first byte, the client is answered ``503 UNAVAILABLE``; after it, its transfer is cut short.
* A replica's look in the bucket that a busy bucket answers late is raced by a look at the fill's
  lease (``registry/sharedfills.py``): a blob another replica is fetching is followed at once, that
  replica asked first without asking the index again.
* Every replica filling a digest, the fetching one and those following it, marks it in use in the index
  (:attr:`Cluster.marks`) until its local fill ended, so that the collector spares its image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import anyio.to_thread
import httpx

from ..metadata.driver import Lease
from ..observe.cluster import ClusterMetrics
from ..spec.errors import APIError
from ..spec.reference import Digest
from ..storage.bypass import FillFailed
from ..storage.growing import Fetch
from .peers import MAX_SKEW, REFUSED_HEADER
from .reads import in_index_thread
from .replica import FILLS_PATH, RETRY_AFTER, RETRY_INTERVAL, Cluster, lease_name, reason, stall_limit
from .takeover import open_from

#: Seconds a fetch that is complete waits for the index to answer the renewal of its fill lease.
FENCE_WAIT = 30.0
log = logging.getLogger("mirror.cluster")

class ClusterFetch:
    """One replica's fetch of one digest (a :class:`~mirror.storage.bypass.Download` in its context)."""

    def __init__(self, cluster: Cluster, digest: Digest, upstream: Fetch, figures: ClusterMetrics,
                 holder: str | None = None, store_down: bool = False) -> None:
        self.cluster = cluster
        #: The request that started this fetch found the store down: the look under the lease is skipped once
        #: (on a hung store each look waits out the same timeouts; the fill then serves the blob unstored).
        self._store_down = store_down
        #: The replica the fill lease named a moment ago, if known: followed first, without asking the index.
        self._holder_hint = holder
        self.digest = digest
        self.upstream = upstream
        self.figures = figures
        self.size: int | None = None
        #: The fill lease while this replica holds it (it fetches from the upstream and stores).
        self.lease: Lease | None = None
        self._lost = False
        self._unanswered = False  # a renewal of the lease failed since the last that went through (index down)
        self._heartbeat: asyncio.Task[None] | None = None
        self._stack = AsyncExitStack()
        self._source: AsyncIterator[bytes] | None = None
        #: Whether the bytes come from another replica (or the store), not from the upstream under the lease.
        self._from_peer = False
        #: Whether another replica's fill was seen (followed, or its lease found held): a later lease is a takeover.
        self._followed = False
        #: Whether this replica is counted as a follower (:class:`ClusterMetrics`, once per fill).
        self._counted_follower = False
        #: Whether the source is another replica's fill stream (not the store, nor the upstream).
        self._source_is_peer = False
        #: When this replica took another's fill over (Unix time), if it did.
        self._taken_over_at: float | None = None
        self._offset = 0
        #: Set by the local fill this fetch feeds once it ended (:meth:`claimed`); None: no fill claimed it.
        self._fill_ended: asyncio.Event | None = None

    def claimed(self) -> Callable[[], None]:
        """Called by the local fill whose source this fetch is (``storage/fill.py``); the callable returned
        is called once that fill ended (stored, or failed).  The lease and the mark are kept until then:
        the fill's commit comes after the last byte.  A fetch no fill claims (streamed through to one
        client) gives them up when its context exits."""
        self._fill_ended = asyncio.Event()
        return self._fill_ended.set

    def stored_elsewhere(self) -> bool:
        """Whether another replica stores the object (this one only follows its fill)."""
        return self.lease is None

    async def __aenter__(self) -> ClusterFetch:
        marks, held = self.cluster.marks, False

        def hold() -> None:
            nonlocal held
            if marks is not None:
                marks.hold(self.digest)
                held = True  # released below even if this task is cancelled while the thread runs

        def settle(holding: asyncio.Future[None]) -> None:
            if not holding.cancelled() and holding.exception() is None and held and marks is not None:
                marks.release(self.digest)

        # The mark is written while the source is sought: nothing of this fill is stored before both.
        holding = asyncio.ensure_future(in_index_thread(hold)) if marks is not None else None
        try:
            await self._connect()
            if holding is not None:
                await holding
        except BaseException:
            await self._stack.aclose()
            if holding is not None:
                holding.add_done_callback(settle)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._stack.aclose()
        finally:
            if self.lease is not None or self.cluster.marks is not None:
                self.cluster.track(self._release_after_fill(self.lease))

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            assert self._source is not None
            start = self._offset
            try:
                async for chunk in self._source:
                    if self._lost:
                        self.figures.fenced_off()
                        raise FillFailed(f"{self.digest}: the fill lease was lost to another replica")
                    self._offset += len(chunk)
                    yield chunk
            except httpx.HTTPError as exc:
                if not self._from_peer:
                    raise
                self.figures.stream_error("stalled" if isinstance(exc, httpx.TimeoutException) else "broken")
                log.info("%s: the stream from the replica fetching it broke at byte %d (%s): asking again",
                         self.digest, self._offset, reason(exc))
            else:
                if not self._from_peer:
                    await self._fenced()
                    return
                if self.size is None or self._offset >= self.size:
                    return
            finally:
                if self._source_is_peer:
                    self.figures.received(self._offset - start)
            await self._stack.aclose()
            self._stack = AsyncExitStack()
            await self._connect()

    async def _fenced(self) -> None:
        """The fetch is complete: go on only if the lease is still the one granted (its token), or
        granted again (:meth:`_renew`).  The index down, it is asked again for :data:`FENCE_WAIT`
        seconds (the fill's clients wait for their last byte meanwhile)."""
        assert self.lease is not None
        renewed, deadline = None, time.monotonic() + FENCE_WAIT
        while not self._lost:
            try:
                renewed = await self._renew(self.lease)
                break
            except Exception as exc:  # noqa: BLE001 (raised once FENCE_WAIT is over)
                self._unanswered = True
                if time.monotonic() > deadline:
                    raise
                log.warning("%s: fetched; the fill lease cannot be renewed: %s", self.digest, exc)
                await asyncio.sleep(self.cluster.ttl / 3)
        if renewed is None:
            self.figures.fenced_off()
            raise FillFailed(f"{self.digest}: the fill lease (token {self.lease.token}) expired or was taken over")
        self.lease = renewed

    async def _connect(self) -> None:
        """Open the next source: the upstream under the lease, or the holder's fill."""
        cluster, name = self.cluster, lease_name(self.digest)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + stall_limit(cluster.ttl)
        hint, self._holder_hint = self._holder_hint, None
        if hint is not None and hint != cluster.replica:
            self._followed = True
            if await self._follow(hint):
                return

        def look() -> tuple[Lease | None, Lease | None]:
            """The lease if granted to this replica, else who holds it (one trip to a worker thread)."""
            taken = cluster.metadata.take_lease(name, cluster.replica, cluster.ttl)
            return (taken, None) if taken is not None else (None, cluster.metadata.current_lease(name))

        while True:
            lease, holder = await in_index_thread(look)
            if lease is not None:
                await self._lead(lease)
                return
            if holder is not None:
                self._followed = True
                # This replica's own name: a lease left by its previous run, until it expires.
                if holder.holder != cluster.replica and await self._follow(holder.holder):
                    return
                if loop.time() > give_up:
                    log.warning("%s: no bytes from %s, which holds its fill, for %gs", self.digest, holder.holder,
                                stall_limit(cluster.ttl))
                    raise _unavailable("the replica fetching this blob does not answer")
                await asyncio.sleep(RETRY_INTERVAL)

    async def _lead(self, lease: Lease) -> None:
        """Fetch from the upstream under *lease*, from the byte this fill reached; or, if the object
        was stored meanwhile (its fetcher finished and let go of the lease), read it from the store (not
        looked for once the request that started this fetch found the store down)."""
        try:
            stored = None if self._store_down else await anyio.to_thread.run_sync(self.cluster.stored, self.digest)
            self._store_down = False
        except BaseException:
            await asyncio.shield(in_index_thread(self.cluster.metadata.release_lease, lease))
            raise
        if stored is not None:
            self._stack.callback(stored.close)
            await in_index_thread(self.cluster.metadata.release_lease, lease)
            self.size, self._from_peer, self._source_is_peer = stored.size, True, False
            self._source = stored.chunks(self._offset)
            return
        self.lease, self._lost, self._from_peer, self._source_is_peer = lease, False, False, False
        self._heartbeat = asyncio.create_task(self._beat())
        rests = AsyncExitStack()  # a body that breaks off is resumed where it broke, its rests kept here
        self._stack.push_async_callback(rests.aclose)
        try:  # a fill taken over: the rest only (Range), not the bytes it reached again
            size, self._source = await open_from(self.upstream, self.digest, self._offset, self.size, self._stack,
                                                 rests)
        except BaseException:
            self._heartbeat.cancel()
            self.lease = None
            await asyncio.shield(in_index_thread(self.cluster.metadata.release_lease, lease))
            raise
        self.figures.fill("takeover" if self._followed else "owner")
        if self._followed:
            self._taken_over_at = time.time()
        self.size = size

    async def _follow(self, holder: str) -> bool:
        """Stream the fill from *holder* from the byte reached; False if it does not answer it now."""
        path = f"{FILLS_PATH}{self.digest}"
        headers = self.cluster.signed("GET", path)
        if self._offset:
            headers["Range"] = f"bytes={self._offset}-"
        try:
            response = await self._stack.enter_async_context(
                self.cluster.client.stream("GET", holder + path, headers=headers))
        except httpx.HTTPError as exc:
            self.cluster.unanswered(holder, self.digest, reason(exc))
            return False
        size = _size(response, self._offset)
        if size is None or (self._offset and size != self.size):
            await self._stack.aclose()
            self._stack = AsyncExitStack()
            if response.headers.get(REFUSED_HEADER) == "clock":  # the secret is right: wait, as for a silent one
                self.figures.stream_error("refused")
                self.cluster.unanswered(holder, self.digest, "it refused this replica's request as more than "
                                        f"{MAX_SKEW}s off its clock", "keep the hosts' clocks synchronized (NTP)")
                return False
            if response.status_code in (401, 403):
                self.figures.stream_error("refused")
                log.warning("%s: %s refused this replica's request (%d): is cluster.secret_file the same "
                            "on every replica?", self.digest, holder, response.status_code)
                raise _unavailable("the replica fetching this blob refused this one's request")
            return False
        self.size, self._from_peer, self._source_is_peer = size, True, True
        self._source = response.aiter_bytes()
        if not self._counted_follower:
            self._counted_follower = True
            self.figures.fill("follower")
        return True

    async def _beat(self) -> None:
        """Renew the lease every third of its TTL until cancelled; note when it is lost."""
        while True:
            await asyncio.sleep(self.cluster.ttl / 3)
            lease = self.lease
            if lease is None:
                return
            try:
                renewed = await self._renew(lease)
            except Exception as exc:  # noqa: BLE001 (the index is down: try again; expiry fences this fill)
                self._unanswered = True
                log.warning("%s: cannot renew the fill lease: %s", self.digest, exc)
                continue
            if renewed is None:
                log.warning("%s: the fill lease expired or was taken over: this replica stops fetching", self.digest)
                self._lost = True
                return
            self.lease = renewed

    async def _renew(self, lease: Lease) -> Lease | None:
        """*lease* renewed, or None: taken over.  One that expired while the index did not answer (a database
        failover longer than ``cluster.lease_ttl``) is granted again if no replica took it since."""
        renewed = await in_index_thread(self.cluster.metadata.renew_lease, lease, self.cluster.ttl)
        if renewed is None and self._unanswered:
            renewed = await in_index_thread(self.cluster.metadata.take_lease, lease.name, lease.holder,
                                            self.cluster.ttl)
            if renewed is not None:
                log.warning("%s: the fill lease expired while the index did not answer: granted again", self.digest)
        self._unanswered = False
        return renewed

    async def _release_after_fill(self, lease: Lease | None) -> None:
        """Keep the lease (if this replica fetches) and the mark until the local fill this fetch fed
        ended (the object stored, or the fill failed), then give them up: other replicas then find the
        object, or fetch it themselves.  That fill, not whichever fill of the digest is running: a fill
        of the same digest started here after this one ended (the object stored, then collected) waits
        for this lease, and must not be waited for in turn."""
        try:
            if self._fill_ended is not None:
                await self._fill_ended.wait()
            if self._taken_over_at is not None:
                await anyio.to_thread.run_sync(self._abort_left_behind, self._taken_over_at)
        finally:
            if self.cluster.marks is not None:
                self.cluster.marks.release(self.digest)
            if self._heartbeat is not None:
                self._heartbeat.cancel()
            current = self.lease or lease
            if current is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(in_index_thread(self.cluster.metadata.release_lease, current))

    def _abort_left_behind(self, since: float) -> None:
        """After a takeover whose object is stored: abort the multipart upload the replica that
        died or hung left in the bucket (its note is in its own data directory: only its restart
        would abort it)."""
        from ..storage.s3 import S3Store  # here: a store on a filesystem never loads boto3
        from ..storage.s3notes import abort_left_behind

        store = self.cluster.store
        if not isinstance(store, S3Store):
            return
        try:
            if store.size(self.digest) is None:
                return
            key = store.key(self.digest)
            for upload in abort_left_behind(store.client, store.bucket, key, since, store.abort):
                log.info("%s: aborted upload %s, left by the replica whose fill this one took over",
                         self.digest, upload)
        except Exception as exc:  # noqa: BLE001 (the upload is aborted by its replica's restart, or expires)
            log.warning("%s: could not abort the upload left by the replica whose fill this one took over: %s",
                        self.digest, exc)


def _unavailable(message: str) -> APIError:
    return APIError("UNAVAILABLE", message, status=503, headers={"Retry-After": str(RETRY_AFTER)})


def _size(response: httpx.Response, offset: int) -> int | None:
    """The whole blob's size from a replica's answer for bytes *offset*..; None if it is not that."""
    if offset == 0 and response.status_code == 200:
        length = response.headers.get("content-length")
        return int(length) if length is not None and length.isdigit() else None
    if response.status_code != 206:
        return None
    unit, _, spec = response.headers.get("content-range", "").partition(" ")
    span, _, total = spec.partition("/")
    if unit != "bytes" or not total.isdigit() or not span.startswith(f"{offset}-"):
        return None
    return int(total)
