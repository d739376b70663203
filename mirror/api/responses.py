"""ASGI responses for blobs: fast reads from the store, and readers following a fetch.

Starlette's ``FileResponse`` reads 64 KiB per thread hop; serving layers at disk speed needs
better.  Over plain HTTP a stored blob goes from the page cache to the socket with
``sendfile(2)`` (``server/zerocopy.py``).  Otherwise (TLS) it goes out in 256 KiB chunks read
straight from the page cache on the event loop (``RWF_NOWAIT``: such a read never waits for
the disk); only a chunk that is not cached is read in a worker thread.  A blob still arriving from the upstream
is sent as it grows (over plain HTTP, what is already written with ``sendfile(2)`` too), and one the
store cannot take as the upstream sends it.  None ever holds a blob
in memory, and all stop reading as soon as the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.types import Message, Receive, Scope, Send

from ..spec.reference import ByteRange
from ..storage.bypass import BypassBlob, FillFailed
from ..storage.driver import BlobReader
from ..storage.growing import GrowingBlob
from ..storage.reads import ShortFile
from . import extensions

log = logging.getLogger("mirror.api.responses")


class BlobResponse:
    """Send a stored or growing blob, whole or one byte range, or only its headers (HEAD)."""

    def __init__(self, source: BlobReader | GrowingBlob | BypassBlob, headers: dict[str, str], *,
                 byte_range: ByteRange | None = None, head: bool = False) -> None:
        self.source = source
        self.byte_range = byte_range
        self.head = head
        size = source.size
        self.status = 206 if byte_range else 200
        self.headers = dict(headers)
        self.headers.setdefault("Content-Type", "application/octet-stream")
        self.headers["Accept-Ranges"] = "bytes"
        if byte_range is not None:
            self.headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end}/{size}"
            self.headers["Content-Length"] = str(byte_range.length)
        elif size is not None:
            self.headers["Content-Length"] = str(size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({
                "type": "http.response.start",
                "status": self.status,
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()],
            })
            if self.head:
                await send({"type": "http.response.body", "body": b""})
                return
            fd = None if isinstance(self.source, (GrowingBlob, BypassBlob)) else self.source.fd
            if fd is not None and extensions.available(scope):  # a stored local file: sendfile(2)
                start = self.byte_range.start if self.byte_range else 0
                count = self.byte_range.length if self.byte_range else self.source.size
                await send({"type": extensions.EXTENSION, "file": fd, "offset": start, "count": count})
                return
            disconnected = asyncio.Event()
            watcher = asyncio.create_task(_watch_disconnect(receive, disconnected))
            try:
                start = self.byte_range.start if self.byte_range else 0
                end = self.byte_range.end if self.byte_range else None
                async for piece in self._pieces(scope, start, end):
                    if isinstance(piece, tuple):  # already in a fill's file: sendfile(2) it
                        assert isinstance(self.source, GrowingBlob)
                        offset, count = piece
                        message: Message = {"type": extensions.EXTENSION, "file": self.source.fd, "offset": offset,
                                            "count": count, "more_body": True}
                        await send(message)
                        if int(message.get("sent", count)) < count:
                            return  # the client went away or stalled: the connection is closed
                    else:
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
                    if disconnected.is_set():
                        return
                await send({"type": "http.response.body", "body": b""})
            except (FillFailed, ShortFile) as exc:
                # Headers are gone; the only honest signal left is an aborted transfer.
                log.warning("aborting transfer of %s: %s", getattr(self.source, "digest", "blob"), exc)
                if extensions.available(scope, extensions.ABORT):
                    await send({"type": extensions.ABORT})
                return
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        finally:
            self.source.close()

    def _pieces(self, scope: Scope, start: int, end: int | None) -> AsyncIterator[bytes | tuple[int, int]]:
        """Body bytes, or for a fill followed over plain HTTP ``(offset, count)`` spans of its file
        (sendfile needs a ``Content-Length``: not for a blob whose size the upstream did not announce)."""
        if isinstance(self.source, GrowingBlob) and "Content-Length" in self.headers and extensions.available(scope):
            return self.source.spans(start, end)
        return self._chunks(start, end)

    def _chunks(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        return self.source.chunks(start, end)


async def _watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            return
