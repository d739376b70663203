"""One collector at a time across hosts that share one PostgreSQL index and one bucket: a collector
of another host (another data directory) holds the index's ``collector`` lease, and this one waits
for it instead of sweeping at the same time; once the lease is given up, it runs.  And it spares what
the other replicas serve or fill, which they mark in the index."""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mirror.maintenance.collecting import LEASE
from mirror.metadata.postgres import PostgresMetadata
from tests.support.catalog import StandardImages
from tests.support.client import pull_checked
from tests.support.faults import FaultProxy
from tests.support.images import MANIFEST_MEDIA_TYPES, Image, build_image, random_layer
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.registry import UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3
from tests.support.storecheck import mirror_cli
from tests.support.waiting import eventually, wait_for
from tests.test_cluster_fills import MIB, Cluster, cluster, start_replicas  # noqa: F401 (cluster: a fixture)
from tests.test_s3_serve import ROOT, Bucket


def test_a_collector_waits_while_another_hosts_collector_holds_the_lease(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, images: StandardImages,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    dsn = postgres.create_database()
    bucket = Bucket(seaweedfs, s3_bucket)
    serving = bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=dsn)
    mirror, replica = mirror_factory(env=serving), mirror_factory(env=serving)
    replica.stop()  # another replica, with a data directory of its own
    with httpx.Client(timeout=30.0, trust_env=False) as http:
        pull_checked(http, mirror.url, "library/small", "1", images.small)
    wait_for(lambda: len(bucket.objects()) == 4, timeout=30, what="the image in the bucket")
    mirror.stop()
    stored = bucket.objects()

    index = PostgresMetadata(dsn)
    try:
        other = index.take_lease(LEASE, "other-host:4242", 120.0)  # a collector on another host, running
        assert other is not None
        # Another replica (its own data directory) collects with a budget that evicts everything.
        evicting = {**serving, "MIRROR_CACHE_MAX_SIZE": "1", "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s"}
        done: list[str] = []
        runner = threading.Thread(target=lambda: done.append(
            (lambda r: f"{r.returncode}:{r.stdout}{r.stderr}")(
                mirror_cli("gc", "--data", replica.data_dir, env=evicting))))
        runner.start()
        time.sleep(8)
        assert done == [], f"collected while another host's collector held the lease: {done}"
        assert bucket.objects() == stored
        current = index.current_lease(LEASE)
        assert current is not None and current.holder == "other-host:4242"

        assert index.release_lease(other)
        runner.join(60)
        assert done and done[0].startswith("0:"), done
        assert "4 objects" in done[0] and bucket.objects() == {}, done
        assert index.current_lease(LEASE) is None  # given up when it finished
        # Each collection forgets the leases released or expired an hour before (replicas leave one
        # row per blob filled and per upload), not those of a minute ago.
        for name, age in (("fill:sha256:old", 7200), ("upload:old", 3700), ("upload:recent", 60)):
            index._all("INSERT INTO leases VALUES (%s, 'gone', nextval('lease_tokens'),"
                       " extract(epoch from now()) - %s) RETURNING 1", (name, age))
        collected = mirror_cli("gc", "--data", replica.data_dir, env=evicting)
        assert collected.returncode == 0, collected.stderr
        assert {name for (name, _) in index._all("SELECT name, expires FROM leases")} == {LEASE, "upload:recent"}
    finally:
        index.close()


#: Seconds the clients pull each two images before they turn to the next two.
PHASE = 6.0


def slow_pull(http: httpx.Client, replica: MirrorServer, name: str, image: Image) -> None:
    """The manifest, then the config and the layer read slowly (64 KiB every 10 ms), every byte checked."""
    answer = http.get(f"{replica.url}/v2/{name}/manifests/1", headers={"accept": ", ".join(MANIFEST_MEDIA_TYPES)})
    assert answer.status_code == 200 and answer.content == image.manifest, (answer.status_code, answer.text[:200])
    for digest, size in ((image.config_digest, len(image.config)), *((lay.digest, lay.size) for lay in image.layers)):
        hasher, got = hashlib.sha256(), 0
        with http.stream("GET", f"{replica.url}/v2/{name}/blobs/{digest}") as blob:
            assert blob.status_code == 200, (digest, blob.status_code, blob.read()[:200])
            for chunk in blob.iter_bytes(64 << 10):
                hasher.update(chunk)
                got += len(chunk)
                time.sleep(0.01)
        assert (got, "sha256:" + hasher.hexdigest()) == (size, digest), f"{digest} from {replica.url}: {got} bytes"


@pytest.mark.slow
def test_eviction_and_gc_on_one_replica_while_pulls_run_on_two_others_fail_none_and_keep_the_budget(
    cluster: Cluster, seaweedfs: SeaweedS3, tmp_path: Path,  # noqa: F811 (cluster: the fixture)
    upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
) -> None:
    """Three replicas on one bucket and one database: clients pull from two while the third evicts and
    collects under a budget of two images of five, the clients moving on to the next two images every
    few seconds.  The two reach the bucket through a proxy that starts every GET half a second late, so
    the collector runs between their look-up of an object and its read.  It sees their transfers through
    their marks in the index: no pull fails or ends short, the images no longer pulled are evicted (and
    fetched again when their turn comes back), and once the pulls stop the bucket is within the budget."""
    own = upstream_factory()
    images = [build_image(tmp_path / f"img{i}", [random_layer(tmp_path / f"img{i}", 4 * MIB, seed=620 + i,
                                                              compressed=False)]) for i in range(5)]
    for i, image in enumerate(images):
        own.push_image(f"library/img{i}", "1", image)
    budget = 9 * MIB  # two of the five images
    late = FaultProxy(seaweedfs.endpoint).start()
    late.add("late", r"/blobs/sha256/", method="GET", delay=0.5)
    try:
        serving = start_replicas(cluster, 2, own.url, mirror_factory, MIRROR_STORAGE_S3_REGIONENDPOINT=late.url)
        collector = start_replicas(cluster, 1, own.url, mirror_factory, MIRROR_CACHE_MAX_SIZE=str(budget),
                                   MIRROR_CACHE_KEEP_RECENT="0s", MIRROR_GC_GRACE="0s", MIRROR_GC_INTERVAL="1s")[-1]
        stop = threading.Event()
        failures: list[str] = []
        pulls = [0]

        started = time.monotonic()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(timeout=60.0, trust_env=False) as http:
                while not stop.is_set():
                    turn = int((time.monotonic() - started) / PHASE)  # images turn and turn+1 now
                    i, replica = (turn + rng.randrange(2)) % len(images), serving[rng.randrange(2)]
                    try:
                        slow_pull(http, replica, f"library/img{i}", images[i])
                        pulls[0] += 1
                    except (AssertionError, httpx.HTTPError) as exc:
                        failures.append(f"img{i}: {exc!r}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(6 * PHASE)  # every image in turn, and the first two again
        stop.set()
        for thread in threads:
            thread.join(120)
    finally:
        late.stop()

    assert not failures, failures[:5]
    assert pulls[0] >= 30, pulls
    # The first two images were evicted once their turn passed: fetched again (config and layer) when it came back.
    fetched = own.count("GET", re.compile(r"^/v2/library/img\d/blobs/"))
    assert fetched >= 2 * len(images) + 4, f"the collector evicted no image out of use ({fetched} upstream fetches)"
    assert "in open transfers" in collector.log_path.read_text()  # what the others served held the store
    # The transfers over, their marks are withdrawn and the collector evicts down to the budget.
    assert eventually(lambda: not cluster.in_use(), timeout=30), cluster.in_use()
    assert eventually(lambda: sum(cluster.bucket.objects().values()) <= budget, timeout=30), cluster.bucket.objects()
    assert cluster.bucket.uploads() == []
    for digest in cluster.bucket.objects():
        try:
            assert cluster.bucket.digest_of(digest) == digest
        except cluster.bucket.client.exceptions.NoSuchKey:
            pass  # collected since the listing (the collector goes on): gone whole, never left wrong


def test_a_blob_collected_just_after_its_fill_is_filled_again_at_once_by_the_same_replica(
    cluster: Cluster, upstream_factory: Callable[[], UpstreamRegistry], tmp_path: Path,  # noqa: F811
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A replica's fill keeps its lease until the fill ended (its object stored).  When a collector
    deletes that object and a client asks for the blob again at once, the replica's new fill of the
    digest waits for that lease; the first fill's release must not wait for the second fill in turn
    (it once did, both waiting until the client gave up).  Ten rounds of fill, delete, fill again:
    every one answers in full, from one upstream fetch each."""
    own = upstream_factory()
    image = build_image(tmp_path / "img", [random_layer(tmp_path / "img", MIB, seed=640, compressed=False)])
    own.push_image("library/again", "1", image)
    layer = image.layers[0]
    replica = start_replicas(cluster, 1, own.url, mirror_factory)[0]
    hexdigest = layer.digest.removeprefix("sha256:")
    key = f"{ROOT}/blobs/sha256/{hexdigest[:2]}/{hexdigest}"
    with httpx.Client(timeout=30.0, trust_env=False) as http:
        for round_ in range(10):
            answer = http.get(f"{replica.url}/v2/library/again/blobs/{layer.digest}")
            assert answer.status_code == 200, (round_, answer.status_code, answer.text[:300])
            assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == layer.digest, round_
            wait_for(lambda: layer.digest in cluster.bucket.objects(), timeout=30, what="the object stored")
            cluster.bucket.client.delete_object(Bucket=cluster.bucket.name, Key=key)  # as a collector would
    assert own.count("GET", f"/v2/library/again/blobs/{layer.digest}") == 10


@pytest.mark.slow
def test_a_blob_a_replica_still_sends_from_its_fill_is_spared_by_another_replicas_collector(
    cluster: Cluster, upstream_factory: Callable[[], UpstreamRegistry], tmp_path: Path,  # noqa: F811
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A slow client of one replica reads the blob from that replica's fill file, which stays its
    source after the fill has stored the object and ended.  While it reads, the blob stays marked in
    the index: a collection on another replica, under a budget that evicts everything, keeps the
    image.  Before, the mark went with the fill, a second or two after the object was stored, and the
    other replica's collector evicted the image the client was still pulling."""
    own = upstream_factory()
    image = build_image(tmp_path / "img", [random_layer(tmp_path / "img", 32 * MIB, seed=650, compressed=False)])
    own.push_image("library/slow", "1", image)
    layer = image.layers[0]
    serving, other = start_replicas(cluster, 2, own.url, mirror_factory)
    evicting = {**other.env, "MIRROR_CACHE_MAX_SIZE": "1", "MIRROR_CACHE_KEEP_RECENT": "0s",
                "MIRROR_GC_GRACE": "0s"}
    got: list[tuple[int, str]] = []

    def slow_client() -> None:  # 32 MiB at about 1.6 MiB/s
        hasher, size = hashlib.sha256(), 0
        with httpx.Client(timeout=60.0, trust_env=False) as http, \
                http.stream("GET", f"{serving.url}/v2/library/slow/blobs/{layer.digest}") as blob:
            for chunk in blob.iter_bytes(64 << 10):
                hasher.update(chunk)
                size += len(chunk)
                time.sleep(0.04)
        got.append((size, "sha256:" + hasher.hexdigest()))

    with httpx.Client(timeout=30.0, trust_env=False) as http:
        answer = http.get(f"{serving.url}/v2/library/slow/manifests/1", headers={"accept": image.media_type})
        assert answer.status_code == 200
    reader = threading.Thread(target=slow_client)
    reader.start()
    try:
        wait_for(lambda: layer.digest in cluster.bucket.objects(), timeout=30, what="the layer stored")
        time.sleep(4)  # the fill ended, and its own mark would be withdrawn (inuse.LINGER)
        assert reader.is_alive(), "the client is still reading"
        assert layer.digest in cluster.in_use(), "the blob a client still reads is marked in the index"
        collected = mirror_cli("gc", "--data", other.data_dir, env=evicting)
        assert collected.returncode == 0, collected.stdout + collected.stderr
        assert layer.digest in cluster.bucket.objects(), collected.stdout
        assert reader.is_alive()
    finally:
        reader.join(60)
    assert got == [(layer.size, layer.digest)]
    assert eventually(lambda: layer.digest not in cluster.in_use(), timeout=30), cluster.in_use()
    collected = mirror_cli("gc", "--data", other.data_dir, env=evicting)
    assert collected.returncode == 0 and layer.digest not in cluster.bucket.objects(), collected.stdout
