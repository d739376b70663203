"""Bounded disk: LRU eviction, online garbage collection, fsck, crash consistency.

Real mirror processes in front of a real docker-registry; what was evicted is proven by what
the upstream has to serve again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pty
import random
import re
import struct
import subprocess
import sys
import tarfile
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.client import pull_checked
from tests.support.dockerd import Dockerd
from tests.support.images import (
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    build_image,
    build_index,
    busybox_layer,
    random_layer,
    sha256_digest as sha256,
    write_oci_layout,
)
from tests.support.mirror import PROJECT_ROOT, MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import mirror_cli, stored_objects
from tests.support.waiting import eventually
from tests.test_push_api import push_image

ALL_TYPES = ", ".join(MANIFEST_MEDIA_TYPES)
MIB = 1024 * 1024


def store_bytes(data_dir: Path) -> int:
    """Bytes of the objects under ``blobs/``; a file the collector removes while it is counted counts 0."""
    total = 0
    for root, _, files in os.walk(data_dir / "blobs"):  # a directory removed meanwhile is skipped
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def pull(http: httpx.Client, base: str, name: str, tag: str, image: Image) -> str:
    """Pull an image over HTTP, checking every byte; return the manifest's X-Mirror-Cache."""
    return pull_checked(http, base, name, tag, image)[0]


@pytest.fixture(scope="module")
def sized_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpstreamRegistry, list[Image]]]:
    """An upstream of its own with six images of one 8 MiB layer each (library/img0..img5:1)."""
    root = tmp_path_factory.mktemp("sized")
    registry = UpstreamRegistry(root / "registry").start()
    try:
        images = []
        for i in range(6):
            image = build_image(root / f"img{i}", [random_layer(root / f"img{i}", 8 * MIB, seed=100 + i)])
            registry.push_image(f"library/img{i}", "1", image)
            images.append(image)
        yield registry, images
    finally:
        registry.stop()


def test_eviction_keeps_the_store_under_its_budget(
    sized_upstream: tuple[UpstreamRegistry, list[Image]], mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client, tmp_path: Path,
) -> None:
    registry, images = sized_upstream
    budget = 30 * MIB
    one_image = max(image.layers[0].size for image in images) + 4096
    mirror = mirror_factory(registry.url, env={
        "MIRROR_CACHE_MAX_SIZE": str(budget), "MIRROR_CACHE_KEEP_RECENT": "0.3s", "MIRROR_GC_GRACE": "1h",
    })
    # A pushed image is pinned: eviction never touches it.
    pushed = os.urandom(6 * MIB)
    assert http.post(f"{mirror.url}/v2/team/app/blobs/uploads/", params={"digest": sha256(pushed)},
                     content=pushed).status_code == 201
    config = b'{"architecture":"amd64","os":"linux"}'
    assert http.post(f"{mirror.url}/v2/team/app/blobs/uploads/", params={"digest": sha256(config)},
                     content=config).status_code == 201
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha256(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": sha256(pushed), "size": len(pushed)}]}).encode()
    assert http.put(f"{mirror.url}/v2/team/app/manifests/v1", content=manifest,
                    headers={"content-type": OCI_MANIFEST}).status_code == 201

    peak = 0
    for i, image in enumerate(images):
        assert pull(http, mirror.url, f"library/img{i}", "1", image) == "MISS"
        time.sleep(0.4)  # older than keep_recent: the previous images become candidates
        # The collector is woken by the commit that crossed the high watermark.
        assert eventually(lambda: store_bytes(mirror.data_dir) <= budget + one_image), store_bytes(mirror.data_dir)
        peak = max(peak, store_bytes(mirror.data_dir))
    assert eventually(lambda: store_bytes(mirror.data_dir) <= budget)
    assert peak <= budget + one_image

    # An evicted image's repository, left empty, leaves the catalog.
    catalog = http.get(f"{mirror.url}/v2/_catalog").json()["repositories"]
    assert {"library/img5", "team/app"} <= set(catalog) and "library/img0" not in catalog, catalog
    registry.clear_counts()
    # The most recent image is still served from the store...
    assert pull(http, mirror.url, "library/img5", "1", images[5]) == "HIT"
    assert registry.count("GET", re.compile("/blobs/")) == 0
    # ...an old one was evicted and is transparently fetched again...
    assert pull(http, mirror.url, "library/img0", "1", images[0]) == "MISS"
    assert registry.count("GET", re.compile(f"^/v2/library/img0/blobs/{images[0].layers[0].digest}$")) == 1
    assert "library/img0" in http.get(f"{mirror.url}/v2/_catalog").json()["repositories"]  # back with it
    # ...and the pushed image was never touched.
    assert http.get(f"{mirror.url}/v2/team/app/manifests/v1").content == manifest
    assert sha256(http.get(f"{mirror.url}/v2/team/app/blobs/{sha256(pushed)}").content) == sha256(pushed)
    assert "evicting" in mirror.log_tail(400)


def test_blobs_no_image_reaches_go_before_any_image_when_the_store_is_over_its_budget(
    sized_upstream: tuple[UpstreamRegistry, list[Image]], mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """Blobs fetched by digest whose manifests never came are the cache's orphans: over the budget
    they go at once, before any image, however recently fetched.  Before, they waited ``gc.grace``
    (an hour) while the store stayed above its budget, and the images being pulled went instead."""
    registry, images = sized_upstream
    budget = 30 * MIB
    # The image and the blobs all used within keep_recent, however slow the machine: the blobs go first.
    mirror = mirror_factory(registry.url, env={
        "MIRROR_CACHE_MAX_SIZE": str(budget), "MIRROR_CACHE_KEEP_RECENT": "10s", "MIRROR_GC_GRACE": "1h",
    })
    assert pull(http, mirror.url, "library/img5", "1", images[5]) == "MISS"
    for i in range(4):
        layer = images[i].layers[0]
        answer = http.get(f"{mirror.url}/v2/library/img{i}/blobs/{layer.digest}")
        assert answer.status_code == 200 and sha256(answer.content) == layer.digest
    assert eventually(lambda: store_bytes(mirror.data_dir) <= budget), store_bytes(mirror.data_dir)
    registry.clear_counts()
    assert pull(http, mirror.url, "library/img5", "1", images[5]) == "HIT"  # the image stayed
    assert registry.count("GET", re.compile("/blobs/")) == 0
    # A blob that went is fetched again when asked for.
    layer = images[0].layers[0]
    again = http.get(f"{mirror.url}/v2/library/img0/blobs/{layer.digest}")
    assert again.status_code == 200 and sha256(again.content) == layer.digest


def test_a_shared_layer_being_read_does_not_hold_every_image_that_has_it_above_the_budget(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path,
) -> None:
    """Five images on one 16 MiB base layer (as images on a popular base are), the base being read
    by a slow client the whole time: before, every image reaching it counted as in use, and the
    store stayed above its budget for as long as someone read the base ("in open transfers").  Now
    the images whose only open object is shared go when the budget needs it; the base, being read,
    is not deleted, and its reader gets every byte."""
    registry = UpstreamRegistry(tmp_path / "registry").start()
    try:
        base = random_layer(tmp_path, 16 * MIB, seed=700)
        images = [build_image(tmp_path / f"img{i}", [base, random_layer(tmp_path, 4 * MIB, seed=710 + i)])
                  for i in range(5)]
        for i, image in enumerate(images):
            registry.push_image(f"library/based{i}", "1", image)
        budget = 30 * MIB
        mirror = mirror_factory(registry.url, env={
            "MIRROR_CACHE_MAX_SIZE": str(budget), "MIRROR_CACHE_KEEP_RECENT": "0.3s", "MIRROR_GC_GRACE": "1h"})
        assert pull(http, mirror.url, "library/based0", "1", images[0]) == "MISS"
        with httpx.Client(trust_env=False, timeout=120) as slow, \
                slow.stream("GET", f"{mirror.url}/v2/library/based0/blobs/{base.digest}") as reading:
            received = hashlib.sha256()
            chunks = reading.iter_raw(64 * 1024)
            received.update(next(chunks))  # then nothing for a while: the base stays open
            for i in range(1, 5):
                assert pull(http, mirror.url, f"library/based{i}", "1", images[i]) == "MISS"
            assert eventually(lambda: store_bytes(mirror.data_dir) <= budget, timeout=30), \
                (store_bytes(mirror.data_dir), mirror.log_tail(40))
            for chunk in chunks:
                received.update(chunk)
        assert f"sha256:{received.hexdigest()}" == base.digest
        assert "evicting" in mirror.log_tail(400)
    finally:
        registry.stop()


def test_a_multi_platform_image_being_read_is_not_evicted_for_its_children_sharing_its_layers(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path,
) -> None:
    """A multi-platform image pulled (its index by tag, a child by digest: both linked in the
    repository) and one of its layers being read.  Before, the child counted as another image sharing
    that layer, so over the budget the index went as an image whose open objects are all shared: its
    tag was dropped for 1.6 KiB freed, and every pull fetched the index from the upstream again (and
    failed while the upstream was down).  Now the image is in use; an image no transfer holds goes."""
    registry = UpstreamRegistry(tmp_path / "registry").start()
    try:
        children = [build_image(tmp_path / arch, [random_layer(tmp_path / arch, 4 * MIB, seed=730 + i)], arch)
                    for i, arch in enumerate(("amd64", "arm64"))]
        index = build_index(children)
        registry.push_index("library/multi", "1", index)
        other = build_image(tmp_path / "other", [random_layer(tmp_path / "other", 6 * MIB, seed=735)])
        registry.push_image("library/other", "1", other)
        mirror = mirror_factory(registry.url)
        accept = {"accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
        assert http.get(f"{mirror.url}/v2/library/multi/manifests/1", headers=accept).content == index.manifest
        child, layer = children[0], children[0].layers[0]
        assert pull(http, mirror.url, "library/multi", child.digest, child) == "MISS"
        assert pull(http, mirror.url, "library/other", "1", other) == "MISS"
        registry.clear_counts()
        squeeze = {"MIRROR_CACHE_MAX_SIZE": str(MIB), "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s"}
        with httpx.Client(trust_env=False, timeout=120) as slow, \
                slow.stream("GET", f"{mirror.url}/v2/library/multi/blobs/{layer.digest}") as reading:
            received = hashlib.sha256()
            chunks = reading.iter_raw(64 * 1024)
            received.update(next(chunks))  # then nothing for a while: the layer stays open
            done = mirror_cli("gc", "--data", str(mirror.data_dir), env=squeeze)
            assert done.returncode == 0 and "(1 images evicted" in done.stdout, done.stdout + done.stderr
            for chunk in chunks:
                received.update(chunk)
        assert f"sha256:{received.hexdigest()}" == layer.digest
        again = http.get(f"{mirror.url}/v2/library/multi/manifests/1", headers=accept)
        assert again.content == index.manifest and again.headers["x-mirror-cache"] == "HIT", again.headers
        assert registry.count("GET", re.compile("^/v2/library/multi/")) == 0
        assert pull(http, mirror.url, "library/other", "1", other) == "MISS"  # it went: nothing held it
    finally:
        registry.stop()


def test_mirror_gc_says_why_the_store_stays_above_its_budget(tmp_path: Path) -> None:
    """Before, it printed what it freed (nothing) and the sizes, not what held the store."""
    data, blobs = tmp_path / "data", tmp_path / "blobs"
    image = build_image(blobs, [random_layer(blobs, 2 * MIB, seed=720)])
    write_oci_layout(tmp_path / "layout", image, "docker.io/library/kept:1")
    assert mirror_cli("preload", "--data", data, tmp_path / "layout").returncode == 0  # pinned
    done = mirror_cli("gc", "--data", data, env={"MIRROR_CACHE_MAX_SIZE": str(MIB)})
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first.startswith("freed 0 objects") and "of a 1.0 MiB budget" in first, first
    assert second.startswith("store 2.0 MiB stays above its budget (1.0 MiB): 2.0 MiB pinned"), second


def test_answers_from_memory_count_as_use_and_end_with_eviction(
    sized_upstream: tuple[UpstreamRegistry, list[Image]], mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """Repeated GETs by digest are answered from memory: they must still keep an image recently used,
    and an eviction (online, or by `mirror gc` in another process) must end them."""
    registry, images = sized_upstream
    mirror = mirror_factory(registry.url, env={  # room for two of the 8 MiB images, not three
        "MIRROR_CACHE_MAX_SIZE": str(20 * MIB), "MIRROR_CACHE_KEEP_RECENT": "0.3s", "MIRROR_GC_GRACE": "1h"})
    first, second, third = images[0], images[1], images[2]

    def by_digest(name: str, image: Image) -> str:
        answer = http.get(f"{mirror.url}/v2/{name}/manifests/{image.digest}")
        assert answer.status_code == 200 and answer.content == image.manifest
        return answer.headers["x-mirror-cache"]

    assert pull(http, mirror.url, "library/img0", "1", first) == "MISS"
    assert [by_digest("library/img0", first) for _ in range(3)] == ["HIT"] * 3
    time.sleep(0.4)
    assert pull(http, mirror.url, "library/img1", "1", second) == "MISS"
    time.sleep(0.4)
    assert by_digest("library/img0", first) == "HIT"  # from memory: img0 is now the most recently used
    time.sleep(0.4)
    assert pull(http, mirror.url, "library/img2", "1", third) == "MISS"  # over the budget: one must go
    assert eventually(lambda: "evicting" in mirror.log_tail(400))
    assert eventually(lambda: store_bytes(mirror.data_dir) <= 20 * MIB)

    registry.clear_counts()
    assert pull(http, mirror.url, "library/img0", "1", first) == "HIT"
    assert pull(http, mirror.url, "library/img1", "1", second) == "MISS"  # the least recently used went
    assert registry.count("GET", re.compile(r"^/v2/library/img0/")) == 0

    # An eviction by another process (`mirror gc`, unused images) ends the answers kept in memory.
    assert [by_digest("library/img0", first) for _ in range(2)] == ["HIT"] * 2
    time.sleep(1.5)
    gc = mirror_cli("gc", "--data", str(mirror.data_dir), env={"MIRROR_CACHE_UNUSED_FOR": "1s",
                                                                "MIRROR_CACHE_KEEP_RECENT": "0s"})
    assert gc.returncode == 0 and "freed" in gc.stdout, gc.stdout + gc.stderr
    assert by_digest("library/img0", first) == "MISS"
    assert registry.count("GET", re.compile(rf"^/v2/library/img0/manifests/{first.digest}$")) == 1


def test_gc_removes_only_unreferenced_objects_past_the_grace_period(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    mirror = mirror_factory(env={"MIRROR_GC_GRACE": "1s", "MIRROR_GC_INTERVAL": "0"})
    # A pushed image, and an uploaded blob that no manifest references.
    referenced = os.urandom(4096)
    orphan = os.urandom(5000)
    for blob in (referenced, orphan):
        assert http.post(f"{mirror.url}/v2/team/app/blobs/uploads/", params={"digest": sha256(blob)},
                         content=blob).status_code == 201
    config = b"{}"
    http.post(f"{mirror.url}/v2/team/app/blobs/uploads/", params={"digest": sha256(config)}, content=config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(config),
                                      "size": 2},
                           "layers": [{"mediaType": "application/octet-stream", "digest": sha256(referenced),
                                       "size": len(referenced)}]}).encode()
    assert http.put(f"{mirror.url}/v2/team/app/manifests/v1", content=manifest,
                    headers={"content-type": OCI_MANIFEST}).status_code == 201

    grace = {"MIRROR_GC_GRACE": "1s"}
    young = mirror_cli("gc", "--data", str(mirror.data_dir), "--dry-run", env=grace)
    assert young.returncode == 0, young.stderr
    assert young.stdout.startswith("would free 0 objects"), young.stdout
    time.sleep(1.2)
    dry = mirror_cli("gc", "--data", str(mirror.data_dir), "--dry-run", env=grace)
    assert dry.stdout.startswith("would free 1 objects, 4.9 KiB"), dry.stdout
    assert http.get(f"{mirror.url}/v2/team/app/blobs/{sha256(orphan)}").status_code == 200  # dry run changed nothing
    real = mirror_cli("gc", "--data", str(mirror.data_dir), env=grace)
    assert real.returncode == 0 and real.stdout.startswith("freed 1 objects, 4.9 KiB"), real.stdout
    assert http.get(f"{mirror.url}/v2/team/app/blobs/{sha256(orphan)}").status_code == 404
    assert http.get(f"{mirror.url}/v2/team/app/manifests/v1").content == manifest
    assert http.get(f"{mirror.url}/v2/team/app/blobs/{sha256(referenced)}").content == referenced
    again = mirror_cli("gc", "--data", str(mirror.data_dir), env=grace)
    assert again.stdout.startswith("freed 0 objects"), again.stdout
    clean = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content")
    assert clean.returncode == 0 and "clean" in clean.stdout, clean.stdout + clean.stderr


def test_a_deleted_image_is_collected_though_a_referrer_names_it_as_its_subject(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """An image deleted by digest while a signature of it stays (a referrer, whose subject may be absent:
    distribution-spec, "Pushing Manifests with Subject").  Before, the collector marked through the
    referrer's subject and kept the deleted image's objects for good, while fsck counted them as ones
    "mirror gc removes once older than gc.grace"."""
    mirror = mirror_factory()
    manifest, blobs = push_image(http, mirror.url, "team/signed", "1", seed=7)
    payload = b"signature of the image"
    for blob in (b"{}", payload):
        assert http.post(f"{mirror.url}/v2/team/signed/blobs/uploads/", params={"digest": sha256(blob)},
                         content=blob).status_code == 201
    signature = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha256(payload), "size": len(payload)}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest)}}).encode()
    assert http.put(f"{mirror.url}/v2/team/signed/manifests/{sha256(signature)}", content=signature,
                    headers={"content-type": OCI_MANIFEST}).status_code == 201
    assert http.delete(f"{mirror.url}/v2/team/signed/manifests/{sha256(manifest)}").status_code == 202

    freed = mirror_cli("gc", "--data", str(mirror.data_dir), env={"MIRROR_GC_GRACE": "0s"})
    assert freed.returncode == 0 and freed.stdout.startswith("freed 4 objects"), freed.stdout  # manifest, 3 blobs
    gone = {sha256(b) for b in (manifest, *blobs)}
    assert not gone & set(stored_objects(mirror.data_dir))
    kept = http.get(f"{mirror.url}/v2/team/signed/manifests/{sha256(signature)}", headers={"accept": OCI_MANIFEST})
    assert (kept.status_code, kept.content) == (200, signature), kept.text
    assert http.get(f"{mirror.url}/v2/team/signed/blobs/{sha256(payload)}").content == payload
    listed = http.get(f"{mirror.url}/v2/team/signed/referrers/{sha256(manifest)}").json()["manifests"]
    assert [d["digest"] for d in listed] == [sha256(signature)]
    clean = mirror_cli("fsck", "--data", str(mirror.data_dir))
    assert clean.returncode == 0 and "clean" in clean.stdout, clean.stdout + clean.stderr


def test_fsck_finds_and_repairs_damage(
    upstream: UpstreamRegistry, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    mirror = mirror_factory()
    pull(http, mirror.url, "library/small", "1", images.small)
    mirror.stop()
    layer = images.small.layers[-1].digest.removeprefix("sha256:")
    config = images.small.config_digest.removeprefix("sha256:")
    blobs = mirror.data_dir / "blobs" / "sha256"
    (blobs / layer[:2] / layer).write_bytes(b"bit rot")           # corrupt content
    (blobs / config[:2] / config).unlink()                        # missing config
    (blobs / "zz").mkdir()
    (blobs / "zz" / "not-a-digest").write_text("stray")           # stray file
    (blobs / "yy").write_text("stray")                             # where a prefix's directory would be
    (blobs.parent / "notes.txt").write_text("stray")               # where an algorithm's would be
    (mirror.data_dir / "tmp" / "sha256-abc.partial").write_text("abandoned")

    check = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content")
    assert check.returncode == 1
    assert "corrupt object (content does not match its digest): sha256:" + layer in check.stdout
    assert "stray file in blobs/" in check.stdout and "abandoned temp file" in check.stdout
    for stray in (blobs / "zz" / "not-a-digest", blobs / "yy", blobs.parent / "notes.txt"):
        assert f"stray file in blobs/: {stray}" in check.stdout, check.stdout
    repaired = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content", "--repair")
    assert repaired.returncode == 0, repaired.stdout
    assert "(repaired)" in repaired.stdout
    after = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content")
    assert after.returncode == 0 and after.stdout.rstrip().endswith("clean"), after.stdout
    assert not (blobs / "yy").exists() and not (blobs.parent / "notes.txt").exists()

    mirror.start()
    upstream.clear_counts()
    pull(http, mirror.url, "library/small", "1", images.small)  # the lost objects come back from the upstream
    assert upstream.count("GET", re.compile(f"/blobs/sha256:{layer}$")) == 1
    bad = mirror_cli("fsck", "--data", str(mirror.data_dir / "nowhere"))
    assert bad.returncode == 2 and "not a mirror data directory" in bad.stderr


def test_fsck_repairs_what_the_index_says_of_objects_and_uploads_that_are_gone(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A pushed image whose manifest and a layer were lost: its tag, links and manifest record go
    (a pull gets a clean 404, not a broken image); so do an upload record whose file is gone and
    an upload file without a record.  What is still whole stays."""
    mirror = mirror_factory(env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"})
    manifest, (config, *layers) = push_image(http, mirror.url, "team/app", "v1", seed=1)
    _, (kept_config, *_) = push_image(http, mirror.url, "team/kept", "v1", seed=2)
    digest, layer = sha256(manifest), sha256(layers[0])
    started = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/")
    assert started.status_code == 202
    uuid = started.headers["docker-upload-uuid"]
    mirror.stop()
    blobs = stored_objects(mirror.data_dir)
    blobs[digest].unlink()
    blobs[layer].unlink()
    (mirror.data_dir / "uploads" / uuid).unlink()
    stray_upload = mirror.data_dir / "uploads" / ("0" * 32)
    stray_upload.write_bytes(b"abandoned")

    check = mirror_cli("fsck", "--data", str(mirror.data_dir))
    assert check.returncode == 1
    found = set(check.stdout.splitlines())
    wanted = {
        f"manifest record without its object: {digest}",
        f"tag points to a missing manifest: local/team/app:v1 -> {digest}",
        f"pushed object missing: local/team/app@{digest}",
        f"pushed object missing: local/team/app@{layer}",
        f"upload record without its file: {uuid}",
        f"upload without a record: {stray_upload}",
    }
    assert wanted <= found, check.stdout
    repaired = mirror_cli("fsck", "--data", str(mirror.data_dir), "--repair")
    assert repaired.returncode == 0 and {f"{line} (repaired)" for line in wanted} <= set(repaired.stdout.splitlines())
    after = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content")
    assert after.returncode == 0 and after.stdout.rstrip().endswith("clean"), after.stdout
    assert not stray_upload.exists()

    mirror.start()
    gone = http.get(f"{mirror.url}/v2/team/app/manifests/v1", headers={"accept": OCI_MANIFEST})
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert http.get(f"{mirror.url}/v2/team/app/blobs/uploads/{uuid}").status_code == 404
    assert http.get(f"{mirror.url}/v2/team/app/blobs/{sha256(config)}").status_code == 200
    assert http.get(f"{mirror.url}/v2/team/kept/manifests/v1", headers={"accept": OCI_MANIFEST}).status_code == 200
    assert http.get(f"{mirror.url}/v2/team/kept/blobs/{sha256(kept_config)}").status_code == 200


def test_fsck_shows_its_progress_on_a_terminal_only(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """The display preload and export draw (tqdm, on stderr), while re-hashing; nothing in a pipe."""
    mirror = mirror_factory()
    pull(http, mirror.url, "library/small", "1", images.small)
    mirror.stop()
    quiet = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 wide
    try:
        done = subprocess.run([sys.executable, "-m", "mirror", "fsck", "--data", str(mirror.data_dir),
                               "--verify-content"], stdout=subprocess.PIPE, stderr=follower, text=True,
                              timeout=120, cwd=PROJECT_ROOT, check=False)
    finally:
        os.close(follower)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once everything written is read
        while chunk := os.read(leader, 65536):
            shown += chunk
    os.close(leader)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("clean"), done.stdout
    assert b"fsck: verifying" in shown and b"B/s" in shown, shown


@pytest.mark.slow  # a 20 s soak under load
def test_online_gc_and_eviction_under_load(
    sized_upstream: tuple[UpstreamRegistry, list[Image]], mirror_factory: Callable[..., MirrorServer],
) -> None:
    registry, images = sized_upstream
    mirror = mirror_factory(registry.url, workers=2, env={
        "MIRROR_CACHE_MAX_SIZE": str(24 * MIB), "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s",
        "MIRROR_GC_INTERVAL": "0.5s",
    })
    stop = threading.Event()
    failures: list[str] = []
    pulls = [0]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60.0, trust_env=False) as http:
            while not stop.is_set():
                i = rng.randrange(len(images))
                try:
                    pull(http, mirror.url, f"library/img{i}", "1", images[i])
                    pulls[0] += 1
                except (AssertionError, httpx.HTTPError) as exc:
                    failures.append(f"img{i}: {exc!r}")

    def collector() -> None:
        while not stop.is_set():
            result = mirror_cli("gc", "--data", str(mirror.data_dir), env={
                "MIRROR_CACHE_MAX_SIZE": str(24 * MIB), "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s"})
            if result.returncode != 0:
                failures.append(f"gc: {result.stderr}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)] + [threading.Thread(target=collector)]
    for thread in threads:
        thread.start()
    time.sleep(20)
    stop.set()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:5]
    assert pulls[0] >= 16
    check = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content")
    assert check.returncode == 0, check.stdout


@pytest.mark.slow
def test_kill9_at_random_moments_leaves_a_consistent_store(
    sized_upstream: tuple[UpstreamRegistry, list[Image]], mirror_factory: Callable[..., MirrorServer],
) -> None:
    registry, images = sized_upstream
    mirror = mirror_factory(registry.url, env={
        "MIRROR_CACHE_MAX_SIZE": str(20 * MIB), "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s",
        "MIRROR_GC_INTERVAL": "0.3s",
    })
    rng = random.Random(7)
    for round_ in range(5):
        stop = threading.Event()

        def load(stop: threading.Event = stop) -> None:
            with httpx.Client(timeout=30.0, trust_env=False) as http:
                while not stop.is_set():
                    i = rng.randrange(len(images))
                    try:
                        pull(http, mirror.url, f"library/img{i}", "1", images[i])
                    except (AssertionError, httpx.HTTPError):
                        pass  # the server is being killed under it

        workers = [threading.Thread(target=load) for _ in range(3)]
        for worker in workers:
            worker.start()
        time.sleep(rng.uniform(0.3, 2.5))
        mirror.kill9()
        stop.set()
        for worker in workers:
            worker.join(60)
        mirror.start()
        check = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content")
        assert check.returncode == 0, f"round {round_}: {check.stdout}"
        with httpx.Client(timeout=60.0, trust_env=False) as http:
            for i, image in enumerate(images[:3]):
                pull(http, mirror.url, f"library/img{i}", "1", image)


@pytest.mark.slow
def test_dockerd_pulls_300_mib_through_a_100_mib_cache(
    tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
    dockerd_factory: Callable[..., Dockerd], http: httpx.Client,
) -> None:
    registry = upstream_factory()
    images = []
    for i in range(6):  # 6 x 50 MiB: three times the budget
        image = build_image(tmp_path / f"big{i}", [busybox_layer(tmp_path / f"big{i}", marker=f"big{i}"),
                                                   random_layer(tmp_path / f"big{i}", 50 * MIB, seed=300 + i,
                                                                compressed=False)])
        registry.push_image(f"library/big{i}", "1", image)
        images.append(image)
    budget = 100 * MIB
    one_image = sum(layer.size for layer in images[0].layers) + 64 * 1024
    mirror = mirror_factory(registry.url, env={
        "MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true", "MIRROR_CACHE_MAX_SIZE": "100MiB",
        "MIRROR_CACHE_KEEP_RECENT": "1s",
    })
    # A pinned image beside the cache: pushed content is never evicted.
    pinned = os.urandom(5 * MIB)
    assert http.post(f"{mirror.url}/v2/team/pinned/blobs/uploads/", params={"digest": sha256(pinned)},
                     content=pinned).status_code == 201
    daemon = dockerd_factory(registry_mirror=mirror.url)
    for i in range(6):
        out = daemon.docker("pull", f"big{i}:1").stdout
        assert f"Downloaded newer image for big{i}:1" in out, out
        assert daemon.docker("run", "--rm", "--network", "none", f"big{i}:1", "cat", "/etc/image-marker").stdout \
            .strip() == f"big{i}"
        time.sleep(1.2)  # older than keep_recent: a candidate from now on
        assert eventually(lambda: store_bytes(mirror.data_dir) <= budget + one_image), store_bytes(mirror.data_dir)
    assert eventually(lambda: store_bytes(mirror.data_dir) <= budget)

    # The newest images are still served from the store; the oldest was evicted and comes back.
    registry.clear_counts()
    recent = http.get(f"{mirror.url}/v2/library/big5/manifests/1", headers={"accept": ALL_TYPES})
    assert recent.headers["x-mirror-cache"] == "HIT"
    daemon.docker("rmi", "big0:1")
    assert "Downloaded newer image for big0:1" in daemon.docker("pull", "big0:1").stdout
    assert registry.count("GET", re.compile(f"^/v2/library/big0/blobs/{images[0].layers[1].digest}$")) == 1
    assert registry.count("GET", re.compile("^/v2/library/big5/blobs/")) == 0
    assert sha256(http.get(f"{mirror.url}/v2/team/pinned/blobs/{sha256(pinned)}").content) == sha256(pinned)


@pytest.mark.slow
def test_kill9_during_preload_leaves_a_consistent_store(
    tmp_path: Path, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    image = build_image(tmp_path / "img", [random_layer(tmp_path / "img", 48 * MIB, seed=400 + n, compressed=False)
                                           for n in range(3)])
    layout = tmp_path / "layout"
    write_oci_layout(layout, image, "docker.io/library/preloaded:1")
    archive = tmp_path / "preload.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    mirror = mirror_factory("http://127.0.0.1:9", start=False)
    mirror.data_dir.mkdir(parents=True)
    rng = random.Random(11)
    for round_ in range(3):
        loader = subprocess.Popen([sys.executable, "-m", "mirror", "preload", "--data", str(mirror.data_dir),
                                   str(archive)], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.5))
        loader.kill()
        loader.wait()
        mirror.start()  # sweeps what the killed preload left
        check = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content")
        assert check.returncode == 0, f"round {round_}: {check.stdout}"
        # Tags are written last: the image is either all there or not visible at all.
        answer = http.get(f"{mirror.url}/v2/library/preloaded/manifests/1", headers={"accept": ALL_TYPES})
        assert answer.status_code in (200, 404, 503)
        if answer.status_code == 200:
            for layer in image.layers:
                blob = http.get(f"{mirror.url}/v2/library/preloaded/blobs/{layer.digest}")
                assert blob.status_code == 200 and sha256(blob.content) == layer.digest
        mirror.stop()
    done = mirror_cli("preload", "--data", str(mirror.data_dir), str(archive))
    assert done.returncode == 0, done.stderr
    mirror.start()
    answer = http.get(f"{mirror.url}/v2/library/preloaded/manifests/1", headers={"accept": ALL_TYPES})
    assert answer.status_code == 200 and answer.content == image.manifest


def test_a_directory_in_blobs_is_reported_and_left_where_it_is_by_fsck_and_gc(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A directory where an object's file would be (another registry's layout copied in, say) is not
    the mirror's: fsck reports it and ``--repair`` leaves it (it crashed on ``unlink`` before), gc
    neither counts it nor crashes."""
    mirror = mirror_factory()
    pull(http, mirror.url, "library/small", "1", images.small)
    mirror.stop()
    hex_ = "49" + "0" * 62
    foreign = mirror.data_dir / "blobs" / "sha256" / "49" / hex_
    foreign.mkdir(parents=True)
    (foreign / "data").write_text("not the mirror's")
    for flags in ((), ("--repair",)):
        check = mirror_cli("fsck", "--data", str(mirror.data_dir), *flags)
        assert check.returncode == 1, check.stdout + check.stderr
        assert f"stray directory in blobs/ (not removed): {foreign}" in check.stdout, check.stdout
        assert "Traceback" not in check.stderr, check.stderr
    assert (foreign / "data").read_text() == "not the mirror's"
    for flags in (("--dry-run",), ()):
        collected = mirror_cli("gc", "--data", str(mirror.data_dir), *flags)
        assert collected.returncode == 0 and "Traceback" not in collected.stderr, collected.stdout + collected.stderr
    assert (foreign / "data").read_text() == "not the mirror's"
    mirror.start()
    pull(http, mirror.url, "library/small", "1", images.small)
