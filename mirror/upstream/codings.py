"""Content codings of upstream answers: digests are over the identity bytes.

Every request to an upstream (the registry, its token realm and any redirect's target) carries
``Accept-Encoding: identity`` (:data:`ACCEPT_ENCODING`).  An answer content-coded anyway (gzip or
its alias x-gzip, deflate, br or zstd; RFC 9110 section 8.4) is decoded by httpx
(``aiter_bytes()``) before anything hashes or keeps it, once :func:`unalias_codings` has named its
coding by the registered name; lengths announced for coded answers count coded bytes, so they are
not the identity length (:func:`identity_length`).  A blob's first bytes are decoded before it is
handed on (:func:`primed`), so a coding corrupt from the start fails before anything is served.

Imports nothing of the mirror (httpx only).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

#: RFC 9110 section 12.5.3: only the identity coding is acceptable in answers to the mirror.
ACCEPT_ENCODING = "identity"
#: Codings decoded anyway (httpx does it; ``br`` needs ``brotli``, ``zstd`` needs ``zstandard``).
SUPPORTED_CODINGS = frozenset({"gzip", "deflate", "br", "zstd"})
#: RFC 9110 section 8.4.1: "x-gzip" and "x-compress" are the same codings as "gzip" and "compress".
CODING_ALIASES = {"x-gzip": "gzip", "x-compress": "compress"}


def content_codings(response: httpx.Response) -> list[str]:
    """The answer's content codings, in the order applied (RFC 9110 section 8.4); ``identity`` left out."""
    return [value.strip().lower() for value in response.headers.get_list("content-encoding", split_commas=True)
            if value.strip() and value.strip().lower() != "identity"]


def identity_length(response: httpx.Response) -> int | None:
    """The length of the identity bytes, if announced: a coded answer's ``Content-Length`` counts coded bytes."""
    length = response.headers.get("content-length")
    if content_codings(response) or not length or not length.isdigit():
        return None
    return int(length)


def content_range(response: httpx.Response) -> tuple[int, int] | None:
    """``(first byte, complete length)`` of a ``206``'s ``Content-Range: bytes <first>-<last>/<length>``
    whose range runs to the last byte (RFC 9110 section 14.4); None for any other value."""
    unit, _, rest = (response.headers.get("content-range") or "").strip().partition(" ")
    span, _, complete = rest.partition("/")
    first, _, last = span.partition("-")
    if unit.lower() != "bytes" or not (first.isdigit() and last.isdigit() and complete.isdigit()):
        return None
    if int(last) != int(complete) - 1 or int(first) > int(last):
        return None
    return int(first), int(complete)


async def unalias_codings(response: httpx.Response) -> None:
    """Name a coding by its registered name before httpx decodes (``x-gzip`` is ``gzip``, RFC 9110
    section 8.4.1.3): an httpx response hook, run for every answer, the token realm's and redirects' too."""
    codings = response.headers.get_list("content-encoding", split_commas=True)
    if any(c.strip().lower() in CODING_ALIASES for c in codings):
        response.headers["content-encoding"] = ", ".join(
            CODING_ALIASES.get(c.strip().lower(), c.strip()) for c in codings)


async def primed(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """*chunks* with the first one already received: a coding that does not decode fails here."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = b""

    async def body() -> AsyncIterator[bytes]:
        if first:
            yield first
            async for chunk in chunks:
                yield chunk

    return body()
