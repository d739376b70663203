"""The body of a GET from the bucket, read ahead of the client in a thread of its own.

botocore's body is a blocking stream.  Handing the read of each chunk to a worker thread and back
costs two thread hops per chunk (each waiting for the GIL while the event loop is busy) and reads
from S3 only while nothing is sent to the client.  :class:`ReadAhead` reads the body in one thread
for the whole transfer, :data:`READ_BYTES` at a time (hashing there, if the caller's ``read`` does:
``hashlib`` lets go of the GIL), and hands the chunks to the event loop through a queue at most
:data:`AHEAD` chunks deep: the bucket is read while the client is written to, and one transfer never
holds more than ``(AHEAD + 2) * READ_BYTES`` bytes (the queue, the chunk being read, the chunk being
sent).  A body of one chunk or less is read with one hop to a worker thread, without a thread of its own.

Measured on loopback SeaweedFS (``tests/bench/README.md``, "Object storage: where the time goes"):
with the whole reads of vouched objects no longer hashed (``S3Reader``), a third of the CPU per GB.

May import: the standard library and anyio.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import AsyncIterator, Callable

import anyio.to_thread

from .reads import ShortFile

#: Bytes asked of the body at a time (one hand-over to the event loop each).
READ_BYTES = 1 << 20
#: Chunks read but not yet taken by the event loop, at most, per transfer (one is enough for the
#: bucket to be read while the client is sent to; two measured no faster).
AHEAD = 1


class ReadAhead:
    """*count* bytes of a body, read by ``read(n)`` (up to *n* bytes; ``b""`` at its end) in a thread
    of their own; ``close()`` is called once, in that thread, when it is done with the body.

    Iterate over it once (chunks of at most :data:`READ_BYTES`); :class:`ShortFile` if the body ends
    early, and whatever ``read`` raised is raised there.  :meth:`close` ends the transfer (the
    thread stops after the read it is in) and must be called whether or not it was iterated."""

    def __init__(self, read: Callable[[int], bytes], count: int, close: Callable[[], None]) -> None:
        self._read, self._count, self._close = read, count, close
        self._room = threading.Semaphore(AHEAD)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._count <= READ_BYTES:
            async for data in self._in_one_hop():
                yield data
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self._thread = threading.Thread(target=self._pump, args=(loop, queue), name="s3-read", daemon=True)
        self._thread.start()
        got = 0
        while got < self._count:
            item = await queue.get()
            self._room.release()
            if isinstance(item, BaseException):
                raise item
            if not item:
                raise ShortFile(errno.EIO, f"object ended at {got} bytes, expected {self._count}")
            got += len(item)
            yield item

    async def _in_one_hop(self) -> AsyncIterator[bytes]:
        got = 0
        while got < self._count:
            data = await anyio.to_thread.run_sync(self._read, self._count - got)
            if not data:
                raise ShortFile(errno.EIO, f"object ended at {got} bytes, expected {self._count}")
            got += len(data)
            yield data

    def _pump(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | BaseException]) -> None:
        got = 0
        try:
            while got < self._count:
                self._room.acquire()
                if self._stopping:
                    return
                try:
                    data = self._read(min(READ_BYTES, self._count - got))
                except BaseException as exc:  # noqa: BLE001 (handed to the event loop, raised there)
                    loop.call_soon_threadsafe(queue.put_nowait, exc)
                    return
                loop.call_soon_threadsafe(queue.put_nowait, data)
                if not data:
                    return
                got += len(data)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is waiting
            return
        finally:
            self._close()

    def close(self) -> None:
        """End the transfer: the body is closed now if no thread reads it, else by the thread once
        its current read is done."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            self._close()
            return
        self._stopping = True
        self._room.release()  # a thread waiting for room wakes up and sees it must stop
