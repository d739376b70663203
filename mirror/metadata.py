"""The index: what the store's bytes mean, kept in diskcache under ``DATA/index/``.

Keys (repositories are filed under their registry, e.g. ``docker.io/library/alpine``):

* ``tag/<repo>:<tag>``        -> (digest, media type, fetched-at): where a tag pointed when last checked
* ``tags/<repo>``             -> sorted tuple of the tags known locally for a repository
* ``manifest/<digest>``       -> (media type, size) of a stored manifest
* ``link/<repo>@<digest>``    -> True: the repository may serve this manifest or blob

diskcache (SQLite in WAL mode) is safe to share between worker processes.  Reads are cheap
enough for the event loop; writes should go through a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import diskcache


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: str
    media_type: str
    fetched_at: float


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    media_type: str
    size: int


class Metadata:
    def __init__(self, directory: Path) -> None:
        self._cache = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**62)

    def close(self) -> None:
        self._cache.close()

    # -- tags --

    def get_tag(self, repo: str, tag: str) -> TagRecord | None:
        value = self._cache.get(f"tag/{repo}:{tag}")
        return None if value is None else TagRecord(*value)

    def set_tag(self, repo: str, tag: str, record: TagRecord) -> None:
        with self._cache.transact():
            self._cache.set(f"tag/{repo}:{tag}", (record.digest, record.media_type, record.fetched_at))
            known = self._cache.get(f"tags/{repo}", ())
            if tag not in known:
                self._cache.set(f"tags/{repo}", tuple(sorted((*known, tag))))

    def tags(self, repo: str) -> list[str]:
        return list(self._cache.get(f"tags/{repo}", ()))

    # -- manifests and links --

    def get_manifest(self, digest: str) -> ManifestRecord | None:
        value = self._cache.get(f"manifest/{digest}")
        return None if value is None else ManifestRecord(*value)

    def put_manifest(self, digest: str, media_type: str, size: int) -> None:
        self._cache.set(f"manifest/{digest}", (media_type, size))

    def link(self, repo: str, digests: Iterable[str]) -> None:
        with self._cache.transact():
            for digest in digests:
                self._cache.set(f"link/{repo}@{digest}", True)

    def is_linked(self, repo: str, digest: str) -> bool:
        return f"link/{repo}@{digest}" in self._cache
