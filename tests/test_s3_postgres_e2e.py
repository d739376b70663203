"""The end-to-end scenarios on S3 + PostgreSQL: objects in a real SeaweedFS bucket, the index in a real
PostgreSQL database, a real upstream registry, the real mirror under uvicorn, real clients (dockerd, skopeo).

The same scenarios run on the filesystem and diskcache in test_clients.py, test_gc.py and
test_push_clients.py; here each also checks the bucket (objects under their digests, no multipart upload
left) and the rows in PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.catalog import StandardImages
from tests.support.client import pull_checked
from tests.support.dockerd import Dockerd, pull, run
from tests.support.faults import FaultProxy
from tests.support.images import MANIFEST_MEDIA_TYPES, build_image, random_layer
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.registry import UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3
from tests.support.skopeo import everything, layout_blobs, skopeo_run
from tests.support.storecheck import mirror_cli
from tests.support.waiting import eventually, wait_for
from tests.test_push_clients import (
    LIBRARY,
    config_digest,
    copy_an_index_in_and_out,
    docker_push,
    layer_digests,
    local_manifest,
    upload_requests,
    uploaded_digests,
)
from tests.test_s3_serve import ROOT, Bucket

pytestmark = pytest.mark.slow
#: How the index names library/small of the default upstream (keys carry the registry's name).
HUB_SMALL = "docker.io/library/small"
MIB = 1 << 20


@dataclass
class Backends:
    """The bucket and the database of one test: ``env`` starts the mirror (or its CLI) on both."""

    bucket: Bucket
    dsn: str

    def env(self, **extra: str) -> dict[str, str]:
        return self.bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=self.dsn, **extra)

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(sql, params).fetchall()


@pytest.fixture
def backends(seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer) -> Backends:
    return Backends(Bucket(seaweedfs, s3_bucket), postgres.create_database())


def blob_path(name: str, digest: str) -> re.Pattern[str]:
    return re.compile(rf"^/v2/{re.escape(name)}/blobs/{re.escape(digest)}$")


def test_dockerd_pulls_and_runs_an_image_kept_in_the_bucket_and_indexed_in_postgres(
    backends: Backends, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer], dockerd_factory: Callable[..., Dockerd],
) -> None:
    small, bucket = images.small, backends.bucket
    mirror = mirror_factory(env=backends.env())
    daemon = dockerd_factory(registry_mirror=mirror.url)
    upstream.clear_counts()

    pull(daemon, "small:1")
    assert run(daemon, "small:1", "cat", "/etc/image-marker") == "small"
    assert daemon.docker("image", "inspect", "--format", "{{index .RepoDigests 0}}", "small:1").stdout.strip() \
        == f"small@{small.digest}"
    assert {d: upstream.count("GET", blob_path("library/small", d)) for d in small.blobs} \
        == dict.fromkeys(small.blobs, 1)

    # The objects in the bucket, each whole under its digest; nothing left half sent.
    wait_for(lambda: set(bucket.objects()) == everything(small), timeout=30, what="the image in the bucket")
    for digest in bucket.objects():
        assert bucket.digest_of(digest) == digest
    assert bucket.uploads() == []
    # The rows in PostgreSQL; no index in the data directory.
    assert backends.rows("SELECT repo, tag, digest FROM tags") == [(HUB_SMALL, "1", small.digest)]
    assert backends.rows("SELECT digest, size FROM manifests") == [(small.digest, small.size)]
    linked = {d for (d,) in backends.rows("SELECT digest FROM links WHERE repo = %s", HUB_SMALL)}
    assert set(small.blobs) <= linked
    assert not (mirror.data_dir / "index").exists()


def skopeo_pull(skopeo: str, mirror: MirrorServer, ref: str, layout: Path) -> set[str]:
    """``skopeo copy`` *ref* from the mirror into an OCI layout; the digests it holds (each checked)."""
    skopeo_run(skopeo, "copy", "--preserve-digests", "--src-tls-verify=false",
               f"docker://{mirror.address}/{ref}", f"oci:{layout}:out")
    return layout_blobs(layout)


def test_with_the_upstream_down_tags_and_digests_pulled_before_are_served_stale_and_after_a_restart(
    skopeo: str, backends: Backends, tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    own = upstream_factory()
    image = build_image(tmp_path / "img", [random_layer(tmp_path / "img", 12 * MIB, seed=501),  # three parts
                                           random_layer(tmp_path / "img", 4096, seed=502)])
    other = build_image(tmp_path / "other", [random_layer(tmp_path / "other", 4096, seed=503)])
    own.push_image("library/app", "1", image)
    own.push_image("library/app", "2", other)
    # A tag TTL of 0 asks the upstream about the tag on every pull: with the upstream gone, the STALE path.
    mirror = mirror_factory(own.url, env=backends.env(MIRROR_CACHE_TAG_TTL="0s", MIRROR_UPSTREAM_RETRIES="1",
                                                      MIRROR_UPSTREAM_CONNECT_TIMEOUT="1s"))
    assert skopeo_pull(skopeo, mirror, "app:1", tmp_path / "cold") == everything(image)
    wait_for(lambda: set(backends.bucket.objects()) == everything(image), timeout=30, what="the image stored")
    own.stop()

    def check_served(round_: str) -> None:
        assert skopeo_pull(skopeo, mirror, "app:1", tmp_path / f"{round_}-tag") == everything(image)
        assert skopeo_pull(skopeo, mirror, f"app@{image.digest}", tmp_path / f"{round_}-digest") == everything(image)
        by_tag = http.head(f"{mirror.url}/v2/library/app/manifests/1", headers={"accept": image.media_type})
        assert (by_tag.status_code, by_tag.headers["x-mirror-cache"], by_tag.headers["docker-content-digest"]) \
            == (200, "STALE", image.digest)
        by_digest = http.head(f"{mirror.url}/v2/library/app/manifests/{image.digest}",
                              headers={"accept": image.media_type})
        assert (by_digest.status_code, by_digest.headers["x-mirror-cache"]) == (200, "HIT")
        # What was never pulled cannot be served, and says why.
        unknown = http.get(f"{mirror.url}/v2/library/app/manifests/2", headers={"accept": other.media_type})
        assert unknown.status_code == 503 and unknown.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert subprocess.run([skopeo, "inspect", "--tls-verify=false", f"docker://{mirror.address}/app:2"],
                              capture_output=True, timeout=120, check=False).returncode != 0

    check_served("down")
    mirror.restart()  # start-up needs neither the upstream nor anything but the bucket and the database
    check_served("restarted")
    assert backends.bucket.uploads() == []


def test_eviction_and_gc_under_concurrent_pulls_fail_no_pull_and_end_under_budget(
    backends: Backends, tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    own, bucket = upstream_factory(), backends.bucket
    images = [build_image(tmp_path / f"img{i}", [random_layer(tmp_path / f"img{i}", 6 * MIB, seed=510 + i)])
              for i in range(6)]
    for i, image in enumerate(images):
        own.push_image(f"library/img{i}", "1", image)
    budget = 16 * MIB  # room for two of the six images
    collect = {"MIRROR_CACHE_MAX_SIZE": str(budget), "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s"}
    mirror = mirror_factory(own.url, workers=2, env=backends.env(**collect, MIRROR_GC_INTERVAL="0.5s"))
    stop = threading.Event()
    failures: list[str] = []
    pulls = [0]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60.0, trust_env=False) as http:
            while not stop.is_set():
                i = rng.randrange(len(images))
                try:
                    pull_checked(http, mirror.url, f"library/img{i}", "1", images[i])
                    pulls[0] += 1
                except (AssertionError, httpx.HTTPError) as exc:
                    failures.append(f"img{i}: {exc!r}")

    def collector() -> None:  # another process collects at the same time, coordinated through PostgreSQL
        while not stop.is_set():
            done = mirror_cli("gc", "--data", mirror.data_dir, env=backends.env(**collect))
            if done.returncode != 0:
                failures.append(f"gc: {done.stdout}{done.stderr}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)] + [threading.Thread(target=collector)]
    for thread in threads:
        thread.start()
    time.sleep(20)
    stop.set()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:5]
    assert pulls[0] >= 24, pulls
    fetched = own.count("GET", re.compile(r"^/v2/library/img\d/blobs/"))
    assert fetched > 2 * len(images), f"eviction made the upstream serve blobs again ({fetched} fetches)"

    assert eventually(lambda: sum(bucket.objects().values()) <= budget, timeout=30), bucket.objects()
    assert bucket.uploads() == []
    for digest in bucket.objects():  # the collector may still be deleting: one gone since the listing is fine
        with contextlib.suppress(bucket.client.exceptions.NoSuchKey):
            assert bucket.digest_of(digest) == digest
    mirror.stop()
    check = mirror_cli("fsck", "--data", mirror.data_dir, "--verify-content", env=backends.env())
    assert check.returncode == 0 and check.stdout.rstrip().endswith("clean"), check.stdout + check.stderr
    # What the index still names is served whole, from the bucket.
    mirror.start()
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        for i, image in enumerate(images):
            pull_checked(http, mirror.url, f"library/img{i}", "1", image)


def parts_of(bucket: Bucket, key: str) -> list[int]:
    """Sizes of the parts sent so far to the unfinished multipart uploads of *key*."""
    sizes = []
    for upload in bucket.client.list_multipart_uploads(Bucket=bucket.name, Prefix=key).get("Uploads", []):
        try:
            answer = bucket.client.list_parts(Bucket=bucket.name, Key=key, UploadId=upload["UploadId"])
        except bucket.client.exceptions.NoSuchUpload:
            continue  # completed or aborted in between
        sizes += [part["Size"] for part in answer.get("Parts", [])]
    return sizes


def test_kill9_in_the_middle_of_a_fill_then_a_restart_leaves_pulls_working_fsck_clean_and_no_upload(
    skopeo: str, backends: Backends, images: StandardImages, fault_proxy: FaultProxy,
    mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    big, bucket = images.big, backends.bucket
    layer = big.layers[2]  # 64 MiB
    key = f"{ROOT}/blobs/sha256/{layer.digest[7:9]}/{layer.digest[7:]}"
    mirror = mirror_factory(fault_proxy.url, env=backends.env())
    # 12 MiB at once (two parts go up), then a trickle: the mirror is killed long before the end.
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=12 * MIB,
                    chunk_size=64 * 1024, delay=0.05)
    with subprocess.Popen(
        [skopeo, "copy", "--preserve-digests", "--src-tls-verify=false", "--retry-times=0",
         f"docker://{mirror.address}/big:1", f"oci:{tmp_path / 'killed'}:out"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    ) as pulling:
        try:
            wait_for(lambda: parts_of(bucket, key) == [5 * MIB, 5 * MIB], timeout=60,
                     what="two parts of the layer sent")
            mirror.kill9()
            _, err = pulling.communicate(timeout=120)
            assert pulling.returncode != 0, "the pull lost its server"
            assert "unexpected EOF" in err.decode(), err.decode()
        finally:
            if pulling.poll() is None:
                pulling.kill()
    assert layer.digest not in bucket.objects()
    assert key in bucket.uploads(), "the killed fill's upload is left behind"

    mirror.start()
    assert bucket.uploads() == [], "aborted by the start-up sweep"
    assert skopeo_pull(skopeo, mirror, "big:1", tmp_path / "after") == everything(big)
    wait_for(lambda: set(bucket.objects()) == everything(big), timeout=60, what="the image in the bucket")
    for digest in bucket.objects():
        assert bucket.digest_of(digest) == digest
    assert bucket.uploads() == []
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 2, "fetched again after the kill, once"
    mirror.stop()
    check = mirror_cli("fsck", "--data", mirror.data_dir, "--verify-content", env=backends.env())
    assert check.returncode == 0 and check.stdout.rstrip().endswith("clean"), check.stdout + check.stderr
    assert bucket.uploads() == []


def test_docker_pushes_a_second_dockerd_pulls_and_a_mount_adds_no_object(
    backends: Backends, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    dockerd_factory: Callable[..., Dockerd],
) -> None:
    bucket = backends.bucket
    mirror = mirror_factory(env=backends.env())
    pusher = dockerd_factory(registry_mirror=mirror.url, insecure_registries=[mirror.address])
    mine, other = f"{mirror.address}/my-small:1", f"{mirror.address}/team/other:1"
    pull(pusher, "small:1")
    for ref in (mine, other):
        pusher.docker("tag", "small:1", ref)

    mirror.access.clear()
    pushed, out = docker_push(pusher, mine)
    assert "Pushed" in out, out
    manifest = local_manifest(mirror, "my-small", "1").content
    layers, config = layer_digests(manifest), config_digest(manifest)
    assert uploaded_digests(mirror, "my-small") == {*layers, config}
    wait_for(lambda: {pushed, config, *layers} <= set(bucket.objects()), timeout=30, what="the push in the bucket")
    for digest in (pushed, config, *layers):
        assert bucket.digest_of(digest) == digest
    stored = bucket.objects()
    assert backends.rows("SELECT digest FROM tags WHERE repo = 'local/my-small' AND tag = '1'") == [(pushed,)]
    assert backends.rows("SELECT name FROM locals") == [("my-small",)]

    # Into another repository of the same registry: the layers are mounted, not uploaded, nor stored again.
    mirror.access.clear()
    mounted, out = docker_push(pusher, other)
    assert mounted == pushed
    assert out.count("Mounted from my-small") == len(layers), out
    mounts = [(status, q["mount"]) for method, status, q in upload_requests(mirror, "team/other")
              if method == "POST" and q.get("from") == "my-small"]
    assert sorted(mounts) == sorted((201, digest) for digest in layers)
    assert uploaded_digests(mirror, "team/other") == {config}  # docker never mounts a config
    assert bucket.objects() == stored
    linked = {d for (d,) in backends.rows("SELECT digest FROM links WHERE repo = 'local/team/other'")}
    assert {*layers, config} <= linked

    # Another daemon, which never saw the image, pulls both and runs them.
    puller = dockerd_factory(insecure_registries=[mirror.address])
    for name, ref in (("my-small", mine), ("team/other", other)):
        pull(puller, ref)
        assert run(puller, ref, "cat", "/etc/image-marker") == "small"
        repo_digests = json.loads(puller.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref).stdout)
        assert f"{mirror.address}/{name}@{pushed}" in repo_digests
    assert bucket.uploads() == []
    assert backends.rows("SELECT count(*) FROM uploads") == [(0,)]


def test_skopeo_copies_a_multi_arch_index_in_and_out_of_the_bucket_byte_for_byte(
    backends: Backends, skopeo: str, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    multi, bucket = images.multi, backends.bucket
    mirror = mirror_factory(env=backends.env(**LIBRARY))
    copy_an_index_in_and_out(skopeo, mirror, upstream, multi, tmp_path)

    # Each object once in the bucket, under its digest; the index and both children recorded in PostgreSQL.
    wait_for(lambda: set(bucket.objects()) == everything(multi), timeout=30, what="the index in the bucket")
    for digest in bucket.objects():
        assert bucket.digest_of(digest) == digest
    assert bucket.uploads() == []
    assert sorted(backends.rows("SELECT repo, tag, digest FROM tags")) == [
        ("docker.io/library/multi", "1", multi.digest),
        ("local/team/multi", "1", multi.digest), ("local/team/multi-copy", "1", multi.digest)]
    assert {d for (d,) in backends.rows("SELECT digest FROM manifests")} == set(multi.manifests)
    assert backends.rows("SELECT count(*) FROM uploads") == [(0,)]
    assert not (mirror.data_dir / "index").exists()


def test_with_the_database_down_a_mirror_on_s3_fails_fast_names_it_and_recovers_with_every_object_kept(
    seaweedfs: SeaweedS3, s3_bucket: str, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """PostgreSQL stops under a mirror on S3: what needs the index answers ``503 UNAVAILABLE`` with
    ``Retry-After`` at once, ``/readyz`` names the database (not the bucket), ``/metrics`` answers
    with ``mirror_index_up 0``; nothing in the bucket is lost, and everything works again once the
    database is back."""
    bucket = Bucket(seaweedfs, s3_bucket)
    accept = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}
    with PostgresServer() as own, httpx.Client(timeout=30.0, trust_env=False) as http:
        mirror = mirror_factory(env=bucket.env(MIRROR_METADATA_DRIVER="postgres",
                                               MIRROR_METADATA_POSTGRES_DSN=own.create_database()))
        small = images.small
        pull_checked(http, mirror.url, "library/small", "1", small)
        pulled = {small.digest, small.config_digest, *(layer.digest for layer in small.layers)}
        # A fetched blob's upload ends just after its last byte was sent.
        wait_for(lambda: set(bucket.objects()) == pulled, timeout=30, what="the image in the bucket")
        kept = bucket.objects()

        own.halt()
        for method, path in (("GET", "/v2/library/big/manifests/1"),
                             ("GET", f"/v2/library/big/blobs/{images.big.layers[0].digest}"),
                             ("HEAD", f"/v2/library/small/blobs/{small.layers[0].digest}")):
            started = time.monotonic()
            down = http.request(method, f"{mirror.url}{path}", headers=accept)
            assert time.monotonic() - started < 5.0, (method, path)
            assert (down.status_code, down.headers.get("retry-after")) == (503, "5"), (method, path, down.text)
            if method == "GET":
                assert down.json()["errors"][0]["code"] == "UNAVAILABLE"
        ready = http.get(f"{mirror.url}/readyz")
        assert ready.status_code == 503 and set(ready.json()["problems"]) == {"index"}, ready.text
        metrics = http.get(f"{mirror.url}/metrics")
        assert metrics.status_code == 200 and "\nmirror_index_up 0.0\n" in metrics.text
        assert bucket.objects() == kept

        own.resume()
        assert eventually(lambda: http.get(f"{mirror.url}/readyz").status_code == 200, timeout=15, interval=0.25), \
            mirror.log_tail()
        pull_checked(http, mirror.url, "library/small", "1", small)
        pull_checked(http, mirror.url, "library/big", "1", images.big)
        assert set(bucket.objects()) >= set(kept)
        assert "Traceback" not in mirror.log_tail(500)
