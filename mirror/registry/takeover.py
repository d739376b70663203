"""A fill taken over at a byte: the upstream asked for the rest only.

A replica that takes over the fill another replica left (``registry/cluster.py``) has the bytes up
to where that fill reached; it opens the upstream's blob from there (:class:`UpstreamBlob`: ``Range:
bytes=<offset>-``, ``Upstream.blob``), one request.  An upstream that ignores ranges answers the whole
blob, whose first bytes are dropped (:func:`skip`); so does a fetch that cannot start at a byte (a
non-distributable layer's URLs).  The fill verifies the whole blob's digest as before.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack

from ..spec.reference import Digest
from ..storage.batches import resumed_chunks
from ..storage.bypass import Download, FillFailed
from ..storage.growing import Fetch

log = logging.getLogger("mirror.cluster")


class UpstreamBlob:
    """The fetch of one blob of the upstream (a :data:`~mirror.storage.growing.Fetch`: called, from its
    start), which can also start at a byte (:meth:`from_byte`); *opener* is called with that byte."""

    def __init__(self, opener: Callable[[int], AbstractAsyncContextManager[Download]]) -> None:
        self._opener = opener

    def __call__(self) -> AbstractAsyncContextManager[Download]:
        return self._opener(0)

    def from_byte(self, offset: int) -> AbstractAsyncContextManager[Download]:
        """The blob from byte *offset* on if the upstream gives a range (the download's ``start``), else whole."""
        return self._opener(offset)


async def open_from(fetch: Fetch, digest: Digest, offset: int, size: int | None, stack: AsyncExitStack,
                    rests: AsyncExitStack) -> tuple[int | None, AsyncIterator[bytes]]:
    """The upstream's blob for a fill at byte *offset* (0: from its start) of *size* bytes, entered into
    *stack*: its size and its bytes from *offset* on, resumed where the body breaks off (the rests
    entered into *rests*).  :class:`FillFailed` when the upstream announces another size than *size*."""
    opened = fetch.from_byte(offset) if offset and isinstance(fetch, UpstreamBlob) else fetch()
    download = await stack.enter_async_context(opened)
    if offset and download.size != size:
        raise FillFailed(f"{digest}: the upstream now announces {download.size} bytes, not {size}")
    start = getattr(download, "start", 0)  # an upstream's answer to a range (``upstream/answers.py``)
    if offset:
        log.info("%s: took over the fill at byte %d; %s", digest, offset,
                 f"fetching the rest from byte {start} from the upstream" if start else
                 f"fetching it whole from the upstream, its first {offset} bytes dropped")
    return download.size, skip(resumed_chunks(download, digest, rests, start), offset - start)


async def skip(chunks: AsyncIterator[bytes], count: int) -> AsyncIterator[bytes]:
    """*chunks* without their first *count* bytes."""
    async for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:] if count else chunk
        count = 0
