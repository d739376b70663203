"""End to end with real clients: dockerd, skopeo, and a mirror that gets killed.

Every test counts what the upstream registry served (from its own access log), compares
bytes and digests with the images as built, and checks the clients' own output.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx
import pytest

from tests.support import client
from tests.support.catalog import StandardImages
from tests.support.dockerd import Dockerd, forget_all, pull, run
from tests.support.faults import FaultProxy
from tests.support.images import (
    DEFAULT_APPLETS,
    MANIFEST_MEDIA_TYPES,
    Index,
    sha256_digest as sha256,
)
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.skopeo import everything, layout_blobs, skopeo_run
from tests.support.storecheck import verified_objects
from tests.support.waiting import wait_for

LIBRARY = {"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"}
ACCEPT_ALL = ", ".join(MANIFEST_MEDIA_TYPES)
MIB = 1024 * 1024
#: What dockerd picks from an index on this machine.
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
OTHER_ARCH = "arm64" if HOST_ARCH == "amd64" else "amd64"


# -- helpers ---------------------------------------------------------------------------


def blob_path(name: str, digest: str) -> re.Pattern[str]:
    return re.compile(rf"^/v2/{re.escape(name)}/blobs/{re.escape(digest)}$")


def manifest_path(name: str, reference: str) -> re.Pattern[str]:
    return re.compile(rf"^/v2/{re.escape(name)}/manifests/{re.escape(reference)}$")


def blob_gets(registry: UpstreamRegistry | FaultProxy, name: str, digests: Iterable[str]) -> dict[str, int]:
    """How often the upstream was asked for each blob (GET, any status)."""
    return {d: registry.count("GET", blob_path(name, d)) for d in digests}


def push(registry_url: str, images: StandardImages, *which: str) -> None:
    for short in which:
        name, tag, item = images.refs[short]
        if isinstance(item, Index):
            client.push_index(registry_url, name, tag, item)
        else:
            client.push_image(registry_url, name, tag, item)


def copy_to_layout(skopeo: str, source: str, target: Path, *, all_platforms: bool = False) -> Path:
    """``skopeo copy`` an image from the mirror into an OCI layout; return the layout."""
    args = ["copy", "--src-tls-verify=false", "--preserve-digests"]
    if all_platforms:
        args.append("--all")
    skopeo_run(skopeo, *args, source, f"oci:{target}:pulled")
    return target


def assert_stale(mirror: MirrorServer, name: str, tag: str, digest: str) -> None:
    """The mirror answers for the tag from its store, saying the upstream could not confirm it."""
    answer = httpx.head(f"{mirror.url}/v2/{name}/manifests/{tag}", headers={"accept": ACCEPT_ALL},
                        trust_env=False, timeout=30)
    assert answer.status_code == 200
    assert (answer.headers["x-mirror-cache"], answer.headers["docker-content-digest"]) == ("STALE", digest)


# -- dockerd ---------------------------------------------------------------------------


@pytest.mark.slow
def test_dockerd_pulls_and_runs_through_the_mirror_and_without_its_upstream(
    dockerd_factory: Callable[..., Dockerd],
    upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer],
    images: StandardImages,
) -> None:
    registry = upstream_factory()
    push(registry.url, images, "small", "multi", "dlist")
    # A tag TTL of 0 revalidates the tag on every pull: with the upstream gone, that is the STALE path.
    mirror = mirror_factory(registry.url, env={**LIBRARY, "MIRROR_CACHE_TAG_TTL": "0"})
    daemon = dockerd_factory(registry_mirror=mirror.url)
    registry.clear_counts()
    small, multi, dlist = images.small, images.multi, images.dlist
    by_digest = f"small@{small.digest}"

    def check_runs() -> None:
        assert run(daemon, "small:1", "cat", "/etc/image-marker") == "small"
        assert run(daemon, "small:1", "sh", "-c", "echo $((6 * 7)) from $(ls /bin | wc -l) files") \
            == f"42 from {len(DEFAULT_APPLETS) + 1} files\n"  # busybox and its applets

    # Cold: every blob comes from the upstream once.
    pull(daemon, "small:1")
    check_runs()
    assert daemon.docker("image", "inspect", "--format", "{{index .RepoDigests 0}}", "small:1").stdout.strip() \
        == f"small@{small.digest}"
    assert blob_gets(registry, "library/small", small.blobs) == dict.fromkeys(small.blobs, 1)
    assert registry.count("GET", manifest_path("library/small", "1")) == 1

    # An OCI index and a Docker manifest list: dockerd picks this machine's platform, and
    # the other platform's blobs are never fetched.
    for name, index in (("multi", multi), ("dlist", dlist)):
        pull(daemon, f"{name}:1")
        assert run(daemon, f"{name}:1", "cat", "/etc/image-marker") == f"{name}-{HOST_ARCH}"
        assert daemon.docker("image", "inspect", "--format", "{{.Architecture}}", f"{name}:1").stdout.strip() \
            == HOST_ARCH
        mine, other = index.child(HOST_ARCH), index.child(OTHER_ARCH)
        assert blob_gets(registry, f"library/{name}", mine.blobs) == dict.fromkeys(mine.blobs, 1)
        assert blob_gets(registry, f"library/{name}", other.blobs) == dict.fromkeys(other.blobs, 0)
        assert registry.count("GET", manifest_path(f"library/{name}", "1")) == 1
        assert registry.count("GET", manifest_path(f"library/{name}", mine.digest)) == 1
        assert registry.count(None, manifest_path(f"library/{name}", other.digest)) == 0

    # Warm: with every image gone from dockerd, pulls download everything again, but only
    # from the mirror.  The tags are revalidated with a HEAD each, nothing more.
    forget_all(daemon)
    for ref in ("small:1", "multi:1", "dlist:1"):
        pull(daemon, ref)
    check_runs()
    for name, item in (("small", small), ("multi", multi.child(HOST_ARCH)), ("dlist", dlist.child(HOST_ARCH))):
        assert blob_gets(registry, f"library/{name}", item.blobs) == dict.fromkeys(item.blobs, 1)
        assert registry.count("HEAD", manifest_path(f"library/{name}", "1")) == 1
        assert registry.count("GET", manifest_path(f"library/{name}", "1")) == 1

    # Upstream gone: pulls by tag (stale) and by digest still work.
    registry.stop()
    forget_all(daemon)
    pull(daemon, "small:1")
    check_runs()
    forget_all(daemon)
    pull(daemon, by_digest)
    assert run(daemon, by_digest, "cat", "/etc/image-marker") == "small"
    pull(daemon, "multi:1")
    assert run(daemon, "multi:1", "cat", "/etc/image-marker") == f"multi-{HOST_ARCH}"
    assert_stale(mirror, "library/small", "1", small.digest)

    # ... and across a restart of the mirror while the upstream is still down.
    mirror.restart()
    forget_all(daemon)
    pull(daemon, "small:1")
    check_runs()
    forget_all(daemon)
    pull(daemon, by_digest)
    assert run(daemon, by_digest, "cat", "/etc/image-marker") == "small"
    pull(daemon, "dlist:1")
    assert run(daemon, "dlist:1", "cat", "/etc/image-marker") == f"dlist-{HOST_ARCH}"
    assert_stale(mirror, "library/dlist", "1", dlist.digest)
    for name, item in (("small", small), ("multi", multi.child(HOST_ARCH)), ("dlist", dlist.child(HOST_ARCH))):
        assert blob_gets(registry, f"library/{name}", item.blobs) == dict.fromkeys(item.blobs, 1)


# -- skopeo ----------------------------------------------------------------------------


@pytest.mark.slow
def test_skopeo_sees_the_upstreams_digests(
    skopeo: str, upstream: UpstreamRegistry, images: StandardImages, mirror_factory: Callable[..., MirrorServer]
) -> None:
    mirror = mirror_factory(env=LIBRARY)
    for short in ("multi", "dlist", "small"):
        name, tag, item = images.refs[short]
        upstream_digest = upstream.get_manifest(name, tag).headers["docker-content-digest"]
        raw = skopeo_run(skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{mirror.address}/{name}:{tag}")
        assert raw == item.manifest
        assert sha256(raw) == item.digest == upstream_digest
    # A child of an index by digest, and the image config skopeo reads from a manifest.
    child = images.multi.child("arm64")
    raw = skopeo_run(skopeo, "inspect", "--raw", "--tls-verify=false",
                     f"docker://{mirror.address}/library/multi@{child.digest}")
    assert sha256(raw) == child.digest
    config = skopeo_run(skopeo, "inspect", "--config", "--raw", "--tls-verify=false",
                        f"docker://{mirror.address}/library/small:1")
    assert config == images.small.config


@pytest.mark.slow
def test_skopeo_copies_a_whole_index_fetching_each_blob_once(
    skopeo: str, upstream: UpstreamRegistry, images: StandardImages,
    mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    mirror = mirror_factory(env=LIBRARY)
    upstream.clear_counts()
    multi = images.multi
    for attempt in ("first", "second"):
        layout = copy_to_layout(skopeo, f"docker://{mirror.address}/library/multi:1", tmp_path / attempt,
                                all_platforms=True)
        assert layout_blobs(layout) == everything(multi)
        (entry,) = json.loads((layout / "index.json").read_bytes())["manifests"]
        assert (entry["mediaType"], entry["digest"]) == (multi.media_type, multi.digest)
        index = (layout / "blobs" / "sha256" / multi.digest.removeprefix("sha256:")).read_bytes()
        assert index == multi.manifest
        for child in multi.children:
            for digest, path in child.blobs.items():
                assert (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes() \
                    == path.read_bytes()
    assert verified_objects(mirror.data_dir) == everything(multi)
    assert blob_gets(upstream, "library/multi", multi.blobs) == dict.fromkeys(multi.blobs, 1)
    assert upstream.count("GET", manifest_path("library/multi", "1")) == 1
    for child in multi.children:
        assert upstream.count("GET", manifest_path("library/multi", child.digest)) == 1


def test_skopeo_copies_an_image_whose_upstream_breaks_off_a_layer_mid_body(
    skopeo: str, images: StandardImages, fault_proxy: FaultProxy,
    mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    """skopeo does not resume a blob itself: before, the upstream's reset cut its copy off.  The mirror
    now asks for the rest (``Range``), and skopeo gets the whole layer from one fill."""
    mirror = mirror_factory(fault_proxy.url, env=LIBRARY)
    big = images.big
    layer = big.layers[1]
    fault_proxy.clear_counts()
    fault_proxy.add("reset", blob_path("library/big", layer.digest).pattern, method="GET", times=1,
                    after_bytes=2 * MIB)
    layout = copy_to_layout(skopeo, f"docker://{mirror.address}/library/big:1", tmp_path / "copy")
    assert layout_blobs(layout) == everything(big)
    copied = layout / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")
    assert copied.read_bytes() == layer.path.read_bytes()
    statuses = [r.status for r in fault_proxy.requests()
                if r.method == "GET" and blob_path("library/big", layer.digest).search(r.path)]
    assert statuses == [200, 206], statuses


# -- crashes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_right_after_a_complete_pull_loses_nothing(
    skopeo: str, upstream: UpstreamRegistry, images: StandardImages,
    mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    big = images.big
    mirror = mirror_factory(env=LIBRARY)
    upstream.clear_counts()
    copy_to_layout(skopeo, f"docker://{mirror.address}/library/big:1", tmp_path / "first")
    mirror.kill9()
    assert verified_objects(mirror.data_dir) == everything(big)

    mirror.start()
    layout = copy_to_layout(skopeo, f"docker://{mirror.address}/library/big:1", tmp_path / "again")
    assert layout_blobs(layout) == everything(big)
    assert blob_gets(upstream, "library/big", big.blobs) == dict.fromkeys(big.blobs, 1)
    assert upstream.count(None, re.compile(r"^/v2/library/big/manifests/")) == 1


@pytest.mark.slow
def test_a_client_with_the_last_byte_of_a_blob_finds_it_stored_after_a_crash(
    upstream: UpstreamRegistry, images: StandardImages, mirror_factory: Callable[..., MirrorServer]
) -> None:
    """The narrowest window: the mirror dies the moment its client has the whole body.

    The last byte goes out once the blob is verified; ``fsync`` and the rename into ``blobs/``
    follow (README, "Verified store"). A crash in between may lose the cache entry, never
    correctness: the store holds the blob whole or not at all, and it comes back after a restart.
    """
    layer = images.big.layers[2]
    assert layer.size > 64 * MIB
    mirror = mirror_factory(env=LIBRARY)
    upstream.clear_counts()
    hasher = hashlib.sha256()
    with httpx.Client(timeout=60, trust_env=False) as http, \
            http.stream("GET", f"{mirror.url}/v2/library/big/blobs/{layer.digest}") as answer:
        assert answer.headers["x-mirror-cache"] == "MISS"
        assert int(answer.headers["content-length"]) == layer.size
        received = 0
        for data in answer.iter_raw():
            hasher.update(data)
            received += len(data)
            if received == layer.size:
                mirror.kill9()
                break
    assert received == layer.size and "sha256:" + hasher.hexdigest() == layer.digest
    stored = verified_objects(mirror.data_dir)  # every object hashes to its name
    assert stored <= {layer.digest}

    mirror.start()
    assert client.fetch_blob_digest(mirror.url, "library/big", layer.digest) == (layer.digest, layer.size)
    fetched_again = 0 if stored else 1
    assert blob_gets(upstream, "library/big", [layer.digest]) == {layer.digest: 1 + fetched_again}


@pytest.mark.slow
def test_kill9_in_the_middle_of_a_cold_fetch_leaves_no_trace(
    skopeo: str, images: StandardImages, fault_proxy: FaultProxy,
    mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    big = images.big
    layer = big.layers[2]
    mirror = mirror_factory(fault_proxy.url, env=LIBRARY)
    tmp = mirror.data_dir / "tmp"
    partial = tmp / f"sha256-{layer.digest.removeprefix('sha256:')}.partial"
    # 16 MiB at once, then a trickle: the mirror is killed long before the end.
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1,
                    after_bytes=16 * MIB, chunk_size=64 * 1024, delay=0.05)

    outcome: dict[str, object] = {}

    def fetch() -> None:
        received = 0
        try:
            with httpx.Client(timeout=60, trust_env=False) as http, \
                    http.stream("GET", f"{mirror.url}/v2/library/big/blobs/{layer.digest}") as answer:
                outcome["status"] = answer.status_code
                for data in answer.iter_raw():
                    received += len(data)
        except httpx.TransportError as exc:
            outcome["error"] = exc
        outcome["received"] = received

    reader = threading.Thread(target=fetch)
    reader.start()
    wait_for(lambda: partial.exists() and partial.stat().st_size >= 16 * MIB, 30, "the fetch to get going",
             interval=0.01)
    mirror.kill9()
    reader.join(30)
    assert not reader.is_alive()
    assert outcome["status"] == 200 and "error" in outcome
    assert 0 < outcome["received"] < layer.size  # type: ignore[operator]
    # The crash left the partial fetch behind, and nothing of it in the store.
    assert {p.name for p in tmp.iterdir()} == {partial.name, partial.with_suffix(".meta").name}
    assert layer.digest not in verified_objects(mirror.data_dir)

    mirror.start()
    assert list(tmp.iterdir()) == []
    layout = copy_to_layout(skopeo, f"docker://{mirror.address}/library/big:1", tmp_path / "layout")
    assert layout_blobs(layout) == everything(big)
    assert verified_objects(mirror.data_dir) == everything(big)
    assert list(tmp.iterdir()) == []
    # One interrupted fetch, one complete one.
    assert fault_proxy.count("GET", blob_path("library/big", layer.digest)) == 2
    others = set(big.blobs) - {layer.digest}
    assert blob_gets(fault_proxy, "library/big", others) == dict.fromkeys(others, 1)
