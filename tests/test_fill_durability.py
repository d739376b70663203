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
from tests.support.procs import require_tool
from tests.support.registry import UpstreamRegistry
from tests.test_gc import mirror_cli

MIB = 1 << 20
#: How long the mirror's disk takes over each ``fsync`` (strace delays the call's entry): the window
#: between a fill's last verified byte and its durability, made wide enough to land in every time.
SLOW_FSYNC_S = 2.0


def slow_fsync_disk() -> list[str]:
    """A wrapper command under which every ``fsync`` of the server waits :data:`SLOW_FSYNC_S` first: a
    disk slow to flush (only ``fsync`` is trapped, by seccomp, so nothing else slows down)."""
    strace = require_tool("strace", "strace")
    return [strace, "-f", "--seccomp-bpf", "-e", "trace=fsync", "-o", "/dev/null",
            "-e", f"inject=fsync:delay_enter={int(SLOW_FSYNC_S * 1_000_000)}"]


@dataclass
class _BigBlob:
    """A 64 MiB layer in an upstream of its own, and a mirror in front of it on a disk slow to flush:
    a fill's ``fsync`` and rename follow the client's last byte by :data:`SLOW_FSYNC_S`."""

    registry: UpstreamRegistry
    layer: Layer
    mirror: MirrorServer

    @classmethod
    def make(cls, tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
             mirror_factory: Callable[..., MirrorServer], *, seed: int) -> _BigBlob:
        registry = upstream_factory()
        layer = random_layer(tmp_path, 64 * MIB, seed=seed, compressed=False)
        registry.push_image("library/big", "1", build_image(tmp_path, [layer]))
        mirror = mirror_factory(registry.url, wrapper=slow_fsync_disk())
        registry.clear_counts()  # what the push asked is not the mirror's
        return cls(registry, layer, mirror)

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
    """A crash after a client's last byte of a fill, before its ``fsync`` and rename, loses the cache
    entry and nothing else: the start-up sweep clears it, fsck is clean, the next pull fetches again."""
    case = _BigBlob.make(tmp_path, upstream_factory, mirror_factory, seed=15)
    registry, layer, mirror = case.registry, case.layer, case.mirror
    hex_, blob_url_path, partial, stored = case.hex, case.path, case.partial, case.stored

    hasher, received = hashlib.sha256(), 0
    with httpx.Client(timeout=60.0, trust_env=False) as http, \
            http.stream("GET", f"{mirror.url}{blob_url_path}") as answer:
        assert answer.status_code == 200
        for chunk in answer.iter_raw():
            hasher.update(chunk)
            received += len(chunk)
    # The client has every byte, verified: crash while the fill is made durable.
    assert received == layer.size and f"sha256:{hasher.hexdigest()}" == layer.digest
    in_window = not stored.exists() and partial.exists() and partial.stat().st_mode & 0o777 == 0o444
    mirror.kill9()
    assert in_window, "the fill was durable before the client's last byte: nothing to test"
    assert not stored.exists()
    mirror.start()  # the start-up sweep removes what the dead leader left in tmp/
    check = mirror_cli("fsck", "--data", str(mirror.data_dir), "--verify-content")
    assert check.returncode == 0, check.stdout
    assert not partial.exists() and not stored.exists()
    # Served right after the crash: the lost cache entry is fetched again.
    again = httpx.get(f"{mirror.url}{blob_url_path}", timeout=60.0, trust_env=False)
    assert again.status_code == 200 and hashlib.sha256(again.content).hexdigest() == hex_
    assert registry.count("GET", re.compile(f"^{re.escape(blob_url_path)}$")) == 2


def test_a_head_between_the_last_byte_and_durability_is_answered_as_cached(
    tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A client that HEADs a blob right after its GET's last byte (the fill verified, its fsync
    and rename still to come) hears what the GET said: stored here (HIT), the upstream not asked."""
    case = _BigBlob.make(tmp_path, upstream_factory, mirror_factory, seed=16)
    registry, layer, mirror = case.registry, case.layer, case.mirror
    blob_url_path, partial, stored = case.path, case.partial, case.stored

    received = 0
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        with http.stream("GET", f"{mirror.url}{blob_url_path}") as answer:
            assert answer.status_code == 200
            for chunk in answer.iter_raw():
                received += len(chunk)
        in_window = not stored.exists() and partial.exists() and partial.stat().st_mode & 0o777 == 0o444
        head = http.head(f"{mirror.url}{blob_url_path}")
    assert received == layer.size
    assert in_window, "the fill was durable before the client's last byte: nothing to test"
    assert head.status_code == 200 and head.headers["content-length"] == str(layer.size)
    assert head.headers["x-mirror-cache"] == "HIT"
    assert registry.count("HEAD", re.compile(f"^{re.escape(blob_url_path)}$")) == 0
