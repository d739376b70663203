"""The blob-store driver contract (``mirror/storage/driver.py``): every driver passes this module.

Each test runs once per driver (the ``driver`` fixture's params): the filesystem one in a temp
directory, the S3 one in a new bucket of a real S3 server (SeaweedFS, ``tests/support/seaweedfs.py``)
with the smallest part size S3 allows, so objects of a few MiB are multipart uploads.  A driver
comes with a probe of what it leaves behind outside its objects (temp files, unfinished uploads),
which must be empty after a failed ingest or a discarded one.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import httpx
import pytest

from mirror.spec.reference import Digest, parse_digest
from mirror.storage.driver import BlobReader, BlobStore, DigestMismatch, SizeMismatch
from mirror.storage.filesystem import Store
from mirror.storage.s3 import MIN_CHUNK, S3Options, S3Store
from tests.support.images import random_layer
from tests.support.schema1 import signed_schema1
from tests.support.seaweedfs import SeaweedS3


@dataclass
class Driver:
    store: BlobStore
    #: Whatever the driver holds besides its objects (must be empty when no write is in progress).
    leftovers: Callable[[], list[str]]
    #: A local directory for files to hand to ``commit_file``.
    scratch: Path
    #: The resolution of an object's ``mtime`` in seconds.
    tick: float = 0.05


def _filesystem(request: pytest.FixtureRequest, tmp_path: Path) -> Driver:
    store = Store(tmp_path / "data")
    store.create()
    scratch = tmp_path / "data" / "uploads"
    return Driver(store, lambda: sorted(os.listdir(store.layout.tmp)), scratch)


def _s3(request: pytest.FixtureRequest, tmp_path: Path) -> Driver:
    server: SeaweedS3 = request.getfixturevalue("seaweedfs")
    bucket: str = request.getfixturevalue("s3_bucket")
    options = S3Options(bucket, server.region, server.endpoint, "/registry/", server.accesskey, server.secretkey,
                        forcepathstyle=True, chunksize=MIN_CHUNK, redirect=True)
    (tmp_path / "spool").mkdir()
    store = S3Store(options, tmp_path / "spool")
    store.create()
    client = server.client()

    def leftovers() -> list[str]:  # unfinished uploads, and anything beside the objects
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        strays = [key for key in keys if not key.startswith("registry/blobs/")]
        return sorted([f"upload {u['Key']}" for u in uploads] + strays)

    return Driver(store, leftovers, tmp_path / "scratch", tick=1.1)  # S3's LastModified is in seconds


DRIVERS: dict[str, Callable[[pytest.FixtureRequest, Path], Driver]] = {"filesystem": _filesystem, "s3": _s3}


@pytest.fixture(params=sorted(DRIVERS))
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    yield DRIVERS[request.param](request, tmp_path)


def ingest(store: BlobStore, data: bytes, digest: Digest | None = None, size: int | None = None,
           piece: int = 1000) -> None:
    writer = store.ingest(digest or Digest.of(data), size)
    try:
        for i in range(0, len(data), piece):
            writer.write(data[i:i + piece])
        writer.commit()
    finally:
        writer.close()


def read(reader: BlobReader, start: int = 0, end: int | None = None) -> bytes:
    async def collect() -> bytes:
        return b"".join([chunk async for chunk in reader.chunks(start, end)])

    return asyncio.run(collect())


def read_all(store: BlobStore, digest: Digest, start: int = 0, end: int | None = None) -> bytes:
    reader = store.open(digest)
    assert reader is not None, f"{digest} is not stored"
    try:
        return read(reader, start, end)
    finally:
        reader.close()


def listed(store: BlobStore) -> dict[str, int]:
    return {str(o.digest): o.size for o in store.objects() if o.digest is not None}


def test_a_committed_ingest_is_visible_under_its_digest(driver: Driver) -> None:
    store, data = driver.store, os.urandom(300_000)
    digest = Digest.of(data)
    writer = store.ingest(digest, len(data))
    try:
        writer.write(data[:1000])
        assert store.size(digest) is None and not store.exists(digest), "visible before it was verified"
        assert str(digest) not in listed(store)
        writer.write(memoryview(data)[1000:])
        assert writer.written == len(data)
        writer.commit()
    finally:
        writer.close()
    assert store.size(digest) == len(data) and store.exists(digest)
    assert read_all(store, digest) == data
    assert store.read_bytes(digest) == data
    with store.open_stream(digest) as stream:
        assert stream.read() == data
    assert listed(store) == {str(digest): len(data)}
    assert store.matches(digest)
    assert driver.leftovers() == []


@pytest.mark.parametrize("size", [None, 5])
def test_a_wrong_digest_is_never_visible_and_leaves_nothing(driver: Driver, size: int | None) -> None:
    store = driver.store
    claimed = Digest.of(b"other")
    with pytest.raises(DigestMismatch):
        ingest(store, b"hello", claimed, size)
    assert store.size(claimed) is None and store.open(claimed) is None and store.read_bytes(claimed) is None
    assert listed(store) == {}
    assert driver.leftovers() == []
    with pytest.raises(DigestMismatch):
        store.put_bytes(claimed, b"hello")
    assert listed(store) == {} and driver.leftovers() == []


@pytest.mark.parametrize("announced", [4, 6])
def test_a_size_mismatch_is_never_visible_and_leaves_nothing(driver: Driver, announced: int) -> None:
    store, digest = driver.store, Digest.of(b"hello")
    with pytest.raises(SizeMismatch):
        ingest(store, b"hello", digest, announced)
    assert store.size(digest) is None and listed(store) == {} and driver.leftovers() == []


def test_an_ingest_closed_without_commit_leaves_nothing(driver: Driver) -> None:
    store, digest = driver.store, Digest.of(b"hello")
    writer = store.ingest(digest, 5)
    writer.write(b"hello")
    writer.close()
    assert store.size(digest) is None and listed(store) == {} and driver.leftovers() == []


def test_a_sweep_never_takes_a_write_in_progress(driver: Driver) -> None:
    store, data = driver.store, os.urandom(100_000)
    digest = Digest.of(data)
    writer = store.ingest(digest, len(data))
    try:
        writer.write(data[:50_000])
        assert store.sweep_tmp() == 0
        writer.write(data[50_000:])
        writer.commit()
    finally:
        writer.close()
    assert read_all(store, digest) == data and driver.leftovers() == []


def test_ranged_reads(driver: Driver) -> None:
    store, data = driver.store, os.urandom(3 << 20)
    digest = Digest.of(data)
    ingest(store, data, piece=1 << 20)
    assert read_all(store, digest) == data
    assert read_all(store, digest, 0, 0) == data[:1]
    assert read_all(store, digest, 10, 19) == data[10:20]
    assert read_all(store, digest, (1 << 20) - 5, (2 << 20) + 5) == data[(1 << 20) - 5:(2 << 20) + 6]
    assert read_all(store, digest, len(data) - 1) == data[-1:]
    assert read_all(store, digest, 12345) == data[12345:]  # to the end
    assert read_all(store, digest, len(data) - 7, len(data) - 1) == data[-7:]
    reader = store.open(digest)
    assert reader is not None and reader.size == len(data)
    try:  # one reader, several ranges
        assert read(reader, 5, 9) == data[5:10] and read(reader, 0, 4) == data[:5]
    finally:
        reader.close()


def test_a_missing_object(driver: Driver) -> None:
    store, digest = driver.store, Digest.of(b"absent")
    assert store.size(digest) is None and not store.exists(digest)
    assert store.open(digest) is None and store.read_bytes(digest) is None
    with pytest.raises(FileNotFoundError):
        store.open_stream(digest)
    assert store.delete(digest) is False


def test_a_redirect_is_a_url_or_none(driver: Driver) -> None:
    store, digest = driver.store, Digest.of(b"here")
    store.put_bytes(digest, b"here")
    url = store.redirect_url(digest)
    assert url is None or url.startswith(("https://", "http://")), url
    if url is not None:  # a client needs nothing else to fetch the object there
        with httpx.Client(trust_env=False) as client:
            answer = client.get(url)
        assert answer.status_code == 200 and answer.content == b"here", answer.text


def test_a_large_object_in_many_pieces(driver: Driver) -> None:
    """Bigger than two parts of an object store's smallest part size (5 MiB), in odd pieces."""
    store, data = driver.store, os.urandom(2 * (5 << 20) + 3)
    digest = Digest.of(data)
    with pytest.raises(DigestMismatch):
        ingest(store, data, Digest.of(b"other"), len(data), piece=(1 << 20) + 7)
    assert listed(store) == {} and driver.leftovers() == []
    writer = store.ingest(digest, len(data))
    try:
        for i in range(0, len(data), (1 << 20) + 7):
            writer.write(data[i:i + (1 << 20) + 7])
        assert store.size(digest) is None and listed(store) == {}, "visible before it was verified"
        writer.commit()
    finally:
        writer.close()
    assert store.size(digest) == len(data) and listed(store) == {str(digest): len(data)}
    assert read_all(store, digest, (5 << 20) - 2, (5 << 20) + 1) == data[(5 << 20) - 2:(5 << 20) + 2]
    assert read_all(store, digest) == data and store.matches(digest)
    assert driver.leftovers() == []


def test_delete(driver: Driver) -> None:
    store = driver.store
    kept, gone = b"kept", b"gone"
    for data in (kept, gone):
        store.put_bytes(Digest.of(data), data)
    assert store.delete(Digest.of(gone)) is True
    assert store.size(Digest.of(gone)) is None and store.open(Digest.of(gone)) is None
    assert listed(store) == {str(Digest.of(kept)): len(kept)}
    assert store.delete(Digest.of(gone)) is False
    store.put_bytes(Digest.of(gone), gone)  # stored again after a delete
    assert store.read_bytes(Digest.of(gone)) == gone


def test_objects_lists_every_object_with_size_and_time(driver: Driver) -> None:
    store = driver.store
    before = time.time() - 2
    blobs = {Digest.of(data): data for data in (b"", b"a", os.urandom(70_000), os.urandom(1 << 20))}
    for digest, data in blobs.items():
        ingest(store, data, digest)
    found = {str(o.digest): o for o in store.objects()}
    assert set(found) == {str(d) for d in blobs}
    for digest, data in blobs.items():
        entry = found[str(digest)]
        assert entry.size == len(data) and entry.name == str(digest) and entry.location
        assert before <= entry.mtime <= time.time() + 2
    old = next(iter(blobs))
    store.remove(found[str(old)])
    assert store.size(old) is None and str(old) not in listed(store)


def test_touch_makes_an_object_young(driver: Driver) -> None:
    store, digest = driver.store, Digest.of(b"young")
    store.put_bytes(digest, b"young")
    entry = next(o for o in store.objects() if o.digest == digest)
    time.sleep(driver.tick)
    store.touch(digest)
    assert next(o for o in store.objects() if o.digest == digest).mtime > entry.mtime


def test_concurrent_ingests_of_one_digest_end_with_one_valid_object(driver: Driver) -> None:
    store, data = driver.store, os.urandom(2 << 20)
    digest = Digest.of(data)
    start, failures = threading.Barrier(6), []

    def one() -> None:
        try:
            start.wait()
            ingest(store, data, digest, len(data), piece=64 << 10)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert listed(store) == {str(digest): len(data)}
    assert read_all(store, digest) == data and store.matches(digest)
    assert driver.leftovers() == []


def test_a_reader_opened_before_a_delete_reads_the_whole_object(driver: Driver) -> None:
    store, data = driver.store, os.urandom(1 << 20)
    digest = Digest.of(data)
    ingest(store, data)
    reader = store.open(digest)
    assert reader is not None
    try:
        assert read(reader, 0, 99) == data[:100]
        assert store.delete(digest)
        assert store.size(digest) is None
        assert read(reader) == data
    finally:
        reader.close()


def test_a_read_begun_before_a_delete_of_this_process_ends_whole(driver: Driver) -> None:
    """The collector may delete between a reader's look-up and its first GET, or in the middle of a
    read: a whole read and a range both still end with the object's bytes."""
    store, data = driver.store, os.urandom(3 << 20)
    digest = Digest.of(data)
    ingest(store, data)
    whole, part = store.open(digest), store.open(digest)
    assert whole is not None and part is not None

    async def collect() -> tuple[bytes, bytes]:
        reading, ranging = whole.chunks(), part.chunks(1000, (2 << 20) - 1)
        first = await anext(reading)  # the whole read is under way, the range not yet begun
        assert await anyio.to_thread.run_sync(store.delete, digest)
        return first + b"".join([c async for c in reading]), b"".join([c async for c in ranging])

    try:
        got_whole, got_part = asyncio.run(collect())
    finally:
        whole.close()
        part.close()
    assert got_whole == data
    assert got_part == data[1000:2 << 20]
    assert store.size(digest) is None


def test_commit_file_stores_a_local_file_verified(driver: Driver) -> None:
    store, data = driver.store, os.urandom(100_000)
    digest = Digest.of(data)
    driver.scratch.mkdir(parents=True, exist_ok=True)
    wrong = driver.scratch / "wrong"
    wrong.write_bytes(data)
    with pytest.raises(DigestMismatch):
        store.commit_file(wrong, Digest.of(b"other"))
    assert wrong.read_bytes() == data, "a file that does not match stays where it was"
    assert listed(store) == {}
    store.commit_file(wrong, digest)
    assert not wrong.exists()
    assert read_all(store, digest) == data
    again = driver.scratch / "again"
    again.write_bytes(data)
    store.commit_file(again, digest, known_hex=digest.hex)  # already stored: the copy goes
    assert not again.exists() and listed(store) == {str(digest): len(data)}
    assert driver.leftovers() == []


def test_a_signed_schema1_manifest_is_stored_under_its_payload_digest(driver: Driver, tmp_path: Path) -> None:
    store, old = driver.store, signed_schema1("library/old", "1", [random_layer(tmp_path, 100, 7)])
    name = parse_digest(old.digest)
    assert name != parse_digest(old.bytes_digest)
    store.put_bytes(name, old.body)
    assert store.read_bytes(name) == old.body, "stored byte for byte"
    assert store.matches(name) and listed(store) == {old.digest: len(old.body)}
    with pytest.raises(DigestMismatch):  # its bytes are no name for something else
        store.put_bytes(Digest.of(b"other"), old.body)
    assert listed(store) == {old.digest: len(old.body)} and driver.leftovers() == []


def test_on_commit_hears_of_every_new_object(driver: Driver) -> None:
    store, sizes = driver.store, []
    store.on_commit = sizes.append
    store.put_bytes(Digest.of(b"abc"), b"abc")
    ingest(store, b"hello")
    with pytest.raises(DigestMismatch):
        ingest(store, b"bad", Digest.of(b"good"))
    assert sizes == [3, 5]


def test_room(driver: Driver) -> None:
    store = driver.store
    space = store.space()
    if space is not None:
        assert 0 <= space.available <= space.total
        assert store.room_error(space.available * 2 + 1) is not None
    assert store.room_error(None) is None and store.room_error(1) is None
    assert store.write_problem() is None
