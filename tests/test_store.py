"""The store and the coalesced fill, on real files (the upstream side is a plain async generator)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mirror.spec.reference import Digest
from mirror.storage import growing
from mirror.storage.bypass import BypassBlob, FillFailed
from mirror.storage.driver import DigestMismatch, SizeMismatch
from mirror.storage.filesystem import ROOM_MARGIN, Store, StoredBlob
from mirror.storage.fill import Fills
from mirror.storage.growing import GrowingBlob
from tests.support.smallfs import MIB, tmpfs


class Source:
    """Bytes handed out in chunks, with a pause between them and an optional fault."""

    def __init__(self, data: bytes, chunk: int = 64 << 10, pause: float = 0.0, corrupt: bool = False,
                 cut_at: int | None = None, announce: bool = True) -> None:
        self.data, self.chunk, self.pause, self.corrupt, self.cut_at = data, chunk, pause, corrupt, cut_at
        self.size: int | None = len(data) if announce else None
        self.opened = 0

    @asynccontextmanager
    async def fetch(self) -> AsyncIterator[Source]:
        self.opened += 1
        yield self

    async def chunks(self) -> AsyncIterator[bytes]:
        data = bytes(b ^ 0xFF for b in self.data[:16]) + self.data[16:] if self.corrupt else self.data
        for i in range(0, len(data), self.chunk):
            if self.cut_at is not None and i >= self.cut_at:
                raise ConnectionResetError("reset by peer")
            await asyncio.sleep(self.pause)
            yield data[i:i + self.chunk]


def make_store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "data")
    store.create()
    return store


async def read_all(blob: StoredBlob | GrowingBlob | BypassBlob) -> bytes:
    try:
        if isinstance(blob, StoredBlob):
            return os.pread(blob.fd, blob.size, 0)
        return b"".join([chunk async for chunk in blob.chunks()])
    finally:
        blob.close()


def test_ingest_verifies_and_leaves_nothing_on_mismatch(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = b"hello"
    digest = Digest.of(data)
    store.put_bytes(digest, data)
    assert store.read_bytes(digest) == data
    assert store.layout.blob(digest).parent.parent.name == "sha256"

    wrong = Digest.of(b"other")
    ingest = store.ingest(wrong)
    ingest.write(data)
    with pytest.raises(DigestMismatch):
        ingest.commit()
    ingest.close()
    short = store.ingest(digest, expected_size=6)
    short.write(data)
    with pytest.raises(SizeMismatch):
        short.commit()
    short.close()
    assert not store.exists(wrong)
    assert os.listdir(store.layout.tmp) == []


def test_sweep_removes_only_abandoned_temp_files(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    abandoned = store.layout.tmp / "sha256-abc.partial"
    abandoned.write_bytes(b"half")
    (store.layout.tmp / "sha256-abc.meta").write_text("{}")
    live = store.ingest(Digest.of(b"x"))  # holds its lock
    os.mkfifo(store.layout.tmp / "preload-gone.fifo")  # its upload's lock file is gone: the server died
    uploading = store.layout.tmp / "preload-live.partial"
    held = os.open(uploading, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    os.mkfifo(uploading.with_suffix(".fifo"))  # never opened by the sweep: that would wait for a writer
    assert store.sweep_tmp() == 1
    assert sorted(os.listdir(store.layout.tmp)) == sorted([live.path.name, uploading.name, "preload-live.fifo"])
    live.close()
    os.close(held)


def test_concurrent_readers_share_one_fetch(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = os.urandom(3 << 20)
    digest = Digest.of(data)
    source = Source(data, pause=0.001)

    async def run() -> None:
        fills = Fills(store)
        blobs = await asyncio.gather(*(fills.open(digest, source.fetch) for _ in range(8)))
        assert [b.coalesced for b in blobs if isinstance(b, GrowingBlob)].count(False) == 1
        results = await asyncio.gather(*(read_all(b) for b in blobs))
        assert all(r == data for r in results)
        await fills.aclose()

    asyncio.run(run())
    assert source.opened == 1
    assert store.layout.blob(digest).read_bytes() == data
    assert os.listdir(store.layout.tmp) == []


def test_a_reader_following_a_fill_by_spans_allocates_no_read_buffer(tmp_path: Path) -> None:
    """Spans are sent from the file (sendfile): a reader of them needs no buffer of CHUNK bytes,
    whose page faults were the whole cost of its first span."""
    store = make_store(tmp_path)
    data = os.urandom(3 << 20)
    digest = Digest.of(data)
    source = Source(data, chunk=16 << 10, pause=0.001)

    async def run() -> tuple[int, int]:
        fills = Fills(store)
        blob = await fills.open(digest, source.fetch)
        assert isinstance(blob, GrowingBlob)
        got, held = 0, -1
        tracemalloc.start()
        try:
            async for piece in blob.spans():
                got += piece[1] if isinstance(piece, tuple) else len(piece)  # (offset, count), or bytes
                if held < 0:  # what the reader holds once its first span is out
                    ours = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, growing.__file__)])
                    held = sum(stat.size for stat in ours.statistics("filename"))
        finally:
            tracemalloc.stop()
            blob.close()
        await fills.aclose()
        return got, held

    got, held = asyncio.run(run())
    assert got == len(data)
    assert 0 <= held < 64 << 10, f"the reader holds {held} bytes allocated in {growing.__name__}"


@pytest.mark.parametrize("fault", ["corrupt", "cut"])
def test_failed_fetch_aborts_readers_and_stores_nothing(tmp_path: Path, fault: str) -> None:
    store = make_store(tmp_path)
    data = os.urandom(1 << 20)
    digest = Digest.of(data)
    source = Source(data, pause=0.001, corrupt=fault == "corrupt", cut_at=512 << 10 if fault == "cut" else None)

    async def run() -> None:
        fills = Fills(store)
        blobs = await asyncio.gather(*(fills.open(digest, source.fetch) for _ in range(3)))
        for blob in blobs:
            with pytest.raises(FillFailed):
                await read_all(blob)
        await fills.aclose()
        # the next request fetches again, and this time the bytes are right
        good = Source(data)
        assert await read_all(await Fills(store).open(digest, good.fetch)) == data
        assert good.opened == 1

    asyncio.run(run())
    assert store.layout.blob(digest).read_bytes() == data


def left_in(store: Store) -> list[str]:
    """Every file under blobs/ and tmp/."""
    return sorted(str(p.relative_to(store.root)) for d in (store.layout.blobs, store.layout.tmp)
                  for p in d.rglob("*") if p.is_file())


def test_a_blob_with_no_room_is_streamed_through_to_every_reader_and_not_stored(tmp_path: Path) -> None:
    """Leader and followers (in this process and in another one: a second Fills on the same store) all
    get the upstream's bytes; nothing is left on the disk; the store reports why it took nothing."""
    data = os.urandom(10 * MIB)
    digest = Digest.of(data)
    with tmpfs(tmp_path / "fs", 8):
        store = make_store(tmp_path / "fs")
        source = Source(data, pause=0.001)

        async def run() -> None:
            fills, other = Fills(store), Fills(Store(store.root))
            blobs = await asyncio.gather(*(f.open(digest, source.fetch) for f in (fills, fills, other, fills)))
            assert all(isinstance(b, BypassBlob) for b in blobs), blobs
            results = await asyncio.gather(*(read_all(b) for b in blobs))
            assert all(r == data for r in results)
            await fills.aclose()
            await other.aclose()

        asyncio.run(run())
        assert source.opened == 4  # one each: the store holds nothing they could share
        assert left_in(store) == []
        problem = store.write_problem()
        assert problem is not None and problem.startswith("no space left on device"), problem


def test_bytes_streamed_through_are_verified_too(tmp_path: Path) -> None:
    data = os.urandom(10 * MIB)
    digest = Digest.of(data)
    with tmpfs(tmp_path / "fs", 8):
        store = make_store(tmp_path / "fs")
        source = Source(data, corrupt=True)

        async def run() -> bytes:
            blob = await Fills(store).open(digest, source.fetch)
            assert isinstance(blob, BypassBlob)
            received = b""
            with pytest.raises(FillFailed):
                try:
                    async for chunk in blob.chunks():
                        received += chunk
                finally:
                    blob.close()
            return received

        received = asyncio.run(run())
        assert len(received) < len(data)  # never the whole answer
        assert left_in(store) == []


def test_a_range_of_a_blob_streamed_through_waits_for_the_whole_blob(tmp_path: Path) -> None:
    data = os.urandom(10 * MIB)
    digest = Digest.of(data)
    with tmpfs(tmp_path / "fs", 8):
        store = make_store(tmp_path / "fs")

        async def get(source: Source, start: int, end: int) -> bytes:
            blob = await Fills(store).open(digest, source.fetch)
            assert isinstance(blob, BypassBlob)
            try:
                return b"".join([chunk async for chunk in blob.chunks(start, end)])
            finally:
                blob.close()

        for start, end in ((0, 0), (100, 70_000), (5 * MIB, 10 * MIB - 1)):
            assert asyncio.run(get(Source(data), start, end)) == data[start:end + 1]
        # Bytes past the range are wrong: only the whole blob's digest tells, and the range is cut short.
        with pytest.raises(FillFailed):
            asyncio.run(get(Source(data[:-1] + bytes([data[-1] ^ 1])), 0, 99))
        assert left_in(store) == []


def test_a_fill_the_disk_refuses_midway_is_finished_from_the_upstream(tmp_path: Path) -> None:
    """No announced size, so the fill starts, and the disk fills up under it: every reader, leader
    included, goes on with the upstream's bytes from where it was."""
    data = os.urandom(10 * MIB)
    digest = Digest.of(data)
    with tmpfs(tmp_path / "fs", 8):
        store = make_store(tmp_path / "fs")
        source = Source(data, pause=0.001, announce=False)

        async def run() -> None:
            fills = Fills(store)
            blobs = await asyncio.gather(*(fills.open(digest, source.fetch) for _ in range(3)))
            assert sorted(type(b).__name__ for b in blobs) == ["GrowingBlob"] * 3
            results = await asyncio.gather(*(read_all(b) for b in blobs))
            assert all(r == data for r in results)
            await fills.aclose()

        asyncio.run(run())
        assert source.opened == 4  # the fill, then one for each reader
        assert left_in(store) == []
        problem = store.write_problem()
        assert problem is not None and problem.startswith("no space left on device"), problem


def test_a_refused_fill_whose_upstream_then_fails_cuts_the_transfer_short(tmp_path: Path) -> None:
    data = os.urandom(10 * MIB)
    digest = Digest.of(data)
    with tmpfs(tmp_path / "fs", 8):
        store = make_store(tmp_path / "fs")
        source = Source(data, pause=0.001, announce=False)

        @asynccontextmanager
        async def fetch() -> AsyncIterator[Source]:
            if source.opened:
                raise ConnectionRefusedError("upstream gone")
            async with source.fetch() as download:
                yield download

        async def run() -> bytes:
            fills = Fills(store)
            blob = await fills.open(digest, fetch)
            received = b""
            with pytest.raises(FillFailed):
                try:
                    async for chunk in blob.chunks():
                        received += chunk
                finally:
                    blob.close()
                    await fills.aclose()
            return received

        assert len(asyncio.run(run())) < len(data)
        assert left_in(store) == []


def test_a_refused_write_is_seen_by_every_process_until_there_is_room(tmp_path: Path) -> None:
    """Two Store objects on one DATA/ stand for two workers: one records, both report; a clearance by
    one outdates what the other remembers."""
    with tmpfs(tmp_path / "fs", 8):
        one, two = make_store(tmp_path / "fs"), Store(tmp_path / "fs" / "data")
        two.create()
        assert one.write_problem() is None and two.write_problem() is None
        ballast = tmp_path / "fs" / "ballast"
        ballast.write_bytes(bytes(5 * MIB))
        one.refused(OSError(errno.ENOSPC, "full"), 4 * MIB)
        for store in (one, two):
            problem = store.write_problem()
            assert problem is not None and problem.startswith(
                f"no space left on device ({4 * MIB + ROOM_MARGIN} bytes needed with the reserve"), problem
        ballast.unlink()
        assert two.write_problem() is None  # room again: cleared, for both
        assert one.write_problem() is None
        one.refused(OSError(errno.EROFS, "read-only"), None)  # the probe succeeds: writable again
        assert two.write_problem() is None
        # A refusal of unknown size (a push chunk): over once any process stores an object.
        ballast.write_bytes(bytes(5 * MIB))
        one.refused(OSError(errno.ENOSPC, "full"), None)
        ballast.unlink()
        ballast.write_bytes(bytes(6 * MIB))  # less free than at the refusal: space is no proof
        assert two.write_problem() is not None and one.write_problem() is not None
        two.put_bytes(Digest.of(b"stored"), b"stored")
        assert one.write_problem() is None and two.write_problem() is None


def test_reader_of_a_dead_process_fill_sees_failure(tmp_path: Path) -> None:
    """A leader that vanished (lock gone, file unlinked) is a failure, never a short success."""
    store = make_store(tmp_path)
    digest = Digest.of(b"never")
    path = store.layout.fill(digest)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"nev")
    reader = GrowingBlob(Fills(store), digest, os.open(path, os.O_RDONLY), 5, coalesced=True)
    os.unlink(path)
    os.close(fd)
    with pytest.raises(FillFailed):
        asyncio.run(read_all(reader))


def test_the_index_generation_moves_on_withdrawals_only(tmp_path: Path) -> None:
    """Answers kept in memory are dropped when the generation moves: it must move after every
    withdrawal, seen through another process's mapping too, and not for nothing (that would
    empty every worker's memory for no reason)."""
    from mirror.metadata.diskcache import DiskcacheMetadata

    metadata, other = DiskcacheMetadata(tmp_path / "index"), DiskcacheMetadata(tmp_path / "index")
    repo = "docker.io/library/a"
    try:
        def moves(action: Callable[[], object]) -> bool:
            before = other.generation.read()
            action()
            return other.generation.read() != before

        assert not moves(lambda: metadata.link(repo, ["sha256:1", "sha256:2"]))  # adds, withdraws nothing
        assert not moves(lambda: metadata.forget())
        assert not moves(lambda: metadata.forget(links=[(repo, "sha256:9")]))  # not there
        assert not moves(lambda: metadata.unlink(repo, "sha256:9"))
        assert not moves(lambda: metadata.untag_many(repo, []))
        assert moves(lambda: metadata.unlink(repo, "sha256:1"))
        assert moves(lambda: metadata.forget(links=[(repo, "sha256:2")]))
        assert moves(lambda: metadata.mark_local("team/app", 1.0))  # its requests stop going upstream
        assert not moves(lambda: metadata.mark_local("team/app", 2.0))
    finally:
        metadata.close()
        other.close()
