"""Blob uploads that continue on any replica (``mirror/registry/roaming.py``): three replicas on one
SeaweedFS bucket and one PostgreSQL database, each request of one chunked upload sent to another
replica, one replica killed between two chunks, a wrong offset and a concurrent chunk refused, and
cancelled and expired uploads leaving nothing in the bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from mirror.storage.layout import ORPHAN_GRACE
from mirror.storage.s3binding import BINDING
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.registry import UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3
from tests.support.storecheck import mirror_cli
from tests.support.waiting import wait_for
from tests.test_cluster import SECRET, replica_env
from tests.test_cluster_fills import Cluster, start_replicas
from tests.test_s3_serve import ROOT, Bucket, get_digest, parts_sent

pytestmark = pytest.mark.slow
MIB = 1 << 20
PART = 5 * MIB  # the parts of tests.test_s3_serve.Bucket.env


@pytest.fixture
def cluster(seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, tmp_path: Path) -> Cluster:
    secret = tmp_path / "cluster-secret"
    secret.write_text(SECRET)
    return Cluster(Bucket(seaweedfs, s3_bucket), postgres.create_database(), secret)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60.0, trust_env=False) as client:
        yield client


def bucket_keys(cluster: Cluster) -> list[str]:
    bucket = cluster.bucket
    return [item["Key"] for page in bucket.client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name)
            for item in page.get("Contents", []) if item["Key"] != f"{ROOT}/{BINDING}"]


def parts_recorded(cluster: Cluster) -> int:
    """Parts the upload records in the index say were sent (of the one upload in progress)."""
    with psycopg.connect(cluster.dsn) as conn:
        row = conn.execute("SELECT coalesce(cardinality(etags), 0) FROM uploads").fetchone()
    return int(row[0]) if row else 0


def patch(http: httpx.Client, replica: MirrorServer, location: str, data: bytes, start: int) -> httpx.Response:
    return http.patch(replica.url + location, content=data,
                      headers={"content-range": f"{start}-{start + len(data) - 1}",
                               "content-type": "application/octet-stream"})


def test_a_chunked_upload_whose_every_request_goes_to_another_replica_is_stored_and_served_by_each(
    cluster: Cluster, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    replicas = start_replicas(cluster, 3, upstream.url, mirror_factory)
    sizes = [3 * MIB + 1, 7 * MIB + 123, 2 * MIB + 5, 6 * MIB + 77, MIB + 9]  # not whole parts; some above one
    data = random.Random(21).randbytes(sum(sizes) + 4321)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = http.post(f"{replicas[0].url}/v2/team/app/blobs/uploads/").headers["location"]
    uuid = location.rsplit("/", 1)[-1]
    start = 0
    for turn, size in enumerate(sizes, 1):
        replica = replicas[turn % 3]
        answer = patch(http, replica, location, data[start:start + size], start)
        start += size
        assert answer.status_code == 202, (turn, answer.text)
        assert answer.headers["range"] == f"0-{start - 1}", turn
        # Every replica knows where the upload is, and its tail beyond the parts is in the bucket.
        for each in replicas:
            status = http.get(each.url + location)
            assert (status.status_code, status.headers["range"]) == (204, f"0-{start - 1}")
        assert sum(parts_sent(cluster.bucket)) == start // PART * PART
        if start % PART:
            tail = cluster.bucket.client.get_object(Bucket=cluster.bucket.name, Key=f"{ROOT}/uploads/{uuid}/tail",
                                                    Range=f"bytes=0-{start % PART - 1}")["Body"].read()
            assert tail == data[start // PART * PART:start]

    # A chunk that does not start where the upload ends is refused on any replica, and changes nothing.
    wrong = patch(http, replicas[1], location, b"x" * 10, start - 5)
    assert wrong.status_code == 416 and wrong.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    assert wrong.headers["range"] == f"0-{start - 1}"

    done = http.put(f"{replicas[2].url}{location}?digest={digest}", content=data[start:],
                    headers={"content-range": f"{start}-{len(data) - 1}"})
    assert done.status_code == 201, done.text
    for replica in replicas:
        assert get_digest(http, f"{replica.url}/v2/team/app/blobs/{digest}")[:3] == (200, digest, len(data))
    assert cluster.bucket.objects() == {digest: len(data)} and cluster.bucket.uploads() == []
    assert bucket_keys(cluster) == [f"{ROOT}/blobs/sha256/{digest[7:9]}/{digest[7:]}"], "no tail left"
    gone = http.get(replicas[0].url + location)
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    routes = [(e["method"], e["status"]) for r in replicas for e in r.access_entries() if e.get("route") == "upload"]
    assert ("PUT", 201) in routes and routes.count(("PATCH", 202)) == len(sizes)


def test_an_upload_goes_on_on_another_replica_after_the_one_that_took_its_chunks_is_killed(
    cluster: Cluster, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    replicas = start_replicas(cluster, 3, upstream.url, mirror_factory)
    data = random.Random(22).randbytes(15 * MIB + 333)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = http.post(f"{replicas[0].url}/v2/team/app/blobs/uploads/").headers["location"]
    first = 6 * MIB + 17
    assert patch(http, replicas[0], location, data[:first], 0).status_code == 202
    assert patch(http, replicas[0], location, data[first:2 * first], first).status_code == 202
    replicas[0].kill9()  # its local file and running hash are gone with it: the bucket has the rest

    status = http.get(replicas[1].url + location)
    assert (status.status_code, status.headers["range"]) == (204, f"0-{2 * first - 1}")
    answer = patch(http, replicas[1], location, data[2 * first:-MIB], 2 * first)
    assert answer.status_code == 202 and answer.headers["range"] == f"0-{len(data) - MIB - 1}"
    done = http.put(f"{replicas[2].url}{location}?digest={digest}", content=data[-MIB:])
    assert done.status_code == 201, done.text
    for replica in replicas[1:]:
        assert get_digest(http, f"{replica.url}/v2/team/app/blobs/{digest}")[:3] == (200, digest, len(data))
    assert cluster.bucket.objects() == {digest: len(data)} and cluster.bucket.uploads() == []


def test_a_replica_killed_in_the_middle_of_a_chunk_leaves_the_upload_where_its_record_says(
    cluster: Cluster, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """The replica dies after a part of the chunk went to the bucket: another replica answers the
    offset recorded (the part: the tail kept before is in it), waits for the dead one's lease to
    expire, and the client goes on from there."""
    replicas = start_replicas(cluster, 2, upstream.url, mirror_factory, MIRROR_CLUSTER_LEASE_TTL="2s")
    data = random.Random(25).randbytes(13 * MIB + 99)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = http.post(f"{replicas[0].url}/v2/team/app/blobs/uploads/").headers["location"]
    head = 3 * MIB + 7  # a tail kept in the bucket before the chunk that is cut
    assert patch(http, replicas[1], location, data[:head], 0).status_code == 202
    chunk = data[head:12 * MIB]

    def slowly() -> Iterator[bytes]:
        for at in range(0, len(chunk), 512 * 1024):
            yield chunk[at:at + 512 * 1024]
            time.sleep(0.2)

    def doomed() -> None:
        with httpx.Client(timeout=60.0, trust_env=False) as own, contextlib.suppress(httpx.HTTPError):
            own.patch(replicas[0].url + location, content=slowly(),
                      headers={"content-range": f"{head}-{head + len(chunk) - 1}"})

    thread = threading.Thread(target=doomed)
    thread.start()
    try:
        wait_for(lambda: parts_recorded(cluster) == 1, timeout=30, what="the chunk's first part sent and recorded")
        replicas[0].kill9()
    finally:
        thread.join(60)
    status = http.get(replicas[1].url + location)
    assert (status.status_code, status.headers["range"]) == (204, f"0-{PART - 1}")
    answer = patch(http, replicas[1], location, data[PART:-MIB], PART)  # waits for the lease to expire
    assert answer.status_code == 202 and answer.headers["range"] == f"0-{len(data) - MIB - 1}"
    done = http.put(f"{replicas[1].url}{location}?digest={digest}", content=data[-MIB:])
    assert done.status_code == 201, done.text
    assert cluster.bucket.objects() == {digest: len(data)} and cluster.bucket.digest_of(digest) == digest


def test_a_chunk_sent_to_another_replica_while_one_is_written_waits_for_it_and_is_refused(
    cluster: Cluster, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """Two clients send the same chunk of one upload to two replicas at once: one is taken, the other
    waits for it, then finds the upload past its start (416); the upload is whole."""
    replicas = start_replicas(cluster, 2, upstream.url, mirror_factory)
    data = random.Random(23).randbytes(8 * MIB + 11)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = http.post(f"{replicas[0].url}/v2/team/app/blobs/uploads/").headers["location"]
    chunk = data[:6 * MIB]
    began = threading.Event()

    def slowly() -> Iterator[bytes]:
        for at in range(0, len(chunk), 256 * 1024):
            yield chunk[at:at + 256 * 1024]
            began.set()
            time.sleep(0.1)

    answers: dict[str, httpx.Response] = {}

    def slow_patch() -> None:
        with httpx.Client(timeout=60.0, trust_env=False) as own:
            answers["slow"] = own.patch(replicas[0].url + location, content=slowly(),
                                        headers={"content-range": f"0-{len(chunk) - 1}"})

    thread = threading.Thread(target=slow_patch)
    thread.start()
    try:
        assert began.wait(10)
        time.sleep(0.3)
        answers["fast"] = patch(http, replicas[1], location, chunk, 0)
    finally:
        thread.join(60)
    assert answers["slow"].status_code == 202, answers["slow"].text
    assert answers["fast"].status_code == 416 and answers["fast"].headers["range"] == f"0-{len(chunk) - 1}"
    assert answers["fast"].json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    done = http.put(f"{replicas[1].url}{location}?digest={digest}", content=data[len(chunk):])
    assert done.status_code == 201, done.text
    assert cluster.bucket.objects() == {digest: len(data)} and cluster.bucket.digest_of(digest) == digest


def test_a_cancelled_and_an_expired_upload_leave_neither_parts_nor_tail_in_the_bucket(
    cluster: Cluster, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    ttl = 3.0
    replicas = start_replicas(cluster, 2, upstream.url, mirror_factory, MIRROR_PUSH_UPLOAD_TTL=f"{ttl:g}s")
    cancelled = http.post(f"{replicas[0].url}/v2/team/app/blobs/uploads/").headers["location"]
    assert patch(http, replicas[0], cancelled, random.randbytes(7 * MIB), 0).status_code == 202
    assert len(cluster.bucket.uploads()) == 1 and len(bucket_keys(cluster)) == 1, "its parts and its tail"
    assert http.delete(replicas[1].url + cancelled).status_code == 204
    assert cluster.bucket.uploads() == [] and bucket_keys(cluster) == []
    assert http.get(replicas[0].url + cancelled).status_code == 404
    # The first replica's file of it (no record now) goes once it is older than a record takes to come.
    leftover = replicas[0].data_dir / "uploads" / cancelled.rsplit("/", 1)[-1]
    assert leftover.exists()
    os.utime(leftover, (time.time() - 120, time.time() - 120))
    wait_for(lambda: not leftover.exists(), timeout=ttl * 4, what="the file of an upload cancelled elsewhere removed")

    # Abandoned after a chunk on one replica and one on the other; the first replica is gone for good:
    # the other expires it by its record, parts and tail included.
    expired = http.post(f"{replicas[0].url}/v2/team/app/blobs/uploads/").headers["location"]
    assert patch(http, replicas[0], expired, random.randbytes(6 * MIB), 0).status_code == 202
    assert patch(http, replicas[1], expired, random.randbytes(MIB), 6 * MIB).status_code == 202
    replicas[0].kill9()
    assert len(cluster.bucket.uploads()) == 1 and len(bucket_keys(cluster)) == 1
    files = replicas[1].data_dir / "uploads"
    wait_for(lambda: cluster.bucket.uploads() == [] and bucket_keys(cluster) == [] and not any(files.iterdir()),
             timeout=ttl * 6, what="the abandoned upload's parts, tail and file removed by the running replica")
    gone = http.get(replicas[1].url + expired)
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


def test_fsck_on_a_replica_without_the_file_of_an_upload_in_progress_leaves_the_upload_alone(
    cluster: Cluster, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    replicas = start_replicas(cluster, 2, upstream.url, mirror_factory)
    data = random.Random(24).randbytes(6 * MIB + 5)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = http.post(f"{replicas[0].url}/v2/team/app/blobs/uploads/").headers["location"]
    assert patch(http, replicas[0], location, data[:-5], 0).status_code == 202
    fsck = mirror_cli("fsck", "--repair", "--data", replicas[1].data_dir,
                      env=replica_env(cluster.bucket, cluster.dsn, cluster.secret_file, replicas[1].port))
    assert fsck.returncode == 0 and "upload record" not in fsck.stdout, fsck.stdout + fsck.stderr
    assert len(cluster.bucket.uploads()) == 1
    done = http.put(f"{replicas[1].url}{location}?digest={digest}", content=data[-5:])
    assert done.status_code == 201, done.text
    assert cluster.bucket.objects() == {digest: len(data)}
    # The first replica's file of that upload, which ended on the other: no problem for fsck (the
    # server's sweep removes it), nor is anything else after an ordinary push.
    assert any(replicas[0].data_dir.joinpath("uploads").iterdir())
    fsck = mirror_cli("fsck", "--data", replicas[0].data_dir,
                      env=replica_env(cluster.bucket, cluster.dsn, cluster.secret_file, replicas[0].port))
    assert fsck.returncode == 0 and fsck.stdout.rstrip().endswith(": clean"), fsck.stdout + fsck.stderr


def test_a_tail_left_in_the_bucket_after_its_upload_ended_is_swept_and_found_by_fsck(
    cluster: Cluster, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A completed upload whose tail could not be deleted (the bucket did not answer the ``DELETE``)
    leaves ``uploads/<uuid>/tail`` behind, its record gone: fsck reports it, and the replicas' sweep
    removes it (a tail comes after its record, so none is coming for it)."""
    first = start_replicas(cluster, 1, upstream.url, mirror_factory)[0]
    first.stop()  # its data directory, for fsck
    uuid = "0123456789abcdef0123456789abcdef"
    key = f"{ROOT}/uploads/{uuid}/tail"
    cluster.bucket.client.put_object(Bucket=cluster.bucket.name, Key=key, Body=b"x" * 2048)
    found = mirror_cli("fsck", "--data", first.data_dir,
                       env=replica_env(cluster.bucket, cluster.dsn, cluster.secret_file, first.port))
    assert found.returncode != 0 and "upload tail without a record" in found.stdout and uuid in found.stdout, \
        found.stdout + found.stderr
    assert key in bucket_keys(cluster)  # reported, not removed, without --repair
    start_replicas(cluster, 2, upstream.url, mirror_factory, MIRROR_PUSH_UPLOAD_TTL="3s")
    wait_for(lambda: key not in bucket_keys(cluster), timeout=12, what="the tail left behind swept")


def test_an_upload_object_left_in_the_bucket_after_its_upload_ended_is_found_by_fsck_and_swept(
    cluster: Cluster, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A commit whose delete of the upload's completed object failed (or whose process was killed between
    the copy to the digest's key and that delete) leaves ``uploads/<uuid>/data`` behind, its record gone:
    once older than ``ORPHAN_GRACE`` fsck reports it (``--repair`` removes it) and the replicas' sweep
    removes it; a younger one, as a commit between its copy and its delete leaves, is left alone."""
    first = start_replicas(cluster, 1, upstream.url, mirror_factory)[0]
    first.stop()  # its data directory, for fsck
    env = replica_env(cluster.bucket, cluster.dsn, cluster.secret_file, first.port)

    def put(uuid: str) -> str:
        key = f"{ROOT}/uploads/{uuid}/data"
        cluster.bucket.client.put_object(Bucket=cluster.bucket.name, Key=key, Body=b"x" * 2048)
        return key

    stray = put("0123456789abcdef0123456789abcdef")
    time.sleep(ORPHAN_GRACE + 1)
    young = put("fedcba9876543210fedcba9876543210")
    found = mirror_cli("fsck", "--data", first.data_dir, env=env)
    assert found.returncode != 0 and "upload object without a record" in found.stdout, found.stdout + found.stderr
    assert "0123456789abcdef" in found.stdout and "fedcba9876543210" not in found.stdout, found.stdout
    assert {stray, young} <= set(bucket_keys(cluster))  # reported, not removed, without --repair
    mirror_cli("fsck", "--repair", "--data", first.data_dir, env=env)
    keys = bucket_keys(cluster)
    assert stray not in keys and young in keys, keys

    swept = put("00112233445566778899aabbccddeeff")
    time.sleep(ORPHAN_GRACE + 1)
    young = put("ffeeddccbbaa99887766554433221100")
    start_replicas(cluster, 2, upstream.url, mirror_factory, MIRROR_PUSH_UPLOAD_TTL="3s")
    wait_for(lambda: swept not in bucket_keys(cluster), timeout=12, what="the upload's object left behind swept")
    assert young in bucket_keys(cluster)


def test_every_replica_reports_the_uploads_in_progress_the_index_records(
    cluster: Cluster, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """Before, each replica counted the files of its own spool, among them those of uploads finished on
    another replica (kept until its sweep): a cluster with one upload in progress showed several, and
    each replica another figure."""
    first, second = start_replicas(cluster, 2, upstream.url, mirror_factory)
    for turn in range(3):  # two started and sent to the first replica, finished on the second; one left open
        data = random.Random(turn).randbytes(MIB + turn)
        location = http.post(f"{first.url}/v2/team/app/blobs/uploads/").headers["location"]
        assert patch(http, first, location, data[:MIB // 2], 0).status_code == 202
        if turn < 2:
            done = http.put(f"{second.url}{location}?digest=sha256:{hashlib.sha256(data).hexdigest()}",
                            content=data[MIB // 2:], headers={"content-range": f"{MIB // 2}-{len(data) - 1}"})
            assert done.status_code == 201, done.text
    with psycopg.connect(cluster.dsn) as conn:
        row = conn.execute("SELECT count(*) FROM uploads").fetchone()
    assert row is not None and row[0] == 1
    time.sleep(1.1)  # past the spool count kept between two scrapes
    for replica in (first, second):
        samples = scrape(f"{replica.url}/metrics")
        assert value(samples, "mirror_uploads_in_progress") == 1, replica.url
