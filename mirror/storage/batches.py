"""A fill's bytes written to its writer in batches (``storage/fill.py``): one thread hop per batch,
not per chunk, and no byte waits longer than :data:`FLUSH_SECONDS` for its batch.

May import: the standard library, anyio, ``storage/driver.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import anyio.to_thread

from .driver import FillWriter

#: Bytes that make a batch full, and seconds a byte may wait for its batch to be written.
FLUSH_BYTES = 1 << 20
FLUSH_SECONDS = 0.02


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


async def _write_after(previous: asyncio.Task[None] | None, ingest: FillWriter, parts: list[bytes],
                       written: Callable[[], None]) -> None:
    if previous is not None:
        await previous
    if parts:
        await anyio.to_thread.run_sync(_write_batch, ingest, parts)
        written()


def _write_batch(ingest: FillWriter, batch: list[bytes]) -> None:
    ingest.write(b"".join(batch) if len(batch) > 1 else batch[0])
