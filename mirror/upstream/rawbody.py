"""A large blob body read straight from its connection once the answer's headers are in.

Reading a body through httpx costs a pass through httpx, httpcore and h11 per socket read (h11
copies every read into its receive buffer and out again).  For a cold fill of a large layer that
pass was the largest share of the event loop's time (``tests/bench/README.md``).  So a body of at
least :data:`RAW_AT_LEAST` bytes, announced by ``Content-Length`` (HTTP/1.1, no content coding, no
``Transfer-Encoding``) is read from the connection's network stream, httpcore's documented
``network_stream`` extension: first what h11 already holds past the headers (one item of
``aiter_raw()``), then :data:`~mirror.upstream.reads.READ_BYTES` at a time, each read under the
client's read timeout, never past the announced length.

The connection is not reused afterwards (h11 never saw the body end): closing the answer closes it.
For a body this large one more connection costs little.  Errors are httpx's, as through httpx: a
read timing out is :class:`httpx.ReadTimeout`, a reset :class:`httpx.ReadError`, a body ending
early :class:`httpx.RemoteProtocolError` (RFC 9112 section 6.3: an incomplete message).

Imports ``codings`` and ``reads`` only.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import httpcore
import httpx

from .codings import content_codings, identity_length
from .reads import READ_BYTES

__all__ = ["RAW_AT_LEAST", "incomplete", "raw_body", "raw_length"]

#: Bodies at least this long (bytes) are read from the connection; smaller ones through httpx,
#: which keeps their connection for the next request.
RAW_AT_LEAST = 16 << 20

#: httpcore's errors on a network stream, as httpx raises them.
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ReadTimeout, httpx.ReadTimeout), (httpcore.ReadError, httpx.ReadError),
    (httpcore.NetworkError, httpx.NetworkError), (httpcore.TimeoutException, httpx.TimeoutException))


def incomplete(request: httpx.Request, got: int, size: int) -> httpx.RemoteProtocolError:
    """The error of a body that ended after *got* of its *size* bytes, as httpx words it (RFC 9112
    section 6.3: an incomplete message)."""
    return httpx.RemoteProtocolError(
        f"peer closed connection without sending complete message body: received {got} bytes, expected {size}",
        request=request)


def raw_length(response: httpx.Response) -> int | None:
    """The length of *response*'s body if it is one to read from the connection, else None (too
    short or of unknown length, coded, chunked, or not HTTP/1.1)."""
    size = identity_length(response)
    if (size is None or size < RAW_AT_LEAST or response.http_version != "HTTP/1.1"
            or content_codings(response) or "transfer-encoding" in response.headers):
        return None
    return size


def raw_body(response: httpx.Response) -> AsyncIterator[bytes] | None:
    """The body of *response* read from its connection, or None when it is read through httpx
    (too short or of unknown length, coded, chunked, not HTTP/1.1, or no network stream)."""
    size = raw_length(response)
    if size is None:
        return None
    stream = response.extensions.get("network_stream")
    if stream is None or not callable(getattr(stream, "read", None)):
        return None
    timeouts = response.request.extensions.get("timeout") or {}
    return _read(response, stream, size, timeouts.get("read"))


async def _read(response: httpx.Response, stream: Any, size: int, timeout: float | None) -> AsyncIterator[bytes]:
    head = cast(AsyncGenerator[bytes, None], response.aiter_raw())  # httpx's own is one
    try:
        got = 0
        async for first in head:  # what h11 holds past the headers, or one read of the socket
            got += len(first)
            yield first
            break
        while got < size:
            try:
                chunk: bytes = await stream.read(min(READ_BYTES, size - got), timeout)
            except Exception as exc:
                for theirs, ours in _ERRORS:
                    if isinstance(exc, theirs):
                        raise ours(str(exc) or type(exc).__name__, request=response.request) from exc
                raise
            if not chunk:
                raise incomplete(response.request, got, size)
            got += len(chunk)
            yield chunk
    finally:
        await head.aclose()
