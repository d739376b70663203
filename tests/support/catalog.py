"""The standard image set that the test session pushes to its upstream once.

========================  ==============================================
``library/small:1``       OCI, amd64: busybox + 1 MiB random layer
``library/multi:1``       OCI index: amd64 + arm64/v8 (busybox + 1 MiB)
``library/dlist:1``       Docker manifest list: amd64 + arm64/v8
``library/big:1``         OCI, amd64: random layers of 1, 8 and 64 MiB
========================  ==============================================

Every image has blobs of its own (distinct busybox markers and seeds), so a
test that counts upstream blob requests for one image is not disturbed by
another image it also pulled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .client import push_image, push_index
from .images import Image, Index, Media, build_image, build_index, busybox_layer, random_layer

MIB = 1024 * 1024


def _platform_pair(dir: Path, stem: str, seed: int, media: Media) -> Index:
    amd64 = build_image(dir, [busybox_layer(dir, marker=f"{stem}-amd64"), random_layer(dir, MIB, seed)],
                        arch="amd64", media=media)
    arm64 = build_image(dir, [busybox_layer(dir, marker=f"{stem}-arm64"), random_layer(dir, MIB, seed + 1)],
                        arch="arm64", variant="v8", media=media)
    return build_index([amd64, arm64], media=media)


@dataclass(frozen=True)
class StandardImages:
    """The built images; ``refs`` maps each to its ``(name, tag)``."""

    small: Image
    multi: Index
    dlist: Index
    big: Image

    @classmethod
    def build(cls, dir: Path) -> StandardImages:
        """Build every image's blobs as files under *dir*."""
        dir.mkdir(parents=True, exist_ok=True)
        small = build_image(dir, [busybox_layer(dir, marker="small"), random_layer(dir, MIB, 11)])
        big = build_image(dir, [random_layer(dir, size * MIB, seed) for size, seed in ((1, 41), (8, 42), (64, 43))])
        return cls(
            small=small,
            multi=_platform_pair(dir, "multi", 21, "oci"),
            dlist=_platform_pair(dir, "dlist", 31, "docker"),
            big=big,
        )

    @property
    def refs(self) -> dict[str, tuple[str, str, Image | Index]]:
        """``{short name: (repository, tag, image or index)}``."""
        return {
            "small": ("library/small", "1", self.small),
            "multi": ("library/multi", "1", self.multi),
            "dlist": ("library/dlist", "1", self.dlist),
            "big": ("library/big", "1", self.big),
        }

    def push(self, registry_url: str) -> None:
        """Push (or re-push, e.g. after a test deleted something) every image."""
        for name, tag, item in self.refs.values():
            if isinstance(item, Index):
                push_index(registry_url, name, tag, item)
            else:
                push_image(registry_url, name, tag, item)
