"""A fill's bytes written to its writer in batches (``storage/fill.py``): one thread hop per batch,
not per chunk, and no byte waits longer than :data:`FLUSH_SECONDS` for its batch; and a body that
broke off resumed where it broke (:func:`receive`); work a fill's end must not give up halfway
(:func:`thread_to_the_end`).

May import: the standard library, anyio, ``storage/driver.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio.to_thread

from .driver import FillWriter

#: Bytes that make a batch full, and seconds a byte may wait for its batch to be written.
FLUSH_BYTES = 1 << 20
FLUSH_SECONDS = 0.02

log = logging.getLogger("mirror.storage.fill")


async def receive(download: Any, ingest: FillWriter, written: Callable[[], None]) -> None:
    """Write *download*'s whole body to *ingest*: drained by a thread of its own when it can be
    (``download.drain()``), else read in batches (:func:`write_in_batches`).

    A body that breaks off is resumed from the byte *ingest* reached (:class:`Resumption`), so the
    fill and every client following it go on, and the bytes already received are not fetched again.
    """
    resumption = Resumption(download)
    async with contextlib.AsyncExitStack() as rests:
        while True:
            try:
                drain = getattr(download, "drain", None)
                if (drained := drain() if drain is not None else None) is not None:
                    await drained.into(ingest.write, written)
                else:
                    await write_in_batches(download.chunks(), ingest, written)
                return
            except Exception as exc:
                rest = await resumption.rest(download, exc, ingest.digest, ingest.written, rests)
                if rest is None:
                    raise
                download = rest


async def resumed_chunks(download: Any, digest: object, rests: contextlib.AsyncExitStack,
                         start: int = 0) -> AsyncIterator[bytes]:
    """``download.chunks()`` (the blob's bytes from *start* on), resumed where the body broke off
    (:class:`Resumption`); the rests are entered into *rests*, which the caller closes."""
    resumption, offset = Resumption(download), start
    while True:
        try:
            async for chunk in download.chunks():
                offset += len(chunk)
                yield chunk
            return
        except Exception as exc:
            rest = await resumption.rest(download, exc, digest, offset, rests)
            if rest is None:
                raise
            download = rest


class Resumption:
    """The rests of one upstream body that broke off (``download.broken(exc)``: a reset, a stall past
    the read timeout, an early end), each asked for from the byte reached (``download.resume(offset)``:
    the upstream client's ``Range`` request, RFC 9110 section 14.2).

    At most ``download.resumes`` times in a row with no byte received in between
    (``upstream.retries``), after a pause of 0.1 s, 0.3 s, 0.9 s...
    """

    def __init__(self, download: Any) -> None:
        self.resumes = self.left = getattr(download, "resumes", 0)
        self.reached = 0

    async def rest(self, download: Any, exc: Exception, digest: object, offset: int,
                   rests: contextlib.AsyncExitStack) -> Any | None:
        """The download of the rest from *offset*, entered into *rests* (the broken rest before it
        closed); None when *exc* is not the body breaking off, *download* cannot resume, or the
        resumes are spent: the caller raises *exc*.  The rest's own errors are raised."""
        resume = getattr(download, "resume", None)
        if resume is None or not download.broken(exc):
            return None
        if offset > self.reached:
            self.left, self.reached = self.resumes, offset
        if self.left <= 0:
            return None
        log.warning("the upstream body of %s broke off after %d bytes (%s): asking for the rest",
                    digest, offset, f"{type(exc).__name__}: {exc}".rstrip(": "))
        await rests.aclose()  # the broken rest before, if any
        await asyncio.sleep(0.1 * 3 ** (self.resumes - self.left))
        self.left -= 1
        return await rests.enter_async_context(resume(offset))


async def write_in_batches(chunks: AsyncIterator[bytes], ingest: FillWriter, written: Callable[[], None]) -> None:
    """Write *chunks* to *ingest* in batches, each byte at most ``FLUSH_SECONDS`` after it arrived;
    call *written* after each batch (readers in this process wake up at once).

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
        behind = asyncio.ensure_future(_write_after(behind, ingest, take(), written))

    async def write(parts: list[bytes]) -> None:
        nonlocal behind
        if behind is not None:
            await behind
            behind = None
        if parts:
            await anyio.to_thread.run_sync(_write_batch, ingest, parts)
            written()

    try:
        async for chunk in _flushed_when_broken(chunks, lambda: write(take())):
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


async def _flushed_when_broken(chunks: AsyncIterator[bytes], flush: Callable[[], Awaitable[None]]
                               ) -> AsyncIterator[bytes]:
    """*chunks*; when they fail (the body broke off), *flush* is awaited first: the bytes received
    before are written, and a resumed body goes on after them, not from the last batch written."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except Exception:
            await flush()
            raise
        yield chunk


async def _write_after(previous: asyncio.Task[None] | None, ingest: FillWriter, parts: list[bytes],
                       written: Callable[[], None]) -> None:
    if previous is not None:
        await previous
    if parts:
        await anyio.to_thread.run_sync(_write_batch, ingest, parts)
        written()


def _write_batch(ingest: FillWriter, batch: list[bytes]) -> None:
    ingest.write(b"".join(batch) if len(batch) > 1 else batch[0])


async def thread_to_the_end(work: Callable[[], None]) -> None:
    """Run *work* in a thread to its end, even if the caller is cancelled meanwhile (the cancellation
    is raised once it ended).  Readers take a verified fill as done before it is durable (``fill_state``):
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
