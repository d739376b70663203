"""``mirror serve`` on the S3 driver, end to end: a real SeaweedFS bucket, a real upstream registry,
the real mirror under uvicorn, real clients.

Blobs and manifests must be in the bucket under their digest keys, each complete and verified;
the data directory keeps only work in progress (``tmp/``, ``uploads/``), the locks and the diskcache
index.  Upstream counts prove what came from the bucket.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mirror.spec.manifest import MANIFEST_MEDIA_TYPES
from mirror.storage.s3binding import BINDING
from mirror.storage.s3fill import SEND_AFTER
from tests.support.catalog import StandardImages
from tests.support.client import pull_checked
from tests.support.faults import FaultProxy
from tests.support.images import build_image, random_layer, write_oci_layout
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.procs import free_port
from tests.support.registry import UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3
from tests.support.skopeo import everything, layout_blobs, skopeo_run
from tests.support.smallfs import read_only, tmpfs
from tests.support.storecheck import mirror_cli
from tests.support.waiting import wait_for

MIB = 1 << 20
ROOT = "registry"
#: What the data directory may hold on S3 (diskcache index, locks, the binding to the index).
LOCAL = {"tmp", "uploads", "index", "index.json", "gc.lock", "refused", "auth.key"}


class Bucket:
    """The test's bucket, as the mirror's S3 driver fills it (keys under ``registry/blobs/``)."""

    def __init__(self, server: SeaweedS3, name: str) -> None:
        self.server, self.name, self.client = server, name, server.client()

    def env(self, **extra: str) -> dict[str, str]:
        """The mirror's environment for this bucket (5 MiB parts: several per large layer)."""
        return {"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": self.name,
                "MIRROR_STORAGE_S3_REGIONENDPOINT": self.server.endpoint, "MIRROR_STORAGE_S3_FORCEPATHSTYLE": "true",
                "MIRROR_STORAGE_S3_ACCESSKEY": self.server.accesskey,
                "MIRROR_STORAGE_S3_SECRETKEY": self.server.secretkey, "MIRROR_STORAGE_S3_ROOTDIRECTORY": ROOT,
                "MIRROR_STORAGE_S3_CHUNKSIZE": "5MiB", "MIRROR_CACHE_MAX_SIZE": "0",
                "MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true", **extra}

    def objects(self) -> dict[str, int]:
        """``{digest: size}`` of every object stored (fails on a key that is neither a digest's nor
        the index's binding)."""
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            for item in page.get("Contents", []):
                if item["Key"] == f"{ROOT}/{BINDING}":  # which index the objects belong to
                    continue
                match = re.fullmatch(rf"{ROOT}/blobs/sha256/([0-9a-f]{{2}})/(\1[0-9a-f]{{62}})", item["Key"])
                assert match, f"unexpected key {item['Key']}"
                found[f"sha256:{match[2]}"] = int(item["Size"])
        return found

    def digest_of(self, digest: str) -> str:
        """The sha256 of the object stored as *digest*, read back from the bucket."""
        hex_ = digest.removeprefix("sha256:")
        body = self.client.get_object(Bucket=self.name, Key=f"{ROOT}/blobs/sha256/{hex_[:2]}/{hex_}")["Body"]
        hasher = hashlib.sha256()
        while data := body.read(MIB):
            hasher.update(data)
        return "sha256:" + hasher.hexdigest()

    def uploads(self) -> list[str]:
        """Keys of multipart uploads not completed nor aborted."""
        return [u["Key"] for u in self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])]


@pytest.fixture
def bucket(seaweedfs: SeaweedS3, s3_bucket: str) -> Bucket:
    return Bucket(seaweedfs, s3_bucket)


def only_work_in_progress(data_dir: Path) -> None:
    """The data directory holds no object: nothing but :data:`LOCAL`, and no fill left in ``tmp/``."""
    assert {p.name for p in data_dir.iterdir()} <= LOCAL, sorted(p.name for p in data_dir.iterdir())
    assert not (data_dir / "blobs").exists()
    wait_for(lambda: [p.name for p in (data_dir / "tmp").iterdir()] == [], what="tmp/ to be empty")


def parts_sent(bucket: Bucket) -> list[int]:
    """Sizes of the parts of every unfinished multipart upload in *bucket*."""
    sizes = []
    for upload in bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []):
        try:
            answer = bucket.client.list_parts(Bucket=bucket.name, Key=upload["Key"], UploadId=upload["UploadId"])
        except bucket.client.exceptions.NoSuchUpload:
            continue  # completed or aborted in between
        sizes += [part["Size"] for part in answer.get("Parts", [])]
    return sizes


def blob_url(mirror: MirrorServer, name: str, digest: str) -> str:
    return f"{mirror.url}/v2/{name}/blobs/{digest}"


def upstream_blob(name: str, digest: str) -> re.Pattern[str]:
    return re.compile(rf"^/v2/{re.escape(name)}/blobs/{re.escape(digest)}$")


def get_digest(http: httpx.Client, url: str) -> tuple[int, str, int, str]:
    """``(status, digest of the body, its size, X-Mirror-Cache)`` of a streamed GET."""
    with http.stream("GET", url) as answer:
        hasher, size = hashlib.sha256(), 0
        for chunk in answer.iter_bytes(MIB):
            hasher.update(chunk)
            size += len(chunk)
        return answer.status_code, "sha256:" + hasher.hexdigest(), size, answer.headers.get("x-mirror-cache", "")


def test_concurrent_cold_clients_share_one_fetch_stored_once_in_the_bucket(
    bucket: Bucket, images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
) -> None:
    mirror = mirror_factory(workers=2, env=bucket.env())
    layer = images.big.layers[2]  # 64 MiB: thirteen 5 MiB parts
    assert layer.size >= 64 * MIB
    upstream.clear_counts()

    def pull(_: int) -> tuple[int, str, int, str]:
        with httpx.Client(timeout=120.0, trust_env=False) as http:
            return get_digest(http, blob_url(mirror, "library/big", layer.digest))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(pull, range(8)))
    assert {(status, digest, size) for status, digest, size, _ in results} == {(200, layer.digest, layer.size)}
    assert "MISS" in {outcome for *_, outcome in results}
    assert upstream.count("GET", upstream_blob("library/big", layer.digest)) == 1
    assert upstream.bytes_served(upstream_blob("library/big", layer.digest)) == layer.size
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer in the bucket")
    assert bucket.objects() == {layer.digest: layer.size}
    assert bucket.digest_of(layer.digest) == layer.digest
    assert bucket.uploads() == []
    wait_for(lambda: not list((mirror.data_dir / "tmp").iterdir()), what="the fill's local file to go")
    only_work_in_progress(mirror.data_dir)


def test_a_stored_blob_is_read_from_the_bucket_with_ranges_and_head(
    bucket: Bucket, images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    mirror = mirror_factory(env=bucket.env())
    layer = images.big.layers[1]  # 8 MiB: two parts
    data = layer.path.read_bytes()
    upstream.clear_counts()
    assert get_digest(http, blob_url(mirror, "library/big", layer.digest))[:3] == (200, layer.digest, layer.size)
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer in the bucket")
    wait_for(lambda: not list((mirror.data_dir / "tmp").iterdir()), what="the fill's local file to go")

    url = blob_url(mirror, "library/big", layer.digest)
    assert get_digest(http, url) == (200, layer.digest, layer.size, "HIT")
    start = 5 * MIB - 10  # across the first part's end
    part = http.get(url, headers={"range": f"bytes={start}-{start + 99}"})
    assert part.status_code == 206 and part.content == data[start:start + 100]
    assert part.headers["content-range"] == f"bytes {start}-{start + 99}/{layer.size}"
    tail = http.get(url, headers={"range": "bytes=-7"})
    assert tail.status_code == 206 and tail.content == data[-7:]
    beyond = http.get(url, headers={"range": f"bytes={layer.size}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{layer.size}"
    assert beyond.json()["errors"][0]["code"] == "RANGE_INVALID"
    head = http.head(url)
    assert (head.status_code, head.headers["content-length"], head.headers["x-mirror-cache"]) == (
        200, str(layer.size), "HIT")
    assert head.content == b""
    assert upstream.count("GET", upstream_blob("library/big", layer.digest)) == 1, "read from the bucket since"
    only_work_in_progress(mirror.data_dir)


def test_redirect_sends_clients_of_a_stored_blob_to_the_bucket(
    bucket: Bucket, images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REDIRECT="true"))
    layer = images.big.layers[0]
    url = blob_url(mirror, "library/big", layer.digest)
    upstream.clear_counts()
    assert get_digest(http, url) == (200, layer.digest, layer.size, "MISS"), "a fill is served from here"
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer in the bucket")
    moved = http.get(url)
    assert moved.status_code == 307 and moved.headers["docker-content-digest"] == layer.digest
    location = moved.headers["location"]
    assert location.startswith(f"{bucket.server.endpoint}/{bucket.name}/{ROOT}/blobs/sha256/")
    assert get_digest(http, location)[:3] == (200, layer.digest, layer.size)
    assert http.head(url).status_code == 200
    assert upstream.count("GET", upstream_blob("library/big", layer.digest)) == 1
    # Served from the store though sent by the bucket: the dashboards' saved bytes count it.
    samples = scrape(f"{mirror.url}/metrics")
    assert value(samples, "mirror_cache_served_bytes_total", kind="blob", outcome="hit") == layer.size


def test_a_blob_handed_out_by_a_redirect_keeps_its_image_from_an_eviction_until_the_client_fetched_it(
    bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """The client of a ``307`` fetches the object after the answer: a collector in another process
    (``mirror gc``) evicting the image in between would leave it a ``404`` from the bucket."""
    image, layer = images.small, images.small.layers[0]
    env = bucket.env(MIRROR_STORAGE_S3_REDIRECT="true")
    mirror = mirror_factory(env=env)
    assert pull_checked(http, mirror.url, "library/small", "1", image)[0] == "MISS"
    wait_for(lambda: set(bucket.objects()) == everything(image), timeout=30, what="the image in the bucket")
    idle = {**env, "MIRROR_CACHE_UNUSED_FOR": "1s", "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s"}
    time.sleep(1.5)

    moved = http.get(blob_url(mirror, "library/small", layer.digest))
    assert moved.status_code == 307, moved.text
    held = mirror_cli("gc", "--data", mirror.data_dir, env=idle)
    assert held.returncode == 0 and "0 images evicted" in held.stdout, held.stdout + held.stderr
    assert get_digest(http, moved.headers["location"])[:3] == (200, layer.digest, layer.size)
    assert set(bucket.objects()) == everything(image)
    assert [p.name for p in (mirror.data_dir / "tmp").iterdir()] != [], "the mark is held a while"


def test_a_collection_counts_an_object_a_redirect_holds_as_kept_not_freed(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """An unreferenced object the collector may not delete (a client was just sent to it) stays in
    the bucket and in the store's figure: the report and the usage count say so."""
    env = bucket.env(MIRROR_STORAGE_S3_REDIRECT="true", MIRROR_DELETE_ENABLED="true")
    mirror = mirror_factory(env=env)
    layer = os.urandom(100_000)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    assert http.post(f"{mirror.url}/v2/team/app/blobs/uploads/", params={"digest": digest},
                     content=layer).status_code == 201
    moved = http.get(blob_url(mirror, "team/app", digest))
    assert moved.status_code == 307, moved.text
    assert http.delete(blob_url(mirror, "team/app", digest)).status_code == 202  # unreferenced now
    done = mirror_cli("gc", "--data", mirror.data_dir, env={**env, "MIRROR_GC_GRACE": "0s"})
    assert done.returncode == 0 and "freed 0 objects, 0 B" in done.stdout, done.stdout + done.stderr
    assert "1 objects kept" in done.stdout and "-> 97.7 KiB" in done.stdout, done.stdout
    assert get_digest(http, moved.headers["location"])[:3] == (200, digest, len(layer))


def test_gc_on_a_host_whose_clock_runs_ahead_spares_a_blob_younger_than_the_grace_by_the_stores_clock(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """``gc.grace`` is measured on the clock that dates the objects, the object store's: ``mirror gc``
    on a host 10 minutes ahead, with a grace of 5, leaves a layer pushed just now (its manifest to come)."""
    env = bucket.env()
    mirror = mirror_factory(env=env)
    layer = os.urandom(100_000)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    assert http.post(f"{mirror.url}/v2/team/app/blobs/uploads/", params={"digest": digest},
                     content=layer).status_code == 201
    ahead = {**env, "MIRROR_GC_GRACE": "5m", "SKEWED_CLOCK_SECONDS": "600"}
    done = mirror_cli("gc", "--data", mirror.data_dir, env=ahead, module="tests.support.skewed_clock")
    assert done.returncode == 0 and "freed 0 objects, 0 B" in done.stdout, done.stdout + done.stderr
    assert http.head(blob_url(mirror, "team/app", digest)).status_code == 200
    assert digest.removeprefix("sha256:") in " ".join(bucket.objects())


def test_parts_go_up_while_the_fill_grows(
    bucket: Bucket, images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    layer = images.big.layers[1]  # 8 MiB: the first 5 MiB part can go up while the rest trickles in
    mirror = mirror_factory(fault_proxy.url, env=bucket.env())
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=6 * MIB,
                    chunk_size=64 * 1024, delay=0.1)

    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60.0, trust_env=False) as http:
        transfer = pool.submit(get_digest, http, blob_url(mirror, "library/big", layer.digest))
        wait_for(lambda: parts_sent(bucket) == [5 * MIB], timeout=15, what="the first part in the bucket")
        assert not transfer.done() and bucket.objects() == {}, "sent while the upstream still sends"
        assert transfer.result()[:3] == (200, layer.digest, layer.size)
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer in the bucket")
    assert bucket.digest_of(layer.digest) == layer.digest and bucket.uploads() == []


def test_kill9_in_the_middle_of_a_fill_leaves_no_upload_after_the_restart(
    bucket: Bucket, images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    layer = images.big.layers[2]
    mirror = mirror_factory(fault_proxy.url, env=bucket.env())
    # 12 MiB at once (two parts go up), then a trickle: the mirror is killed long before the end.
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=12 * MIB,
                    chunk_size=64 * 1024, delay=0.05)
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60.0, trust_env=False) as own:
        transfer = pool.submit(get_digest, own, blob_url(mirror, "library/big", layer.digest))
        wait_for(lambda: bucket.uploads() != [] and parts_sent(bucket) == [5 * MIB, 5 * MIB], timeout=20,
                 what="parts in the bucket")
        mirror.kill9()
        with pytest.raises(httpx.TransportError):
            transfer.result()
    assert bucket.objects() == {} and len(bucket.uploads()) == 1, "the killed fill's upload is left behind"

    mirror.start()
    assert bucket.uploads() == [], "aborted by the start-up sweep"
    assert list((mirror.data_dir / "tmp").iterdir()) == []
    assert get_digest(http, blob_url(mirror, "library/big", layer.digest))[:3] == (200, layer.digest, layer.size)
    wait_for(lambda: set(bucket.objects()) == {layer.digest}, timeout=30, what="the layer in the bucket")
    assert bucket.uploads() == [] and bucket.digest_of(layer.digest) == layer.digest


def test_a_corrupt_upstream_body_leaves_nothing_in_the_bucket(
    bucket: Bucket, images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    layer = images.big.layers[1]  # 8 MiB: its first 5 MiB part is sent before the end shows the damage
    mirror = mirror_factory(fault_proxy.url, env=bucket.env())
    # The fill is older than SEND_AFTER when its first part is complete (so the part goes up), and
    # the body stops before the damage long enough for that part to be seen in the bucket.
    fault_proxy.add("corrupt", f"/blobs/{layer.digest}$", method="GET", times=1,
                    after_bytes=layer.size - 1000, flip_bytes=3, pause_first=SEND_AFTER + 0.5, pause=3.0)
    with ThreadPoolExecutor(1) as pool:
        transfer = pool.submit(get_digest, http, blob_url(mirror, "library/big", layer.digest))
        wait_for(lambda: parts_sent(bucket) == [5 * MIB], timeout=15, what="the first part in the bucket")
        with pytest.raises(httpx.RemoteProtocolError):
            transfer.result()
    wait_for(lambda: not list((mirror.data_dir / "tmp").iterdir()), what="the failed fill's local file to go")
    wait_for(lambda: bucket.uploads() == [], what="the multipart upload to be aborted")
    assert bucket.objects() == {}
    assert "aborting transfer" in mirror.log_tail(200)

    assert get_digest(http, blob_url(mirror, "library/big", layer.digest))[:3] == (200, layer.digest, layer.size)
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer in the bucket")
    assert bucket.digest_of(layer.digest) == layer.digest and bucket.uploads() == []
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 2


def test_a_blob_the_data_directory_cannot_spool_is_served_through_and_evicts_nothing(
    bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    small, layer = images.small, images.big.layers[2]  # 64 MiB, on a 32 MiB data directory
    mirror = mirror_factory(env=bucket.env(), start=False)
    with tmpfs(mirror.data_dir, 32):
        try:
            mirror.start()
            assert http.get(f"{mirror.url}/v2/library/small/manifests/1",
                            headers={"accept": small.media_type}).status_code == 200
            for digest in small.blobs:
                assert get_digest(http, blob_url(mirror, "library/small", digest))[:2] == (200, digest)
            wait_for(lambda: set(bucket.objects()) == everything(small), timeout=30, what="the small image stored")

            assert get_digest(http, blob_url(mirror, "library/big", layer.digest)) == (
                200, layer.digest, layer.size, "BYPASS")
            time.sleep(1.0)  # what a request for room would have set off
            assert set(bucket.objects()) == everything(small), "nothing stored, nothing evicted"
            assert bucket.uploads() == []
            assert [p.name for p in (mirror.data_dir / "tmp").iterdir()] == []
        finally:
            mirror.stop()


def test_readyz_says_when_the_bucket_does_not_answer(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    mirror = mirror_factory(env=bucket.env())
    assert http.get(f"{mirror.url}/readyz").status_code == 200
    bucket.client.delete_bucket(Bucket=bucket.name)
    try:
        gone = http.get(f"{mirror.url}/readyz")
        assert gone.status_code == 503 and bucket.name in gone.text, gone.text
    finally:
        bucket.client.create_bucket(Bucket=bucket.name)
    assert http.get(f"{mirror.url}/readyz").status_code == 200


def test_readyz_says_when_the_data_directory_takes_no_writes(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    mirror = mirror_factory(env=bucket.env())
    assert http.get(f"{mirror.url}/readyz").status_code == 200
    with read_only(mirror.data_dir):
        refused = http.get(f"{mirror.url}/readyz")
        assert refused.status_code == 503 and "read-only" in refused.text, refused.text
    assert http.get(f"{mirror.url}/readyz").status_code == 200


def test_a_data_directory_that_takes_no_writes_still_pulls_images_through_into_the_bucket(
    bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """The local data directory goes read-only (a remount after an I/O error) while the bucket takes
    writes.  Before, every manifest pulled through answered 500: the lock a write of a reachable object
    holds (``DATA/gc.lock``) could not be opened for writing.  Now the write goes on without it where
    none can be had (nor can a collector run there), and blobs come through unstored as before."""
    mirror = mirror_factory(env=bucket.env())
    with read_only(mirror.data_dir):
        outcomes = pull_checked(http, mirror.url, "library/small", "1", images.small)
        assert outcomes[0] in {"MISS", "BYPASS"} and set(outcomes[1:]) <= {"MISS", "BYPASS"}, outcomes
        again = http.get(f"{mirror.url}/v2/library/small/manifests/1",
                         headers={"accept": ", ".join(MANIFEST_MEDIA_TYPES)})
        assert again.status_code == 200 and again.content == images.small.manifest, again.text
    assert pull_checked(http, mirror.url, "library/small", "1", images.small)[0] in {"MISS", "HIT"}
    mirror.stop()
    checked = mirror_cli("fsck", "--data", mirror.data_dir, env=bucket.env(), timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_serve_refuses_a_read_only_data_directory_naming_it_alone(bucket: Bucket, tmp_path: Path) -> None:
    """The bucket answers; the data directory is read-only: the one line names the directory, not the bucket
    too (before: "cannot use data directory X or storage.s3.bucket B", sending the operator to the bucket)."""
    data = tmp_path / "data"
    data.mkdir()
    with read_only(data):
        done = mirror_cli("serve", "--data", data, env=bucket.env(), timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(f"mirror: cannot use data directory {data}: "), done.stderr
    assert bucket.name not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr


def test_serve_refuses_a_bucket_it_cannot_reach(bucket: Bucket, tmp_path: Path) -> None:
    done = mirror_cli("serve", "--data", tmp_path / "data",
                      env=bucket.env(MIRROR_STORAGE_S3_SECRETKEY="not-the-secret"), timeout=60)
    assert done.returncode == 2 and bucket.name in done.stderr, done.stderr


def test_metrics_give_the_filesystem_of_the_data_directory_that_spools_fills_and_uploads(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """On S3 the local data directory's filesystem takes every fill and upload in progress (full, fills are
    served unstored and pushes refused): its size and room are exported, for the "filesystem nearly full"
    alert (deploy/prometheus/alerts.yml).  Before, only the filesystem driver exported them."""
    mirror = mirror_factory(env=bucket.env())
    samples = scrape(f"{mirror.url}/metrics")
    fs = os.statvfs(mirror.data_dir)
    assert value(samples, "mirror_store_filesystem_size_bytes") == fs.f_blocks * fs.f_frsize
    assert 0 < value(samples, "mirror_store_filesystem_avail_bytes") <= fs.f_blocks * fs.f_frsize


def test_every_command_says_in_one_line_that_the_s3_driver_needs_the_s3_extra(bucket: Bucket, tmp_path: Path) -> None:
    """A mirror installed without its s3 extra (no boto3), configured with ``storage.driver: s3``: each command
    exits 2 with one line naming the extra to install (before: a traceback of a failed import)."""
    hide = "import sys; sys.modules['boto3'] = sys.modules['botocore'] = None; from mirror.cli import main; "
    for command in (["serve", "--listen", f"127.0.0.1:{free_port()}"], ["gc"], ["fsck"]):
        args = [*command, "--data", str(tmp_path / "data")]
        done = subprocess.run([sys.executable, "-c", hide + f"sys.exit(main({args!r}))"], env={
            **os.environ, **bucket.env()}, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, (command, done.stdout + done.stderr)
        assert done.stderr.startswith("mirror: storage.driver s3 needs boto3, which is not installed") \
            and "pip install 'mirror[s3]'" in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_skopeo_pulls_through_the_bucket_and_a_restart_serves_from_it(
    skopeo: str, bucket: Bucket, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    image = images.big
    mirror = mirror_factory(env=bucket.env())
    skopeo_run(skopeo, "copy", "--preserve-digests", "--src-tls-verify=false",
               f"docker://{mirror.address}/library/big:1", f"oci:{tmp_path / 'first'}:out")
    assert layout_blobs(tmp_path / "first") == everything(image)
    wait_for(lambda: set(bucket.objects()) == everything(image), timeout=30, what="every object in the bucket")
    for digest, size in bucket.objects().items():
        assert bucket.digest_of(digest) == digest
        assert size == (len(image.manifest) if digest == image.digest else image.blobs[digest].stat().st_size)
    assert bucket.uploads() == []
    wait_for(lambda: not list((mirror.data_dir / "tmp").iterdir()), what="the fills' local files to go")
    only_work_in_progress(mirror.data_dir)

    mirror.restart()
    upstream.clear_counts()
    skopeo_run(skopeo, "copy", "--preserve-digests", "--src-tls-verify=false",
               f"docker://{mirror.address}/library/big@{image.digest}", f"oci:{tmp_path / 'again'}:out")
    assert layout_blobs(tmp_path / "again") == everything(image)
    assert upstream.count("GET", re.compile(r"/blobs/")) == 0, "every blob came from the bucket"


@pytest.mark.slow
def test_skopeo_pushes_to_the_bucket_and_pulls_by_tag_and_digest_with_postgres(
    skopeo: str, bucket: Bucket, postgres: PostgresServer, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    image = build_image(tmp_path / "img", [random_layer(tmp_path / "img", 12 * MIB, seed=71),
                                           random_layer(tmp_path / "img", 4096, seed=72)])
    env = bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=postgres.create_database())
    mirror = mirror_factory(workers=2, env=env)
    skopeo_run(skopeo, "copy", "--preserve-digests", "--dest-tls-verify=false",
               write_oci_layout(tmp_path / "source", image, "1"), f"docker://{mirror.address}/s3pushed/app:1")
    assert set(bucket.objects()) == everything(image)
    for digest in bucket.objects():
        assert bucket.digest_of(digest) == digest
    assert bucket.uploads() == []
    assert not (mirror.data_dir / "index").exists(), "the index is in PostgreSQL"
    assert [p.name for p in (mirror.data_dir / "uploads").iterdir()] == []
    only_work_in_progress(mirror.data_dir)

    # Mounted into another repository, by tag and by digest, and again after a restart.
    skopeo_run(skopeo, "copy", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
               f"docker://{mirror.address}/s3pushed/app:1", f"docker://{mirror.address}/s3pushed/copy:2")
    mirror.restart()
    for ref, out in (("s3pushed/app:1", "by-tag"), (f"s3pushed/copy@{image.digest}", "by-digest")):
        skopeo_run(skopeo, "copy", "--preserve-digests", "--src-tls-verify=false",
                   f"docker://{mirror.address}/{ref}", f"oci:{tmp_path / out}:out")
        assert layout_blobs(tmp_path / out) == everything(image)
        for digest, path in image.blobs.items():
            assert (tmp_path / out / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes() == \
                path.read_bytes()
    # Pushed repositories reach the upstream only with the question, before a first push, whether it
    # serves them (under names no other test asks the session's upstream for).
    asked = upstream.count("GET", re.compile(r"^/v2/s3pushed/(app|copy)/tags/list$"))
    assert upstream.count(None, "s3pushed/") == asked >= 2


def test_gc_evicts_and_deletes_from_the_bucket(
    bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    image = images.small
    env = bucket.env()
    mirror = mirror_factory(env=env)
    answer = http.get(f"{mirror.url}/v2/library/small/manifests/1",
                      headers={"accept": image.media_type})
    assert answer.status_code == 200
    for digest in image.blobs:
        assert get_digest(http, blob_url(mirror, "library/small", digest))[:2] == (200, digest)
    wait_for(lambda: set(bucket.objects()) == everything(image), timeout=30, what="every object in the bucket")
    mirror.stop()

    idle = {**env, "MIRROR_CACHE_UNUSED_FOR": "1s", "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s"}
    dry = mirror_cli("gc", "--dry-run", "--data", mirror.data_dir, env=idle)
    assert dry.returncode == 0 and set(bucket.objects()) == everything(image), dry.stderr
    time.sleep(1.5)
    done = mirror_cli("gc", "--data", mirror.data_dir, env=idle)
    assert done.returncode == 0, done.stderr
    assert f"freed {len(everything(image))} objects" in done.stdout, done.stdout
    assert bucket.objects() == {}
    fsck = mirror_cli("fsck", "--data", mirror.data_dir, env=env)
    assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr


def test_eviction_over_the_budget_deletes_from_the_bucket(
    bucket: Bucket, tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    own = upstream_factory()
    images = [build_image(tmp_path / f"img{i}", [random_layer(tmp_path / f"img{i}", 6 * MIB, seed=80 + i)])
              for i in range(3)]
    for i, image in enumerate(images):
        own.push_image(f"library/img{i}", "1", image)
    # Room for two of the 6 MiB images, not three.
    mirror = mirror_factory(own.url, env=bucket.env(MIRROR_CACHE_MAX_SIZE=str(16 * MIB),
                                                    MIRROR_CACHE_KEEP_RECENT="0.3s", MIRROR_GC_GRACE="1h"))
    for i, image in enumerate(images):
        assert pull_checked(http, mirror.url, f"library/img{i}", "1", image)[0] == "MISS"
        time.sleep(0.4)  # older than keep_recent: the earlier images become candidates
    wait_for(lambda: set(bucket.objects()) == everything(images[1]) | everything(images[2]), timeout=30,
             what="the least recently used image to leave the bucket")
    assert "evicting" in mirror.log_tail(400)
    own.clear_counts()
    assert pull_checked(http, mirror.url, "library/img2", "1", images[2])[0] == "HIT"
    assert own.count("GET", re.compile("/blobs/")) == 0
    assert pull_checked(http, mirror.url, "library/img0", "1", images[0])[0] == "MISS"


def test_export_from_one_bucket_and_preload_into_another(
    bucket: Bucket, seaweedfs: SeaweedS3, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path,
) -> None:
    image = images.small
    source = mirror_factory(env=bucket.env())
    assert pull_checked(http, source.url, "library/small", "1", image)[0] in ("MISS", "HIT")
    source.stop()
    upstream.clear_counts()
    bundle = tmp_path / "bundle.tar"
    out = mirror_cli("export", "--data", source.data_dir, "--upstream", upstream.url, "small:1", "-o", bundle,
                     env=bucket.env())
    assert out.returncode == 0, out.stderr
    assert upstream.count(None, "/v2/") == 0, "everything came from the bucket"

    other = Bucket(seaweedfs, seaweedfs.new_bucket())
    try:
        served = mirror_factory(env=other.env(), start=False)
        loaded = mirror_cli("preload", "--data", served.data_dir, bundle, env=other.env())
        assert loaded.returncode == 0, loaded.stderr
        assert set(other.objects()) == everything(image)
        only_work_in_progress(served.data_dir)
        served.start()
        assert pull_checked(http, served.url, "library/small", "1", image)[0] == "HIT"
        assert upstream.count("GET", re.compile("/blobs/")) == 0
        served.stop()
    finally:
        seaweedfs.drop_bucket(other.name)


def test_a_blob_served_from_the_bucket_keeps_its_image_from_an_eviction_in_another_process(
    bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    image, layer = images.big, images.big.layers[2]
    env = bucket.env()
    mirror = mirror_factory(env=env)
    assert pull_checked(http, mirror.url, "library/big", "1", image)[0] in ("MISS", "HIT")
    wait_for(lambda: set(bucket.objects()) == everything(image), timeout=30, what="the image in the bucket")
    idle = {**env, "MIRROR_CACHE_UNUSED_FOR": "1s", "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s"}
    time.sleep(1.5)

    with httpx.Client(timeout=60.0, trust_env=False) as slow, \
            slow.stream("GET", blob_url(mirror, "library/big", layer.digest)) as answer:
        assert answer.headers["x-mirror-cache"] == "HIT"
        pieces = answer.iter_bytes(MIB)
        hasher = hashlib.sha256(next(pieces))  # then the client stalls, the response half sent
        held = mirror_cli("gc", "--data", mirror.data_dir, env=idle)
        assert held.returncode == 0 and "0 images evicted" in held.stdout, held.stdout + held.stderr
        assert set(bucket.objects()) == everything(image), "the image being served stays"
        for data in pieces:
            hasher.update(data)
    assert "sha256:" + hasher.hexdigest() == layer.digest
    wait_for(lambda: not list((mirror.data_dir / "tmp").iterdir()), what="the reader's mark to go")
    done = mirror_cli("gc", "--data", mirror.data_dir, env=idle)
    assert done.returncode == 0 and "1 images evicted" in done.stdout, done.stdout + done.stderr
    assert bucket.objects() == {}


def test_a_blob_its_fill_still_sends_keeps_its_image_from_an_eviction_once_the_fill_ended(
    bucket: Bucket, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A client still reading the fill's local file when the fill ends (the object in the bucket): before,
    nothing marked the object as being read, and a collection deleted it from the bucket under that client
    (which still got every byte, from the file), so the next client fetched it from the upstream again."""
    image, layer = images.big, images.big.layers[2]
    env = bucket.env()
    mirror = mirror_factory(env=env)
    assert http.get(f"{mirror.url}/v2/library/big/manifests/1", headers={"accept": image.media_type}).status_code == 200
    idle = {**env, "MIRROR_CACHE_UNUSED_FOR": "1s", "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s"}

    with httpx.Client(timeout=60.0, trust_env=False) as slow, \
            slow.stream("GET", blob_url(mirror, "library/big", layer.digest)) as answer:
        assert answer.headers["x-mirror-cache"] == "MISS"
        pieces = answer.iter_bytes(MIB)
        hasher = hashlib.sha256(next(pieces))  # then the client stalls while the fill goes on to its end
        wait_for(lambda: layer.digest in bucket.objects(), timeout=60, what="the fill's object in the bucket")
        time.sleep(1.5)  # unused for MIRROR_CACHE_UNUSED_FOR
        held = mirror_cli("gc", "--data", mirror.data_dir, env=idle)
        assert held.returncode == 0 and "0 images evicted" in held.stdout, held.stdout + held.stderr
        assert layer.digest in bucket.objects(), "the blob being sent stays"
        for data in pieces:
            hasher.update(data)
    assert "sha256:" + hasher.hexdigest() == layer.digest
    wait_for(lambda: not list((mirror.data_dir / "tmp").glob("*.reading")), what="the reader's mark to go")
    done = mirror_cli("gc", "--data", mirror.data_dir, env=idle)
    assert done.returncode == 0 and "1 images evicted" in done.stdout, done.stdout + done.stderr
    assert layer.digest not in bucket.objects()


def test_an_index_that_does_not_hold_the_bucket_is_refused_and_deletes_nothing(
    bucket: Bucket, postgres: PostgresServer, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client, tmp_path: Path,
) -> None:
    """The bucket records the index its objects belong to.  Another index on it (a new database, a
    re-created one, a staging mirror pointed at production's bucket) would see every object as
    unreferenced, and its collector would delete them all: ``serve``, ``gc`` and ``fsck`` refuse it in
    one line (exit 2), and nothing is deleted; the index the objects belong to still opens."""
    image = images.small
    env = bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=postgres.create_database(),
                     MIRROR_GC_GRACE="0s", MIRROR_CACHE_UNUSED_FOR="1s", MIRROR_CACHE_KEEP_RECENT="0s")
    mirror = mirror_factory(env=env)
    manifest = http.get(f"{mirror.url}/v2/library/small/manifests/1", headers={"accept": image.media_type})
    assert manifest.status_code == 200
    for digest in image.blobs:
        assert get_digest(http, blob_url(mirror, "library/small", digest))[:2] == (200, digest)
    wait_for(lambda: set(bucket.objects()) == everything(image), timeout=30, what="every object in the bucket")
    mirror.stop()
    stored = bucket.objects()
    time.sleep(1.5)  # past unused_for and the grace: a collector of the wrong index would delete everything

    binding = f"{ROOT}/{BINDING}"
    recorded = bucket.client.get_object(Bucket=bucket.name, Key=binding)["Body"].read().decode().strip()
    second = postgres.create_database()
    other = {**env, "MIRROR_METADATA_POSTGRES_DSN": second}
    data = tmp_path / "second"
    serve = mirror_cli("serve", "--data", data, "--listen", f"127.0.0.1:{free_port()}", env=other, timeout=60)
    for done in (serve, mirror_cli("gc", "--data", data, env=other), mirror_cli("fsck", "--data", data, env=other)):
        line = done.stderr.strip()
        assert done.returncode == 2 and "\n" not in line, done.stdout + done.stderr
        assert f"S3 bucket {bucket.name!r} under {ROOT!r} holds the objects of another index (id {recorded}), " \
               f"not of PostgreSQL database '{second.split('dbname=')[1].split()[0]}'" in line, line
        assert "point this mirror at the database that holds their index" in line, line
    # A bucket filled before it recorded its index: an index that holds no manifest is refused too.
    bucket.client.delete_object(Bucket=bucket.name, Key=binding)
    done = mirror_cli("gc", "--data", data, env=other)
    assert done.returncode == 2 and f"under {ROOT!r} holds objects, and PostgreSQL database" in done.stderr \
        and "records none of them" in done.stderr, done.stderr
    local = {key: value for key, value in env.items() if not key.startswith("MIRROR_METADATA")}
    serve = mirror_cli("serve", "--data", tmp_path / "third", "--listen", f"127.0.0.1:{free_port()}", env=local,
                       timeout=60)
    assert serve.returncode == 2 and "diskcache (DATA/index/) records none of them" in serve.stderr, serve.stderr
    assert bucket.objects() == stored
    # The index the objects belong to opens (and records itself again), its collector sees them referenced.
    done = mirror_cli("gc", "--dry-run", "--data", mirror.data_dir, env={**env, "MIRROR_CACHE_UNUSED_FOR": "0s"})
    assert done.returncode == 0 and "would free 0 objects" in done.stdout, done.stdout + done.stderr
    assert bucket.client.get_object(Bucket=bucket.name, Key=binding)["Body"].read().decode().strip() == recorded
    assert bucket.objects() == stored


def test_a_registry2_store_under_the_same_root_is_named_at_start_up_and_left_alone(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A registry:2 configuration carried over names the bucket and rootdirectory distribution stored
    into: its images are not this mirror's (another layout), which says so rather than look empty."""
    legacy = f"{ROOT}/docker/registry/v2/repositories/team/app/_layers/sha256/{'a' * 64}/link"
    bucket.client.put_object(Bucket=bucket.name, Key=legacy, Body=b"sha256:" + b"a" * 64)
    mirror = mirror_factory(env=bucket.env())
    assert http.get(f"{mirror.url}/readyz").status_code == 200
    assert f"holds a registry:2 store under '{ROOT}/docker/registry/v2/'" in mirror.log_tail(100)
    checked = mirror_cli("fsck", "--repair", "--data", mirror.data_dir, env=bucket.env())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert bucket.client.head_object(Bucket=bucket.name, Key=legacy)["ContentLength"] == 71
