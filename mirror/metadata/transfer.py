"""Copying one index into another (``mirror migrate``): a snapshot of every record, what a target
holds that the source does not, the copy, and the comparison that verifies it.

Every record the index keeps is carried over with its times (tags with their fetched-at, manifest
records, links, the catalog, pushed repositories, referrers in the order added, upstream referrers
lists, Referrers API answers, pins, foreign-layer urls, access times, the usage count and the
reasons held), except what lives only while a server runs: blob uploads in progress (their bytes
are in the old data directory, their clients gone with the server) and leases.  The writes are the
drivers' own idempotent ones, so copying again after an interruption ends with the same index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from .driver import ManifestRecord, Metadata, TagRecord, UpstreamReferrers

__all__ = ["Snapshot", "copy_records"]

Pair = tuple[str, str]
T = TypeVar("T")
#: Records written per call where the driver takes a batch (links of one repository, access times).
BATCH = 1000


@dataclass(frozen=True)
class Snapshot:
    """Every record of one index, read once (``Snapshot.of``)."""

    tags: dict[Pair, TagRecord]
    manifests: dict[str, ManifestRecord]
    links: frozenset[Pair]
    repositories: frozenset[str]
    locals: dict[str, float]
    pins: dict[Pair, float]
    referrers: dict[Pair, tuple[dict[str, object], ...]]
    upstream_referrers: dict[tuple[str, str, str | None], UpstreamReferrers]
    referrers_apis: dict[str, bool]
    foreign_urls: dict[str, tuple[str, ...]]
    access: dict[Pair, float]
    uploads: int
    usage: int
    held: dict[str, int]

    @classmethod
    def of(cls, index: Metadata) -> Snapshot:
        manifests = {}
        for digest in index.manifest_digests():
            record = index.get_manifest(digest)
            if record is not None:  # withdrawn meanwhile
                manifests[digest] = record
        return cls(
            tags={(repo, tag): record for repo, tag, record in index.all_tags()},
            manifests=manifests,
            links=frozenset(index.all_links()),
            repositories=frozenset(index.repositories()),
            locals=index.local_names(),
            pins=index.pin_times(),
            referrers={(repo, subject): tuple(found) for repo, subject, found in index.all_referrers()},
            upstream_referrers={(u.repo, u.subject, u.artifact_type): u for u in index.all_upstream_referrers()},
            referrers_apis=index.referrers_apis(),
            foreign_urls=index.all_foreign_urls(),
            access=index.access_times(),
            uploads=len(index.upload_ids()),
            usage=index.usage(),
            held=index.held(),
        )

    def counts(self) -> dict[str, int]:
        """Records of each kind, by the name the summary gives them."""
        return {"tags": len(self.tags), "manifests": len(self.manifests), "links": len(self.links),
                "repositories": len(self.repositories), "pushed repositories": len(self.locals),
                "pins": len(self.pins), "referrers": sum(map(len, self.referrers.values())),
                "upstream referrers lists": len(self.upstream_referrers),
                "Referrers API answers": len(self.referrers_apis),
                "foreign-layer urls": len(self.foreign_urls), "access times": len(self.access)}

    @property
    def empty(self) -> bool:
        return not any(self.counts().values())

    def strangers(self, source: Snapshot) -> list[str]:
        """Records of this index that *source* does not hold (as it is), a few of each kind: empty
        when this index is empty or a copy, complete or not, of *source*."""
        found = [*(f"tag {repo}:{tag} -> {record.digest}" for (repo, tag), record in self.tags.items()
                   if (known := source.tags.get((repo, tag))) is None
                   or (known.digest, known.media_type) != (record.digest, record.media_type)),
                 *(f"manifest {digest}" for digest in self.manifests.keys() - source.manifests.keys()),
                 *(f"link {repo}@{digest}" for repo, digest in self.links - source.links),
                 *(f"pin {repo}@{digest}" for repo, digest in self.pins.keys() - source.pins.keys()),
                 *(f"pushed repository {name}" for name in self.locals.keys() - source.locals.keys()),
                 *(f"repository {repo}" for repo in self.repositories - source.repositories)]
        return sorted(found)

    def differences(self, copy: Snapshot) -> list[str]:
        """How *copy* (the target after copying) differs from this index: empty when it holds every
        record, with the same values (access times as late or later)."""
        out = []
        for kind, mine, theirs in (
            ("tags", self.tags, copy.tags), ("manifests", self.manifests, copy.manifests),
            ("links", self.links, copy.links), ("repositories", self.repositories, copy.repositories),
            ("pushed repositories", self.locals, copy.locals), ("pins", self.pins, copy.pins),
            ("referrers", self.referrers, copy.referrers),
            ("upstream referrers lists", self.upstream_referrers, copy.upstream_referrers),
            ("Referrers API answers", self.referrers_apis, copy.referrers_apis),
            ("foreign-layer urls", self.foreign_urls, copy.foreign_urls),
        ):
            if mine != theirs:
                out.append(f"{kind}: {len(mine)} in the source, {len(theirs)} in the target"
                           + ("" if len(mine) != len(theirs) else " (values differ)"))
        late = [pair for pair, when in self.access.items() if copy.access.get(pair, -1.0) < when]
        if late:
            out.append(f"access times: {len(late)} of {len(self.access)} missing or older in the target")
        if (self.held, self.usage) != (copy.held, copy.usage):
            out.append(f"usage or held: {self.usage} {self.held} in the source, {copy.usage} {copy.held} in the target")
        return out


def copy_records(source: Snapshot, target: Metadata, advance: Callable[[int], None] = lambda n: None) -> None:
    """Write every record of *source* into *target* (idempotent: an index holding some or all of them
    already ends the same).  Manifest records and links come before the tags that lead to them, so an
    interrupted copy never has a tag whose manifest the target does not know.  *advance* is told how
    many records each step wrote."""
    for digest, manifest in source.manifests.items():
        target.put_manifest(digest, manifest.media_type, manifest.size)
        advance(1)
    for digest, urls in source.foreign_urls.items():
        target.set_foreign_urls(digest, urls)
        advance(1)
    by_repo: dict[str, list[str]] = {repo: [] for repo in source.repositories}  # the catalog, linked or not
    for repo, digest in source.links:
        by_repo.setdefault(repo, []).append(digest)
    for repo, digests in by_repo.items():
        for digest_batch in _batches(sorted(digests)):
            target.link(repo, digest_batch)
            advance(len(digest_batch))
        if not digests:
            target.link(repo, [])  # registers it
    for name, created in source.locals.items():
        target.mark_local(name, created)
        advance(1)
    for (repo, subject), descriptors in source.referrers.items():
        for descriptor in descriptors:  # in the order they were added
            target.add_referrer(repo, subject, descriptor)
            advance(1)
    for kept in source.upstream_referrers.values():
        target.put_upstream_referrers(kept.repo, kept.subject, kept.artifact_type, kept.descriptors, kept.fetched_at)
        advance(1)
    for registry, present in source.referrers_apis.items():
        target.set_referrers_api(registry, present)
        advance(1)
    for (repo, digest), when in source.pins.items():
        target.pin(repo, digest, now=when)
        advance(1)
    for batch in _batches(sorted(source.access)):
        target.record_access({pair: source.access[pair] for pair in batch})
        advance(len(batch))
    for (repo, tag), record in source.tags.items():
        target.set_tag(repo, tag, record)
        advance(1)
    target.set_usage(source.usage)
    target.set_held(source.held)


def _batches(items: Iterable[T]) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
