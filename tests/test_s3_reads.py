"""A GET's body read ahead of the client in a thread of its own (``mirror/storage/s3reads.py``).

Pure logic over a body that is a file-like object: a real one from SeaweedFS for the bytes, an
in-memory one where the test must see how far the reading thread got.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time

import pytest

from mirror.storage.reads import ShortFile
from mirror.storage.s3reads import AHEAD, READ_BYTES, ReadAhead
from tests.support.seaweedfs import SeaweedS3
from tests.support.waiting import wait_for


class Body(io.BytesIO):
    """An in-memory body that counts its closes and can be made to fail or end early."""

    def __init__(self, data: bytes, *, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.closes = 0
        self.fail_at = fail_at
        self.readers: set[str] = set()

    def read(self, size: int | None = -1) -> bytes:
        self.readers.add(threading.current_thread().name)
        if self.fail_at is not None and self.tell() >= self.fail_at:
            raise ConnectionResetError("the store went away")
        return super().read(size)

    def close(self) -> None:
        self.closes += 1


def collect(ahead: ReadAhead) -> list[bytes]:
    async def run() -> list[bytes]:
        try:
            return [chunk async for chunk in ahead]
        finally:
            ahead.close()
    return asyncio.run(run())


@pytest.mark.parametrize("size", [1, READ_BYTES, 3 * READ_BYTES + 12345])
def test_every_byte_comes_in_order_and_the_body_is_closed_once(size: int) -> None:
    data = os.urandom(size)
    body = Body(data)
    chunks = collect(ReadAhead(body.read, size, body.close))
    assert b"".join(chunks) == data and all(len(chunk) <= READ_BYTES for chunk in chunks)
    wait_for(lambda: body.closes == 1, what="the body closed")
    time.sleep(0.05)
    assert body.closes == 1
    assert ("s3-read" in body.readers) == (size > READ_BYTES), "a thread of its own only for more than a chunk"


def test_a_body_that_ends_early_is_a_short_file() -> None:
    body = Body(os.urandom(2 * READ_BYTES))
    with pytest.raises(ShortFile):
        collect(ReadAhead(body.read, 3 * READ_BYTES, body.close))
    wait_for(lambda: body.closes == 1, what="the body closed")


def test_what_the_read_raises_is_raised_to_the_reader() -> None:
    body = Body(os.urandom(4 * READ_BYTES), fail_at=2 * READ_BYTES)
    got: list[bytes] = []

    async def run() -> None:
        ahead = ReadAhead(body.read, 4 * READ_BYTES, body.close)
        try:
            async for chunk in ahead:
                got.append(chunk)
        finally:
            ahead.close()

    with pytest.raises(ConnectionResetError):
        asyncio.run(run())
    assert len(b"".join(got)) == 2 * READ_BYTES
    wait_for(lambda: body.closes == 1, what="the body closed")


def test_the_thread_reads_at_most_a_few_chunks_ahead_and_stops_when_closed() -> None:
    """Never a blob in memory: a client that does not read holds up the reads of the bucket; one
    that goes away ends them, and the body is closed."""
    body = Body(os.urandom(20 * READ_BYTES))

    async def run() -> None:
        ahead = ReadAhead(body.read, 20 * READ_BYTES, body.close)
        chunks = aiter(ahead)
        try:
            await anext(chunks)  # one taken: the queue holds AHEAD more, one more may be in a read
            await asyncio.sleep(0.3)
            assert body.tell() == (AHEAD + 1) * READ_BYTES
        finally:
            ahead.close()
            await chunks.aclose()  # type: ignore[attr-defined]

    asyncio.run(run())
    wait_for(lambda: body.closes == 1, what="the body closed")
    time.sleep(0.1)
    assert body.tell() <= (AHEAD + 2) * READ_BYTES


def test_a_body_from_the_bucket(seaweedfs: SeaweedS3, s3_bucket: str) -> None:
    data = os.urandom(5 * READ_BYTES + 7)
    client = seaweedfs.client()
    client.put_object(Bucket=s3_bucket, Key="k", Body=data)
    body = client.get_object(Bucket=s3_bucket, Key="k", Range=f"bytes=10-{len(data) - 1}")["Body"]
    assert b"".join(collect(ReadAhead(body.read, len(data) - 10, body.close))) == data[10:]
