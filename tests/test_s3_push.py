"""Push uploads on the S3 driver (``mirror/storage/s3uploads.py``, ``mirror/registry/uploads.py``): parts
sent to the bucket while the upload runs, the state in the index, the object copied to its digest's
key once verified; on a real S3 server (SeaweedFS), with the real mirror under uvicorn and a real
PostgreSQL where the index is shared.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mirror.spec.reference import Digest
from mirror.storage.driver import DigestMismatch, UploadParts
from mirror.storage.layout import ORPHAN_GRACE, new_upload_id
from mirror.storage.s3 import MIN_CHUNK, S3Store
from mirror.storage.s3binding import BINDING
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.seaweedfs import SeaweedS3
from tests.support.storecheck import mirror_cli
from tests.support.waiting import wait_for
from tests.test_s3_driver import options
from tests.test_s3_serve import ROOT, Bucket, get_digest, parts_sent

MIB = 1 << 20


@pytest.fixture
def bucket(seaweedfs: SeaweedS3, s3_bucket: str) -> Bucket:
    return Bucket(seaweedfs, s3_bucket)


def unfinished(store: S3Store) -> list[str]:
    return [u["Key"] for u in store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])]


def keys(store: S3Store) -> list[str]:
    return [item["Key"] for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
            for item in page.get("Contents", [])]


def spooled(store: S3Store, data: bytes) -> tuple[str, Path]:
    """A new upload whose local file holds *data* (as ``registry/uploads.py`` writes it)."""
    store.create()
    uuid = new_upload_id()
    path = store.layout.upload(uuid)
    path.write_bytes(data)
    return uuid, path


def send_whole_parts(store: S3Store, uuid: str, path: Path, size: int) -> UploadParts | None:
    parts = None
    while size - (parts.sent if parts else 0) >= store.options.chunksize:
        parts = store.send_upload_part(uuid, path, parts)
    return parts


@pytest.mark.parametrize("copy_in_ranges", [False, True], ids=["copy-object", "upload-part-copy"])
def test_an_upload_goes_in_parts_to_its_own_key_and_is_copied_to_its_digest_once_verified(
    seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path, copy_in_ranges: bool,
) -> None:
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    if copy_in_ranges:  # what a blob above S3's 5 GiB CopyObject limit takes
        store.copy_limit, store.copy_part = 0, MIN_CHUNK
    data = random.Random(7).randbytes(2 * MIN_CHUNK + 12345)
    digest = Digest.of(data)
    uuid, path = spooled(store, data)

    parts = send_whole_parts(store, uuid, path, len(data))
    assert parts is not None and parts.sent == 2 * MIN_CHUNK
    assert unfinished(store) == [f"mirror/uploads/{uuid}/data"], "the upload's own key: the digest is not known yet"
    assert parts_sent(Bucket(seaweedfs, s3_bucket)) == [MIN_CHUNK, MIN_CHUNK]
    assert keys(store) == [] and store.size(digest) is None
    # The first part is recorded by now (it was given back): its bytes leave the local file, its size stays.
    store.send_upload_part(uuid, path, UploadParts(parts.upload_id, parts.part_size, parts.etags[:1]))
    assert os.stat(path).st_size == len(data)
    assert os.stat(path).st_blocks * 512 <= len(data) - MIN_CHUNK + (1 << 16)

    store.commit_upload(uuid, path, digest, None, parts)  # no running hash: read back from the bucket
    assert store.size(digest) == len(data)
    assert hashlib.sha256(store.open_stream(digest).read()).hexdigest() == digest.hex
    assert keys(store) == [f"mirror/blobs/sha256/{digest.hex[:2]}/{digest.hex}"], "the upload's object is gone"
    assert unfinished(store) == [] and not path.exists()


def test_an_upload_that_is_not_its_digest_leaves_nothing_and_aborting_removes_its_parts(
    seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path,
) -> None:
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    data = os.urandom(MIN_CHUNK + 100)
    claimed = Digest.of(b"something else")
    for known_hex in (None, hashlib.sha256(data).hexdigest()):
        uuid, path = spooled(store, data)
        parts = send_whole_parts(store, uuid, path, len(data))
        with pytest.raises(DigestMismatch):
            store.commit_upload(uuid, path, claimed, known_hex, parts)
        assert store.size(claimed) is None and not any(k.startswith("mirror/blobs/") for k in keys(store))
        store.abort_upload(uuid, parts)
        assert unfinished(store) == [] and keys(store) == []


def test_the_start_up_sweep_keeps_the_parts_of_a_push_upload_still_in_progress(
    seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path,
) -> None:
    store = S3Store(options(seaweedfs, s3_bucket), tmp_path)
    uuid, path = spooled(store, os.urandom(MIN_CHUNK))
    send_whole_parts(store, uuid, path, MIN_CHUNK)
    time.sleep(1.1)  # Initiated is in whole seconds
    restarted = S3Store(options(seaweedfs, s3_bucket), tmp_path, stale_upload=0.5)
    assert restarted.sweep_tmp() == 0 and len(unfinished(store)) == 1, "its local file is there: it goes on"
    path.unlink()
    restarted.shared_pushes = True  # a replica's: its file may be on another replica, its record expires it
    assert restarted.sweep_tmp() == 0 and len(unfinished(store)) == 1
    restarted.shared_pushes = False
    assert restarted.sweep_tmp() == 1 and unfinished(store) == [], "its local file is gone: abandoned"


# -- the mirror: chunked pushes over a restart, expiry --

def push_env(bucket: Bucket, postgres: PostgresServer | None, **extra: str) -> dict[str, str]:
    index = {} if postgres is None else {"MIRROR_METADATA_DRIVER": "postgres",
                                         "MIRROR_METADATA_POSTGRES_DSN": postgres.create_database()}
    return bucket.env(**index, **extra)


@pytest.mark.parametrize("index", ["diskcache", "postgres"])
def test_a_chunked_push_goes_on_after_a_kill9_and_the_blob_is_pulled_back(
    bucket: Bucket, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
    index: str,
) -> None:
    data = random.Random(11).randbytes(13 * MIB + 777)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    mirror = mirror_factory(env=push_env(bucket, postgres if index == "postgres" else None))
    location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
    first = http.patch(mirror.url + location, content=data[:11 * MIB],
                       headers={"content-range": f"0-{11 * MIB - 1}", "content-type": "application/octet-stream"})
    assert first.status_code == 202 and first.headers["range"] == f"0-{11 * MIB - 1}"
    # Two whole parts went up while the chunk arrived, to the upload's own key; nothing under a digest yet.
    assert parts_sent(bucket) == [5 * MIB, 5 * MIB] and bucket.uploads() == [f"{ROOT}/uploads/{location[-32:]}/data"]
    assert bucket.objects() == {}

    mirror.kill9()
    mirror.start()
    status = http.get(mirror.url + location)
    assert (status.status_code, status.headers["range"]) == (204, f"0-{11 * MIB - 1}")
    second = http.patch(mirror.url + location, content=data[11 * MIB:12 * MIB],
                        headers={"content-range": f"{11 * MIB}-{12 * MIB - 1}"})
    assert second.status_code == 202 and second.headers["range"] == f"0-{12 * MIB - 1}"
    done = http.put(f"{mirror.url}{location}?digest={digest}", content=data[12 * MIB:],
                    headers={"content-range": f"{12 * MIB}-{len(data) - 1}"})
    assert done.status_code == 201, done.text

    assert bucket.objects() == {digest: len(data)} and bucket.digest_of(digest) == digest
    assert bucket.uploads() == [], "the upload's multipart upload is completed, its object deleted"
    assert get_digest(http, f"{mirror.url}/v2/team/app/blobs/{digest}")[:3] == (200, digest, len(data))
    assert [p.name for p in (mirror.data_dir / "uploads").iterdir()] == []


def test_a_push_of_the_wrong_digest_after_a_restart_stores_nothing_and_aborts_its_parts(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    data = os.urandom(6 * MIB)
    mirror = mirror_factory(env=bucket.env())
    location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
    assert http.patch(mirror.url + location, content=data).status_code == 202
    assert parts_sent(bucket) == [5 * MIB]
    mirror.restart()  # the running hash is gone: the bytes are read back from the bucket
    wrong = "sha256:" + hashlib.sha256(b"not these bytes").hexdigest()
    answer = http.put(f"{mirror.url}{location}?digest={wrong}")
    assert answer.status_code == 400 and answer.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert bucket.objects() == {} and bucket.uploads() == []
    assert [item["Key"] for item in bucket.client.list_objects_v2(Bucket=bucket.name).get("Contents", [])] \
        == [f"{ROOT}/{BINDING}"]  # which index the bucket's objects belong to, and nothing else


def test_an_expired_upload_aborts_its_multipart_upload(
    bucket: Bucket, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    ttl = 3.0
    mirror = mirror_factory(env=push_env(bucket, postgres, MIRROR_PUSH_UPLOAD_TTL=f"{ttl:g}s"))
    location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
    assert http.patch(mirror.url + location, content=os.urandom(7 * MIB)).status_code == 202
    assert parts_sent(bucket) == [5 * MIB] and len(bucket.uploads()) == 1
    mirror.kill9()
    time.sleep(ttl + 0.5)
    mirror.start()  # the start-up expiry of uploads
    assert bucket.uploads() == [] and bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads") is None
    gone = http.get(mirror.url + location)
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert [p.name for p in (mirror.data_dir / "uploads").iterdir()] == []


def test_an_upload_abandoned_while_the_server_runs_expires_without_a_restart(
    bucket: Bucket, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    ttl = 2.0
    mirror = mirror_factory(env=push_env(bucket, postgres, MIRROR_PUSH_UPLOAD_TTL=f"{ttl:g}s"))
    location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
    assert http.patch(mirror.url + location, content=os.urandom(7 * MIB)).status_code == 202
    assert len(bucket.uploads()) == 1
    wait_for(lambda: bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads") is None
             and http.get(mirror.url + location).status_code == 404,  # the parts go first, then the record
             timeout=ttl * 4, what="the abandoned upload's parts aborted and its record dropped by the running server")
    gone = http.get(mirror.url + location)
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert bucket.uploads() == [] and [p.name for p in (mirror.data_dir / "uploads").iterdir()] == []
    # Said once the sweep is over: after the records, it lists what ended uploads left in the bucket.
    wait_for(lambda: "removed 1 abandoned uploads" in mirror.log_tail(200), timeout=10, what="the sweep's count")


@pytest.mark.slow
def test_an_upload_object_left_in_the_bucket_after_its_upload_ended_is_swept_by_a_single_mirror(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A commit whose delete of the upload's completed object failed (or whose process was killed between
    the copy to the digest's key and that delete) leaves ``uploads/<uuid>/data`` behind, its record gone.
    Only the replicas' sweep and ``mirror fsck --repair`` removed it: one mirror kept it for good.  Now its
    sweep removes it once older than ``ORPHAN_GRACE``; a younger one (a commit between its copy and its
    delete) is left alone."""
    def put(uuid: str) -> str:
        key = f"{ROOT}/uploads/{uuid}/data"
        bucket.client.put_object(Bucket=bucket.name, Key=key, Body=b"x" * 2048)
        return key

    def listed() -> list[str]:
        return [item["Key"] for item in bucket.client.list_objects_v2(Bucket=bucket.name).get("Contents", [])]

    stray = put("0123456789abcdef0123456789abcdef")
    time.sleep(ORPHAN_GRACE + 1)
    young = put("fedcba9876543210fedcba9876543210")
    mirror = mirror_factory(env=bucket.env(MIRROR_PUSH_UPLOAD_TTL="2s"))
    wait_for(lambda: stray not in listed(), timeout=10, what="the upload's object left behind swept")
    assert young in listed()
    assert "removed the object of the ended upload 0123456789abcdef0123456789abcdef" in mirror.log_tail(200)


def test_a_push_spread_over_two_workers_sends_its_parts_once_and_stores_the_blob(
    bucket: Bucket, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """PATCHes of one upload answered by different worker processes (as by replicas sharing the index)."""
    data = random.Random(13).randbytes(16 * MIB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    mirror = mirror_factory(workers=2, env=push_env(bucket, postgres))

    def fresh() -> httpx.Client:  # a new connection per request: any worker may take it
        return httpx.Client(timeout=60.0, trust_env=False, headers={"connection": "close"})

    with fresh() as http:
        location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
    for start in range(0, len(data) - MIB, MIB):
        with fresh() as http:
            answer = http.patch(mirror.url + location, content=data[start:start + MIB],
                                headers={"content-range": f"{start}-{start + MIB - 1}"})
            assert answer.status_code == 202 and answer.headers["range"] == f"0-{start + MIB - 1}"
    assert parts_sent(bucket) == [5 * MIB] * 3
    with fresh() as http:
        assert http.put(f"{mirror.url}{location}?digest={digest}", content=data[-MIB:]).status_code == 201
        assert get_digest(http, f"{mirror.url}/v2/team/app/blobs/{digest}")[:3] == (200, digest, len(data))
    pids = {e["pid"] for e in mirror.access_entries() if e["route"] == "upload" and e["method"] in ("PATCH", "PUT")}
    assert len(pids) == 2, "the upload's requests went to both workers"
    assert bucket.objects() == {digest: len(data)} and bucket.uploads() == []


def peak_rss(pid: int) -> int:
    """The largest resident set the process has had, in bytes (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_large_push_sent_in_parts_keeps_the_mirrors_memory_bounded(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    size = 96 * MIB
    mirror = mirror_factory(env=bucket.env())
    assert mirror.pid is not None

    def push(seed: int, size: int) -> str:
        hasher, rng = hashlib.sha256(), random.Random(seed)

        def body() -> Iterator[bytes]:
            for _ in range(size // MIB):
                chunk = rng.randbytes(MIB)
                hasher.update(chunk)
                yield chunk
        location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
        assert http.patch(mirror.url + location, content=body()).status_code == 202
        digest = "sha256:" + hasher.hexdigest()
        assert http.put(f"{mirror.url}{location}?digest={digest}").status_code == 201
        return digest

    push(1, 11 * MIB)  # every code path loaded once
    before = peak_rss(mirror.pid)
    digest = push(2, size)
    grown = peak_rss(mirror.pid) - before
    assert bucket.objects()[digest] == size and bucket.uploads() == []
    assert grown < 24 * MIB, f"the peak resident set grew by {grown / MIB:.1f} MiB for a {size // MIB} MiB blob"



def test_fsck_repair_of_an_upload_record_without_its_file_aborts_its_parts(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    env = bucket.env()
    mirror = mirror_factory(env=env)
    location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
    assert http.patch(mirror.url + location, content=os.urandom(6 * MIB)).status_code == 202
    mirror.stop()
    (mirror.data_dir / "uploads" / location[-32:]).unlink()  # lost with a disk, say
    assert len(bucket.uploads()) == 1
    fsck = mirror_cli("fsck", "--repair", "--data", mirror.data_dir, env=env)
    assert "upload record without its file" in fsck.stdout and "(repaired)" in fsck.stdout, fsck.stdout + fsck.stderr
    assert bucket.uploads() == []


@dataclass
class StartedPush:
    bucket: Bucket
    mirror: MirrorServer
    data: bytes
    digest: str
    location: str


def started_push(seaweedfs: SeaweedS3, mirror_factory: Callable[..., MirrorServer], http: httpx.Client, *,
                 seed: int, size: int, first: int) -> StartedPush:
    """A mirror on a new bucket of *seaweedfs*, and an upload of *size* random bytes whose *first* came in."""
    bucket = Bucket(seaweedfs, seaweedfs.new_bucket())
    data = random.Random(seed).randbytes(size)
    mirror = mirror_factory(env=bucket.env())
    location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
    assert http.patch(mirror.url + location, content=data[:first]).status_code == 202
    return StartedPush(bucket, mirror, data, "sha256:" + hashlib.sha256(data).hexdigest(), location)


@pytest.mark.slow
def test_chunks_that_arrive_while_the_bucket_is_down_are_kept_and_their_parts_sent_later(
    own_seaweedfs: SeaweedS3, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    push = started_push(own_seaweedfs, mirror_factory, http, seed=17, size=12 * MIB, first=3 * MIB)
    bucket, mirror, data, digest, location = push.bucket, push.mirror, push.data, push.digest, push.location

    own_seaweedfs.stop()
    down = http.patch(mirror.url + location, content=data[3 * MIB:11 * MIB])
    assert (down.status_code, down.headers["range"]) == (202, f"0-{11 * MIB - 1}"), down.text
    own_seaweedfs.start()
    assert bucket.uploads() == [], "nothing went up while the bucket was down"

    done = http.put(f"{mirror.url}{location}?digest={digest}", content=data[11 * MIB:])
    assert done.status_code == 201, done.text
    assert bucket.objects() == {digest: len(data)} and bucket.digest_of(digest) == digest
    assert bucket.uploads() == []
    assert get_digest(http, f"{mirror.url}/v2/team/app/blobs/{digest}")[:3] == (200, digest, len(data))


def abort_behind_the_mirrors_back(bucket: Bucket) -> None:
    """What a bucket lifecycle rule for incomplete multipart uploads does: abort every one."""
    for upload in bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []):
        bucket.client.abort_multipart_upload(Bucket=bucket.name, Key=upload["Key"], UploadId=upload["UploadId"])


def test_an_upload_whose_parts_the_bucket_dropped_is_lost_with_404_not_503_for_ever(
    bucket: Bucket, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """Its multipart upload aborted behind the mirror's back: the next chunk (or the final ``PUT``) answers
    ``404 BLOB_UPLOAD_UNKNOWN`` and the upload is discarded, record and file, so its client pushes the blob
    again; before, every chunk was kept "for later" (the spool growing) and every ``PUT`` answered 503."""
    data = os.urandom(12 * MIB)
    mirror = mirror_factory(env=push_env(bucket, postgres))
    for finish in (False, True):
        location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
        assert http.patch(mirror.url + location, content=data[:6 * MIB]).status_code == 202
        assert parts_sent(bucket) == [5 * MIB]
        abort_behind_the_mirrors_back(bucket)
        if finish:
            lost = http.put(f"{mirror.url}{location}?digest=sha256:{hashlib.sha256(data).hexdigest()}",
                            content=data[6 * MIB:])
        else:
            lost = http.patch(mirror.url + location, content=data[6 * MIB:])
        assert lost.status_code == 404 and lost.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN", lost.text
        assert "upload lost: the object store no longer holds the multipart upload" in lost.text
        gone = http.get(mirror.url + location)
        assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        assert [p.name for p in (mirror.data_dir / "uploads").iterdir()] == [] and bucket.uploads() == []
    checked = mirror_cli("fsck", "--data", mirror.data_dir, env=mirror.env)
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("clean"), checked.stdout + checked.stderr
    again = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/?digest=sha256:{hashlib.sha256(data).hexdigest()}",
                      content=data)
    assert again.status_code == 201, again.text


def test_a_cancel_during_a_chunk_waits_for_it_and_leaves_nothing_behind(
    bucket: Bucket, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """``DELETE`` of an upload while a ``PATCH`` streams into it: the cancel waits for the chunk, then
    discards everything (before, the ``PATCH`` failed with 500 and left its record and a multipart
    upload behind for good)."""
    mirror = mirror_factory(env=push_env(bucket, postgres))
    location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]

    def slowly() -> Iterator[bytes]:
        for _ in range(8):
            yield os.urandom(MIB)
            time.sleep(0.1)

    with httpx.Client(timeout=30, trust_env=False) as other, ThreadPoolExecutor(1) as pool:
        patched = pool.submit(other.patch, mirror.url + location, content=slowly())
        time.sleep(0.3)
        cancelled = http.delete(mirror.url + location)
        assert cancelled.status_code == 204, cancelled.text
        assert patched.result().status_code == 202, patched.result().text
    gone = http.get(mirror.url + location)
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads") is None
    assert [p.name for p in (mirror.data_dir / "uploads").iterdir()] == [] and bucket.uploads() == []
    checked = mirror_cli("fsck", "--data", mirror.data_dir, env=mirror.env)
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("clean"), checked.stdout + checked.stderr
    assert "Traceback" not in mirror.log_tail(300)


@pytest.mark.slow
def test_a_final_put_answered_503_is_taken_when_sent_again_as_it_was(
    own_seaweedfs: SeaweedS3, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """The bucket down during the final ``PUT`` (with the last bytes in its body): ``503`` with
    ``Retry-After``, and the upload as it was before that request, so the same request sent again
    once the bucket is back stores the blob (before, it answered 416: the bytes had been kept)."""
    push = started_push(own_seaweedfs, mirror_factory, http, seed=19, size=15 * MIB, first=12 * MIB)
    mirror, data, digest, location = push.mirror, push.data, push.digest, push.location
    own_seaweedfs.stop()
    final = {"url": f"{mirror.url}{location}?digest={digest}", "content": data[12 * MIB:],
             "headers": {"content-range": f"{12 * MIB}-{len(data) - 1}"}}
    down = http.put(**final)  # type: ignore[arg-type]
    assert down.status_code == 503 and "retry-after" in down.headers, down.text
    status = http.get(mirror.url + location)
    assert (status.status_code, status.headers["range"]) == (204, f"0-{12 * MIB - 1}")
    own_seaweedfs.start()
    done = http.put(**final)  # type: ignore[arg-type]
    assert done.status_code == 201, done.text
    assert get_digest(http, f"{mirror.url}/v2/team/app/blobs/{digest}")[:3] == (200, digest, len(data))


def test_a_blob_pushed_in_parts_is_handed_out_from_its_first_get(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """With ``redirect: true``, a blob this process stored is answered with its presigned URL at once,
    a large pushed one too (its object copied from the upload's: SeaweedFS gives that copy's ETag
    without the quotes a HEAD has, which made the first GET read it through)."""
    data = os.urandom(12 * MIB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REDIRECT="true"))
    location = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
    assert http.patch(mirror.url + location, content=data).status_code == 202
    assert http.put(f"{mirror.url}{location}?digest={digest}").status_code == 201
    first = http.get(f"{mirror.url}/v2/team/app/blobs/{digest}")
    assert first.status_code == 307, (first.status_code, first.headers.get("x-mirror-cache"))
    fetched = httpx.get(first.headers["location"], trust_env=False)
    assert hashlib.sha256(fetched.content).hexdigest() == digest.removeprefix("sha256:")
