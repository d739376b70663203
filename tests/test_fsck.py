"""``mirror fsck`` without ``--verify-content``: objects whose size is not the one recorded of them, and
pushed images that need what a ``DELETE`` took out of their repository.

Each test runs twice: on the filesystem and diskcache, and on a real SeaweedFS bucket with the index in
a real PostgreSQL database.  A real upstream registry and the real mirror under uvicorn fill the store
through the API; the damage is done as someone with access to the store would do it, the mirror
stopped, then ``mirror fsck`` runs as an operator runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mirror.cli import main as cli_main
from mirror.maintenance.fsck import Fsck
from mirror.metadata.diskcache import DiskcacheMetadata
from mirror.metadata.driver import Metadata
from mirror.metadata.postgres import PostgresMetadata
from mirror.storage.driver import StoredObject
from tests.support import client
from tests.support.archives import compress
from tests.support.catalog import StandardImages
from tests.support.client import pull_checked, push_image, push_index
from tests.support.faults import FaultProxy
from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    Index,
    build_image,
    random_layer,
    sha256_digest as sha256,
)
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.schema1 import SCHEMA1_SIGNED, signed_schema1
from tests.support.storecheck import mirror_cli, stored_objects
from tests.support.waiting import wait_for
from tests.test_s3_serve import ROOT, Bucket

SIZE = "object size differs from its record"
DESCRIPTOR = "object size differs from an image's descriptor"
WRONG = "image gives a wrong size for an object"
NOT_LINKED = "pushed image refers to an object not linked in its repository"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class Backend:
    """Where a test's mirror keeps its objects and its index: its data directory and diskcache, or a
    bucket and a PostgreSQL database."""

    bucket: Bucket | None = None
    dsn: str | None = None

    def env(self) -> dict[str, str]:
        """The mirror's environment (and its CLI's) for these backends."""
        if self.bucket is None:
            return {"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"}
        return self.bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=str(self.dsn))

    def objects(self, mirror: MirrorServer) -> dict[str, int]:
        """``{digest: size}`` of every object stored."""
        if self.bucket is not None:
            return self.bucket.objects()
        return {digest: path.stat().st_size for digest, path in stored_objects(mirror.data_dir).items()}

    def overwrite(self, mirror: MirrorServer, digest: str, body: bytes) -> None:
        """Put *body* where the object *digest* is, behind the mirror's back."""
        if self.bucket is not None:
            hex_ = digest.removeprefix("sha256:")
            key = f"{ROOT}/blobs/sha256/{hex_[:2]}/{hex_}"
            self.bucket.client.put_object(Bucket=self.bucket.name, Key=key, Body=body)
            return
        path = stored_objects(mirror.data_dir)[digest]
        path.unlink()
        path.write_bytes(body)

    @contextlib.contextmanager
    def index(self, mirror: MirrorServer) -> Iterator[Metadata]:
        """The mirror's index, opened as its CLI would (the mirror stopped)."""
        opened: Metadata = DiskcacheMetadata(mirror.data_dir / "index") if self.dsn is None \
            else PostgresMetadata(self.dsn)
        try:
            yield opened
        finally:
            opened.close()

    def wait_stored(self, mirror: MirrorServer, digests: Iterable[str]) -> None:
        """Wait for the fills of *digests* to reach the store (just after their client's last byte)."""
        wanted = set(digests)
        wait_for(lambda: wanted <= set(self.objects(mirror)), timeout=30, what="the objects in the store")


@pytest.fixture(params=["filesystem", "s3+postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "filesystem":
        return Backend()
    bucket = Bucket(request.getfixturevalue("seaweedfs"), request.getfixturevalue("s3_bucket"))
    return Backend(bucket, request.getfixturevalue("postgres").create_database())


def fsck(mirror: MirrorServer, backend: Backend, *flags: str) -> tuple[int, set[str]]:
    """``mirror fsck FLAGS`` of the mirror's store: its exit status and the lines it printed."""
    done: subprocess.CompletedProcess[str] = mirror_cli("fsck", "--data", mirror.data_dir, *flags, env=backend.env())
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, set(done.stdout.splitlines())


def clean(mirror: MirrorServer, backend: Backend, *flags: str) -> None:
    status, lines = fsck(mirror, backend, *flags)
    assert status == 0 and any(line.endswith(": clean") for line in lines), lines


def upload(http: httpx.Client, base: str, name: str, data: bytes) -> str:
    answer = http.post(f"{base}/v2/{name}/blobs/uploads/", params={"digest": sha256(data)}, content=data)
    assert answer.status_code == 201, answer.text
    return sha256(data)


def put_manifest(http: httpx.Client, base: str, name: str, reference: str, document: dict[str, object]) -> bytes:
    body = json.dumps(document).encode()
    answer = http.put(f"{base}/v2/{name}/manifests/{reference}", content=body,
                      headers={"content-type": str(document["mediaType"])})
    assert answer.status_code == 201, answer.text
    return body


def descriptor(media_type: str, data: bytes, size: int | None = None) -> dict[str, object]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data) if size is None else size}


def push(http: httpx.Client, base: str, name: str, reference: str, seed: int,
         layer_sizes: Iterable[int | None] = (None, None)) -> tuple[bytes, list[bytes]]:
    """Push an image of a config and random layers (their descriptors giving *layer_sizes*, None: the
    right one); its manifest and ``[config, *layers]``."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    sizes = list(layer_sizes)
    layers = [os.urandom(3000 + 1000 * n + seed) for n in range(len(sizes))]
    for blob in (config, *layers):
        upload(http, base, name, blob)
    manifest = put_manifest(http, base, name, reference, {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, layer, size) for layer, size in zip(layers, sizes, strict=True)]})
    return manifest, [config, *layers]


def pull_through(http: httpx.Client, base: str, name: str, item: Image | Index) -> None:
    """Pull *item* (an index: and each of its images) through the mirror, checking every byte."""
    if isinstance(item, Index):
        answer = http.get(f"{base}/v2/{name}/manifests/1", headers={"accept": item.media_type})
        assert (answer.status_code, answer.content) == (200, item.manifest), answer.text
        for child in item.children:
            pull_checked(http, base, name, child.digest, child)
    else:
        pull_checked(http, base, name, "1", item)


def test_fsck_finds_objects_whose_size_differs_from_their_record_and_repair_removes_them(
    backend: Backend, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A cached manifest replaced by other bytes of another length (its record in the index gives its
    length), a pushed layer truncated (the pushed manifest that needs it gives its size): found from
    the store's listing alone, removed by ``--repair``.  The cached image comes back from the upstream;
    the pushed layer's bytes are lost, so the image that needs it stays reported until it is pushed again."""
    mirror = mirror_factory(env=backend.env())
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    manifest, (_, layer, _) = push(http, mirror.url, "team/app", "v1", seed=1)
    image, cached, lost = sha256(manifest), images.small.digest, sha256(layer)
    backend.wait_stored(mirror, [cached, *images.small.blobs, image, lost])
    mirror.stop()
    backend.overwrite(mirror, cached, images.small.manifest + b"\n")
    backend.overwrite(mirror, lost, layer[:1000])

    status, lines = fsck(mirror, backend)
    record = f"{SIZE}: {cached}: {images.small.size + 1} bytes, the index records {images.small.size}"
    assert status == 1 and record in lines, lines
    assert f"{DESCRIPTOR}: {lost}: 1000 bytes, {len(layer)} in local/team/app@{image} (the object or the manifest " \
           "is wrong: --repair re-hashes it)" in lines, lines

    status, lines = fsck(mirror, backend, "--repair")
    found = {record, f"{SIZE}: {lost}: 1000 bytes, {len(layer)} in local/team/app@{image}"}  # re-hashed: the object
    assert {f"{line} (repaired)" for line in found} <= lines, lines
    assert any(line.startswith("tag points to a missing manifest: ") and line.endswith(f"{cached} (repaired)")
               for line in lines), lines
    assert status == 1 and f"pushed image refers to a missing object: local/team/app@{image} -> {lost}" in lines
    assert not {cached, lost} & set(backend.objects(mirror))

    mirror.start()
    assert pull_checked(http, mirror.url, "library/small", "1", images.small)[0] == "MISS"
    gone = http.get(f"{mirror.url}/v2/team/app/blobs/{lost}")
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    upload(http, mirror.url, "team/app", layer)  # the client pushes it again
    backend.wait_stored(mirror, [cached])
    mirror.stop()
    clean(mirror, backend)


def test_fsck_finds_a_truncated_cached_layer_without_re_hashing_and_repair_has_it_fetched_again(
    backend: Backend, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A layer pulled through and then cut short (a disk that lost its tail): the cached image's
    manifest gives its size, so the store's listing shows it; ``--repair`` re-hashes and removes it,
    and the next pull fetches it from the upstream again."""
    mirror = mirror_factory(env=backend.env())
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    backend.wait_stored(mirror, [images.small.digest, *images.small.blobs])
    mirror.stop()
    layer = images.small.layers[0]
    backend.overwrite(mirror, layer.digest, layer.path.read_bytes()[: layer.size // 2])

    status, lines = fsck(mirror, backend)  # a cached image's object is re-hashed at once: no manifest of ours
    found = f"{layer.digest}: {layer.size // 2} bytes, {layer.size} in docker.io/library/small@{images.small.digest}"
    assert status == 1 and f"{SIZE}: {found}" in lines and any(line.endswith(": 1 problem") for line in lines), lines
    assert layer.digest in backend.objects(mirror)  # nothing changed without --repair
    status, lines = fsck(mirror, backend, "--repair")
    assert status == 0 and f"{SIZE}: {found} (repaired)" in lines, lines
    assert layer.digest not in backend.objects(mirror)

    mirror.start()
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    backend.wait_stored(mirror, [layer.digest])
    mirror.stop()
    clean(mirror, backend)


def test_fsck_repair_of_a_layer_a_pushed_image_shares_with_a_cached_one_keeps_the_pushed_link(
    backend: Backend, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """An image pushed on a cached base image shares its layers: one cut short is removed by ``--repair``,
    the pushed image is reported as missing it until the cached image's next pull fetches it again, and
    then it is whole (its repository's link was kept: the repair had removed it, so the pushed image
    stayed broken, "not linked in its repository", with the bytes back in the store)."""
    mirror = mirror_factory(env=backend.env())
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    client.push_image(mirror.url, "team/copy", "v1", images.small, client=http)
    backend.wait_stored(mirror, [images.small.digest, *images.small.blobs])
    mirror.stop()
    layer = images.small.layers[0]
    backend.overwrite(mirror, layer.digest, layer.path.read_bytes()[: layer.size // 2])

    status, lines = fsck(mirror, backend, "--repair")
    assert any(line.startswith(f"{SIZE}: {layer.digest}: ") and line.endswith(" (repaired)") for line in lines), lines
    kept = f"pushed object missing until a pull of a cached image that has it fetches it again: local/team/copy@" \
           f"{layer.digest}"
    assert status == 1 and kept in lines and not any(line.startswith(NOT_LINKED) for line in lines), lines
    assert layer.digest not in backend.objects(mirror)
    status, lines = fsck(mirror, backend, "--repair")  # kept by a second repair too
    assert status == 1 and kept in lines, lines

    mirror.start()
    gone = http.get(f"{mirror.url}/v2/team/copy/blobs/{layer.digest}")
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    backend.wait_stored(mirror, [layer.digest])
    pull_checked(http, mirror.url, "team/copy", "v1", images.small)
    mirror.stop()
    clean(mirror, backend)


def test_fsck_repair_beside_a_serving_mirror_takes_what_it_removes_out_of_the_stores_size(
    backend: Backend, images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A truncated layer ``--repair`` removes while the mirror serves leaves the store's size
    (``mirror_store_size_bytes``, what eviction weighs against ``cache.max_size``) as the store adds
    up: it lost the layer's size as stored, and gets it back when the next pull fetches it again (it
    was counted twice until the next collection)."""
    mirror = mirror_factory(env=backend.env())
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    backend.wait_stored(mirror, [images.small.digest, *images.small.blobs])
    whole = sum(backend.objects(mirror).values())

    def counted() -> float:
        return value(scrape(f"{mirror.url}/metrics"), "mirror_store_size_bytes")

    wait_for(lambda: counted() == whole, timeout=10, what="the store's size counted")
    layer = images.small.layers[0]
    backend.overwrite(mirror, layer.digest, layer.path.read_bytes()[: layer.size // 2])
    status, lines = fsck(mirror, backend, "--repair")
    assert status == 0 and layer.digest not in backend.objects(mirror), lines
    time.sleep(1.1)  # the figures of /metrics are kept for a second
    assert counted() == whole - layer.size
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    backend.wait_stored(mirror, [layer.digest])
    time.sleep(1.1)
    assert counted() == whole == sum(backend.objects(mirror).values())


def test_fsck_takes_a_cached_image_whose_upstream_manifest_gives_a_wrong_size_for_no_problem(
    backend: Backend, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
    tmp_path: Path,
) -> None:
    """The upstream's manifest gives a layer 7 bytes more than it has (distribution takes such a push):
    the layer stored is whole, which fsck finds by re-hashing it, and nothing here is to repair."""
    built = build_image(tmp_path / "lie", [random_layer(tmp_path / "lie", 4096, seed=93)])
    document = json.loads(built.manifest)
    document["layers"][0]["size"] += 7
    lying = dataclasses.replace(built, manifest=json.dumps(document).encode(),
                                digest=sha256(json.dumps(document).encode()))
    client.push_image(upstream.url, "w/lie", "1", lying, client=http)
    mirror = mirror_factory(env=backend.env())
    assert http.get(f"{mirror.url}/v2/w/lie/manifests/1", headers={"accept": lying.media_type}).status_code == 200
    for digest in lying.blobs:
        assert http.get(f"{mirror.url}/v2/w/lie/blobs/{digest}").status_code == 200
    backend.wait_stored(mirror, [lying.digest, *lying.blobs])
    mirror.stop()
    clean(mirror, backend)
    clean(mirror, backend, "--repair")


def test_fsck_beside_a_serving_mirror_takes_nothing_stored_after_its_listing_for_missing(
    backend: Backend, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """fsck lists the store, then reads the index: what a server running beside it stores in between
    has links, tags and records whose objects the listing lacks.  They are looked up again before
    anything is called missing: plain fsck is clean with a whole image pushed in between, and
    ``--repair`` (which holds manifest pushes off) unlinks none of the layers uploaded meanwhile, so the
    manifest that needs them is taken once it returns."""
    mirror = mirror_factory(env=backend.env())
    push(http, mirror.url, "team/app", "v1", seed=3)
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": 11}).encode()
    layer = os.urandom(5000)
    listing = Fsck._objects
    during: list[Callable[[], object]] = [lambda: push(http, mirror.url, "team/late", "v1", seed=10),
                                          lambda: [upload(http, mirror.url, "team/late", b) for b in (config, layer)]]

    def listed_then_stored(self: Fsck) -> dict[str, StoredObject]:
        found = listing(self)
        during.pop(0)()
        return found

    monkeypatch.setattr(Fsck, "_objects", listed_then_stored)
    for key in [k for k in os.environ if k.startswith("MIRROR_")]:
        monkeypatch.delenv(key)
    for key, setting in backend.env().items():
        monkeypatch.setenv(key, setting)
    for flags in ([], ["--repair"]):
        status = cli_main(["fsck", "--data", str(mirror.data_dir), *flags])
        printed = capsys.readouterr().out.splitlines()
        assert status == 0 and len(printed) == 1 and printed[0].endswith(": clean"), printed
    assert not during
    put_manifest(http, mirror.url, "team/late", "v2", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, layer)]})
    assert http.get(f"{mirror.url}/v2/team/late/blobs/{sha256(layer)}").content == layer


def test_fsck_repair_keeps_an_object_a_pushed_manifest_gives_a_wrong_size(
    backend: Backend, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A push is not refused for a descriptor's size (nor is it by distribution): the object may be
    whole and the manifest wrong.  ``--repair`` re-hashes it before removing anything, keeps it, and
    reports the image, which clients that check sizes cannot pull."""
    mirror = mirror_factory(env=backend.env())
    manifest, (_, layer) = push(http, mirror.url, "team/app", "v1", seed=2, layer_sizes=[3009])
    image, digest = sha256(manifest), sha256(layer)
    assert len(layer) == 3002
    mirror.stop()

    status, lines = fsck(mirror, backend)
    assert status == 1 and f"{DESCRIPTOR}: {digest}: 3002 bytes, 3009 in local/team/app@{image} (the object or " \
        "the manifest is wrong: --repair re-hashes it)" in lines, lines
    wrong = f"{WRONG}: local/team/app@{image} -> {digest}: 3009 bytes, stored 3002"
    for flags in (["--repair"], ["--verify-content"]):
        status, lines = fsck(mirror, backend, *flags)
        assert status == 1 and wrong in lines and not any(line.endswith("(repaired)") for line in lines), lines
    assert backend.objects(mirror)[digest] == 3002

    mirror.start()
    kept = http.get(f"{mirror.url}/v2/team/app/blobs/{digest}")
    assert (kept.status_code, kept.content) == (200, layer)


def test_fsck_reports_pushed_images_that_need_what_was_deleted_from_their_repository(
    backend: Backend, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """``DELETE`` of a layer an image needs, and of the child manifest an index needs: allowed (as
    distribution allows it), and the objects stay (the manifests still reference them), but pulls of
    those images now fail.  fsck says so, and ``--repair`` does not undo the deletes."""
    mirror = mirror_factory(env=backend.env())
    manifest, (_, layer, _) = push(http, mirror.url, "team/app", "v1", seed=3)
    child, _ = push(http, mirror.url, "team/app", "child", seed=4)
    index = put_manifest(http, mirror.url, "team/app", "multi", {
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{**descriptor(OCI_MANIFEST, child), "platform": {"architecture": "amd64", "os": "linux"}}]})
    image, deleted_layer, deleted_child, listed = sha256(manifest), sha256(layer), sha256(child), sha256(index)
    clean(mirror, backend)

    assert http.delete(f"{mirror.url}/v2/team/app/blobs/{deleted_layer}").status_code == 202
    assert http.delete(f"{mirror.url}/v2/team/app/manifests/{deleted_child}").status_code == 202
    assert http.get(f"{mirror.url}/v2/team/app/manifests/v1", headers={"accept": OCI_MANIFEST}).status_code == 200
    assert http.get(f"{mirror.url}/v2/team/app/blobs/{deleted_layer}").status_code == 404
    assert http.get(f"{mirror.url}/v2/team/app/manifests/{deleted_child}",
                    headers={"accept": OCI_MANIFEST}).status_code == 404
    mirror.stop()
    assert {deleted_layer, deleted_child} <= set(backend.objects(mirror))

    found = {f"{NOT_LINKED}: local/team/app@{image} -> {deleted_layer}",
             f"{NOT_LINKED}: local/team/app@{listed} -> {deleted_child}"}
    for flags in ([], ["--repair"]):
        status, lines = fsck(mirror, backend, *flags)
        assert status == 1 and found <= lines and not any(line.endswith("(repaired)") for line in lines), lines

    mirror.start()
    assert http.get(f"{mirror.url}/v2/team/app/blobs/{deleted_layer}").status_code == 404, "not linked again"
    upload(http, mirror.url, "team/app", layer)  # pushed again, as a client would
    put_manifest(http, mirror.url, "team/app", deleted_child, json.loads(child))
    mirror.stop()
    clean(mirror, backend)


def test_fsck_counts_the_objects_no_repository_links_and_gc_removes_them(
    backend: Backend, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A blob pushed, then deleted (its object stays: distribution's ``DELETE`` unlinks), as a collector
    stopped between its index and its deletes leaves objects: fsck counts it on a line of its own and
    calls the store clean; ``mirror gc`` removes it.  Before, fsck said nothing of it."""
    mirror = mirror_factory(env=backend.env())
    data = os.urandom(5000)
    assert http.post(f"{mirror.url}/v2/team/app/blobs/uploads/", params={"digest": sha256(data)},
                     content=data).status_code == 201
    backend.wait_stored(mirror, [sha256(data)])
    assert http.delete(f"{mirror.url}/v2/team/app/blobs/{sha256(data)}").status_code == 202
    mirror.stop()
    said = "1 object (4.9 KiB) no repository links: mirror gc removes them once older than gc.grace"
    status, lines = fsck(mirror, backend)
    assert status == 0 and said in lines and any(line.endswith(": clean") for line in lines), lines

    collected = mirror_cli("gc", "--data", mirror.data_dir, env={**backend.env(), "MIRROR_GC_GRACE": "0s"})
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert sha256(data) not in backend.objects(mirror)
    status, lines = fsck(mirror, backend)
    assert status == 0 and not any("no repository links" in line for line in lines), lines


def test_an_object_put_in_the_store_without_a_record_is_counted_and_collected_once_past_the_grace(
    backend: Backend, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """An object under its digest's key that the index has never recorded (a copy made by hand, a
    writer stopped between its store and its index): fsck counts it with the objects no repository
    links, a collection within ``gc.grace`` keeps it, and one past the grace removes it and says so."""
    mirror = mirror_factory(env=backend.env())
    mirror.stop()
    data = os.urandom(3000)
    if backend.bucket is None:
        hex_ = sha256(data).removeprefix("sha256:")
        path = mirror.data_dir / "blobs" / "sha256" / hex_[:2] / hex_
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        backend.overwrite(mirror, sha256(data), data)
    assert backend.objects(mirror) == {sha256(data): len(data)}
    status, lines = fsck(mirror, backend)
    said = "1 object (2.9 KiB) no repository links: mirror gc removes them once older than gc.grace"
    assert status == 0 and said in lines, lines

    kept = mirror_cli("gc", "--data", mirror.data_dir, env={**backend.env(), "MIRROR_GC_GRACE": "1h"})
    assert kept.returncode == 0 and backend.objects(mirror) == {sha256(data): len(data)}, kept.stdout + kept.stderr
    time.sleep(1.1)
    freed = mirror_cli("gc", "--data", mirror.data_dir, env={**backend.env(), "MIRROR_GC_GRACE": "1s"})
    assert freed.returncode == 0 and "freed 1 objects" in freed.stdout, freed.stdout + freed.stderr
    assert backend.objects(mirror) == {}
    clean(mirror, backend)


def test_a_tag_whose_manifest_record_is_lost_keeps_its_image_from_gc_and_repair_records_it_again(
    backend: Backend, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A damaged index: the manifest record a pushed image's tag names is gone (the tag, the links and the
    objects stay).  A collection keeps what the tag reaches (it used to read a manifest only through its
    record, and freed the image's config and layers); fsck reports the tag (it used to say nothing), and
    ``--repair`` records the manifest again from the object: the image is pulled whole."""
    mirror = mirror_factory(env=backend.env())
    manifest, blobs = push(http, mirror.url, "team/app", "v1", seed=21)
    digest = sha256(manifest)
    backend.wait_stored(mirror, [digest, *map(sha256, blobs)])
    mirror.stop()
    with backend.index(mirror) as index:
        index.forget(manifests=[digest])
        assert index.get_manifest(digest) is None and index.get_tag("local/team/app", "v1") is not None
    stored = backend.objects(mirror)
    collected = mirror_cli("gc", "--data", mirror.data_dir, env={**backend.env(), "MIRROR_GC_GRACE": "0s"})
    assert collected.returncode == 0 and backend.objects(mirror) == stored, collected.stdout + collected.stderr

    said = f"tag points to a manifest the index has no record of: local/team/app:v1 -> {digest}"
    status, lines = fsck(mirror, backend)
    assert status == 1 and said in lines, lines
    status, lines = fsck(mirror, backend, "--repair")
    assert f"{said} (repaired)" in lines, lines
    clean(mirror, backend)
    with backend.index(mirror) as index:
        record = index.get_manifest(digest)
        assert record is not None and (record.media_type, record.size) == (OCI_MANIFEST, len(manifest))

    mirror.start()
    answer = http.get(f"{mirror.url}/v2/team/app/manifests/v1", headers={"accept": OCI_MANIFEST})
    assert (answer.status_code, answer.content) == (200, manifest)
    for blob in blobs:
        assert http.get(f"{mirror.url}/v2/team/app/blobs/{sha256(blob)}").content == blob


def test_fsck_does_not_ask_for_the_subject_of_a_pushed_referrer(
    backend: Backend, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A registry accepts a manifest whose ``subject`` it does not hold (distribution-spec, "Pushing
    Manifests with Subject"): an artifact pushed before its image, or kept after the image was deleted,
    can be pulled; nothing is missing."""
    mirror = mirror_factory(env=backend.env())
    empty, signature = b"{}", os.urandom(700)
    for blob in (empty, signature):
        upload(http, mirror.url, "team/app", blob)
    absent = {"mediaType": OCI_MANIFEST, "digest": sha256(b"an image pushed later"), "size": 21}
    put_manifest(http, mirror.url, "team/app", "sig", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.signature",
        "config": descriptor("application/vnd.oci.empty.v1+json", empty),
        "layers": [descriptor("application/vnd.example.signature", signature)], "subject": absent})
    mirror.stop()
    clean(mirror, backend)


def test_fsck_finds_nothing_wrong_in_a_healthy_store(
    backend: Backend, images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client, tmp_path: Path,
) -> None:
    """No false alarm from the new checks: images pulled through (gzip layers, an OCI index, a Docker
    list), pushed (gzip and zstd layers, an index), and a signed schema 1 manifest whose index record
    is the length of a copy signed again, longer than the one stored (both named by their payload)."""
    mirror = mirror_factory(fault_proxy.url, env=backend.env())
    for short, (name, _, item) in images.refs.items():
        if short != "big":
            pull_through(http, mirror.url, name, item)
    push_image(mirror.url, "team/small", "1", images.small, client=http)
    push_index(mirror.url, "team/multi", "1", images.multi, client=http)
    plain = random_layer(tmp_path, 20000, 61, compressed=False)
    zstd = compress(plain.path, "zstd").read_bytes()
    upload(http, mirror.url, "team/zstd", config := b'{"architecture":"amd64","os":"linux"}')
    upload(http, mirror.url, "team/zstd", zstd)
    put_manifest(http, mirror.url, "team/zstd", "1", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+zstd", zstd)]})

    old = signed_schema1("library/old", "1", [random_layer(tmp_path, 3000, 62)])
    resigned = twice_signed(old.body)
    for repo, body in (("old", old.body), ("old2", resigned)):
        fault_proxy.add("status", f"/library/{repo}/manifests/1$", status=200, body=body,
                        headers={"content-type": SCHEMA1_SIGNED, "docker-content-digest": old.digest})
        answer = http.get(f"{mirror.url}/v2/{repo}/manifests/1", headers={"accept": SCHEMA1_SIGNED})
        assert (answer.status_code, answer.headers["docker-content-digest"]) == (200, old.digest), answer.text
    backend.wait_stored(mirror, [old.digest])
    assert backend.objects(mirror)[old.digest] == len(old.body) < len(resigned)  # stored once: the first copy
    mirror.stop()
    clean(mirror, backend)
    clean(mirror, backend, "--verify-content")


def twice_signed(body: bytes) -> bytes:
    """A signed schema 1 manifest with its signature given twice: the same payload (and digest), more bytes."""
    signatures = json.loads(body)["signatures"]
    cut = body.index(b',\n   "signatures"')
    block = json.dumps(signatures * 2, indent=3).replace("\n", "\n   ")
    return body[:cut] + f',\n   "signatures": {block}\n}}'.encode()


def test_fsck_reports_a_tampered_pushed_manifest_and_changes_nothing_without_repair(
    backend: Backend, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A pushed manifest's bytes changed in the store, its length kept: plain ``fsck`` reads it as it
    is stored, past the S3 driver's check (which removes what does not match as it reads it), reports
    it, and leaves the store as it found it; ``--repair`` removes it and the tag that names it."""
    mirror = mirror_factory(env=backend.env())
    manifest, _ = push(http, mirror.url, "team/app", "v1", seed=5)
    image = sha256(manifest)
    mirror.stop()
    tampered = manifest[:-1] + b" "  # its closing brace: the length kept, the bytes not
    assert manifest.endswith(b"}")
    backend.overwrite(mirror, image, tampered)

    corrupt = f"corrupt object (content does not match its digest): {image}"
    for _ in range(2):
        status, lines = fsck(mirror, backend)
        assert status == 1 and corrupt in lines, lines
        assert backend.objects(mirror)[image] == len(manifest)  # still there: nothing was changed
    status, lines = fsck(mirror, backend, "--repair")
    assert status == 0 and f"{corrupt} (repaired)" in lines, lines
    assert f"tag points to a missing manifest: local/team/app:v1 -> {image} (repaired)" in lines, lines
    assert image not in backend.objects(mirror)
    clean(mirror, backend)
