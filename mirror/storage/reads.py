"""Reading stored files: in chunks off the event loop, and from the page cache without blocking.

What every reader of a local file uses (the filesystem driver's readers, the fills that clients
follow, and the zero-copy path's fallback when it cannot use ``sendfile(2)``).

May import: the standard library and anyio.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator

import anyio.to_thread

#: Chunk size when bytes are read and written (TLS, or every sending thread busy): few syscalls,
#: little memory per client.
READ_CHUNK = 256 * 1024


_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None


class ShortFile(OSError):
    """A stored file ended before the bytes a response promised."""


async def read_chunks(fd: int, offset: int, count: int) -> AsyncIterator[bytes]:
    """*count* bytes of a stored file from *offset*, in :data:`READ_CHUNK` pieces; :class:`ShortFile`
    if it ends first.  Cached pages are read right here, others in a worker thread."""
    buffer = memoryview(bytearray(min(READ_CHUNK, count)))
    end = offset + count
    while offset < end:
        want = min(len(buffer), end - offset)
        data = read_cached(fd, buffer[:want], offset)
        if data is None:
            data = await anyio.to_thread.run_sync(os.pread, fd, want, offset)
        if not data:
            raise ShortFile(errno.EIO, f"stored file ended at {offset}, expected {end} bytes")
        offset += len(data)
        yield data


def read_cached(fd: int, buffer: memoryview, offset: int) -> bytes | None:
    """Bytes at *offset* that the page cache holds (up to ``len(buffer)``); None if reading would block.

    A worker-thread hop per chunk costs more CPU than the copy itself, and under load each
    hop waits for the GIL; a read that cannot block is cheaper done right here.
    """
    if _RWF_NOWAIT is None:
        return None
    try:
        count = os.preadv(fd, [buffer], offset, _RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no RWF_NOWAIT for this file system or kernel
            return None
        raise
    return bytes(buffer[:count])
