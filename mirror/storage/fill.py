"""One upstream fetch per digest, shared by every reader in every worker process.

The first request for a missing digest becomes the *leader*: it creates
``tmp/<alg>-<hex>.partial`` (``storage/layout.py``, in the local data directory whatever the driver), takes an
exclusive ``flock`` on it, and a background task streams the upstream body into it (hashing as it writes: the
driver's :meth:`~mirror.storage.driver.BlobStore.fill_writer`, which moves the file into ``blobs/`` on the
filesystem, or sends it to the object store as it grows: ``storage/s3fill.py``).  Every
reader follows that growing file (:class:`~mirror.storage.growing.GrowingBlob`, which says how readers in
any process learn the outcome); the leader publishes the fetch's size in ``<alg>-<hex>.meta``.

When the store cannot take the blob (no room for its announced size, or the filesystem refuses
a create, write, fsync or rename: full, over quota, read-only), the fill *bypasses* the store: the
leader marks its temp file :data:`~mirror.storage.growing.REFUSED_MODE`, lets go of it and hands the
download to its own client as a :class:`BypassBlob` (hashed as it passes, the last byte held back
until the whole blob matched its digest; nothing stored).  Every other reader of that fill sees the
mark and streams the upstream's bytes on its own in the same way (:meth:`Fills.bypass`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import anyio.to_thread

from ..observe.metrics import Metrics
from ..spec.reference import Digest
from .batches import receive, thread_to_the_end
from .bypass import RELAY_DEPTH, BypassBlob, FillFailed, handover, relay
from .driver import BlobReader, BlobStore, DigestMismatch, FillWriter, StoreUnavailable
from .filesystem import VERIFIED_MODE
from .fillends import fill_refusal, settle_failed
from .growing import (
    Fetch,
    GrowingBlob,
    fill_state,
    filling,
    names_inode,
    read_meta,
    write_meta,
    write_pending,
)
from .refusals import refusal

log = logging.getLogger("mirror.storage.fill")
T = TypeVar("T")

#: Seconds a reader asking one upstream for a digest waits for another upstream's fetch of it to be
#: answered (counted from that fetch's start) before fetching on its own (:meth:`Fills._follow`).
OTHER_UPSTREAM_WAIT = 2.0


class Fills:
    """Coalesced, verified fetches into a :class:`~mirror.storage.driver.BlobStore`.  Built once per process."""

    def __init__(self, store: BlobStore, poll_interval: float = 0.005, *, metrics: Metrics | None = None) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.metrics = metrics if metrics is not None else Metrics(enabled=False)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Fills this process leads -> an event set (and replaced) whenever bytes or an outcome land.
        self._progress: dict[Digest, asyncio.Event] = {}
        self._leading: set[Digest] = set()
        #: Fills this process leads that started after a look found the store not answering (:meth:`unstored`).
        self._unstored: set[Digest] = set()

    #: Whether the store is looked at again once this process holds a fill's lock (a fill of another
    #: process may have stored the blob in between).  A subclass that looks under a lock of its own
    #: before fetching turns it off (``registry/cluster.py``).
    look_after_lock = True

    async def open(self, digest: Digest, fetch: Fetch, *, looked: bool = False, down: bool = False,
                   origin: str | None = None) -> BlobReader | GrowingBlob | BypassBlob:
        """The stored blob, or a reader of the fetch in progress (started here if there is none), or
        the upstream's bytes streamed through when the store cannot take them.

        *looked*: the caller has just found the blob missing from the store, so the first look here is
        skipped (on an object store each look is a request).  The look once the fill's lock is held
        is not: that one decides.  Errors of ``fetch`` before its body starts are raised here.  *down*:
        that look found the store not answering (:class:`StoreUnavailable`): no look is made here at all
        (each would wait out the same timeouts); the fill goes on as one the store fails, served unstored.

        *origin*: the upstream registry ``fetch`` asks, when there are several.  A fetch of the same
        digest from another one that has had no answer for :data:`OTHER_UPSTREAM_WAIT` seconds is not
        waited for: this reader streams its own upstream's bytes through (verified, not stored).
        """
        for _ in range(100):
            # On an object store these are requests (HEAD), made from a worker thread (look).
            stored = None if looked or down else await self._look_up(self.open_stored, digest)
            looked = False
            if stored is not None:
                return stored
            path = self.store.layout.fill(digest)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if refusal(exc) is None:
                    raise
                await anyio.to_thread.run_sync(self.store.refused, exc, None)
                return await self.bypass(digest, fetch)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                follower = await self._follow(digest, fd, fetch, origin)
                if follower == "refused" or follower == "elsewhere":
                    return await self.bypass(digest, fetch)
                if follower is not None:
                    return await follower.marked()
                continue  # the leader failed before its body started: try again, perhaps as leader
            if not names_inode(path, fd):
                os.close(fd)  # lost a race with a finishing or failing leader
                continue
            try:
                stored_meanwhile = self.look_after_lock and not down and await self._look_up(self.store.exists, digest)
            except BaseException:
                os.close(fd)  # cancelled: let go of the lock, no fill was started
                raise
            if stored_meanwhile:
                os.unlink(path)
                os.close(fd)
                continue
            return await self._lead(digest, fd, fetch, origin, down)
        raise FillFailed(f"{digest}: could not start or join a fetch")

    async def join(self, digest: Digest) -> BlobReader | GrowingBlob | None:
        """A reader of the blob's fill in progress on this host, or the stored blob, or None: nothing
        is fetched.  The fill is looked for first: it is what a replica asks for, and it costs no
        request to an object store.  One that ends meanwhile is read from the store."""
        try:
            fd = os.open(self.store.layout.fill(digest), os.O_RDONLY)
        except FileNotFoundError:
            return await self.look(self.open_stored, digest)
        joined = await self._follow(digest, fd, None)
        return await joined.marked() if isinstance(joined, GrowingBlob) else await self.look(self.open_stored, digest)

    def open_stored(self, digest: Digest) -> BlobReader | None:
        """The stored blob, marked as being served (``BlobStore.open``), or None."""
        return self.store.open(digest)

    async def stored(self, digest: Digest) -> BlobReader | None:
        """:meth:`open_stored` (see :meth:`look`): the stored blob, or None: not stored, or a fill of it
        under way on this host (:meth:`open` joins it; an object store, perhaps down, is not asked)."""
        return None if self._filling_here(digest) else await self.look(self.open_stored, digest)

    async def stored_size(self, digest: Digest) -> int | None:  # the stored blob's size, or None, as stored()
        return None if self._filling_here(digest) else await self.look(self.store.size, digest)

    def _filling_here(self, digest: Digest) -> bool:
        return not self.store.local and filling(self.store.layout.fill(digest))

    async def look(self, lookup: Callable[..., T], *args: Any) -> T:
        """``lookup(*args)``, a look at the store: on the event loop when the store's lookups are local
        system calls (:attr:`BlobStore.local`; a thread hop costs more, and waits its turn behind
        every other request's), else from a worker thread (on an object store it is a request)."""
        if self.store.local:
            return lookup(*args)
        return await anyio.to_thread.run_sync(lookup, *args)

    async def _look_up(self, lookup: Callable[[Digest], T], digest: Digest) -> T | None:
        """:meth:`look`, None when the store does not answer (:class:`StoreUnavailable`): the blob is then
        filled as if missing, its readers served from the one fetch and nothing stored (its writer
        fails to store it: ``_pump``), rather than each one streaming the upstream on its own."""
        try:
            return await self.look(lookup, digest)
        except StoreUnavailable:
            return None

    async def bypass(self, digest: Digest, fetch: Fetch) -> BypassBlob:
        """A fetch of this reader's own, streamed through without being stored.

        Errors of ``fetch`` before its body starts are raised here.
        """
        started: asyncio.Future[BypassBlob] = asyncio.get_running_loop().create_future()
        started.add_done_callback(lambda f: f.cancelled() or f.exception())

        async def stream() -> None:
            try:
                async with fetch() as download:
                    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(RELAY_DEPTH)
                    started.set_result(BypassBlob(digest, download.size, queue, task))
                    await relay(download, queue)
            except BaseException as exc:
                if not started.done():
                    if isinstance(exc, asyncio.CancelledError):
                        started.cancel()
                    else:
                        started.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

        task = asyncio.create_task(stream())
        self._track(task)
        return await handover(started)

    def progressed(self, digest: Digest) -> None:
        """Wake this process's readers of *digest*'s fill: bytes were written, or it ended."""
        event = self._progress.pop(digest, None)
        if event is not None:
            event.set()

    async def changed(self, digest: Digest, timeout: float) -> None:
        """Until this process's fill of *digest* progresses, or *timeout* seconds pass (a fill led
        by another process is only seen by looking again: its readers poll)."""
        if digest not in self._leading:
            await asyncio.sleep(timeout)
            return
        event = self._progress.get(digest)
        if event is None:
            event = self._progress[digest] = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: its extra task cost the reader loop turns
                await event.wait()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def unstored(self, digest: Digest) -> bool:
        """Whether this process leads a fill of *digest* that started after a look found the store not
        answering: its readers get the upstream's bytes, verified, which may never be stored."""
        return digest in self._unstored

    async def _lead(self, digest: Digest, fd: int, fetch: Fetch, origin: str | None,
                    down: bool = False) -> GrowingBlob | BypassBlob:
        os.ftruncate(fd, 0)
        os.fchmod(fd, 0o644)  # whatever the umask: the modes of a refused or verified fill mean something
        path = self.store.layout.fill(digest)
        reader = os.open(path, os.O_RDONLY)
        started: asyncio.Future[int | None | BypassBlob] = asyncio.get_running_loop().create_future()
        started.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if no one waits
        ingest = self.store.fill_writer(digest, path, fd)
        if origin is not None:  # (without it, readers for other upstreams wait as for any fill)
            with contextlib.suppress(OSError):
                write_pending(self.store.layout.fill_meta(digest), os.fstat(fd).st_ino, origin)
        if down:
            self._unstored.add(digest)
        self._track(asyncio.create_task(self._pump(ingest, fetch, started)))
        try:
            size = await handover(started)
        except BaseException:
            os.close(reader)
            raise
        if isinstance(size, BypassBlob):
            os.close(reader)
            return size
        return await GrowingBlob(self, digest, reader, size, coalesced=False, fetch=fetch).marked()

    async def _pump(self, ingest: FillWriter, fetch: Fetch,
                    started: asyncio.Future[int | None | BypassBlob]) -> None:
        meta = self.store.layout.fill_meta(ingest.digest)
        handed_over = False
        ended: Callable[[], None] | None = None
        fetched: object = None
        self._leading.add(ingest.digest)
        try:
            async with fetch() as download:
                fetched = download
                # A fetch that keeps something until its fill ended (a replica's fill lease) is told when.
                if (claimed := getattr(download, "claimed", None)) is not None:
                    ended = claimed()
                ingest.expected_size = download.size
                # Local system calls (statvfs, a small file) on the loop: the readers wait for them.
                problem = self.store.room_error(download.size)
                if problem is None:
                    try:
                        write_meta(meta, os.fstat(ingest.fd).st_ino, download.size)
                    except OSError as exc:
                        if refusal(exc) is None:
                            raise
                        problem = exc
                if problem is not None:
                    # No room: let go of the fill at once (followers fetch on their own) and hand the
                    # download to this fill's own client.
                    handed_over = True
                    await anyio.to_thread.run_sync(self._let_go, ingest, problem)
                    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(RELAY_DEPTH)
                    task = asyncio.current_task()
                    assert task is not None
                    started.set_result(BypassBlob(ingest.digest, download.size, queue, task))
                    await relay(download, queue)
                    return
                ingest.stored_elsewhere = getattr(download, "stored_elsewhere", None)
                started.set_result(download.size)
                self.progressed(ingest.digest)  # the size is published: this process's followers go on
                wrote = functools.partial(self.progressed, ingest.digest)
                # A large body over plain TCP goes from the socket to the writer in a thread of its own;
                # one that breaks off is resumed where it broke.
                await receive(download, ingest, wrote)
            await thread_to_the_end(ingest.commit)
        except BaseException as exc:
            cancelled, early = isinstance(exc, asyncio.CancelledError), not started.done()
            if early or handed_over:
                pass  # the reader gets the error (below, or from the relay), or went away
            elif (refused := fill_refusal(exc)) is not None:
                log.warning("store refused the fill of %s after %d bytes (%s): %s", ingest.digest, ingest.written,
                            refused, "served unstored" if ingest.serves_unstored else "its readers fetch on their own")
            else:
                log.warning("fetch of %s failed after %d bytes: %s", ingest.digest, ingest.written,
                            str(exc) or type(exc).__name__)
                if isinstance(exc, DigestMismatch) and callable(mismatched := getattr(fetched, "mismatched", None)):
                    mismatched()  # the upstream's answer was not the blob: counted as its invalid answer
            try:
                if not handed_over:
                    if (refused := fill_refusal(exc)) is not None:
                        # Without an announced size, what was written is the least the blob needs.
                        needed = ingest.expected_size if ingest.expected_size is not None else ingest.written
                        await asyncio.shield(anyio.to_thread.run_sync(self.store.refused, exc, needed))
                    await thread_to_the_end(functools.partial(settle_failed, self.store, ingest,
                                                              refused=refused is not None))
            finally:
                if early:  # told once the fill is cleared away: its client's answer leaves nothing behind
                    if cancelled:
                        started.cancel()
                    else:
                        started.set_exception(exc)
            if cancelled:
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(meta)
            if not handed_over:
                os.close(ingest.fd)  # releases the lock: followers now see the outcome
            self._leading.discard(ingest.digest)
            self._unstored.discard(ingest.digest)
            self.progressed(ingest.digest)
            if ended is not None:
                ended()

    def _let_go(self, ingest: FillWriter, problem: OSError) -> None:
        """Give up a fill the store has no room for, before its body: followers see it refused."""
        try:
            self.store.refused(problem, ingest.expected_size)
            settle_failed(self.store, ingest, refused=True)
        finally:
            os.close(ingest.fd)

    async def _follow(self, digest: Digest, fd: int, fetch: Fetch | None,
                      origin: str | None = None) -> GrowingBlob | Literal["refused", "elsewhere"] | None:
        """Wait for the leader of ``fd``'s inode to publish its size; None if it failed first,
        ``"refused"`` if the store refused it, and ``"elsewhere"`` if it asks another upstream than
        *origin* and has had no answer for :data:`OTHER_UPSTREAM_WAIT` seconds (a client of one upstream
        must not wait out another's timeouts, up to ``read_timeout`` x (1 + ``retries``))."""
        meta = self.store.layout.fill_meta(digest)
        ino = os.fstat(fd).st_ino
        try:
            while True:
                found = read_meta(meta)
                if found is not None and found.ino == ino and found.answered:
                    verified = os.fstat(fd).st_mode & 0o777 == VERIFIED_MODE
                    return GrowingBlob(self, digest, fd, found.size, coalesced=not verified, fetch=fetch,
                                       verified=verified)
                if (found is not None and found.ino == ino and fetch is not None and found.origin not in (None, origin)
                        and origin is not None and (waited := time.time() - found.written) >= OTHER_UPSTREAM_WAIT):
                    log.info("the fetch of %s from %s has had no answer for %.0f s: a client of %s fetches "
                             "it on its own", digest, found.origin, waited, origin)
                    os.close(fd)
                    return "elsewhere"
                state = fill_state(fd, functools.partial(self.store.fill_placed, digest, fd))
                if state != "filling":
                    os.close(fd)
                    return "refused" if state == "refused" else None
                await self.changed(digest, self.poll_interval)  # woken when this process leads it
        except BaseException:
            os.close(fd)
            raise

    async def settled(self) -> None:
        """Wait until every fill this process leads has ended: verified fills are then in the store
        (their ``fsync`` and rename follow the last byte readers get), failed ones gone."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
