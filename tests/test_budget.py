"""The disk budget holds after a burst: eviction resumes by itself, spares open transfers, says why.

Real mirror processes in front of a real docker-registry (and, in the slow test, a real dockerd);
what was evicted is proven by what the upstream has to serve again, or by the upstream being gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.dockerd import Dockerd
from tests.support.images import (
    OCI_MANIFEST,
    Image,
    build_image,
    busybox_layer,
    random_layer,
    sha256_digest as sha256,
    write_oci_layout,
)
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import mirror_cli
from tests.support.waiting import eventually
from tests.test_gc import ALL_TYPES, MIB, pull, sized_upstream, store_bytes

__all__ = ["sized_upstream"]  # the module fixture: six images of one 8 MiB layer (library/img0..img5:1)


def push_image(http: httpx.Client, base: str, name: str, layer: bytes) -> bytes:
    """Push a one-layer image as ``name:1``; return its manifest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                         "config": {}}).encode()
    for blob in (layer, config):
        answer = http.post(f"{base}/v2/{name}/blobs/uploads/", params={"digest": sha256(blob)}, content=blob)
        assert answer.status_code == 201, answer.text
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha256(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": sha256(layer), "size": len(layer)}]}).encode()
    answer = http.put(f"{base}/v2/{name}/manifests/1", content=manifest, headers={"content-type": OCI_MANIFEST})
    assert answer.status_code == 201, answer.text
    return manifest


@contextlib.contextmanager
def slow_reader(address: str, path: str) -> Iterator[None]:
    """A client that asks for *path* and reads only the start of the answer while the block runs.

    Its small receive buffer keeps the mirror's transfer of a blob of several MiB open.
    """
    host, _, port = address.rpartition(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.connect((host, int(port)))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
        head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 "), head[:200]
        yield


@pytest.mark.parametrize("workers", [1, 2])
def test_eviction_resumes_by_itself_and_spares_open_transfers(
    sized_upstream: tuple[UpstreamRegistry, list[Image]], mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client, workers: int,
) -> None:
    """With two workers, the transfer and the collector are in different processes half of the time."""
    registry, images = sized_upstream
    budget = 20 * MIB  # high watermark 19 MiB, low 10 MiB: two 8 MiB images are above the low one
    mirror = mirror_factory(registry.url, workers=workers, env={
        "MIRROR_CACHE_MAX_SIZE": str(budget), "MIRROR_CACHE_LOW_WATERMARK": "50%",
        "MIRROR_CACHE_KEEP_RECENT": "2s", "MIRROR_GC_GRACE": "1h"})

    # A burst: three images within keep_recent, more than the budget.
    for i in range(3):
        assert pull(http, mirror.url, f"library/img{i}", "1", images[i]) == "MISS"
    # Under the budget at once (the oldest goes, recent as it is)...
    assert eventually(lambda: store_bytes(mirror.data_dir) <= budget, 5), store_bytes(mirror.data_dir)
    # ...and under the low watermark once keep_recent has passed, with no request to wake the collector.
    assert eventually(lambda: store_bytes(mirror.data_dir) <= budget // 2, 10), store_bytes(mirror.data_dir)
    assert "used within cache.keep_recent" in mirror.log_tail(400)
    # (the collector says so just after its deletions, which the store size already shows)
    assert eventually(lambda: "back under its low watermark" in mirror.log_tail(400), 5)
    registry.clear_counts()
    assert pull(http, mirror.url, "library/img2", "1", images[2]) == "HIT"  # the newest stayed
    assert registry.count("GET", re.compile("/blobs/")) == 0

    # An image being served is not evicted, though it is the least recently used.
    layer = images[2].layers[0]
    with slow_reader(mirror.address, f"/v2/library/img2/blobs/{layer.digest}"):
        time.sleep(2.2)  # img2 is no longer recent
        for i in (3, 4):
            assert pull(http, mirror.url, f"library/img{i}", "1", images[i]) == "MISS"
        assert eventually(lambda: "in open transfers" in mirror.log_tail(400), 10)
        # While it is held the collector keeps trying, and takes what it may: img3, then img4.
        assert eventually(lambda: store_bytes(mirror.data_dir) <= budget // 2, 10), store_bytes(mirror.data_dir)
    registry.clear_counts()
    assert pull(http, mirror.url, "library/img2", "1", images[2]) == "HIT"
    assert registry.count("GET", re.compile("/blobs/")) == 0
    assert pull(http, mirror.url, "library/img3", "1", images[3]) == "MISS"


def test_content_that_cannot_be_evicted_shows_over_budget(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    budget = 10 * MIB
    mirror = mirror_factory(env={"MIRROR_CACHE_MAX_SIZE": str(budget)})
    samples = scrape(f"{mirror.url}/metrics")
    assert {labels["reason"] for name, labels, _ in samples if name == "mirror_store_over_budget"} \
        == {"in_use", "recent", "pinned", "grace"}
    assert value(samples, "mirror_store_over_budget") == 0

    # Pushed content is pinned: more of it than the budget cannot be evicted.
    push_image(http, mirror.url, "team/app", os.urandom(12 * MIB))

    def over_for_pins() -> bool:
        samples = scrape(f"{mirror.url}/metrics")
        return value(samples, "mirror_store_over_budget", reason="pinned") == 1 \
            and value(samples, "mirror_store_over_budget") == 1

    assert eventually(over_for_pins, 10), scrape(f"{mirror.url}/metrics")
    assert "stays above its budget" in mirror.log_tail(200) and "pinned or pushed" in mirror.log_tail(200)
    samples = scrape(f"{mirror.url}/metrics")
    assert value(samples, "mirror_store_size_bytes") == store_bytes(mirror.data_dir) > budget


def test_a_preload_into_the_running_servers_store_is_evicted_for_within_seconds(
    sized_upstream: tuple[UpstreamRegistry, list[Image]], mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client, tmp_path: Path,
) -> None:
    """``mirror preload --data`` is another process: the server sees the store grow from the index's
    count, without a pull through it, and evicts cached images to get back under the budget."""
    registry, images = sized_upstream
    mirror = mirror_factory(registry.url, workers=2, env={
        "MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true", "MIRROR_CACHE_MAX_SIZE": "20MiB",
        "MIRROR_CACHE_KEEP_RECENT": "0s"})
    assert pull(http, mirror.url, "library/img0", "1", images[0]) == "MISS"
    # A fill is made durable (and moved into the store) just after its client's last byte.
    layers = sum(layer.size for layer in images[0].layers)
    assert eventually(lambda: store_bytes(mirror.data_dir) > layers, 10), store_bytes(mirror.data_dir)
    cached = store_bytes(mirror.data_dir)
    preloaded = build_image(tmp_path / "pinned", [random_layer(tmp_path / "pinned", 14 * MIB, seed=591)])
    write_oci_layout(tmp_path / "layout", preloaded, "docker.io/library/pinned:1")
    with tarfile.open(tmp_path / "pinned.tar", "w") as tar:
        tar.add(tmp_path / "layout", arcname=".")
    loaded = mirror_cli("preload", "--data", str(mirror.data_dir), str(tmp_path / "pinned.tar"))
    assert loaded.returncode == 0, loaded.stderr
    assert store_bytes(mirror.data_dir) > cached + 14 * MIB > 20 * MIB * 0.95  # over the high watermark

    def evicted() -> bool:
        samples = scrape(f"{mirror.url}/metrics")
        return store_bytes(mirror.data_dir) < cached + 14 * MIB and value(samples, "mirror_store_over_budget") == 0 \
            and value(samples, "mirror_store_size_bytes") == store_bytes(mirror.data_dir) <= 20 * MIB * 0.85

    assert eventually(evicted, 15), (store_bytes(mirror.data_dir), mirror.log_tail(40))
    registry.clear_counts()
    assert pull(http, mirror.url, "library/img0", "1", images[0]) == "MISS"  # evicted: fetched again
    assert registry.count("GET", re.compile(f"/blobs/{images[0].layers[-1].digest}")) == 1
    answer = http.get(f"{mirror.url}/v2/library/pinned/manifests/1", headers={"accept": ALL_TYPES})
    assert answer.status_code == 200 and answer.content == preloaded.manifest


def du_bytes(path: Path) -> int:
    done = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True, timeout=60)
    return int(done.stdout.split()[0])


@pytest.mark.slow
def test_a_burst_of_dockerd_pulls_leaves_the_store_under_its_budget(
    tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
    dockerd_factory: Callable[..., Dockerd], http: httpx.Client,
) -> None:
    registry = upstream_factory()
    images = []
    for i in range(6):  # 6 x 43 MiB: 2.5 times the budget
        image = build_image(tmp_path / f"big{i}", [busybox_layer(tmp_path / f"big{i}", marker=f"big{i}"),
                                                   random_layer(tmp_path / f"big{i}", 42 * MIB, seed=500 + i,
                                                                compressed=False)])
        registry.push_image(f"library/big{i}", "1", image)
        images.append(image)
    total = sum(sum(layer.size for layer in image.layers) for image in images)
    budget = 100 * MIB
    assert total >= 2.5 * budget
    mirror = mirror_factory(registry.url, env={  # the default keep_recent (10s) and watermarks
        "MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true", "MIRROR_CACHE_MAX_SIZE": "100MiB"})

    # A preloaded and a pushed image: pinned, never evicted.
    preloaded = build_image(tmp_path / "pinned", [random_layer(tmp_path / "pinned", 3 * MIB, seed=590)])
    write_oci_layout(tmp_path / "layout", preloaded, "docker.io/library/pinned:1")
    with tarfile.open(tmp_path / "pinned.tar", "w") as tar:
        tar.add(tmp_path / "layout", arcname=".")
    loaded = mirror_cli("preload", "--data", str(mirror.data_dir), str(tmp_path / "pinned.tar"))
    assert loaded.returncode == 0, loaded.stderr
    pushed_layer = os.urandom(5 * MIB)
    pushed_manifest = push_image(http, mirror.url, "team/pushed", pushed_layer)

    # The burst: every image, one after another, as fast as dockerd goes.
    daemon = dockerd_factory(registry_mirror=mirror.url)
    started = time.monotonic()
    for i in range(6):
        out = daemon.docker("pull", f"big{i}:1").stdout
        assert f"Downloaded newer image for big{i}:1" in out, out
    burst = time.monotonic() - started

    # Within 15 s the store is under its budget, by du and by the metric alike.
    def under_budget() -> bool:
        size = value(scrape(f"{mirror.url}/metrics"), "mirror_store_size_bytes")
        return size == store_bytes(mirror.data_dir) and size <= budget and du_bytes(mirror.data_dir) <= budget

    assert eventually(under_budget, 15), (burst, du_bytes(mirror.data_dir), store_bytes(mirror.data_dir),
                                        mirror.log_tail(40))
    assert abs(du_bytes(mirror.data_dir) - store_bytes(mirror.data_dir)) < 2 * MIB  # the index and the rest
    assert value(scrape(f"{mirror.url}/metrics"), "mirror_store_over_budget") == 0

    # The newest image is served with the upstream gone; pinned and pushed content is untouched.
    registry.stop()
    daemon.docker("rmi", "big5:1")
    assert "Downloaded newer image for big5:1" in daemon.docker("pull", "big5:1").stdout
    assert daemon.docker("run", "--rm", "--network", "none", "big5:1", "cat", "/etc/image-marker").stdout \
        .strip() == "big5"
    answer = http.get(f"{mirror.url}/v2/library/pinned/manifests/1", headers={"accept": ALL_TYPES})
    assert answer.status_code == 200 and answer.content == preloaded.manifest
    for layer in preloaded.layers:
        assert sha256(http.get(f"{mirror.url}/v2/library/pinned/blobs/{layer.digest}").content) == layer.digest
    assert http.get(f"{mirror.url}/v2/team/pushed/manifests/1").content == pushed_manifest
    assert sha256(http.get(f"{mirror.url}/v2/team/pushed/blobs/{sha256(pushed_layer)}").content) \
        == sha256(pushed_layer)
