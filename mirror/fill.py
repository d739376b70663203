"""One upstream fetch per digest, shared by every reader in every worker process.

The first request for a missing digest becomes the *leader*: it creates
``tmp/<alg>-<hex>.partial``, takes an exclusive ``flock`` on it, and a background task
streams the upstream body into it (hashing as it writes).  Every reader -- the leader's
own client included -- *follows* that growing file with ``pread``: its first bytes go out
as soon as they are written, and a client that disconnects stops only its own reading.

Readers in any process learn the outcome from the file itself:

* mode :data:`~mirror.store.VERIFIED_MODE` -> complete and verified (the leader may still be
  making it durable: ``fsync`` and rename into ``blobs/`` follow the readers' last byte);
* lock still held            -> more bytes may come;
* lock free, and the inode is now ``blobs/...`` -> complete and verified;
* lock free otherwise         -> the fetch failed (the leader unlinked the file): abort.

The fetch's size is published in ``<alg>-<hex>.meta`` (with the inode, so a reader never
mistakes an older attempt's file for the current one).

A reader of a stored blob (and of a fill, once it is done) holds a shared ``flock`` on it until it
closes: the collector keeps an image while any of its objects is filling or so marked
(:func:`fills_in_progress`, :func:`being_served`).

When the store cannot take the blob (no room for its announced size, or the filesystem refuses
a create, write, fsync or rename: full, over quota, read-only), the fill *bypasses* the store:
the leader marks its temp file :data:`REFUSED_MODE` and lets go of it, and hands the download to
its own client as a :class:`BypassBlob` (streamed through, hashed as it passes, the last byte held
back until the whole blob matched its digest; nothing stored).  Every other reader of that fill
sees the mark and streams the upstream's bytes on its own in the same way (:meth:`Fills.bypass`),
going on from the byte it had reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio.to_thread

from .bypass import RELAY_DEPTH, BypassBlob, Download, FillFailed, relay
from .metrics import Metrics
from .reference import Digest, ParseError, parse_digest
from .refusals import refusal
from .store import VERIFIED_MODE, Ingest, Store
from .zerocopy import read_cached

log = logging.getLogger("mirror.fill")
T = TypeVar("T")

CHUNK = 1 << 20
#: Most bytes of a fill handed out at once as a span of its file (:meth:`GrowingBlob.spans`).
SPAN = 64 << 20
FLUSH_BYTES = 1 << 20
FLUSH_SECONDS = 0.02
#: A fill's temp file gets this mode when the store refused it: its readers fetch on their own.
REFUSED_MODE = 0o600


class FillRefused(FillFailed):
    """The store could not take the fetch being followed: its bytes must come from the upstream."""


Fetch = Callable[[], AbstractAsyncContextManager[Download]]


@dataclass
class StoredBlob:
    """Verified content already in the store; ``fd`` keeps it readable whatever GC does."""

    fd: int
    size: int

    def close(self) -> None:
        os.close(self.fd)


class GrowingBlob:
    """A reader following a fetch in progress (``coalesced`` when another request leads it)."""

    def __init__(self, fills: Fills, digest: Digest, fd: int, size: int | None, coalesced: bool,
                 fetch: Fetch | None = None, *, verified: bool = False) -> None:
        self.fills = fills
        self.digest = digest
        self.fd = fd
        self.size = size
        self.coalesced = coalesced
        #: Already verified when joined (its leader was making it durable): served as if stored.
        self.verified = verified
        #: Where the bytes come from if the store refuses the fill (None: the reader fails instead).
        self.fetch = fetch
        if coalesced:
            fills.metrics.waiting(1)

    def close(self) -> None:
        os.close(self.fd)
        if self.coalesced:
            self.fills.metrics.waiting(-1)

    def state(self) -> str:
        """``filling``, ``done``, ``refused`` or ``failed``; once done, the blob is marked as being served."""
        state = _state(self.fd, self.fills.store.blob_path(self.digest))
        if state == "done":
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return state

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``start..end`` (inclusive) as they become available; raises :class:`FillFailed`.

        If the store refuses the fill, the rest comes straight from the upstream (:class:`BypassBlob`).
        """
        offset = start
        try:
            async for data in self._follow(start, end):
                assert isinstance(data, bytes)
                offset += len(data)
                yield data
        except FillRefused:
            if self.fetch is None:
                raise
            async for data in self._bypassed(offset, end):
                yield data

    async def spans(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes | tuple[int, int]]:
        """As :meth:`chunks`, but what is already in the file comes as ``(offset, count)``, to send
        from ``fd`` (``sendfile``) without reading it; the last byte, held back until the verdict,
        and what comes from the upstream after a refused fill come as bytes."""
        offset = start
        try:
            async for data in self._follow(start, end, spans=True):
                if isinstance(data, _Span):
                    offset += data.count
                    yield data.offset, data.count
                else:
                    offset += len(data)
                    yield data
        except FillRefused:
            if self.fetch is None:
                raise
            async for piece in self._bypassed(offset, end):
                yield piece

    async def _bypassed(self, offset: int, end: int | None) -> AsyncIterator[bytes]:
        """Bytes ``offset..end`` straight from the upstream, the store having refused the fill."""
        assert self.fetch is not None
        log.info("store refused the fill of %s: streaming it from the upstream from byte %d", self.digest, offset)
        try:
            bypass = await self.fills.bypass(self.digest, self.fetch)
        except Exception as exc:  # the upstream's own errors: headers are gone, the transfer is cut short
            raise FillFailed(f"{self.digest}: the upstream failed after the store refused the fill: {exc}") from exc
        try:
            if bypass.size != self.size:
                raise FillFailed(f"{self.digest}: the upstream now announces {bypass.size} bytes, not {self.size}")
            async for data in bypass.chunks(offset, end):
                yield data
        finally:
            bypass.close()

    async def _follow(self, start: int, end: int | None, *, spans: bool = False) -> AsyncIterator[bytes | _Span]:
        offset = start
        stop = None if end is None else end + 1
        poll = self.fills.poll_interval
        settled = False
        # The last byte asked for (of the blob, or of a range) waits for the verdict: nothing
        # unverified is ever answered as a success.
        last = stop if stop is not None else self.size
        buffer = memoryview(bytearray(CHUNK))
        while stop is None or offset < stop:
            data: bytes | _Span | None
            if spans:
                want = SPAN if stop is None else min(SPAN, stop - offset)
                data = _Span(offset, max(0, min(want, os.fstat(self.fd).st_size - offset)))
            else:
                want = CHUNK if stop is None else min(CHUNK, stop - offset)
                # What was just written is in the page cache: read right here, without a thread hop
                # (which, while the fill's own thread hashes, waits for the GIL).
                data = read_cached(self.fd, buffer[:want], offset)
                if data is None:
                    data = await anyio.to_thread.run_sync(os.pread, self.fd, want, offset)
            if data:
                if last is not None and offset + len(data) >= last:
                    if len(data) > 1:
                        yield data[:-1] if isinstance(data, bytes) else _Span(offset, len(data) - 1)
                    while (state := self.state()) == "filling":
                        await asyncio.sleep(poll)
                    if state == "refused":
                        raise FillRefused(f"{self.digest}: the store refused the fill")
                    if state != "done":
                        raise FillFailed(f"{self.digest}: fetch failed verification")
                    offset, data = offset + len(data) - 1, (
                        data[-1:] if isinstance(data, bytes) else os.pread(self.fd, 1, offset + len(data) - 1))
                offset += len(data)
                yield data
                continue
            if settled:  # nothing more after the writer finished
                state = self.state()
                if state == "done" and stop is None:
                    return
                if state == "refused":
                    raise FillRefused(f"{self.digest}: the store refused the fill at {offset} bytes")
                raise FillFailed(f"{self.digest}: fetch ended at {offset} bytes")
            state = self.state()
            if state == "filling":
                await asyncio.sleep(poll)
            else:
                settled = True  # re-read once: bytes may have landed just before the lock was released
        while (state := self.state()) == "filling":
            await asyncio.sleep(poll)
        if state == "refused":
            raise FillRefused(f"{self.digest}: the store refused the fill")
        if state != "done":
            raise FillFailed(f"{self.digest}: fetch failed")


@dataclass(frozen=True, slots=True)
class _Span:
    """Bytes ``offset..offset+count`` of a fill's file, not read."""

    offset: int
    count: int

    def __len__(self) -> int:
        return self.count


def _state(fd: int, final: os.PathLike[str] | str) -> str:
    # Verified: done, even while the leader still makes it durable (fsync, rename) or after it
    # was committed and evicted since.  A crash before the rename loses the fetch, never a byte:
    # the temp file is swept at start-up.
    if os.fstat(fd).st_mode & 0o777 == VERIFIED_MODE:
        return "done"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return "filling"
    fcntl.flock(fd, fcntl.LOCK_UN)
    status = os.fstat(fd)
    if status.st_mode & 0o777 == VERIFIED_MODE:  # verified between the two looks
        return "done"
    if status.st_mode & 0o777 == REFUSED_MODE:
        return "refused"
    try:
        done = os.stat(final).st_ino == status.st_ino
    except FileNotFoundError:
        done = False
    return "done" if done else "failed"


def fills_in_progress(store: Store) -> set[str]:
    """Digests (``sha256:<hex>``) whose fetch is in progress, in any process: the locked fill files."""
    found: set[str] = set()
    try:
        entries = list(os.scandir(store.tmp))
    except FileNotFoundError:
        return found
    for entry in entries:
        algorithm, dash, rest = entry.name.partition("-")
        if not dash or not rest.endswith(".partial") or algorithm == "ingest":
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            found.add(f"{algorithm}:{rest[:-len('.partial')]}")
        finally:
            os.close(fd)
    return found


def being_served(store: Store, digest: str) -> bool:
    """True while a reader in any process holds the stored object marked (see :meth:`Fills.open_stored`)."""
    try:
        fd = os.open(store.blob_path(parse_digest(digest)), os.O_RDONLY)
    except (FileNotFoundError, ParseError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class Fills:
    """Coalesced, verified fetches into a :class:`Store`.  Built once per process."""

    def __init__(self, store: Store, poll_interval: float = 0.005, *, metrics: Metrics | None = None) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.metrics = metrics if metrics is not None else Metrics(enabled=False)
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self, digest: Digest, fetch: Fetch) -> StoredBlob | GrowingBlob | BypassBlob:
        """The stored blob, or a reader of the fetch in progress (started here if there is none), or
        the upstream's bytes streamed through when the store cannot take them.

        Errors of ``fetch`` before its body starts are raised here.
        """
        for _ in range(100):
            stored = self.open_stored(digest)
            if stored is not None:
                return stored
            path = self.store.fill_path(digest)
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
                follower = await self._follow(digest, fd, fetch)
                if follower == "refused":
                    return await self.bypass(digest, fetch)
                if follower is not None:
                    return follower
                continue  # the leader failed before its body started: try again, perhaps as leader
            if not _names_inode(path, fd):
                os.close(fd)  # lost a race with a finishing or failing leader
                continue
            if self.store.exists(digest):
                os.unlink(path)
                os.close(fd)
                continue
            return await self._lead(digest, fd, fetch)
        raise FillFailed(f"{digest}: could not start or join a fetch")

    def open_stored(self, digest: Digest) -> StoredBlob | None:
        """The stored blob, marked as being served (a shared ``flock`` until it is closed).

        The collector does not evict an image while one of its objects is marked (``gc.in_use``).
        """
        try:
            fd = os.open(self.store.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        with contextlib.suppress(BlockingIOError):  # the collector looking at it this instant: serve anyway
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return StoredBlob(fd, os.fstat(fd).st_size)

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
        return await _handed_over(started)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lead(self, digest: Digest, fd: int, fetch: Fetch) -> GrowingBlob | BypassBlob:
        os.ftruncate(fd, 0)
        os.fchmod(fd, 0o644)  # whatever the umask: the modes of a refused or verified fill mean something
        path = self.store.fill_path(digest)
        reader = os.open(path, os.O_RDONLY)
        started: asyncio.Future[int | None | BypassBlob] = asyncio.get_running_loop().create_future()
        started.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if no one waits
        ingest = Ingest(self.store, digest, path, fd, None)
        self._track(asyncio.create_task(self._pump(ingest, fetch, started)))
        try:
            size = await _handed_over(started)
        except BaseException:
            os.close(reader)
            raise
        if isinstance(size, BypassBlob):
            os.close(reader)
            return size
        return GrowingBlob(self, digest, reader, size, coalesced=False, fetch=fetch)

    async def _pump(self, ingest: Ingest, fetch: Fetch,
                    started: asyncio.Future[int | None | BypassBlob]) -> None:
        meta = self.store.fill_meta_path(ingest.digest)
        handed_over = False
        try:
            async with fetch() as download:
                ingest.expected_size = download.size
                problem = await anyio.to_thread.run_sync(self.store.room_error, download.size)
                if problem is None:
                    try:
                        await anyio.to_thread.run_sync(_write_meta, meta, os.fstat(ingest.fd).st_ino, download.size)
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
                started.set_result(download.size)
                await _copy(download.chunks(), ingest)
            await _to_the_end(ingest.commit)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            if not started.done():
                if cancelled:
                    started.cancel()
                else:
                    started.set_exception(exc)
            elif handed_over:
                pass  # the reader has the error from the relay, or went away
            elif (refused := refusal(exc)) is not None:
                log.warning("store refused the fill of %s after %d bytes (%s): its readers fetch on their own",
                            ingest.digest, ingest.written, refused)
            else:
                log.warning("fetch of %s failed after %d bytes: %s", ingest.digest, ingest.written, exc)
            if not handed_over:
                if (refused := refusal(exc)) is not None:
                    # Without an announced size, what was written is the least the blob needs.
                    needed = ingest.expected_size if ingest.expected_size is not None else ingest.written
                    await asyncio.shield(anyio.to_thread.run_sync(self.store.refused, exc, needed))
                _settle_failed(ingest, refused=refused is not None)
            if cancelled:
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(meta)
            if not handed_over:
                os.close(ingest.fd)  # releases the lock: followers now see the outcome

    def _let_go(self, ingest: Ingest, problem: OSError) -> None:
        """Give up a fill the store has no room for, before its body: followers see it refused."""
        try:
            self.store.refused(problem, ingest.expected_size)
            _settle_failed(ingest, refused=True)
        finally:
            os.close(ingest.fd)

    async def _follow(self, digest: Digest, fd: int, fetch: Fetch) -> GrowingBlob | Literal["refused"] | None:
        """Wait for the leader of ``fd``'s inode to publish its size; None if it failed first, and
        ``"refused"`` if the store refused it."""
        meta = self.store.fill_meta_path(digest)
        ino = os.fstat(fd).st_ino
        try:
            while True:
                found = _read_meta(meta)
                if found is not None and found[0] == ino:
                    verified = os.fstat(fd).st_mode & 0o777 == VERIFIED_MODE
                    return GrowingBlob(self, digest, fd, found[1], coalesced=not verified, fetch=fetch,
                                       verified=verified)
                state = _state(fd, self.store.blob_path(digest))
                if state != "filling":
                    os.close(fd)
                    return "refused" if state == "refused" else None
                await asyncio.sleep(self.poll_interval)
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


async def _copy(chunks: AsyncIterator[bytes], ingest: Ingest) -> None:
    """Write *chunks* to *ingest* in batches, each byte at most ``FLUSH_SECONDS`` after it arrived.

    Chunks that arrive close together are written together (one thread hop per batch).  A batch
    that is not full when the upstream pauses is written by a timer, not when the next chunk
    comes: however slowly the upstream sends, readers see every byte received within that bound.
    """
    loop = asyncio.get_running_loop()
    batch: list[bytes] = []
    pending = 0
    last_write = -FLUSH_SECONDS
    timer: asyncio.TimerHandle | None = None
    behind: asyncio.Task[None] | None = None  # a write the timer started: later writes wait for it

    def take() -> list[bytes]:
        nonlocal batch, pending, last_write, timer
        parts, batch, pending, last_write = batch, [], 0, loop.time()
        if timer is not None:
            timer.cancel()
            timer = None
        return parts

    def write_due() -> None:
        nonlocal behind
        behind = asyncio.ensure_future(_write_after(behind, ingest, take()))

    async def write(parts: list[bytes]) -> None:
        nonlocal behind
        if behind is not None:
            await behind
            behind = None
        if parts:
            await anyio.to_thread.run_sync(_write_all, ingest, parts)

    try:
        async for chunk in chunks:
            batch.append(chunk)
            pending += len(chunk)
            if pending >= FLUSH_BYTES or loop.time() >= last_write + FLUSH_SECONDS:
                await write(take())
            elif timer is None:
                timer = loop.call_at(last_write + FLUSH_SECONDS, write_due)
        await write(take())
    finally:
        if timer is not None:
            timer.cancel()
        if behind is not None:  # never leave a write running behind the ingest's back
            with contextlib.suppress(BaseException):
                await behind


async def _write_after(previous: asyncio.Task[None] | None, ingest: Ingest, parts: list[bytes]) -> None:
    if previous is not None:
        await previous
    if parts:
        await anyio.to_thread.run_sync(_write_all, ingest, parts)


async def _to_the_end(work: Callable[[], None]) -> None:
    """Run *work* in a thread to its end, even if the caller is cancelled meanwhile (the cancellation
    is raised once it ended).  Readers take a verified fill as done before it is durable (``_state``):
    a leader cancelled then (shutdown) must not take the fill back while it is being synced and moved.
    The thread's future is not a task, so cancelling every task (``asyncio.run``) does not end it."""
    done = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.wait([done])
        if not done.cancelled():
            done.exception()  # retrieved: the cancellation is what the caller sees
        raise


async def _handed_over(started: asyncio.Future[T]) -> T:
    """What a task hands over through *started*; if the waiter is cancelled meanwhile, a
    :class:`BypassBlob` handed over anyway is closed (nobody else would stop its transfer)."""
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        started.add_done_callback(_close_unclaimed)
        raise


def _close_unclaimed(started: asyncio.Future[Any]) -> None:
    if not started.cancelled() and started.exception() is None and isinstance(started.result(), BypassBlob):
        started.result().close()


def _settle_failed(ingest: Ingest, *, refused: bool) -> None:
    """Mark a failed fill for its readers (refused by the store, or just failed) and remove it.

    A fill can fail after :meth:`Ingest.commit` marked it verified (fsync or rename refused): the
    mark is taken back, since bytes that never reached their final path must not count as done.
    """
    with contextlib.suppress(OSError):
        if not _names_inode(ingest.store.blob_path(ingest.digest), ingest.fd):
            os.fchmod(ingest.fd, REFUSED_MODE if refused else 0o644)
    ingest.discard()


def _names_inode(path: os.PathLike[str] | str, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _write_all(ingest: Ingest, batch: list[bytes]) -> None:
    ingest.write(b"".join(batch) if len(batch) > 1 else batch[0])


def _write_meta(path: os.PathLike[str] | str, ino: int, size: int | None) -> None:
    tmp = f"{os.fspath(path)}.{secrets.token_hex(6)}"
    with open(tmp, "w") as f:
        json.dump({"ino": ino, "size": size}, f)
    os.replace(tmp, path)


def _read_meta(path: os.PathLike[str] | str) -> tuple[int, int | None] | None:
    try:
        with open(path) as f:
            meta = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return int(meta["ino"]), meta["size"]
