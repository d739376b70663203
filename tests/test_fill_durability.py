"""A pull-through fill becomes durable after its readers' last byte (``storage/fill.py``): the bytes are
verified first, and a crash before the ``fsync`` and rename loses the cache entry, never a byte.
Real upstream registry, real mirror process, SIGKILL."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.images import Layer, build_image, random_layer
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.test_gc import mirror_cli

MIB = 1 << 20
ATTEMPTS = 5


@dataclass
class _BigBlob:
    """A 64 MiB layer in an upstream of its own, and a mirror in front of it: a fill long enough
    for its fsync and rename to leave a window after the client's last byte."""

    registry: UpstreamRegistry
    layer: Layer
    mirror: MirrorServer

    @classmethod
    def make(cls, tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
             mirror_factory: Callable[..., MirrorServer], *, seed: int) -> _BigBlob:
        registry = upstream_factory()
        layer = random_layer(tmp_path, 64 * MIB, seed=seed, compressed=False)
        registry.push_image("library/big", "1", build_image(tmp_path, [layer]))
        return cls(registry, layer, mirror_factory(registry.url))

    @property
    def hex(self) -> str:
        return self.layer.digest.removeprefix("sha256:")

    @property
    def path(self) -> str:
        return f"/v2/library/big/blobs/{self.layer.digest}"

    @property
    def partial(self) -> Path:
        """The fill's temp file (``storage/layout.py``)."""
        return self.mirror.data_dir / "tmp" / f"sha256-{self.hex}.partial"

    @property
    def stored(self) -> Path:
        return self.mirror.data_dir / "blobs" / "sha256" / self.hex[:2] / self.hex


def test_kill9_after_the_last_byte_before_durability_loses_only_the_cache_entry(
    tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    case = _BigBlob.make(tmp_path, upstream_factory, mirror_factory, seed=15)
    registry, layer, mirror = case.registry, case.layer, case.mirror
    hex_, blob_url_path, partial, stored = case.hex, case.path, case.partial, case.stored

    caught = 0
    for _ in range(ATTEMPTS):
        registry.clear_counts()
        hasher, received = hashlib.sha256(), 0
        with httpx.Client(timeout=60.0, trust_env=False) as http, \
                http.stream("GET", f"{mirror.url}{blob_url_path}") as answer:
            assert answer.status_code == 200
            for chunk in answer.iter_raw():
                hasher.update(chunk)
                received += len(chunk)
                if received == layer.size:
                    mirror.kill9()  # the client has every byte: crash before durability if we can
                    break
        assert received == layer.size and f"sha256:{hasher.hexdigest()}" == layer.digest
        # Verified but not yet durable: the temp file marked verified, nothing in blobs/.
        window = not stored.exists() and partial.exists() and partial.stat().st_mode & 0o777 == 0o444
        mirror.start()  # the start-up sweep removes what the dead leader left in tmp/
        check = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content")
        assert check.returncode == 0, check.stdout
        if window:
            caught += 1
            assert not partial.exists() and not stored.exists()
        # Served right after the crash: fetched again if it was lost, from the store otherwise.
        again = httpx.get(f"{mirror.url}{blob_url_path}", timeout=60.0, trust_env=False)
        assert again.status_code == 200 and hashlib.sha256(again.content).hexdigest() == hex_
        fetched = registry.count("GET", re.compile(f"^{re.escape(blob_url_path)}$"))
        assert fetched == (2 if window else 1)
        if caught:
            break
        mirror.kill9()  # start cold again
        mirror.start()
        stored.unlink(missing_ok=True)
    assert caught, f"the crash never landed between the last byte and durability in {ATTEMPTS} attempts"


def test_a_head_between_the_last_byte_and_durability_is_answered_as_cached(
    tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A client that HEADs a blob right after its GET's last byte (the fill verified, its fsync
    and rename still to come) hears what the GET said: stored here (HIT), the upstream not asked."""
    case = _BigBlob.make(tmp_path, upstream_factory, mirror_factory, seed=16)
    registry, layer, mirror = case.registry, case.layer, case.mirror
    blob_url_path, partial, stored = case.path, case.partial, case.stored

    caught = 0
    for _ in range(ATTEMPTS):
        registry.clear_counts()
        received = 0
        with httpx.Client(timeout=60.0, trust_env=False) as http:
            with http.stream("GET", f"{mirror.url}{blob_url_path}") as answer:
                assert answer.status_code == 200
                for chunk in answer.iter_raw():
                    received += len(chunk)
            window = not stored.exists() and partial.exists() and partial.stat().st_mode & 0o777 == 0o444
            head = http.head(f"{mirror.url}{blob_url_path}")
        assert received == layer.size
        assert head.status_code == 200 and head.headers["content-length"] == str(layer.size)
        assert head.headers["x-mirror-cache"] == "HIT", f"in the window: {window}"
        assert registry.count("HEAD", re.compile(f"^{re.escape(blob_url_path)}$")) == 0
        caught += window
        if caught:
            break
        mirror.kill9()  # start cold again: the blob linked, not stored
        stored.unlink(missing_ok=True)
        mirror.start()
    assert caught, f"no HEAD landed between the last byte and durability in {ATTEMPTS} attempts"
