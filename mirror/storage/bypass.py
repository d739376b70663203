"""The upstream's bytes for one client, through no store: what a fill falls back on when the store
cannot take a blob (``storage/fill.py``).

:class:`BypassBlob` reads chunks a task hands over from the download (:func:`relay`), hashes
them as they pass and holds back the last byte asked for until the whole blob matched its digest
and announced size, as a fill does: a client never receives a complete answer with wrong bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

from ..spec.reference import Digest

T = TypeVar("T")

#: Chunks of a bypassed download in flight between the upstream and its client.
RELAY_DEPTH = 16


class FillFailed(Exception):
    """The fetch being followed did not complete with verified content."""


class Download(Protocol):
    """What a fetch yields: the body's size when announced, and its bytes."""

    size: int | None

    def chunks(self) -> AsyncIterator[bytes]: ...


class BypassBlob:
    """A blob streamed from the upstream to one client without being stored.

    The bytes are hashed as they pass; the last one asked for (of the blob, or of a range) goes out
    only once the whole blob matched its digest and announced size, as for a fill, so a client never
    sees a complete answer with wrong bytes.  A task of ``fill.Fills`` reads the download and hands
    its chunks over through a small queue; :meth:`close` stops it.
    """

    coalesced = False

    def __init__(self, digest: Digest, size: int | None, queue: asyncio.Queue[bytes | BaseException | None],
                 task: asyncio.Task[None]) -> None:
        self.digest = digest
        self.size = size
        self._queue = queue
        self._task = task

    def close(self) -> None:
        self._task.cancel()

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``start..end`` (inclusive) of the upstream's body; raises :class:`FillFailed`."""
        hasher = self.digest.hasher()
        stop = None if end is None else end + 1
        last = stop if stop is not None else self.size  # the byte held back, when known
        offset = 0
        held = b""
        while (item := await self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise FillFailed(f"{self.digest}: upstream transfer failed after {offset} bytes: {item}") from item
            hasher.update(item)
            begin, offset = offset, offset + len(item)
            if self.size is not None and offset > self.size:
                raise FillFailed(f"{self.digest}: upstream sent more than the {self.size} bytes announced")
            if stop is not None and begin >= stop or offset <= start:
                continue  # outside the range: hashed only
            piece = item[max(start - begin, 0):len(item) if stop is None else stop - begin]
            if last is None:  # unknown length: hold back the last byte seen so far
                if held:
                    yield held
                held, piece = piece[-1:], piece[:-1]
            elif begin + len(item) >= last:
                held, piece = piece[-1:], piece[:-1]
            if piece:
                yield piece
        if self.size is not None and offset != self.size:
            raise FillFailed(f"{self.digest}: upstream sent {offset} bytes, announced {self.size}")
        if hasher.hexdigest() != self.digest.hex:
            raise FillFailed(f"{self.digest}: upstream bytes do not match the digest")
        if held:
            yield held


async def relay(download: Download, queue: asyncio.Queue[bytes | BaseException | None]) -> None:
    """Hand a download's chunks to a :class:`BypassBlob` (None at the end, the error if it fails)."""
    try:
        async for chunk in download.chunks():
            if chunk:
                await queue.put(chunk)
    except Exception as exc:  # noqa: BLE001 (the reader reports it)
        await queue.put(exc)
    else:
        await queue.put(None)


async def handover(started: asyncio.Future[T]) -> T:
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
