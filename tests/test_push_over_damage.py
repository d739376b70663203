"""A push of a blob stored already replaces the stored object with the pushed bytes, which were
verified: a damaged object (truncated, or written over by someone with access to the store) is repaired,
and the blob is young again for the collector's grace while its manifest is still to come.  The push used
to be answered ``201`` while the damaged object stayed, which the next read then removed as corrupt (or,
on the filesystem, served), losing the pushed blob.  A read of the damaged object under way while the
push replaces it removes nothing (its ``ETag`` is not the new object's), and the store's size figure
stays the sum of its objects.

Each test runs on the filesystem and diskcache, and on a real SeaweedFS bucket with the index in a real
PostgreSQL database (``tests/test_fsck.py``'s backends), the real mirror under uvicorn.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import httpx

from tests.support.catalog import StandardImages
from tests.support.client import pull_checked
from tests.support.images import Image, sha256_digest as sha256
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.seaweedfs import SeaweedS3
from tests.support.storecheck import mirror_cli
from tests.support.waiting import wait_for
from tests.test_fsck import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Backend, backend, clean, descriptor, put_manifest
from tests.test_s3_serve import Bucket

__all__ = ["backend"]  # the fixture, from test_fsck

MIB = 1 << 20


def push_chunked(http: httpx.Client, base: str, name: str, data: bytes, chunk: int = 2 * MIB) -> None:
    """A chunked upload (``PATCH``es of *chunk* bytes, then ``PUT ?digest=``), as docker sends a layer."""
    answer = http.post(f"{base}/v2/{name}/blobs/uploads/")
    assert answer.status_code == 202, answer.text
    location = answer.headers["location"]
    for start in range(0, len(data), chunk):
        part = data[start:start + chunk]
        answer = http.patch(location if location.startswith("http") else base + location, content=part, headers={
            "content-range": f"{start}-{start + len(part) - 1}", "content-type": "application/octet-stream"})
        assert answer.status_code == 202, answer.text
        location = answer.headers["location"]
    answer = http.put(location if location.startswith("http") else base + location, params={"digest": sha256(data)})
    assert answer.status_code == 201, answer.text


def figure(mirror: MirrorServer) -> float:
    return value(scrape(f"{mirror.url}/metrics"), "mirror_store_size_bytes")


def test_a_push_over_a_damaged_object_replaces_it_and_the_size_figure_follows(
    backend: Backend, mirror_factory: Callable[..., MirrorServer],
) -> None:
    mirror = mirror_factory(env=backend.env())
    base, name = mirror.url, "team/damaged"
    config = b'{"architecture":"amd64","os":"linux"}'
    small, large = os.urandom(5000), os.urandom(7 * MIB + 123)  # one PutObject; parts then a copy on S3
    with httpx.Client(timeout=60, trust_env=False) as http:
        for blob in (config, small):
            assert http.post(f"{base}/v2/{name}/blobs/uploads/", params={"digest": sha256(blob)},
                             content=blob).status_code == 201
        push_chunked(http, base, name, large)
        assert backend.objects(mirror)[sha256(large)] == len(large)
        put_manifest(http, base, name, "1", {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, small), descriptor(OCI_LAYER, large)]})
        # Damaged behind the mirror's back, truncated then written over with as many other bytes; each
        # time pushed again, as a client repairing them (or pushing the image once more) would.
        for damage in (lambda blob: blob[:1000], lambda blob: os.urandom(len(blob))):
            for blob in (small, large):
                backend.overwrite(mirror, sha256(blob), damage(blob))
            assert http.post(f"{base}/v2/{name}/blobs/uploads/", params={"digest": sha256(small)},
                             content=small).status_code == 201
            push_chunked(http, base, name, large)
            for blob in (small, large):
                url = f"{base}/v2/{name}/blobs/{sha256(blob)}"
                head = http.head(url)
                assert head.status_code == 200 and head.headers["content-length"] == str(len(blob)), head.headers
                answer = http.get(url)
                assert answer.status_code == 200 and answer.content == blob
        # The figure is what the store holds (the damage was not the mirror's to count: set it right first).
        objects = backend.objects(mirror)
        assert objects[sha256(small)] == len(small) and objects[sha256(large)] == len(large)
    mirror.stop()
    clean(mirror, backend, "--verify-content")
    assert mirror_cli("gc", "--data", mirror.data_dir, env=backend.env()).returncode == 0  # recounts
    mirror.start()
    total = sum(backend.objects(mirror).values())
    assert figure(mirror) == total
    with httpx.Client(timeout=60, trust_env=False) as http:
        for _ in range(3):  # pushed again whole, over healthy objects: nothing more in the store
            assert http.post(f"{base}/v2/{name}/blobs/uploads/", params={"digest": sha256(small)},
                             content=small).status_code == 201
            push_chunked(http, base, name, large)
    wait_for(lambda: figure(mirror) == total, timeout=15, what=f"the size figure back at {total}")
    assert sum(backend.objects(mirror).values()) == total


def test_a_blob_pushed_again_is_young_again_for_the_collectors_grace(
    backend: Backend, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A layer pushed to one repository whose manifest never came, older than ``gc.grace``, pushed to
    another: a collection then keeps it for the manifest still to come there."""
    env = {**backend.env(), "MIRROR_GC_GRACE": "2s"}
    mirror = mirror_factory(env=env)
    layer, config = os.urandom(6000), b'{"architecture":"amd64","os":"linux","seed":7}'
    with httpx.Client(timeout=60, trust_env=False) as http:
        for blob in (config, layer):
            assert http.post(f"{mirror.url}/v2/team/first/blobs/uploads/", params={"digest": sha256(blob)},
                             content=blob).status_code == 201
        time.sleep(3)  # older than the grace, and unreferenced
        for blob in (config, layer):
            assert http.post(f"{mirror.url}/v2/team/second/blobs/uploads/", params={"digest": sha256(blob)},
                             content=blob).status_code == 201
        done = mirror_cli("gc", "--data", mirror.data_dir, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        put_manifest(http, mirror.url, "team/second", "1", {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, layer)]})
        assert http.get(f"{mirror.url}/v2/team/second/blobs/{sha256(layer)}").content == layer


def test_a_read_of_a_damaged_object_under_way_while_a_push_replaces_it_removes_nothing(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """On S3: a client reads an object written over with other bytes; meanwhile the blob is pushed
    again.  The reader is cut short (what it read does not match), and the object it read is gone; the
    one the push stored (another ``ETag``) is kept, and every later read gets the blob."""
    backend = Backend(Bucket(seaweedfs, s3_bucket), postgres.create_database())
    mirror = mirror_factory(env=backend.env())
    blob = os.urandom(24 * MIB)
    url = f"{mirror.url}/v2/team/raced/blobs/{sha256(blob)}"
    with httpx.Client(timeout=60, trust_env=False) as http:
        push_chunked(http, mirror.url, "team/raced", blob, chunk=8 * MIB)
        backend.overwrite(mirror, sha256(blob), os.urandom(len(blob) - MIB))
        received = 0
        with httpx.Client(timeout=60, trust_env=False) as reader, reader.stream("GET", url) as answer:
            assert answer.status_code == 200
            chunks = answer.iter_raw()
            received += len(next(chunks))
            push_chunked(http, mirror.url, "team/raced", blob, chunk=8 * MIB)  # while the read is under way
            with contextlib.suppress(httpx.HTTPError):  # cut short: the bytes it read are not the blob
                for chunk in chunks:
                    received += len(chunk)
        assert received < len(blob)
        for _ in range(2):
            again = http.get(url)
            assert again.status_code == 200 and again.content == blob
    assert backend.objects(mirror)[sha256(blob)] == len(blob)


def test_evicting_a_cached_image_keeps_its_layers_just_pushed_to_a_private_repository(
    backend: Backend, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A cached image's config and layers pushed to a private repository (its manifest still to come):
    evicting the cached image leaves them, and the manifest push then finds them; they used to go with
    the eviction, which skips the grace, and the manifest was refused (``MANIFEST_BLOB_UNKNOWN``)."""
    env = {**backend.env(), "MIRROR_CACHE_UNUSED_FOR": "1s", "MIRROR_CACHE_KEEP_RECENT": "0s"}
    mirror = mirror_factory(env=env)
    name, tag, item = images.refs["small"]
    assert isinstance(item, Image)
    with httpx.Client(timeout=60, trust_env=False) as http:
        pull_checked(http, mirror.url, name, tag, item)
        backend.wait_stored(mirror, item.blobs)
        time.sleep(1.5)  # not pulled for longer than cache.unused_for
        for digest, path in item.blobs.items():
            answer = http.post(f"{mirror.url}/v2/team/private/blobs/uploads/", params={"digest": digest},
                               content=path.read_bytes())
            assert answer.status_code == 201, answer.text
        done = mirror_cli("gc", "--data", mirror.data_dir, env=env)
        assert done.returncode == 0 and "1 images evicted" in done.stdout, done.stdout + done.stderr
        for digest in item.blobs:
            assert http.head(f"{mirror.url}/v2/team/private/blobs/{digest}").status_code == 200, digest
        answer = http.put(f"{mirror.url}/v2/team/private/manifests/1", content=item.manifest,
                          headers={"content-type": item.media_type})
        assert answer.status_code == 201, answer.text
        pull_checked(http, mirror.url, "team/private", "1", item)
