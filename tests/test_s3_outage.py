"""The S3 driver while its object store is down or hangs, on a real SeaweedFS: ``/metrics`` and
``/ui/cache`` still answer (``mirror_store_up 0``), ``mirror gc`` and ``mirror fsck`` stop with one
line, and a hung store (``SIGSTOP``: connections accepted, nothing answered) is reported within
seconds, not botocore's 60 s (``storage/s3client.py``: the clients' timeouts).

A test that stops or freezes SeaweedFS has one of its own; one that needs only some requests to go
unanswered puts a :class:`FaultProxy` between the mirror and the session's SeaweedFS.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mirror.spec.reference import parse_digest
from mirror.storage.driver import StoreUnavailable
from mirror.storage.s3 import S3Options, S3Store
from mirror.storage.s3breaker import TRIAL_EVERY
from mirror.storage.s3client import BODY_READ, PROBE, SEND, SMALL, TRANSFER
from mirror.storage.s3uploads import S3UploadTails
from tests.support.catalog import StandardImages
from tests.support.client import push_blob
from tests.support.faults import FaultProxy
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3
from tests.support.storecheck import mirror_cli
from tests.support.waiting import wait_for
from tests.test_s3_serve import Bucket, blob_url, get_digest, upstream_blob

#: Seconds a small request to a hung store may take: two attempts of SMALL's read timeout, and a margin.
BOUND = 2 * SMALL.read + 3.0


@pytest.fixture
def bucket(seaweedfs: SeaweedS3, s3_bucket: str) -> Bucket:
    return Bucket(seaweedfs, s3_bucket)


@pytest.fixture
def own_bucket(own_seaweedfs: SeaweedS3) -> Bucket:
    return Bucket(own_seaweedfs, own_seaweedfs.new_bucket())


@pytest.fixture
def s3_proxy(seaweedfs: SeaweedS3) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's SeaweedFS (it passes ``Host`` on: signatures hold)."""
    with FaultProxy(seaweedfs.endpoint) as proxy:
        yield proxy


def cached(mirror: MirrorServer, http: httpx.Client, images: StandardImages, bucket: Bucket) -> str:
    """Pull the small image's manifest and a blob through *mirror*, wait for the blob in the bucket;
    the blob's digest."""
    image = images.small
    url = f"{mirror.url}/v2/library/small/manifests/1"
    assert http.get(url, headers={"accept": image.media_type}).status_code == 200
    stored = next(d for d in image.blobs if d != image.digest)
    assert get_digest(http, blob_url(mirror, "library/small", stored))[:2] == (200, stored)
    wait_for(lambda: stored in bucket.objects() and image.digest in bucket.objects(), timeout=30,
             what="the image in the bucket")
    return stored


def names(samples: list[tuple[str, dict[str, str], float]]) -> set[str]:
    return {name for name, _, _ in samples}


@pytest.mark.slow
def test_metrics_and_the_cache_page_answer_while_the_object_store_is_down(
    own_bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    bucket = own_bucket
    mirror = mirror_factory(env=bucket.env())
    cached(mirror, http, images, bucket)
    up = scrape(f"{mirror.url}/metrics")
    assert value(up, "mirror_store_up") == 1 and value(up, "mirror_store_objects") == len(bucket.objects())

    bucket.server.stop()
    time.sleep(1.1)  # the last count is a second old at least: the next scrape lists the bucket again
    down = scrape(f"{mirror.url}/metrics")  # 200, or it fails
    assert value(down, "mirror_store_up") == 0 and value(down, "mirror_index_up") == 1
    assert "mirror_store_objects" not in names(down) and "mirror_uploads_in_progress" in names(down)
    page = http.get(f"{mirror.url}/ui/cache")
    assert page.status_code == 200, page.text
    assert "Not ready" in page.text and f"bucket &#39;{bucket.name}&#39; does not answer" in page.text, page.text
    assert "<dt>Objects</dt><dd>—</dd>" in page.text
    for path in ("/ui/r/library/small", f"/ui/r/library/small@{images.small.digest}"):  # they read manifests
        page = http.get(f"{mirror.url}{path}")
        assert page.status_code == 503 and page.headers["content-type"].startswith("text/html"), page.text
        assert "The object store holding this mirror's images cannot be read now" in page.text, page.text
        assert page.headers["retry-after"] == "10" and "Content-Security-Policy" in page.headers
    assert "Traceback" not in mirror.log_tail(400)

    bucket.server.start()
    time.sleep(1.1)
    again = scrape(f"{mirror.url}/metrics")
    assert value(again, "mirror_store_up") == 1 and value(again, "mirror_store_objects") == len(bucket.objects())


def test_a_bucket_that_stops_answering_is_down_in_the_metrics_at_once_though_its_listing_is_slow(
    bucket: Bucket, s3_proxy: FaultProxy, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """The objects are counted again only after 50 times the last listing took (a large bucket's listing
    takes minutes): ``mirror_store_up`` follows a look at one object at every scrape in between, so an
    alert on it fires with the bucket's outage, not at the next count."""
    mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=s3_proxy.url))
    cached(mirror, http, images, bucket)
    slow = s3_proxy.add("late", rf"^/{bucket.name}/?$", method="GET", delay=0.5)  # the LIST, not an object
    up = scrape(f"{mirror.url}/metrics")  # the first count, half a second long: the next in 25 s at least
    assert value(up, "mirror_store_up") == 1 and slow.hits == 1
    s3_proxy.remove(slow)
    s3_proxy.add("refuse", "")  # nothing answers
    try:
        down = scrape(f"{mirror.url}/metrics")
        assert value(down, "mirror_store_up") == 0 and "mirror_store_objects" not in names(down)
    finally:
        s3_proxy.clear_rules()
    wait_for(lambda: value(scrape(f"{mirror.url}/metrics"), "mirror_store_up") == 1, timeout=15,
             what="the store up again once it answers")


def test_gc_and_fsck_say_in_one_line_that_the_object_store_does_not_answer(
    bucket: Bucket, s3_proxy: FaultProxy, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """The store answers the data directory's opening (its binding to the index) and then no more:
    the listing of ``blobs/`` (every command), or the GET of an object (``--verify-content``)."""
    mirror = mirror_factory(env=bucket.env())
    stored = cached(mirror, http, images, bucket)
    env = bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=s3_proxy.url)
    listing = s3_proxy.add("refuse", rf"^/{bucket.name}/?$", method="GET")  # LIST, not the binding's GET
    for command in (["gc"], ["gc", "--dry-run"], ["fsck"], ["fsck", "--verify-content"]):
        done = mirror_cli(*command, "--data", mirror.data_dir, env=env)
        line = done.stderr.strip()
        assert done.returncode == 1, (command, done.returncode, done.stdout, done.stderr)
        assert "\n" not in line and line.startswith(f"mirror: {command[0]}: object store does not answer (LIST "), \
            (command, line)
    s3_proxy.remove(listing)
    s3_proxy.add("refuse", rf"^/{bucket.name}/.*/blobs/sha256/../{stored.removeprefix('sha256:')}$", method="GET")
    done = mirror_cli("fsck", "--verify-content", "--data", mirror.data_dir, env=env)
    line = done.stderr.strip()
    assert done.returncode == 1 and "\n" not in line, (done.returncode, done.stdout, done.stderr)
    assert line.startswith(f"mirror: fsck: object store does not answer (GET {stored})"), line
    s3_proxy.clear_rules()
    failing = s3_proxy.add("status", rf"^/{bucket.name}/?$", method="GET", status=500)  # a store stopping
    done = mirror_cli("gc", "--data", mirror.data_dir, env=env)
    line = done.stderr.strip()
    assert done.returncode == 1 and "\n" not in line, (done.returncode, done.stdout, done.stderr)
    assert line.startswith("mirror: gc: object store failed (LIST ") and "HTTP 500, a server error" in line, line
    s3_proxy.remove(failing)
    clean = mirror_cli("fsck", "--verify-content", "--data", mirror.data_dir, env=env)
    assert clean.returncode == 0 and "clean" in clean.stdout, clean.stdout + clean.stderr


def test_a_get_whose_answer_is_late_fails_within_seconds_and_a_slow_body_is_read_whole(
    seaweedfs: SeaweedS3, s3_bucket: str, s3_proxy: FaultProxy, tmp_path: Path,
) -> None:
    """The time to a GET's headers is a small request's (no 60 s wait for a store that hangs), the
    body's reads wait :data:`BODY_READ` each (a pause longer than a small request's read timeout is
    no reason to cut a stream)."""
    store = S3Store(S3Options(s3_bucket, seaweedfs.region, s3_proxy.url, "registry", seaweedfs.accesskey,
                              seaweedfs.secretkey, True), tmp_path)
    store.create()
    data = b"layer " * 20000
    digest = parse_digest(f"sha256:{hashlib.sha256(data).hexdigest()}")
    store.put_bytes(digest, data)

    with s3_proxy.fault("late", rf"/blobs/.*{digest.hex}$", method="GET", delay=30.0):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"object store does not answer \\(GET {digest}\\)"):
            store.open_stream(digest)
        assert time.monotonic() - started < BOUND

    assert SMALL.read + 1.0 < BODY_READ
    with s3_proxy.fault("slow", rf"/blobs/.*{digest.hex}$", method="GET", after_bytes=len(data) - 10,
                        chunk_size=10, delay=SMALL.read + 1.0):
        started = time.monotonic()
        with store.open_stream(digest) as body:
            assert body.read() == data
        assert time.monotonic() - started > SMALL.read + 1.0


@pytest.mark.slow
def test_a_put_the_store_does_not_answer_fails_within_the_sends_timeouts_not_three_minutes(
    seaweedfs: SeaweedS3, s3_bucket: str, s3_proxy: FaultProxy, tmp_path: Path,
) -> None:
    """A push upload's chunk kept in the bucket (a replica's upload tail) and a manifest are sent by a
    ``PutObject``, which a store answers once it has the last byte: one that does not answer is given
    up after :data:`SEND`'s timeouts (two reads of 20 s), no longer :data:`TRANSFER`'s (three of 60 s,
    what a completion or a copy may take), so the client's ``PATCH`` or ``PUT`` gets its ``503`` in
    well under a minute, and a put once the store answers again succeeds."""
    store = S3Store(S3Options(s3_bucket, seaweedfs.region, s3_proxy.url, "registry", seaweedfs.accesskey,
                              seaweedfs.secretkey, True), tmp_path)
    store.create()
    tails, chunk = S3UploadTails(store), tmp_path / "chunk"
    chunk.write_bytes(os.urandom(100_000))
    manifest = b'{"schemaVersion": 2}'
    digest = parse_digest(f"sha256:{hashlib.sha256(manifest).hexdigest()}")
    bound = SEND.attempts * (SEND.read + 1.0) + 5.0
    assert bound < TRANSFER.attempts * TRANSFER.read / 2

    def timed(call: Callable[[], object]) -> float:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="object store does not answer"):
            call()
        return time.monotonic() - started

    fd = os.open(chunk, os.O_RDONLY)
    try:
        with s3_proxy.fault("late", "", method="PUT", delay=TRANSFER.attempts * TRANSFER.read + 10), \
                ThreadPoolExecutor(2) as pool:
            tail = pool.submit(timed, lambda: tails.put("0" * 32, fd, 0, 100_000))
            whole = pool.submit(timed, lambda: store.put_bytes(digest, manifest))
            seconds = (tail.result(timeout=bound + 30), whole.result(timeout=bound + 30))
        assert all(SEND.read <= taken < bound for taken in seconds), seconds
        tails.put("0" * 32, fd, 0, 100_000)
    finally:
        os.close(fd)
    store.put_bytes(digest, manifest)
    assert store.read_bytes(digest) == manifest


@pytest.mark.slow
def test_a_hung_object_store_is_reported_within_seconds_and_the_mirror_recovers(
    own_bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    bucket = own_bucket
    mirror = mirror_factory(env=bucket.env())
    stored = cached(mirror, http, images, bucket)
    manifest = images.small.digest
    mirror.restart()  # no manifest in memory: a GET of one asks the bucket

    proc = bucket.server.proc
    proc.signal_group(signal.SIGSTOP)
    try:
        timed: dict[str, tuple[int, float]] = {}
        for what, method, url in (
                ("readyz", "GET", f"{mirror.url}/readyz"),
                ("metrics", "GET", f"{mirror.url}/metrics"),
                ("blob HEAD", "HEAD", blob_url(mirror, "library/small", stored)),
                ("blob GET", "GET", blob_url(mirror, "library/small", stored)),
                ("manifest GET", "GET", f"{mirror.url}/v2/library/small/manifests/{manifest}")):
            started = time.monotonic()
            answer = http.request(method, url, headers={"accept": images.small.media_type})
            timed[what] = (answer.status_code, round(time.monotonic() - started, 1))
            if what == "metrics":
                assert "\nmirror_store_up 0.0\n" in answer.text, answer.text
        assert timed["readyz"][0] == 503 and timed["metrics"][0] == 200, timed
        # The upstream's copies, verified, served unstored.
        assert timed["blob HEAD"][0] == timed["blob GET"][0] == timed["manifest GET"][0] == 200, timed
        assert all(seconds < BOUND for _, seconds in timed.values()), timed
        # The commands say it in one line (before, the breaker's warning came first).
        for command in ("gc", "fsck"):
            done = mirror_cli(command, "--data", mirror.data_dir, env=bucket.env(), timeout=120)
            line = done.stderr.strip()
            assert done.returncode == 1 and "\n" not in line, (command, done.returncode, done.stdout, done.stderr)
            assert line.startswith("mirror: object store does not answer (access to bucket"), line
    finally:
        proc.signal_group(signal.SIGCONT)

    wait_for(lambda: http.get(f"{mirror.url}/readyz").status_code == 200, timeout=30, what="ready again")
    assert get_digest(http, blob_url(mirror, "library/small", stored))[:2] == (200, stored)
    again = http.get(f"{mirror.url}/v2/library/small/manifests/{manifest}", headers={"accept": images.small.media_type})
    assert again.status_code == 200 and again.content == images.small.manifest
    assert "Traceback" not in mirror.log_tail(800)


@pytest.mark.slow
def test_once_a_request_to_a_hung_store_timed_out_the_next_ones_fail_at_once_and_it_is_used_again_once_back(
    own_bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
    tmp_path: Path,
) -> None:
    """Each request to a hung store waited out its timeouts (6 s for a look in it): a pull of three
    layers took half a minute to be served from the upstream.  Once one timed out and none got an answer
    since, requests fail at once (``storage/s3breaker.py``): blobs are streamed from the upstream
    without waiting, a pushed one answers 503 at once; a request let through every few seconds finds
    the store back, ``/readyz`` unasked."""
    bucket, image = own_bucket, images.small
    mirror = mirror_factory(env=bucket.env(), workers=1)
    stored = cached(mirror, http, images, bucket)
    own = tmp_path / "own"
    own.write_bytes(os.urandom(300_000))
    pushed = f"sha256:{hashlib.sha256(own.read_bytes()).hexdigest()}"
    assert push_blob(http, mirror.url, "team/own", pushed, own)
    mirror.restart()  # no manifest in memory: a GET of one asks the bucket
    proc = bucket.server.proc
    proc.signal_group(signal.SIGSTOP)
    try:
        seconds = []
        first = started = time.monotonic()
        answer = http.get(f"{mirror.url}/v2/library/small/manifests/{image.digest}",
                          headers={"accept": image.media_type})
        assert (answer.status_code, answer.content) == (200, image.manifest), answer.text
        seconds.append(round(time.monotonic() - started, 2))
        for digest, path in image.blobs.items():  # the config and two layers, one of them stored
            if digest != image.digest:
                started = time.monotonic()
                got = get_digest(http, blob_url(mirror, "library/small", digest))
                assert got == (200, digest, path.stat().st_size, "BYPASS"), got
                seconds.append(round(time.monotonic() - started, 2))
        started = time.monotonic()  # what only the bucket has: a clear 503, at once too
        refused = http.get(blob_url(mirror, "team/own", pushed))
        seconds.append(round(time.monotonic() - started, 2))
        unanswered = time.monotonic() - first  # since the first request that timed out was sent
        assert refused.status_code == 503 and refused.json()["errors"][0]["code"] == "UNAVAILABLE", refused.text
    finally:
        proc.signal_group(signal.SIGCONT)
    # The first waits out a look's timeouts, and the HEAD of the bucket made then; the others fail at once.
    assert len(seconds) == 5 and seconds[0] < BOUND + PROBE.read and all(taken < 1.0 for taken in seconds[1:]), seconds
    # Its log line says how long the store has not answered: since that first request was sent, not
    # since the HEAD of the bucket made once it had timed out (which said about 6 s too few).
    counted = re.search(rf"GET /v2/team/own/blobs/{pushed}: .* got an answer for (\d+) s", mirror.log_tail(400))
    assert counted is not None and unanswered - 1.5 <= int(counted[1]) <= unanswered + 0.5, (counted, unanswered)
    said = "does not answer (a request timed out, and neither another one nor a HEAD of the bucket"
    assert said in mirror.log_tail(400)
    url, size = blob_url(mirror, "library/small", stored), image.blobs[stored].stat().st_size
    wait_for(lambda: get_digest(http, url) == (200, stored, size, "HIT"), timeout=TRIAL_EVERY + 2 * BOUND,
             what="the blob served from the store again", interval=0.25)
    assert "answers again, after" in mirror.log_tail(400)
    assert "Traceback" not in mirror.log_tail(800)


@pytest.mark.slow
def test_the_servers_own_collection_says_in_one_line_that_the_object_store_does_not_answer(
    bucket: Bucket, s3_proxy: FaultProxy, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """The upkeep's scheduled collection lists the bucket: with the listing refused, each run fails,
    with one warning line a minute naming the request (``/readyz`` and ``mirror_store_up`` say the
    rest), the failures are counted, and the next run after the store answers again succeeds and
    says so."""
    mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=s3_proxy.url, MIRROR_GC_INTERVAL="1s"))
    cached(mirror, http, images, bucket)
    listing = s3_proxy.add("refuse", rf"^/{bucket.name}/?$", method="GET")

    def failed() -> float:
        return value(scrape(f"{mirror.url}/metrics"), "mirror_gc_runs_total", result="failed")

    # Polled 4 times a second: each scrape is a line of the access log, the whole of which is read.
    wait_for(lambda: failed() >= 3, timeout=30, what="three failed collections", interval=0.25)
    log = mirror.log_tail(1_000_000)
    assert log.count("maintenance run failed: object store does not answer (LIST ") == 1, log  # once a minute
    assert "Traceback" not in log, log
    s3_proxy.remove(listing)

    def succeeded() -> float:
        return value(scrape(f"{mirror.url}/metrics"), "mirror_gc_runs_total", result="ok")

    # (A run under way when the listing came back may still fail: counted from the first success on.)
    wait_for(lambda: succeeded() >= 1, timeout=30, what="a collection that succeeds", interval=0.25)
    done = failed()
    wait_for(lambda: succeeded() >= 3, timeout=30, what="two more collections", interval=0.25)
    assert failed() == done
    assert "maintenance runs again, after " in mirror.log_tail(1_000_000)


@pytest.mark.slow
def test_an_upkeep_whose_first_count_of_the_store_fails_goes_on_and_counts_it_later(
    bucket: Bucket, s3_proxy: FaultProxy, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """A bucket that answers the start-up's check of its binding but not its listings: the start-up
    sweep of unfinished multipart uploads is left for the next start (one line, and the mirror
    serves), and the upkeep's count of the store's bytes is made on a later turn: the upkeep goes
    on flushing and collecting, and the count it records is the bucket's."""
    mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=s3_proxy.url, MIRROR_GC_INTERVAL="1s"))
    cached(mirror, http, images, bucket)  # and the bucket records its index: no listing at the next start
    mirror.stop()
    listing = s3_proxy.add("refuse", rf"^/{bucket.name}/?$", method="GET")
    mirror.start()
    wait_for(lambda: "counting the store failed: object store does not answer (LIST " in mirror.log_tail(400),
             timeout=30, what="the first count failing")
    assert "start-up sweep not finished: object store does not answer (listing unfinished multipart uploads)" \
        in mirror.log_tail(400)
    s3_proxy.remove(listing)
    wait_for(lambda: value(scrape(f"{mirror.url}/metrics"), "mirror_gc_runs_total", result="ok") >= 1,
             timeout=30, what="a collection")
    sizes = bucket.objects()
    wait_for(lambda: value(scrape(f"{mirror.url}/metrics"), "mirror_store_size_bytes") == sum(sizes.values()),
             timeout=30, what="the bucket's size counted")
    assert "Traceback" not in mirror.log_tail(800)


@pytest.mark.slow
def test_a_bucket_that_stops_taking_writes_serves_what_it_holds_and_readyz_says_so(
    own_bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """The bucket refuses writes (``AccessDenied``: a read-only policy; an account over its quota) but
    reads: stored blobs are served, cold manifests and blobs are served through unstored, a push gets
    ``507`` naming the bucket (a chunk that fills a part too: it was kept locally for a later refusal),
    and ``/readyz`` says the bucket takes no writes (as for a read-only data directory) until it takes them
    again, which it finds out by itself."""
    bucket = own_bucket
    mirror = mirror_factory(env=bucket.env())
    stored = cached(mirror, http, images, bucket)
    assert http.get(f"{mirror.url}/readyz").status_code == 200
    before = bucket.objects()
    bucket.server.take_writes(False)
    try:
        assert get_digest(http, blob_url(mirror, "library/small", stored))[:2] == (200, stored)
        big = images.big
        answer = http.get(f"{mirror.url}/v2/library/big/manifests/1", headers={"accept": big.media_type})
        assert answer.status_code == 200 and answer.content == big.manifest, answer.text
        cold = big.layers[0]
        assert get_digest(http, blob_url(mirror, "library/big", cold.digest))[:3] == (200, cold.digest, cold.size)
        data = os.urandom(4096)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        started = http.post(f"{mirror.url}/v2/own/app/blobs/uploads/")
        assert started.status_code == 202, started.text
        pushed = http.put(f"{mirror.url}{started.headers['location']}", params={"digest": digest}, content=data)
        assert pushed.status_code == 507 and pushed.json()["errors"][0]["code"] == "UNAVAILABLE", pushed.text
        assert "takes no writes (AccessDenied" in pushed.text and bucket.name in pushed.text, pushed.text
        ready = http.get(f"{mirror.url}/readyz")
        assert ready.status_code == 503 and "takes no writes (AccessDenied" in ready.json()["problems"]["store"], \
            ready.text
        assert "refused the credentials" not in mirror.log_tail(200)  # the keys are right: it reads
        # A chunk that fills a part: refused at once, not kept in the data directory for a later PUT's 507.
        chunked = http.post(f"{mirror.url}/v2/own/chunked/blobs/uploads/").headers["location"]
        layer = os.urandom(6 << 20)
        refused = http.patch(mirror.url + chunked, content=layer)
        assert refused.status_code == 507 and "takes no writes (AccessDenied" in refused.text, refused.text
        assert http.get(mirror.url + chunked).headers["range"] == "0-0"  # the upload as it was
    finally:
        bucket.server.take_writes(True)
    assert bucket.objects() == before  # nothing was lost or added
    wait_for(lambda: http.get(f"{mirror.url}/readyz").status_code == 200, timeout=30, what="ready again")
    assert http.patch(mirror.url + chunked, content=layer).status_code == 202
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    assert http.put(mirror.url + chunked, params={"digest": layer_digest}).status_code == 201
    assert get_digest(http, blob_url(mirror, "library/big", cold.digest))[:3] == (200, cold.digest, cold.size)
    wait_for(lambda: cold.digest in bucket.objects(), timeout=30, what="the cold layer stored at last")
    checked = mirror_cli("fsck", "--data", mirror.data_dir, env=bucket.env(), timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_cached_tags_and_digests_are_served_while_the_bucket_does_not_answer(
    bucket: Bucket, s3_proxy: FaultProxy, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """A tag past ``cache.tag_ttl`` is revalidated and its manifest read from the store: with the bucket
    down that read failed, and the pull with it (503), for an image its client already had (dockerd
    then asks Docker Hub itself).  The upstream's copy is served instead, verified and unstored, in
    every worker; by digest too."""
    env = bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=s3_proxy.url, MIRROR_CACHE_TAG_TTL="1s")
    mirror = mirror_factory(env=env, workers=2)
    image = images.small
    cached(mirror, http, images, bucket)
    s3_proxy.add("refuse", "")  # nothing answers
    try:
        time.sleep(1.2)  # the tag is to be revalidated
        for _ in range(6):  # (two workers: one of them has never read the manifest)
            for reference in ("1", image.digest):
                answer = http.get(f"{mirror.url}/v2/library/small/manifests/{reference}",
                                  headers={"accept": image.media_type})
                assert answer.status_code == 200 and answer.content == image.manifest, (reference, answer.text)
    finally:
        s3_proxy.clear_rules()
    assert "Traceback" not in mirror.log_tail(400)


def test_a_manifest_that_neither_the_bucket_nor_the_upstream_gives_is_answered_as_the_bucket_being_down(
    bucket: Bucket, s3_proxy: FaultProxy, fault_proxy: FaultProxy, images: StandardImages,
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A manifest the index records (a preloaded image, which its upstream may never have had) is asked
    of the upstream while the bucket does not answer.  Before, the upstream's answer stood: 404
    ``MANIFEST_UNKNOWN``, telling dockerd and kubelet the image does not exist, or 503 "no cached copy".
    Now it is the bucket's outage, 503 "object store unavailable", which a client retries."""
    mirror = mirror_factory(fault_proxy.url, env=bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=s3_proxy.url))
    image = images.small
    cached(mirror, http, images, bucket)
    mirror.restart()  # no manifest in memory
    s3_proxy.add("refuse", "")  # nothing answers
    try:
        for status in (404, 500):
            with fault_proxy.fault("status", "/manifests/", status=status):
                for reference in ("1", image.digest):
                    answer = http.get(f"{mirror.url}/v2/library/small/manifests/{reference}",
                                      headers={"accept": image.media_type})
                    assert answer.status_code == 503 and "object store unavailable" in answer.text, \
                        (status, reference, answer.text)
    finally:
        s3_proxy.clear_rules()
    answer = http.get(f"{mirror.url}/v2/library/small/manifests/1", headers={"accept": image.media_type})
    assert (answer.status_code, answer.content) == (200, image.manifest), answer.text


@pytest.mark.slow
def test_blobs_are_streamed_from_the_upstream_while_the_bucket_does_not_answer(
    bucket: Bucket, s3_proxy: FaultProxy, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """With the bucket down, a blob (cached or not) was answered 503 although the upstream had it,
    while its manifest was served: a pull failed on its layers.  The upstream's bytes are streamed
    through instead, verified and unstored (``bypass``); once the bucket answers, a blob is stored again."""
    mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=s3_proxy.url), workers=1)
    image = images.small
    stored = cached(mirror, http, images, bucket)
    uncached = next(d for d in image.blobs if d not in (image.digest, stored))
    s3_proxy.add("refuse", "")  # nothing answers
    try:
        for digest in (stored, uncached, stored):
            size = image.blobs[digest].stat().st_size
            head = http.head(blob_url(mirror, "library/small", digest))
            assert (head.status_code, head.headers.get("content-length")) == (200, str(size)), (digest, head.text)
            assert get_digest(http, blob_url(mirror, "library/small", digest)) == (200, digest, size, "BYPASS"), digest
    finally:
        s3_proxy.clear_rules()
    assert uncached not in bucket.objects()
    assert get_digest(http, blob_url(mirror, "library/small", uncached))[:2] == (200, uncached)
    wait_for(lambda: uncached in bucket.objects(), timeout=30, what="the blob in the bucket once it answers")
    assert "Traceback" not in mirror.log_tail(400)


def test_a_client_joining_a_fill_whose_store_was_found_down_is_answered_bypass_not_hit(
    bucket: Bucket, s3_proxy: FaultProxy, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """The bucket's HEADs go unanswered, and its PUTs are answered late: a fill started after its look found
    the store down is verified, then waits to store the blob.  A client of the same blob meanwhile joined
    that fill and was answered ``HIT`` (a fill verified is served as if stored) although the store had not
    answered and nothing was stored yet; it is ``BYPASS``, as for the fill's own client.  Once stored: ``HIT``."""
    mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=s3_proxy.url), workers=1)
    image = images.small
    cached(mirror, http, images, bucket)  # the manifest, and one blob
    blob = next(d for d in image.blobs if d not in bucket.objects())
    size = image.blobs[blob].stat().st_size
    url = blob_url(mirror, "library/small", blob)
    s3_proxy.add("refuse", "", method="HEAD")
    late = s3_proxy.add("late", "/blobs/sha256/", method="PUT", delay=6.0)
    try:
        assert get_digest(http, url) == (200, blob, size, "BYPASS")
        wait_for(lambda: late.hits == 1, timeout=5, what="the fill storing the blob")  # answered in 6 s
        assert get_digest(http, url) == (200, blob, size, "BYPASS")
    finally:
        s3_proxy.clear_rules()
    wait_for(lambda: blob in bucket.objects(), timeout=30, what="the blob stored once the bucket answered")
    assert get_digest(http, url) == (200, blob, size, "HIT")
    assert "Traceback" not in mirror.log_tail(400)


def test_concurrent_clients_share_one_upstream_fetch_while_the_bucket_does_not_answer(
    bucket: Bucket, s3_proxy: FaultProxy, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """While the bucket was down, every request for a blob streamed the upstream's bytes on its own: 8
    clients of one layer made 8 upstream downloads of it.  The store not answering is taken as the blob
    missing: the clients of both workers share one fetch, answered unstored (``BYPASS``, or as a fill
    joined for those that joined it), nothing in the bucket and no upload left open there."""
    mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=s3_proxy.url), workers=2)
    layer = images.big.layers[2]  # 64 MiB
    s3_proxy.add("refuse", "")  # nothing answers
    upstream.clear_counts()

    def pull(_: int) -> tuple[int, str, int, str]:
        with httpx.Client(timeout=120.0, trust_env=False) as http:
            return get_digest(http, blob_url(mirror, "library/big", layer.digest))

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(pull, range(8)))
    finally:
        s3_proxy.clear_rules()
    assert {result[:3] for result in results} == {(200, layer.digest, layer.size)}
    # Those that found the fill under way on their host joined it without asking the bucket (HIT: verified).
    assert "BYPASS" in {result[3] for result in results} <= {"BYPASS", "COALESCED", "HIT"}, results
    assert upstream.count("GET", upstream_blob("library/big", layer.digest)) == 1
    assert upstream.bytes_served(upstream_blob("library/big", layer.digest)) == layer.size
    assert bucket.objects() == {} and bucket.uploads() == []
    assert "Traceback" not in mirror.log_tail(400)


@pytest.mark.slow
def test_a_bucket_that_takes_no_writes_from_the_start_is_not_ready_before_a_write_fails(
    own_bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A read-only bucket (a policy that lets the key read only) was ``ready`` until a client's fill or push
    failed: a load balancer sent pushes to it.  The start tries a write (an upload started and aborted):
    ``/readyz`` says so at once, the log says it once for the server's workers, and nothing is left in the
    bucket; once the bucket takes writes, the mirror is ready by itself."""
    bucket = own_bucket
    mirror = mirror_factory(env=bucket.env(), workers=2)  # (a new bucket's first start writes its index-id)
    mirror.stop()
    before = bucket.objects()
    bucket.server.take_writes(False)
    try:
        mirror.start()
        this_start = lambda: mirror.log_tail(400).rsplit("--- starting:", 1)[-1]  # noqa: E731
        wait_for(lambda: this_start().count("Application startup complete") == 2, timeout=30,
                 what="both workers' start-up")
        for _ in range(4):  # whichever worker answers
            ready = http.get(f"{mirror.url}/readyz")
            assert ready.status_code == 503, ready.text
            assert "takes no writes (AccessDenied" in ready.json()["problems"]["store"], ready.text
        assert this_start().count("the store takes no writes at this start") == 1, this_start()
    finally:
        bucket.server.take_writes(True)
    wait_for(lambda: http.get(f"{mirror.url}/readyz").status_code == 200, timeout=30, what="ready again")
    assert bucket.objects() == before and bucket.uploads() == []
