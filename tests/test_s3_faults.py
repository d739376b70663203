"""The S3 driver when the bucket misbehaves: objects replaced or truncated behind the mirror's back.

A real SeaweedFS bucket, a real upstream registry and the real mirror; the tampering is done with
boto3 straight into the bucket, as someone with write access to it (or bit rot) would.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mirror.storage.s3 import ABORT_RETRY
from tests.support.catalog import StandardImages
from tests.support.client import push_blob, push_image
from tests.support.faults import FaultProxy
from tests.support.images import Layer, random_layer
from tests.support.lagging import lagging_relay
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3
from tests.support.storecheck import mirror_cli
from tests.support.waiting import wait_for
from tests.test_s3_serve import ROOT, Bucket, blob_url, get_digest, parts_sent, upstream_blob

MIB = 1 << 20


@pytest.fixture
def bucket(seaweedfs: SeaweedS3, s3_bucket: str) -> Bucket:
    return Bucket(seaweedfs, s3_bucket)


def key_of(digest: str) -> str:
    hex_ = digest.removeprefix("sha256:")
    return f"{ROOT}/blobs/sha256/{hex_[:2]}/{hex_}"


def tamper(bucket: Bucket, digest: str, body: bytes) -> None:
    """Replace the object stored as *digest* by *body*, as a writer to the bucket would."""
    bucket.client.put_object(Bucket=bucket.name, Key=key_of(digest), Body=body)
    assert bucket.digest_of(digest) != digest


def received(http: httpx.Client, url: str) -> tuple[int, str, int]:
    """``(status, digest, size)`` of what a client got; a transfer the mirror aborted raises."""
    status, digest, size, _ = get_digest(http, url)
    return status, digest, size


@pytest.mark.parametrize(("damage", "redirect"), [("replaced", False), ("truncated", False), ("replaced", True)])
def test_a_tampered_cached_blob_is_never_served_and_is_fetched_again(
    damage: str, redirect: bool, bucket: Bucket, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """With ``redirect: true`` too: a client is sent to the bucket only for an object whose ``ETag``
    this process saw with bytes that matched (it stored it, or read it whole); any other is served
    from here, hashed as it goes."""
    env = bucket.env(MIRROR_STORAGE_S3_REDIRECT="true") if redirect else bucket.env()
    mirror = mirror_factory(env=env)
    http = httpx.Client(timeout=60.0, trust_env=False, follow_redirects=True) if redirect else http
    layer = images.big.layers[1]  # 8 MiB: two parts
    url = blob_url(mirror, "library/big", layer.digest)
    upstream.clear_counts()
    assert received(http, url) == (200, layer.digest, layer.size)
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer in the bucket")
    wait_for(lambda: not list((mirror.data_dir / "tmp").iterdir()), what="the fill's local file to go")

    bad = os.urandom(layer.size) if damage == "replaced" else layer.path.read_bytes()[:layer.size // 2]
    tamper(bucket, layer.digest, bad)
    fsck = mirror_cli("fsck", "--verify-content", "--data", mirror.data_dir, env=env)
    assert fsck.returncode == 1 and f"corrupt object (content does not match its digest): {layer.digest}" in \
        fsck.stdout, fsck.stdout + fsck.stderr

    with pytest.raises(httpx.RemoteProtocolError):  # aborted before its last byte
        received(http, url)
    assert layer.digest not in bucket.objects(), "removed from the bucket"
    assert "does not match its digest" in mirror.log_tail(200)
    assert value(scrape(f"{mirror.url}/metrics"), "mirror_store_corrupt_objects_total") == 1

    assert received(http, url) == (200, layer.digest, layer.size), "fetched again from the upstream"
    assert upstream.count("GET", upstream_blob("library/big", layer.digest)) == 2
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer stored again")
    assert bucket.digest_of(layer.digest) == layer.digest
    assert received(http, url) == (200, layer.digest, layer.size)
    assert upstream.count("GET", upstream_blob("library/big", layer.digest)) == 2, "served from the bucket"
    assert mirror.log_tail(400).count("does not match its digest") == 1, "logged once"
    if redirect:
        assert httpx.get(url, trust_env=False).status_code == 307, "stored by this process: handed out"
        http.close()


def test_a_tampered_pushed_blob_becomes_unknown(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path,
) -> None:
    mirror = mirror_factory(env=bucket.env())
    layer = random_layer(tmp_path, 6 * MIB, seed=91)
    digest = layer.digest
    assert push_blob(http, mirror.url, "team/app", digest, layer.path)
    url = blob_url(mirror, "team/app", digest)
    assert received(http, url) == (200, digest, layer.size)

    tamper(bucket, digest, os.urandom(layer.size))
    with pytest.raises(httpx.RemoteProtocolError):
        received(http, url)
    gone = http.get(url)
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert http.head(url).status_code == 404
    assert bucket.objects() == {}


@pytest.fixture
def own_bucket(own_seaweedfs: SeaweedS3) -> Bucket:
    return Bucket(own_seaweedfs, own_seaweedfs.new_bucket())


@pytest.mark.slow
def test_the_object_store_stopped_and_started_again_while_the_mirror_runs(
    own_bucket: Bucket, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path,
) -> None:
    """Blobs the upstream has are streamed from it (verified, not stored) while the bucket is down;
    what only the bucket has (a pushed blob) answers ``503 UNAVAILABLE`` naming the object store."""
    bucket = own_bucket
    env = bucket.env()
    mirror = mirror_factory(env=env)
    image, other = images.small, images.big.layers[1]
    manifest_url = f"{mirror.url}/v2/library/small/manifests/1"
    assert http.get(manifest_url, headers={"accept": image.media_type}).status_code == 200
    stored = next(iter(d for d in image.blobs if d != image.digest))
    assert received(http, blob_url(mirror, "library/small", stored))[:2] == (200, stored)
    wait_for(lambda: stored in bucket.objects(), timeout=30, what="the blob in the bucket")
    pushed = random_layer(tmp_path, 4096, seed=151)
    assert push_blob(http, mirror.url, "team/app", pushed.digest, pushed.path)

    bucket.server.stop()
    # A stored blob (GET and HEAD), and a new fill (the HEAD of a blob not stored asks only the upstream).
    for url, digest, size in ((blob_url(mirror, "library/small", stored), stored, None),
                              (blob_url(mirror, "library/big", other.digest), other.digest, other.size)):
        assert size or http.head(url).status_code == 200, url  # (a HEAD where nothing was pulled: a pusher's)
        status, got, got_size, served = get_digest(http, url)
        assert (status, got, served) == (200, digest, "BYPASS") and got_size == (size or got_size), url
    for method in ("GET", "HEAD"):
        answer = http.request(method, blob_url(mirror, "team/app", pushed.digest))
        assert answer.status_code == 503, (method, answer.status_code, answer.text)
        if method == "GET":
            error = answer.json()["errors"][0]
            assert error["code"] == "UNAVAILABLE" and "object store" in error["message"], error
    ready = http.get(f"{mirror.url}/readyz")
    assert ready.status_code == 503 and bucket.name in ready.text and "does not answer" in ready.text, ready.text
    assert f"cannot connect to {bucket.server.endpoint} (Connection refused): check storage.s3.regionendpoint" \
        in ready.text, ready.text
    memo = http.get(manifest_url, headers={"accept": image.media_type})
    assert memo.status_code == 200 and memo.content == image.manifest, "answered from memory"
    assert "Traceback" not in mirror.log_tail(400)

    bucket.server.start()
    assert stored in bucket.objects(), "kept over the restart"
    assert http.get(f"{mirror.url}/readyz").status_code == 200
    assert received(http, blob_url(mirror, "library/small", stored))[:2] == (200, stored)
    assert received(http, blob_url(mirror, "library/big", other.digest)) == (200, other.digest, other.size)
    wait_for(lambda: other.digest in bucket.objects(), timeout=30, what="the new blob in the bucket")
    fsck = mirror_cli("fsck", "--verify-content", "--data", mirror.data_dir, env=env)
    assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr
    assert "Traceback" not in mirror.log_tail(800)


@pytest.mark.slow
def test_a_push_goes_on_after_the_object_store_restarts_and_its_presigned_url_takes_no_tampering(
    own_bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """The object store keeps an unfinished multipart upload across its restart, as a real one does: a
    chunked push whose first parts went up before the store stopped ends whole once it is back.  The
    store refuses the blob's presigned URL (``redirect: true``) with its signature or its key altered."""
    bucket = own_bucket
    data = random.Random(17).randbytes(12 * MIB + 321)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REDIRECT="true"))
    started = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/")
    location = httpx.URL(mirror.url).join(started.headers["location"])
    first = http.patch(location, content=data[:11 * MIB], headers={"content-range": f"0-{11 * MIB - 1}"})
    assert first.status_code == 202 and parts_sent(bucket) == [5 * MIB, 5 * MIB]

    bucket.server.stop()
    bucket.server.start()
    assert parts_sent(bucket) == [5 * MIB, 5 * MIB], "the store kept the unfinished upload's parts"
    done = http.put(location.copy_merge_params({"digest": digest}), content=data[11 * MIB:],
                    headers={"content-range": f"{11 * MIB}-{len(data) - 1}"})
    assert done.status_code == 201, done.text
    assert bucket.objects() == {digest: len(data)} and bucket.digest_of(digest) == digest
    assert bucket.uploads() == []

    moved = http.get(blob_url(mirror, "team/app", digest))
    assert moved.status_code == 307, moved.text
    presigned = httpx.URL(moved.headers["location"])
    assert get_digest(http, str(presigned))[:3] == (200, digest, len(data))
    signature = presigned.params["X-Amz-Signature"]
    forged = presigned.copy_set_param("X-Amz-Signature", ("0" if signature[0] != "0" else "1") + signature[1:])
    elsewhere = presigned.copy_with(path=presigned.path.replace(digest.removeprefix("sha256:")[-8:], "0" * 8))
    for url in (forged, elsewhere):
        refused = http.get(url)
        assert refused.status_code == 403 and data[:64] not in refused.content, (url, refused.status_code)


@pytest.mark.slow
def test_kill9_in_the_middle_of_a_push_then_the_retry_succeeds_and_no_upload_is_left(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path,
) -> None:
    env = bucket.env()
    mirror = mirror_factory(env=env)
    layer = random_layer(tmp_path, 96 * MIB, seed=93)  # twenty 5 MiB parts go up while the PUT comes in
    url = blob_url(mirror, "team/app", layer.digest)

    # Killed between PATCH chunks: the first part is in the bucket, at the upload's own key, and stays there
    # for the upload to go on after the restart.
    started = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/")
    assert started.status_code == 202
    location = httpx.URL(mirror.url).join(started.headers["location"])
    with layer.path.open("rb") as source:
        first = source.read(8 * MIB)
    patched = http.patch(location, content=first, headers={"content-range": f"0-{len(first) - 1}",
                                                           "content-type": "application/octet-stream"})
    assert patched.status_code == 202
    mirror.kill9()
    assert bucket.objects() == {} and bucket.uploads() == [f"{ROOT}/uploads/{location.path[-32:]}/data"]
    mirror.start()
    assert http.get(location).headers["range"] == f"0-{len(first) - 1}", "the upload goes on after the restart"

    # Killed while a monolithic PUT comes in, parts of it sent.
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=120.0, trust_env=False) as own:
        push = pool.submit(push_blob, own, mirror.url, "team/app", layer.digest, layer.path)
        wait_for(lambda: len(bucket.uploads()) == 2 and len(parts_sent(bucket)) >= 3, timeout=60, interval=0.02,
                 what="parts of the push in the bucket")
        mirror.kill9()
        with pytest.raises((httpx.TransportError, RuntimeError)):
            push.result()
    assert bucket.objects() == {} and len(bucket.uploads()) == 2, "the killed push's upload is left behind"

    mirror.start()
    assert [p.name for p in (mirror.data_dir / "tmp").iterdir()] == []
    assert push_blob(http, mirror.url, "team/app", layer.digest, layer.path), "the client's retry"
    assert received(http, url) == (200, layer.digest, layer.size)
    assert bucket.objects() == {layer.digest: layer.size} and bucket.uploads() != []
    assert bucket.digest_of(layer.digest) == layer.digest
    # The uploads left behind, cancelled (or expired: test_s3_push.py), take their parts with them.
    for left in (mirror.data_dir / "uploads").iterdir():
        assert http.delete(f"{mirror.url}/v2/team/app/blobs/uploads/{left.name}").status_code == 204
    assert bucket.uploads() == [] and bucket.objects() == {layer.digest: layer.size}
    mirror.stop()
    fsck = mirror_cli("fsck", "--verify-content", "--data", mirror.data_dir, env=env)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_tampered_manifest_is_never_answered(
    bucket: Bucket, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    mirror = mirror_factory(env=bucket.env())
    image = images.small
    pushed = f"{mirror.url}/v2/team/app/manifests/{image.digest}"
    cached = f"{mirror.url}/v2/library/small/manifests/{image.digest}"
    push_image(mirror.url, "team/app", "1", image, client=http)
    assert http.get(cached, headers={"accept": image.media_type}).content == image.manifest
    forged = image.manifest.replace(b'"schemaVersion":2,', b'"schemaVersion":3,')
    assert forged != image.manifest and len(forged) == len(image.manifest)
    tamper(bucket, image.digest, forged)
    mirror.restart()  # nothing answered from memory

    upstream.clear_counts()
    answer = http.get(cached, headers={"accept": image.media_type})
    assert answer.status_code == 200 and answer.content == image.manifest, "fetched again from the upstream"
    assert upstream.count("GET", f"/v2/library/small/manifests/{image.digest}") == 1
    assert bucket.digest_of(image.digest) == image.digest
    assert "does not match its digest" in mirror.log_tail(200)

    tamper(bucket, image.digest, forged)
    mirror.restart()
    unknown = http.get(pushed, headers={"accept": image.media_type})
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN", unknown.text


def stop_the_store_mid_fill(bucket: Bucket, fault_proxy: FaultProxy, mirror: MirrorServer, layer: Layer) -> None:
    """Stop the bucket's SeaweedFS once a slowed fill of *layer* sent two parts to it, with three
    clients following the fill; each of them still gets the whole blob."""
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=12 * MIB,
                    chunk_size=64 * 1024, delay=0.02)
    url = blob_url(mirror, "library/big", layer.digest)
    with ThreadPoolExecutor(3) as pool, httpx.Client(timeout=120.0, trust_env=False) as own:
        transfers = [pool.submit(received, own, url)]
        wait_for(lambda: len(parts_sent(bucket)) >= 2, timeout=20, what="parts of the fill in the bucket")
        transfers += [pool.submit(received, own, url) for _ in range(2)]
        time.sleep(0.5)  # they follow the fill
        bucket.server.stop()
        assert [each.result() for each in transfers] == [(200, layer.digest, layer.size)] * 3


@pytest.mark.slow
def test_a_fill_under_way_when_the_object_store_stops_is_served_from_the_upstream(
    own_bucket: Bucket, images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    bucket, layer = own_bucket, images.big.layers[2]  # 64 MiB
    mirror = mirror_factory(fault_proxy.url, env=bucket.env())
    stop_the_store_mid_fill(bucket, fault_proxy, mirror, layer)
    # The fill went on into its local file, unstored: its three clients had the upstream's one answer.
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 1
    assert "Traceback" not in mirror.log_tail(400)
    wait_for(lambda: not list((mirror.data_dir / "tmp").glob("*.partial")), timeout=10, what="the fill's file gone")

    bucket.server.start()
    # The fill's upload could not be aborted then: a mirror running on asks again every ABORT_RETRY
    # seconds, so that nothing is left in the bucket, nor for fsck (it reported the upload's note).
    # The note goes a moment after the abort (a loaded run saw it still there once the upload was gone).
    wait_for(lambda: bucket.uploads() == [] and not list((mirror.data_dir / "tmp").glob("*.meta-upload")),
             timeout=ABORT_RETRY * 3, what="the fill's upload aborted, and its note gone with it")
    assert layer.digest not in bucket.objects(), "nothing of the fill was stored"
    checked = mirror_cli("fsck", "--data", mirror.data_dir, env=bucket.env())
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("clean"), checked.stdout + checked.stderr
    mirror.restart()
    assert bucket.uploads() == []
    assert received(http, blob_url(mirror, "library/big", layer.digest)) == (200, layer.digest, layer.size)
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer stored once the store is back")
    assert bucket.digest_of(layer.digest) == layer.digest


@pytest.mark.slow
def test_a_client_asking_while_the_object_store_hangs_joins_the_fill_under_way(
    own_bucket: Bucket, images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """The bucket hangs (stopped, not down) during a slowed fill: a client asking for the blob then
    follows the fill without waiting for a look in the bucket, and both clients get the whole blob
    from the one upstream fetch, verified (unstored: the parts did not go up)."""
    bucket, layer = own_bucket, images.big.layers[2]  # 64 MiB
    mirror = mirror_factory(fault_proxy.url, env=bucket.env())
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=12 * MIB,
                    chunk_size=64 * 1024, delay=0.02)
    url = blob_url(mirror, "library/big", layer.digest)
    with ThreadPoolExecutor(2) as pool, httpx.Client(timeout=120.0, trust_env=False) as own:
        first = pool.submit(received, own, url)
        wait_for(lambda: len(parts_sent(bucket)) >= 2, timeout=20, what="parts of the fill in the bucket")
        bucket.server.proc.signal_group(signal.SIGSTOP)
        try:
            second = pool.submit(received, own, url)
            assert second.result() == first.result() == (200, layer.digest, layer.size)
        finally:
            bucket.server.proc.signal_group(signal.SIGCONT)
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 1
    assert "Traceback" not in mirror.log_tail(400)


def test_a_fills_upload_that_could_not_be_aborted_is_aborted_while_the_mirror_runs(
    own_bucket: Bucket, images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """The object store stops mid-fill: the fill's upload cannot be aborted then.  A mirror that runs on
    (no start-up sweep) aborts it once the store is back: when the blob is fetched again (its note,
    one name per digest, was written over and lost before) and when another upload starts."""
    bucket, layer = own_bucket, images.big.layers[2]  # 64 MiB
    mirror = mirror_factory(fault_proxy.url, env=bucket.env())
    # Another blob sent in parts (8 MiB), then the same blob again.
    for n, fetched in enumerate([images.big.layers[1], layer]):
        stop_the_store_mid_fill(bucket, fault_proxy, mirror, layer)
        bucket.server.start()
        assert bucket.uploads() in ([key_of(layer.digest)], []), "left by the fill (unless asked again already)"
        assert received(http, blob_url(mirror, "library/big", fetched.digest)) == (200, fetched.digest, fetched.size)
        wait_for(lambda digest=fetched.digest: digest in bucket.objects(), timeout=30, what="the blob stored")
        wait_for(lambda: bucket.uploads() == [] and not list((mirror.data_dir / "tmp").glob("*.meta-upload")),
                 timeout=30, what=f"the upload left to be aborted, and its note gone with it ({n})")
    assert "Traceback" not in mirror.log_tail(400)


def test_a_range_is_served_only_from_an_object_seen_whole_and_matching(
    bucket: Bucket, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    mirror = mirror_factory(env=bucket.env())
    layer = images.big.layers[1]
    data = layer.path.read_bytes()
    url = blob_url(mirror, "library/big", layer.digest)
    middle = {"range": f"bytes={5 * MIB - 10}-{5 * MIB + 89}"}
    assert received(http, url) == (200, layer.digest, layer.size)
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer in the bucket")
    mirror.restart()  # nothing seen yet by this process: the first range reads the object whole first
    part = http.get(url, headers=middle)
    assert part.status_code == 206 and part.content == data[5 * MIB - 10:5 * MIB + 90]

    tamper(bucket, layer.digest, os.urandom(layer.size))
    with pytest.raises(httpx.RemoteProtocolError):
        http.get(url, headers=middle)
    assert layer.digest not in bucket.objects()
    upstream.clear_counts()
    again = http.get(url, headers=middle)
    assert again.status_code == 206 and again.content == data[5 * MIB - 10:5 * MIB + 90]
    assert upstream.count("GET", upstream_blob("library/big", layer.digest)) == 1, "fetched again"


def test_a_blob_read_whole_then_rewritten_part_for_part_is_never_served_whole(
    bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A whole read of an object whose ``ETag`` a whole read vouched for is served unhashed: a
    rewrite of the key with other bytes in the same parts (same size, same part count, an ``ETag``
    of the same shape) must change that ``ETag``, and so be hashed and caught."""
    mirror = mirror_factory(env=bucket.env())
    layer = images.big.layers[1]  # 8 MiB: parts of 5 MiB and 3 MiB
    url = blob_url(mirror, "library/big", layer.digest)
    assert received(http, url) == (200, layer.digest, layer.size)
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer in the bucket")
    mirror.restart()  # vouched by nothing: the next whole read hashes the object, then vouches for it
    assert received(http, url) == (200, layer.digest, layer.size)
    assert received(http, url) == (200, layer.digest, layer.size)

    key, before = key_of(layer.digest), bucket.client.head_object(Bucket=bucket.name, Key=key_of(layer.digest))
    upload = bucket.client.create_multipart_upload(Bucket=bucket.name, Key=key)["UploadId"]
    parts = []
    for number, size in enumerate((5 * MIB, layer.size - 5 * MIB), 1):
        etag = bucket.client.upload_part(Bucket=bucket.name, Key=key, UploadId=upload, PartNumber=number,
                                         Body=os.urandom(size))["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    bucket.client.complete_multipart_upload(Bucket=bucket.name, Key=key, UploadId=upload,
                                            MultipartUpload={"Parts": parts})
    after = bucket.client.head_object(Bucket=bucket.name, Key=key)
    assert after["ContentLength"] == layer.size and after["ETag"].endswith('-2"') and before["ETag"].endswith('-2"')

    with pytest.raises(httpx.RemoteProtocolError):  # aborted before its last byte
        received(http, url)
    assert layer.digest not in bucket.objects(), "removed from the bucket"
    assert value(scrape(f"{mirror.url}/metrics"), "mirror_store_corrupt_objects_total") == 1


def test_a_slow_object_store_does_not_hold_up_other_requests_while_a_fill_starts(
    bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """Requests to the bucket run in worker threads, never on the event loop: with every request to
    the bucket 0.6 s late, a cold blob's fill starting does not delay an answer that needs no bucket."""
    endpoint = httpx.URL(bucket.server.endpoint)
    with lagging_relay((endpoint.host, endpoint.port or 80)) as relay:
        mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=relay.url))
        layer = images.small.layers[1]
        relay.delay = 0.6
        with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60.0, trust_env=False) as own:
            transfer = pool.submit(received, own, blob_url(mirror, "library/small", layer.digest))
            slowest, started = 0.0, time.monotonic()
            while not transfer.done() and time.monotonic() < started + 30:
                asked = time.monotonic()
                assert http.get(f"{mirror.url}/v2/").status_code == 200
                slowest = max(slowest, time.monotonic() - asked)
                time.sleep(0.02)
            assert transfer.result() == (200, layer.digest, layer.size)
        assert time.monotonic() - started > 1.2, "the bucket was slow"
        assert slowest < 0.3, f"an answer waited {slowest:.2f} s for the bucket"
