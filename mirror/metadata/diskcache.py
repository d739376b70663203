"""The ``diskcache`` metadata driver: the index (``metadata/driver.py``) under ``DATA/index/``.

Keys (repositories are filed under their registry, e.g. ``docker.io/library/alpine``):

* ``tag/<repo>:<tag>``        -> (digest, media type, fetched-at): where a tag pointed when last checked
* ``tags/<repo>``             -> sorted tuple of the tags known locally for a repository
* ``manifest/<digest>``       -> (media type, size) of a stored manifest
* ``link/<repo>@<digest>``    -> True: the repository may serve this manifest or blob
* ``repo/<repo>``             -> True, and ``catalog`` -> sorted tuple of every such repository
* ``local/<name>``            -> created-at: a repository that was pushed to (filed as ``local/<name>``)
* ``referrers/<repo>@<digest>`` -> tuple of descriptors (dicts) of manifests whose subject is the digest
  (pushed ones, and pulled-through ones of a cached repository)
* ``upstream-referrers/<repo>@<digest>[?<artifactType>]`` -> (fetched-at, tuple of descriptors): the
  upstream's last complete referrers list (only of that artifact type when the upstream filtered it)
* ``referrers-api/<registry>`` -> bool: whether that upstream answered the Referrers API when last asked
* ``upload/<uuid>``           -> UploadRecord of a blob upload in progress (``UploadRecord.flat``)
* ``foreign/<digest>``        -> tuple of the ``urls`` a cached manifest gave a non-distributable layer
* ``pin/<repo>@<digest>``     -> pinned-at: a preloaded manifest root (tagged manifest or index) that
  eviction and garbage collection must keep, with everything it references
* ``pin-tagged/<repo>@<digest>`` -> True: that pin goes with the image's last tag (a preload under a tag)
* ``access/<repo>@<digest>``  -> when a manifest was last served for that repository (batched writes)
* ``usage``                   -> bytes in the store (adjusted on every commit, recounted by the collector)
* ``held``                    -> {reason: bytes} that kept the store above its eviction target at the
  last collection (empty when it reached it)
* ``lease/<name>``            -> (holder, token, expires): the latest grant of a lease on *name*
* ``lease-token``             -> the last fencing token granted (of any name)
* ``copy-of``                 -> the ``index_id`` of the index ``mirror migrate`` copied into this one

Next to the database, ``generation`` holds 8 bytes that change whenever the index *withdraws*
something (a link, a record, a tag) or turns a repository local.  Every process maps it, so
answers kept in memory (``api/memo.py``) are dropped in all of them the moment one process, or an
offline ``mirror gc``/``fsck``, takes something away.

Leases expire by the clock given to :class:`DiskcacheMetadata` (``time.time``): the clock of the
one host whose processes share the directory.

Repositories pushed to are filed under ``local/``: they never fall through to the upstream.

diskcache (SQLite in WAL mode) is safe to share between worker processes.  Reads are cheap
enough for the event loop; writes should go through a worker thread.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import diskcache

from ..storage.layout import generation_file
from .dcleases import DiskcacheLeases
from .driver import (
    ManifestRecord,
    Metadata,
    TagRecord,
    UploadRecord,
    local_repo,
)
from .marks import HostMarks
from .releases import DiskcacheReleases
from .scans import DiskcacheRecords

__all__ = ["DiskcacheMetadata", "MappedGeneration"]


class MappedGeneration:
    """A token shared by every process through a memory-mapped file; :meth:`bump` changes it.

    Readers compare it with the token they saw when they last looked at the index: reading it
    costs a memory access, not a query.  A bump writes random bytes rather than a count, so two
    processes bumping at once can never leave the token at a value a reader has already seen.
    """

    SIZE = 8

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < self.SIZE:
                os.ftruncate(fd, self.SIZE)  # a no-op for whoever comes second
            # A page of a mapped file is allocated when first touched: touched on a full filesystem,
            # a hole kills the process (SIGBUS).  Allocated now, without changing a byte.
            os.posix_fallocate(fd, 0, self.SIZE)
            self._map = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)

    def read(self) -> bytes:
        return self._map[:self.SIZE]

    def bump(self) -> None:
        self._map[:self.SIZE] = os.urandom(self.SIZE)

    def close(self) -> None:
        self._map.close()


#: A key no record has: a lookup that answers nothing.
_NO_RECORD = ("open_thread",)


class DiskcacheMetadata(DiskcacheRecords, DiskcacheLeases, DiskcacheReleases, HostMarks, Metadata):
    """The index in diskcache under *directory*; *clock* (seconds) times leases."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._cache = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**62)
        self._generation = MappedGeneration(generation_file(directory))
        self._clock = clock

    @property
    def generation(self) -> MappedGeneration:
        return self._generation

    def open_thread(self) -> None:
        """diskcache opens this thread's SQLite connection with its first query (~0.3 ms)."""
        self._cache.get(_NO_RECORD)

    def index_id(self) -> str:
        self._cache.add("index_id", uuid.uuid4().hex)  # the first opening's: add() keeps one made before
        return str(self._cache.get("index_id"))

    def close(self) -> None:
        self._cache.close()
        self._generation.close()

    # -- tags --

    def get_tag(self, repo: str, tag: str) -> TagRecord | None:
        value = self._cache.get(f"tag/{repo}:{tag}")
        return None if value is None else TagRecord(*value[:3])  # (more: a later version's fields)

    def set_tag(self, repo: str, tag: str, record: TagRecord) -> None:
        with self._cache.transact():
            old = self._cache.get(f"tag/{repo}:{tag}")
            self._cache.set(f"tag/{repo}:{tag}", (record.digest, record.media_type, record.fetched_at))
            known = self._cache.get(f"tags/{repo}", ())
            if tag not in known:
                self._cache.set(f"tags/{repo}", tuple(sorted((*known, tag))))
            self._register(repo)
        if old is not None and tuple(old[:2]) != (record.digest, record.media_type):
            self._generation.bump()

    def untag(self, repo: str, tag: str) -> bool:
        with self._cache.transact():
            found = self._cache.delete(f"tag/{repo}:{tag}")
            known = self._cache.get(f"tags/{repo}", ())
            if tag in known:
                self._cache.set(f"tags/{repo}", tuple(t for t in known if t != tag))
        if found:
            self._generation.bump()
        return bool(found)

    def untag_many(self, repo: str, tags: Iterable[str]) -> None:
        gone = set(tags)
        if not gone:
            return
        with self._cache.transact():
            for tag in gone:
                self._cache.delete(f"tag/{repo}:{tag}")
            known = self._cache.get(f"tags/{repo}", ())
            self._cache.set(f"tags/{repo}", tuple(t for t in known if t not in gone))
        self._generation.bump()

    def tags_pointing_to(self, repo: str, digest: str) -> list[str]:
        return [tag for tag in self.tags(repo) if (record := self.get_tag(repo, tag)) and record.digest == digest]

    def tags(self, repo: str) -> list[str]:
        return list(self._cache.get(f"tags/{repo}", ()))

    def all_tags(self) -> list[tuple[str, str, TagRecord]]:
        out = []
        for key, value in self._items("tag/").items():
            repo, _, tag = key.rpartition(":")
            out.append((repo, tag, TagRecord(*value[:3])))
        return out

    # -- manifests and links --

    def get_manifest(self, digest: str) -> ManifestRecord | None:
        value = self._cache.get(f"manifest/{digest}")
        return None if value is None else ManifestRecord(*value[:2])

    def put_manifest(self, digest: str, media_type: str, size: int) -> None:
        key = f"manifest/{digest}"
        with self._cache.transact():
            before = self._cache.get(key)
            self._cache.set(key, (media_type, size))
        if before is not None and tuple(before) != (media_type, size):
            self._generation.bump()  # answers remembered of it (the memo's) are out of date

    def manifest_digests(self) -> list[str]:
        return [key[len("manifest/"):] for key in self._keys("manifest/")]

    def count_manifests(self) -> int:
        return int(self._cache._sql("SELECT COUNT(*) FROM Cache WHERE raw = 1 AND key >= ? AND key < ?",
                                    ("manifest/", "manifest/\U0010ffff")).fetchone()[0])

    def link(self, repo: str, digests: Iterable[str]) -> None:
        with self._cache.transact():
            for digest in digests:
                self._cache.set(f"link/{repo}@{digest}", True)
            self._register(repo)

    def unlink(self, repo: str, digest: str) -> bool:
        found = bool(self._cache.delete(f"link/{repo}@{digest}"))
        if found:
            self._generation.bump()
        return found

    def is_linked(self, repo: str, digest: str) -> bool:
        return f"link/{repo}@{digest}" in self._cache

    def all_links(self) -> list[tuple[str, str]]:
        return [_split(key, "link/") for key in self._keys("link/")]

    # -- repositories --

    def _register(self, repo: str) -> None:
        """Add a repository to the catalog (call inside a transaction)."""
        if f"repo/{repo}" in self._cache:
            return
        self._cache.set(f"repo/{repo}", True)
        self._cache.set("catalog", tuple(sorted({*self._cache.get("catalog", ()), repo})))

    def repositories(self) -> list[str]:
        return list(self._cache.get("catalog", ()))

    def has_repository(self, repo: str) -> bool:
        return f"repo/{repo}" in self._cache

    def mark_local(self, name: str, now: float) -> None:
        with self._cache.transact():
            created = f"local/{name}" not in self._cache
            if created:
                self._cache.set(f"local/{name}", now)
            self._register(local_repo(name))
        if created:
            self._generation.bump()  # its requests no longer go to the upstream

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

    def put_upstream_referrers(self, repo: str, subject: str, artifact_type: str | None,
                               descriptors: Iterable[dict[str, Any]], now: float) -> None:
        suffix = f"?{artifact_type}" if artifact_type is not None else ""
        self._cache.set(f"upstream-referrers/{repo}@{subject}{suffix}", (now, tuple(descriptors)))

    def upstream_referrers(self, repo: str, subject: str, artifact_type: str | None) -> list[dict[str, Any]] | None:
        base = f"upstream-referrers/{repo}@{subject}"
        value = self._cache.get(f"{base}?{artifact_type}") if artifact_type is not None else None
        if value is None:
            value = self._cache.get(base)
        return None if value is None else list(value[1])

    def set_referrers_api(self, registry: str, present: bool) -> None:
        if self._cache.get(f"referrers-api/{registry}") is not present:
            self._cache.set(f"referrers-api/{registry}", present)

    def referrers_api(self, registry: str) -> bool | None:
        value = self._cache.get(f"referrers-api/{registry}")
        return None if value is None else bool(value)

    # -- pins --

    def pin(self, repo: str, digest: str, now: float | None = None, *, tagged: bool = False) -> None:
        key, kind = f"pin/{repo}@{digest}", f"pin-tagged/{repo}@{digest}"
        with self._cache.transact():
            if key not in self._cache:
                self._cache.set(key, time.time() if now is None else now)
                if tagged:
                    self._cache.set(kind, True)
            elif not tagged:
                self._cache.delete(kind)

    def unpin(self, repo: str, digest: str) -> bool:
        with self._cache.transact():
            self._cache.delete(f"pin-tagged/{repo}@{digest}")
            return bool(self._cache.delete(f"pin/{repo}@{digest}"))

    def unpin_tagged(self, repo: str, digest: str) -> bool:
        with self._cache.transact():
            return bool(self._cache.delete(f"pin-tagged/{repo}@{digest}")) and self.unpin(repo, digest)

    def is_pinned(self, repo: str, digest: str) -> bool:
        return f"pin/{repo}@{digest}" in self._cache

    def pins(self, *, tagged: bool = False) -> list[tuple[str, str]]:
        prefix = "pin-tagged/" if tagged else "pin/"
        return [_split(key, prefix) for key in self._keys(prefix)]

    # -- non-distributable layers --

    def set_foreign_urls(self, digest: str, urls: Iterable[str]) -> None:
        self._cache.set(f"foreign/{digest}", tuple(urls))

    def foreign_urls(self, digest: str) -> tuple[str, ...]:
        return tuple(self._cache.get(f"foreign/{digest}", ()))

    # -- uploads --

    def put_upload(self, uuid: str, record: UploadRecord) -> None:
        self._cache.set(f"upload/{uuid}", record.flat())

    def get_upload(self, uuid: str) -> UploadRecord | None:
        value = self._cache.get(f"upload/{uuid}")
        return None if value is None else UploadRecord.unflat(*value)

    def delete_upload(self, uuid: str) -> None:
        self._cache.delete(f"upload/{uuid}")

    def upload_ids(self) -> list[str]:
        return [key[len("upload/"):] for key in self._keys("upload/")]

    # -- maintenance: scans, access times, usage --

    def _keys(self, prefix: str) -> list[str]:
        """Every key starting with *prefix* (an index range scan, not a walk of the whole index)."""
        rows = self._cache._sql(  # diskcache keeps str keys as raw TEXT, indexed
            "SELECT key FROM Cache WHERE raw = 1 AND key >= ? AND key < ?", (prefix, prefix + "\U0010ffff")
        ).fetchall()
        return [key for (key,) in rows]

    def _items(self, prefix: str) -> dict[str, Any]:
        """``{key without prefix: value}`` for every key starting with *prefix*."""
        out = {}
        for key in self._keys(prefix):
            value = self._cache.get(key)
            if value is not None:
                out[key[len(prefix):]] = value
        return out

    def record_access(self, seen: Mapping[tuple[str, str], float]) -> None:
        with self._cache.transact():
            for (repo, digest), when in seen.items():
                key = f"access/{repo}@{digest}"
                if when > self._cache.get(key, 0.0):
                    self._cache.set(key, when)

    def access_times(self) -> dict[tuple[str, str], float]:
        return {_split(key, ""): when for key, when in self._items("access/").items()}

    def forget(self, *, links: Iterable[tuple[str, str]] = (), manifests: Iterable[str] = (),
               accesses: Iterable[tuple[str, str]] = ()) -> None:
        keys = [*(f"link/{repo}@{digest}" for repo, digest in links), *(f"manifest/{d}" for d in manifests),
                *(f"access/{repo}@{digest}" for repo, digest in accesses)]
        deleted = False
        with self._cache.transact():
            for key in keys:
                deleted = bool(self._cache.delete(key)) or deleted
        if deleted:
            self._generation.bump()

    def add_usage(self, delta: int) -> int:
        return int(self._cache.incr("usage", delta, default=0))

    def set_usage(self, value: int) -> None:
        self._cache.set("usage", value)

    def usage(self) -> int:
        return int(self._cache.get("usage", 0))

    def set_held(self, held: dict[str, int]) -> None:
        self._cache.set("held", dict(held))

    def held(self) -> dict[str, int]:
        return dict(self._cache.get("held", None) or {})


def _split(key: str, prefix: str) -> tuple[str, str]:
    """``<prefix><repo>@<digest>`` -> (repo, digest)."""
    repo, _, digest = key[len(prefix):].rpartition("@")
    return repo, digest
