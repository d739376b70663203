"""A blob of the upstream opened at a byte, as a fill taken over there opens it (``registry/takeover.py``):
one ``Range`` request answered with the rest, or the whole blob from an upstream that ignores ranges,
its first bytes dropped."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mirror.config.sections import UpstreamConfig
from mirror.registry.takeover import UpstreamBlob, open_from
from mirror.spec.reference import parse_digest
from mirror.storage.bypass import FillFailed
from mirror.upstream.answers import BlobDownload
from mirror.upstream.client import Upstream
from mirror.upstream.errors import UpstreamUnavailable
from tests.support.catalog import StandardImages
from tests.support.registry import UpstreamRegistry

OFFSET = 300_001


def taken_over(url: str, digest: str, offset: int, size: int | None) -> tuple[list[int], int | None, bytes]:
    """Open ``library/big``'s blob at *offset* as a fill of *size* bytes taken over there: the starts
    of the answers the upstream gave, the size and the bytes from *offset* on."""
    async def run() -> tuple[list[int], int | None, bytes]:
        upstream, starts = Upstream(UpstreamConfig(url=url, registry="ranges.test")), []

        @asynccontextmanager
        async def opened(offset: int) -> AsyncIterator[BlobDownload]:
            async with upstream.blob("library/big", parse_digest(digest), offset) as download:
                starts.append(download.start)
                yield download

        try:
            async with AsyncExitStack() as stack, AsyncExitStack() as rests:
                fetch = UpstreamBlob(opened)
                announced, chunks = await open_from(fetch, parse_digest(digest), offset, size, stack, rests)
                return starts, announced, b"".join([chunk async for chunk in chunks])
        finally:
            await upstream.aclose()
    return asyncio.run(run())


def test_a_fill_taken_over_at_a_byte_asks_a_registry_for_the_rest_only(
    upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    layer = images.big.layers[0]
    data = layer.path.read_bytes()
    starts, size, rest = taken_over(upstream.url, layer.digest, OFFSET, layer.size)
    assert (starts, size) == ([OFFSET], layer.size)  # one answer: the rest (206)
    assert rest == data[OFFSET:]


class IgnoresRanges(BaseHTTPRequestHandler):
    """A registry's blob URL that answers every GET with the whole blob (``200``), whatever its ``Range``."""

    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ignoring_ranges(images: StandardImages) -> Iterator[str]:
    IgnoresRanges.body = images.big.layers[0].path.read_bytes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), IgnoresRanges)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_fill_taken_over_at_a_byte_drops_the_start_of_a_whole_answer_from_an_upstream_without_ranges(
    ignoring_ranges: str, images: StandardImages,
) -> None:
    layer = images.big.layers[0]
    starts, size, rest = taken_over(ignoring_ranges, layer.digest, OFFSET, layer.size)
    assert (starts, size) == ([0], layer.size)  # one answer, the whole blob
    assert rest == layer.path.read_bytes()[OFFSET:]


def test_a_fill_taken_over_fails_when_the_upstream_announces_another_size(
    upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    layer = images.big.layers[0]
    with pytest.raises(FillFailed, match=re.escape(f"announces {layer.size} bytes, not {layer.size + 1}")):
        taken_over(upstream.url, layer.digest, OFFSET, layer.size + 1)


def test_a_rest_of_another_size_than_the_blob_being_resumed_is_refused(
    upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    layer = images.big.layers[0]

    async def run() -> None:
        client = Upstream(UpstreamConfig(url=upstream.url, registry="ranges.test"))
        try:
            async with client.blob("library/big", parse_digest(layer.digest), OFFSET, layer.size + 1):
                pass
        finally:
            await client.aclose()
    with pytest.raises(UpstreamUnavailable, match="not the rest of the blob"):
        asyncio.run(run())
