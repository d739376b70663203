"""What only the S3 driver does (``mirror/storage/s3.py``), on a real S3 server (SeaweedFS).

The blob-store contract (``test_blobstore_contract.py``) covers what every driver does; here:
fixed-size parts, when a fill's parts go up (``storage/s3fill.py``: not while it is young, then even
while its upstream stalls), the sweep of abandoned multipart uploads, credentials, options and the
``storage.s3.*`` configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mirror.config.load import load_config
from mirror.maintenance.objectcopy import StoredDigests
from mirror.spec.reference import Digest
from mirror.storage.driver import StoreUnavailable
from mirror.storage.opening import open_blob_store
from mirror.storage.s3 import MIN_CHUNK, S3Options, S3Store
from mirror.storage.s3fill import IN_FLIGHT, SEND_AFTER, S3Fill
from mirror.storage.s3objects import S3Reader
from tests.support.seaweedfs import SeaweedS3
from tests.support.waiting import wait_for


def options(server: SeaweedS3, bucket: str, **overrides: object) -> S3Options:
    values: dict[str, object] = {
        "bucket": bucket, "region": server.region, "regionendpoint": server.endpoint, "rootdirectory": "mirror",
        "accesskey": server.accesskey, "secretkey": server.secretkey, "forcepathstyle": True,
        "chunksize": MIN_CHUNK}
    values.update(overrides)
    return S3Options(**values)  # type: ignore[arg-type]


@contextlib.contextmanager
def fill_of(store: S3Store, data: bytes) -> Iterator[S3Fill]:
    """The writer of a fill of *data* (not written yet), as ``storage/fill.py`` makes one; its file is closed after."""
    digest = Digest.of(data)
    path = store.layout.fill(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    writer = store.fill_writer(digest, path, fd)
    writer.expected_size = len(data)
    try:
        yield writer
    finally:
        os.close(fd)


def parts_sent(server: SeaweedS3, bucket: str) -> list[tuple[int, int]]:
    """(number, size) of the parts of every unfinished multipart upload in *bucket*."""
    client = server.client()
    return [(p["PartNumber"], p["Size"]) for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            for p in client.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts", [])]


def fill_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("s3-fill")}


def test_parts_are_all_chunksize_but_the_last(seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    data = os.urandom(2 * MIN_CHUNK + 12345)
    digest = Digest.of(data)
    writer = store.ingest(digest, len(data))
    client = seaweedfs.client()
    try:
        for i in range(0, len(data), (1 << 20) + 7):
            writer.write(data[i:i + (1 << 20) + 7])
        [upload] = client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
        assert upload["Key"] == f"mirror/blobs/sha256/{digest.hex[:2]}/{digest.hex}", "written to its final key"
        parts = client.list_parts(Bucket=s3_bucket, Key=upload["Key"], UploadId=upload["UploadId"])["Parts"]
        assert [p["Size"] for p in parts] == [MIN_CHUNK, MIN_CHUNK]
        assert store.size(digest) is None
        writer.commit()
    finally:
        writer.close()
    assert store.size(digest) == len(data)
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_a_fill_sends_no_part_before_it_ran_send_after_seconds_and_its_parts_as_they_complete_after(
    seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path,
) -> None:
    """A fast fill leaves the CPU to its clients until its verdict; a slow one overlaps its uploads."""
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    client = seaweedfs.client()
    data = os.urandom((IN_FLIGHT + 1) * MIN_CHUNK + 5)
    with fill_of(store, data) as writer:
        writer.write(data[:IN_FLIGHT * MIN_CHUNK])
        time.sleep(0.3)  # time for a part to show, had one been sent
        assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == [], "a part of a young fill"
        time.sleep(SEND_AFTER)
        writer.write(data[IN_FLIGHT * MIN_CHUNK:])
        complete = [(n, MIN_CHUNK) for n in range(1, IN_FLIGHT + 2)]
        wait_for(lambda: parts_sent(seaweedfs, s3_bucket) == complete, timeout=15,
                 what="the complete parts in the bucket")
        writer.commit()
    assert store.size(writer.digest) == len(data) and not writer.path.exists()
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_a_fill_whose_upstream_stalls_sends_its_complete_parts_meanwhile(
    seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path,
) -> None:
    """More complete parts than go up at a time, all written within the fill's first second: they are
    in the bucket once the fill is SEND_AFTER old, though no further byte came."""
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    client = seaweedfs.client()
    complete = IN_FLIGHT + 1
    data = os.urandom(complete * MIN_CHUNK + 12345)
    threads = fill_threads()
    with fill_of(store, data) as writer:
        began = time.monotonic()
        for i in range(0, complete * MIN_CHUNK + 100, 1 << 20):
            writer.write(data[i:min(i + (1 << 20), complete * MIN_CHUNK + 100)])
        assert time.monotonic() - began < SEND_AFTER, "written within the first second"
        assert parts_sent(seaweedfs, s3_bucket) == [], "nothing sent by a young fill"
        wait_for(lambda: parts_sent(seaweedfs, s3_bucket) == [(n, MIN_CHUNK) for n in range(1, complete + 1)],
                 timeout=SEND_AFTER + 15, what="the complete parts in the bucket while the fill stalls")
        assert time.monotonic() - began >= SEND_AFTER
        assert store.size(writer.digest) is None and writer.written == complete * MIN_CHUNK + 100
        writer.write(data[complete * MIN_CHUNK + 100:])
        writer.commit()
    assert store.size(writer.digest) == len(data) and not writer.path.exists()
    assert client.get_object(Bucket=s3_bucket, Key=writer.key)["Body"].read() == data
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert fill_threads() <= threads, "the fill's threads end with it"


def test_a_fill_done_before_send_after_sends_nothing_later_and_leaves_no_thread(
    seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path,
) -> None:
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    client = seaweedfs.client()
    discarded, committed = os.urandom(IN_FLIGHT * MIN_CHUNK + 1), os.urandom(IN_FLIGHT * MIN_CHUNK + 2)
    threads = fill_threads()
    with fill_of(store, discarded) as writer:
        writer.write(discarded)
        writer.discard()
    with fill_of(store, committed) as writer:
        writer.write(committed)
        writer.commit()
    assert fill_threads() <= threads, "no wake-up left waiting"
    time.sleep(SEND_AFTER + 0.3)
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert store.size(Digest.of(discarded)) is None and store.size(Digest.of(committed)) == len(committed)


def test_a_fill_another_replica_stores_sends_nothing_while_its_upstream_stalls(
    seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path,
) -> None:
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    data = os.urandom(IN_FLIGHT * MIN_CHUNK + 3)
    elsewhere = True
    with fill_of(store, data) as writer:
        writer.stored_elsewhere = lambda: elsewhere
        writer.write(data[:-3])
        time.sleep(SEND_AFTER + 0.5)
        assert parts_sent(seaweedfs, s3_bucket) == [], "the other replica stores it"
        elsewhere = False  # it went away: this fill takes over, from the first byte on
        writer.write(data[-3:])
        wait_for(lambda: parts_sent(seaweedfs, s3_bucket) == [(n, MIN_CHUNK) for n in range(1, IN_FLIGHT + 1)],
                 timeout=15, what="the parts of the fill that took over")
        writer.commit()
    assert store.read_bytes(writer.digest) == data


def test_an_object_put_whole_whose_body_arrives_cut_short_is_refused_and_never_stored(
        seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    """A ``PutObject`` (a manifest, a small blob, a fill of one part at most) carries its
    ``Content-MD5``: when the store receives fewer bytes than were sent (a writer killed in the middle
    of its request), it refuses them, and no object is left under the digest's key."""
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    cut: list[int] = []

    def cut_short(request: Any, **_: Any) -> None:  # what the store receives of a PutObject: half its body
        body = request.body.read() if hasattr(request.body, "read") else bytes(request.body)
        request.body = body[:len(body) // 2]
        request.headers["Content-Length"] = str(len(request.body))
        cut.append(len(request.body))

    store.send.meta.events.register("before-send.s3.PutObject", cut_short)
    small, one_part = b"a manifest, say" * 10, os.urandom(MIN_CHUNK // 2)
    with pytest.raises(StoreUnavailable):
        store.put_bytes(Digest.of(small), small)
    with fill_of(store, one_part) as fill, pytest.raises(OSError):
        fill.write(one_part)
        fill.commit()
    assert len(cut) >= 2
    for data in (small, one_part):
        assert store.size(Digest.of(data)) is None
    listed = seaweedfs.client().list_objects_v2(Bucket=s3_bucket, Prefix="mirror/blobs/").get("Contents", [])
    assert listed == [], listed


def test_the_sweep_aborts_only_stale_uploads_of_writers_gone(seaweedfs: SeaweedS3, s3_bucket: str,
                                                             tmp_path: Path) -> None:
    mine = S3Store(options(seaweedfs, s3_bucket), tmp_path, stale_upload=0)
    writer = mine.ingest(Digest.of(b"never"), None)
    writer.write(os.urandom(MIN_CHUNK + 1))  # one part sent: an upload in progress
    client = seaweedfs.client()
    assert len(client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]) == 1
    assert mine.sweep_tmp() == 0, "a write in progress in this process is never swept"
    restarted = S3Store(options(seaweedfs, s3_bucket), tmp_path)  # another process, uploads younger than a day
    assert restarted.sweep_tmp() == 0
    time.sleep(1.1)  # Initiated is in whole seconds
    restarted_later = S3Store(options(seaweedfs, s3_bucket), tmp_path, stale_upload=0.5)
    assert restarted_later.sweep_tmp() == 1
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    writer.close()  # the upload is gone already: closing is quiet


@pytest.mark.parametrize("root", ["", "mirror"])
def test_the_sweep_aborts_no_upload_of_another_store_in_the_bucket(seaweedfs: SeaweedS3, s3_bucket: str,
                                                                   tmp_path: Path, root: str) -> None:
    """Beside the mirror's store, under its ``rootdirectory`` or beside it with none: another mirror's
    store and a registry:2 store, each with an upload in progress.  The start-up sweep aborts the
    mirror's own stale uploads only (before, with no ``rootdirectory`` it aborted every stale upload in
    the bucket: a registry:2's, or another mirror's push kept longer than a day)."""
    client = seaweedfs.client()
    others = ["registry/uploads/0123456789abcdef0123456789abcdef/data",
              "docker/registry/v2/repositories/team/app/_uploads/abc/data", f"{root}-other/blobs/sha256/ab/abcd"]
    for key in others:
        client.create_multipart_upload(Bucket=s3_bucket, Key=key)
    prefix = f"{root}/" if root else ""
    own = [f"{prefix}blobs/sha256/cd/cdef", f"{prefix}uploads/fedcba9876543210fedcba9876543210/data",
           f"{prefix}readyz-probe"]
    for key in own:
        client.create_multipart_upload(Bucket=s3_bucket, Key=key)
    time.sleep(1.1)  # Initiated is in whole seconds
    assert S3Store(options(seaweedfs, s3_bucket, rootdirectory=root), tmp_path, stale_upload=0.5).sweep_tmp() == 3
    left = sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []))
    assert left == sorted(others)


def test_wrong_credentials_are_refused(seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(options(seaweedfs, s3_bucket, secretkey="not-the-secret"), tmp_path)
    with pytest.raises(OSError, match="refused"):
        store.create()
    problem = store.write_problem()
    assert problem is not None and s3_bucket in problem
    with pytest.raises(OSError):
        store.put_bytes(Digest.of(b"x"), b"x")
    assert S3Store(options(seaweedfs, s3_bucket), tmp_path).write_problem() is None


def test_an_empty_object_does_not_stall_the_next_request(seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    """SeaweedFS answers an empty PUT before ``100 Continue``; the next request must not wait a timeout."""
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    started = time.monotonic()
    for data in (b"", b"a", b""):  # PUT after PUT: what stalled
        writer = store.ingest(Digest.of(data), len(data))
        try:
            writer.write(data)
            writer.commit()
        finally:
            writer.close()
    assert time.monotonic() - started < 10
    assert store.read_bytes(Digest.of(b"a")) == b"a" and store.read_bytes(Digest.of(b"")) == b""


def test_options(seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunksize"):
        S3Store(options(seaweedfs, s3_bucket, chunksize=MIN_CHUNK - 1), tmp_path)
    settings = options(seaweedfs, s3_bucket)
    assert seaweedfs.secretkey not in repr(settings) and seaweedfs.secretkey not in str(settings)
    store = S3Store(settings, tmp_path)
    store.put_bytes(Digest.of(b"x"), b"x")
    assert store.redirect_url(Digest.of(b"x")) is None, "redirect is off unless asked for"
    reader = store.open(Digest.of(b"x"))
    assert reader is not None
    try:
        assert reader.fd is None, "no local file to send from"
    finally:
        reader.close()
    assert store.space() is None, "a bucket has no fixed size"
    assert store.room_error(1) is None and store.room_error(None) is None
    assert store.room_error(1 << 60) is not None, "a fill's local file must fit in the data directory"


def test_a_store_built_from_the_configuration(seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    config = load_config(env={
        "MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": s3_bucket,
        "MIRROR_STORAGE_S3_REGIONENDPOINT": seaweedfs.endpoint, "MIRROR_STORAGE_S3_FORCEPATHSTYLE": "true",
        "MIRROR_STORAGE_S3_ACCESSKEY": seaweedfs.accesskey, "MIRROR_STORAGE_S3_SECRETKEY": seaweedfs.secretkey,
        "MIRROR_STORAGE_S3_ROOTDIRECTORY": "/team/registry/", "MIRROR_STORAGE_S3_REDIRECT": "true",
        "MIRROR_STORAGE_PATH": str(tmp_path), "MIRROR_CACHE_MAX_SIZE": "1GiB"})
    store = open_blob_store(config.storage)
    assert isinstance(store, S3Store) and store.layout.root == tmp_path
    store.create()
    digest = Digest.of(b"configured")
    store.put_bytes(digest, b"configured")
    keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == [f"team/registry/blobs/sha256/{digest.hex[:2]}/{digest.hex}"]
    url = store.redirect_url(digest)
    assert url is not None and url.startswith(seaweedfs.endpoint)


def read_all(reader: S3Reader) -> bytes:
    async def collect() -> bytes:
        return b"".join([chunk async for chunk in reader.chunks()])
    return asyncio.run(collect())


def test_a_reader_in_another_process_keeps_its_object_from_a_delete(
    seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path,
) -> None:
    """Two stores on one data directory are two processes (each sees only its own readers in memory)."""
    serving, collecting = (S3Store(options(seaweedfs, s3_bucket), tmp_path) for _ in range(2))
    serving.create()
    data = os.urandom(MIN_CHUNK + 1000)
    digest = Digest.of(data)
    serving.put_bytes(digest, data)
    reader = serving.open(digest)  # the response's headers are sent; no GET yet
    assert reader is not None
    try:
        assert collecting.serving(digest)
        assert collecting.delete(digest) is False, "kept while another process serves it"
        assert read_all(reader) == data
    finally:
        reader.close()
    assert collecting.delete(digest) is True and serving.size(digest) is None
    assert serving.open(digest) is None
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == [], "no reader's mark left"


def test_the_digests_an_object_store_holds_are_looked_up_several_at_once(
    seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path,
) -> None:
    """``mirror migrate``'s last check (the manifests the index names that the source store lacks)
    asks an object store about a batch of digests with several ``HEAD`` requests in flight, and
    answers which it holds; a string that is not a digest is not held."""
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    bodies = [b"manifest %d" % n for n in range(24)]
    for body in bodies[::2]:
        store.put_bytes(Digest.of(body), body)
    at_once = most = 0
    lock = threading.Lock()
    exists = store.exists

    def counted(digest: Digest) -> bool:
        nonlocal at_once, most
        with lock:
            at_once += 1
            most = max(most, at_once)
        try:
            time.sleep(0.02)  # each lookup a little longer than a request on loopback
            return exists(digest)
        finally:
            with lock:
                at_once -= 1

    store.exists = counted  # type: ignore[method-assign]
    asked = [str(Digest.of(body)) for body in bodies] + ["sha256:not-a-digest"]
    with ThreadPoolExecutor(4) as pool:
        held = StoredDigests(store, pool, 4).among(asked)
    assert held == {str(Digest.of(body)) for body in bodies[::2]}
    assert most == 4, f"{most} lookups at once"
