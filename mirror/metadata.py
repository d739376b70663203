"""The index: what the store's bytes mean, kept in diskcache under ``DATA/index/``.

Keys (repositories are filed under their registry, e.g. ``docker.io/library/alpine``):

* ``tag/<repo>:<tag>``        -> (digest, media type, fetched-at): where a tag pointed when last checked
* ``tags/<repo>``             -> sorted tuple of the tags known locally for a repository
* ``manifest/<digest>``       -> (media type, size) of a stored manifest
* ``link/<repo>@<digest>``    -> True: the repository may serve this manifest or blob
* ``repo/<repo>``             -> True, and ``catalog`` -> sorted tuple of every such repository
* ``local/<name>``            -> created-at: a repository that was pushed to (filed as ``local/<name>``)
* ``referrers/<repo>@<digest>`` -> tuple of descriptors (dicts) of manifests whose subject is the digest
* ``upload/<uuid>``           -> UploadRecord of a blob upload in progress

Repositories pushed to are filed under ``local/``: they never fall through to the upstream.

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


@dataclass(frozen=True, slots=True)
class UploadRecord:
    name: str
    started_at: float


LOCAL = "local"


def local_repo(name: str) -> str:
    """The index key of a pushed repository."""
    return f"{LOCAL}/{name}"


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
            self._register(repo)

    def untag(self, repo: str, tag: str) -> bool:
        """Forget a tag; False if it was not known."""
        with self._cache.transact():
            found = self._cache.delete(f"tag/{repo}:{tag}")
            known = self._cache.get(f"tags/{repo}", ())
            if tag in known:
                self._cache.set(f"tags/{repo}", tuple(t for t in known if t != tag))
        return bool(found)

    def tags_pointing_to(self, repo: str, digest: str) -> list[str]:
        return [tag for tag in self.tags(repo) if (record := self.get_tag(repo, tag)) and record.digest == digest]

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
            self._register(repo)

    def unlink(self, repo: str, digest: str) -> bool:
        """Take a digest away from a repository; False if it was not linked."""
        return bool(self._cache.delete(f"link/{repo}@{digest}"))

    def is_linked(self, repo: str, digest: str) -> bool:
        return f"link/{repo}@{digest}" in self._cache

    # -- repositories --

    def _register(self, repo: str) -> None:
        """Add a repository to the catalog (call inside a transaction)."""
        if f"repo/{repo}" in self._cache:
            return
        self._cache.set(f"repo/{repo}", True)
        self._cache.set("catalog", tuple(sorted({*self._cache.get("catalog", ()), repo})))

    def repositories(self) -> list[str]:
        """Every repository key known to the index, sorted."""
        return list(self._cache.get("catalog", ()))

    def has_repository(self, repo: str) -> bool:
        return f"repo/{repo}" in self._cache

    def mark_local(self, name: str, now: float) -> None:
        with self._cache.transact():
            if f"local/{name}" not in self._cache:
                self._cache.set(f"local/{name}", now)
            self._register(local_repo(name))

    def is_local(self, name: str) -> bool:
        return f"local/{name}" in self._cache

    # -- referrers --

    def add_referrer(self, repo: str, subject: str, descriptor: dict[str, object]) -> None:
        key = f"referrers/{repo}@{subject}"
        with self._cache.transact():
            known = self._cache.get(key, ())
            if all(d["digest"] != descriptor["digest"] for d in known):
                self._cache.set(key, (*known, descriptor))

    def remove_referrer(self, repo: str, subject: str, digest: str) -> None:
        key = f"referrers/{repo}@{subject}"
        with self._cache.transact():
            known = self._cache.get(key, ())
            self._cache.set(key, tuple(d for d in known if d["digest"] != digest))

    def referrers(self, repo: str, subject: str) -> list[dict[str, object]]:
        return list(self._cache.get(f"referrers/{repo}@{subject}", ()))

    # -- uploads --

    def put_upload(self, uuid: str, record: UploadRecord) -> None:
        self._cache.set(f"upload/{uuid}", (record.name, record.started_at))

    def get_upload(self, uuid: str) -> UploadRecord | None:
        value = self._cache.get(f"upload/{uuid}")
        return None if value is None else UploadRecord(*value)

    def delete_upload(self, uuid: str) -> None:
        self._cache.delete(f"upload/{uuid}")
