"""Copying one index into another (``mirror migrate``): what a target holds that the source does not,
the copy, and the comparison that verifies it.

Every record the index keeps is carried over with its times (tags with their fetched-at, manifest
records, links, the catalog, pushed repositories, referrers in the order added, upstream referrers
lists, Referrers API answers, pins, foreign-layer urls, access times, the usage count and the
reasons held), except what lives only while a server runs: blob uploads in progress (their bytes
are in the old data directory, their clients gone with the server) and leases.  The writes are the
drivers' own idempotent ones, so copying again after an interruption ends with the same index.
Each function raises what the drivers raise (``MetadataUnavailable`` for a database out of reach).

Memory is bounded whatever the size of the index: each kind of record is read a page at a time
(:meth:`~mirror.metadata.records.RecordListing.records`), written :data:`BATCH` records at a time,
and compared by looking each batch up in the other index (``find_records``), so no more than a
batch of records, and the lookups of one, are held at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .driver import Metadata
from .records import PAGE, RecordKey, RecordKind

__all__ = ["BATCH", "Comparison", "Tally", "compare", "copy_records", "strangers", "unstored", "weight", "withdraw"]

K = RecordKind
T = TypeVar("T")
Record = tuple[RecordKey, Any]
#: Records read, written or looked up per call where the driver takes a batch.
BATCH = PAGE
#: The order of the copy: manifest records and links before the tags that lead to them, so an
#: interrupted copy never has a tag whose manifest the target does not know.
ORDER = (K.MANIFESTS, K.FOREIGN_URLS, K.LINKS, K.REPOSITORIES, K.LOCALS, K.REFERRERS, K.UPSTREAM_REFERRERS,
         K.REFERRERS_APIS, K.PINS, K.ACCESS, K.TAGS)
#: The kinds whose records tell another store's index from a copy of the source's.
OWNED = (K.TAGS, K.MANIFESTS, K.LINKS, K.PINS, K.LOCALS, K.REPOSITORIES)


def weight(kind: RecordKind, value: Any) -> int:
    """How many records a summary counts for one listed: a subject's referrers count one each."""
    return len(value) if kind is K.REFERRERS else 1


def copy_records(source: Metadata, target: Metadata, advance: Callable[[int], None] = lambda n: None) -> None:
    """Write every record of *source* into *target*, kind by kind in :data:`ORDER`, then the usage
    count and the reasons held (idempotent: an index holding some or all of them already ends the
    same).  *advance* is told how many records (as :func:`weight` counts them) each batch wrote."""
    for kind in ORDER:
        write = _WRITERS[kind]
        for batch in _batches(source.records(kind)):
            write(target, batch)
            advance(sum(weight(kind, value) for _, value in batch))
    target.set_usage(source.usage())
    target.set_held(source.held())


def _tags(target: Metadata, batch: list[Record]) -> None:
    for (repo, tag), record in batch:
        target.set_tag(repo, tag, record)


def _manifests(target: Metadata, batch: list[Record]) -> None:
    for (digest,), record in batch:
        target.put_manifest(digest, record.media_type, record.size)


def _links(target: Metadata, batch: list[Record]) -> None:
    for repo, pairs in itertools.groupby((key for key, _ in batch), key=lambda key: key[0]):
        target.link(repo, [digest for _, digest in pairs])


def _repositories(target: Metadata, batch: list[Record]) -> None:
    for (repo,), _ in batch:
        target.link(repo, [])  # registers it (linked or not)


def _locals(target: Metadata, batch: list[Record]) -> None:
    for (name,), created in batch:
        target.mark_local(name, created)


def _pins(target: Metadata, batch: list[Record]) -> None:
    held = target.find_records(K.PINS, [key for key, _ in batch])
    for (repo, digest), record in batch:
        if (kept := held.get((repo, digest))) is not None and kept != record:
            target.unpin(repo, digest)  # a pin copied before without its *tagged* (pin() keeps what it finds)
        target.pin(repo, digest, now=record.pinned_at, tagged=record.tagged)


def _referrers(target: Metadata, batch: list[Record]) -> None:
    for (repo, subject), descriptors in batch:
        for descriptor in descriptors:  # in the order they were added
            target.add_referrer(repo, subject, descriptor)


def _upstream_referrers(target: Metadata, batch: list[Record]) -> None:
    for _, kept in batch:
        target.put_upstream_referrers(kept.repo, kept.subject, kept.artifact_type, kept.descriptors, kept.fetched_at)


def _referrers_apis(target: Metadata, batch: list[Record]) -> None:
    for (registry,), present in batch:
        target.set_referrers_api(registry, present)


def _foreign_urls(target: Metadata, batch: list[Record]) -> None:
    for (digest,), urls in batch:
        target.set_foreign_urls(digest, urls)


def _access(target: Metadata, batch: list[Record]) -> None:
    target.record_access({(repo, digest): when for (repo, digest), when in batch})


_WRITERS: dict[RecordKind, Callable[[Metadata, list[Record]], None]] = {
    K.TAGS: _tags, K.MANIFESTS: _manifests, K.LINKS: _links, K.REPOSITORIES: _repositories, K.LOCALS: _locals,
    K.PINS: _pins, K.REFERRERS: _referrers, K.UPSTREAM_REFERRERS: _upstream_referrers,
    K.REFERRERS_APIS: _referrers_apis, K.FOREIGN_URLS: _foreign_urls, K.ACCESS: _access,
}


@dataclass
class Tally:
    """Records found wanting: how many, and the first of their descriptions in sorted order (say
    ``link docker.io/library/x@sha256:...``), None when there are none."""

    count: int = 0
    first: str | None = None

    def add(self, description: str) -> None:
        self.count += 1
        if self.first is None or description < self.first:
            self.first = description


def strangers(index: Metadata, source: Metadata) -> Tally:
    """Records of *index* that *source* does not hold (as it is), among the :data:`OWNED` kinds: none
    when *index* is empty or a copy, complete or not, of *source*.  A tag *source* points at another
    digest or media type is one; its time (a copy's is older, checked since) is not."""
    found = Tally()
    for kind in OWNED:
        for batch in _batches(index.records(kind)):
            known = source.find_records(kind, [key for key, _ in batch])
            for key, value in batch:
                theirs = known.get(key)
                if theirs is None or (kind is K.TAGS and (theirs.digest, theirs.media_type)
                                      != (value.digest, value.media_type)):
                    found.add(_describe(kind, key, value))
    return found


#: The kinds of record an index withdraws as it runs (a tag deleted, a manifest collected or evicted, a
#: referrer deleted, an image unpinned): what a copy made before may hold that its source no longer does.
#: (Repositories, pushed repositories and the caches of upstream answers are only ever added or replaced.)
WITHDRAWN = (K.TAGS, K.PINS, K.REFERRERS, K.LINKS, K.ACCESS, K.MANIFESTS)


def withdraw(index: Metadata, source: Metadata) -> Tally:
    """Withdraw from *index*, a copy of *source* made before, the records *source* has withdrawn since
    (:data:`WITHDRAWN`; a tag moved since is left to the copy, which writes it over): the tally of them.
    Referrers are withdrawn one descriptor at a time, those *source* no longer lists for the subject.
    Then the repositories and pushed names *source* does not have, emptied by that, leave the catalog
    (pushed to the copy only, since it was made)."""
    found = Tally()
    for kind in WITHDRAWN:
        for batch in _batches(index.records(kind)):
            known = source.find_records(kind, [key for key, _ in batch])
            if kind is K.REFERRERS:
                for (repo, subject), descriptors in batch:
                    kept = {str(d["digest"]) for d in known.get((repo, subject), ())}
                    for digest in sorted({str(d["digest"]) for d in descriptors} - kept):
                        found.add(f"referrer {repo}@{subject} <- {digest}")
                        index.remove_referrer(repo, subject, digest)
                continue
            gone = [(key, value) for key, value in batch if known.get(key) is None]
            for key, value in gone:
                found.add(_describe(kind, key, value) if kind in OWNED else f"access time {'@'.join(key)}")
                if kind is K.TAGS:
                    index.untag(*key)
                elif kind is K.PINS:
                    index.unpin(*key)
            pairs = [(key[0], key[-1]) for key, _ in gone]
            if pairs and kind in (K.LINKS, K.ACCESS, K.MANIFESTS):
                index.forget(links=pairs if kind is K.LINKS else (), accesses=pairs if kind is K.ACCESS else (),
                             manifests=[digest for _, digest in pairs] if kind is K.MANIFESTS else ())
    for kind in (K.LOCALS, K.REPOSITORIES):  # emptied above: names pushed or cached only in the copy
        for batch in _batches(index.records(kind)):
            known = source.find_records(kind, [key for key, _ in batch])
            for key, value in batch:
                if known.get(key) is None:
                    found.add(_describe(kind, key, value))
                    (index.release_local if kind is K.LOCALS else index.release_repository)(key[0])
    return found


def unstored(index: Metadata, held: Callable[[list[str]], Container[str]]) -> Tally:
    """The manifests *index* names (its manifest records, the digests its tags point at) that a store
    does not hold, once each.  ``held(digests)`` answers which of *digests* (at most :data:`BATCH`,
    each asked once) the store holds, so that a store reached over the network is asked about a
    batch at once (``StoredDigests.among``)."""
    found = Tally()
    for batch in _batches(index.records(K.MANIFESTS)):
        digests = [digest for (digest,), _ in batch]
        present = held(digests)
        for digest in digests:
            if digest not in present:
                found.add(digest)
    unrecorded: set[str] = set()  # what tags name without a manifest record: none in a sound index
    for batch in _batches(index.records(K.TAGS)):
        wanted = sorted({record.digest for _, record in batch} - unrecorded)
        recorded = index.find_records(K.MANIFESTS, [(digest,) for digest in wanted])
        wanted = [digest for digest in wanted if (digest,) not in recorded]  # the records were checked above
        present = held(wanted)
        for digest in wanted:
            if digest not in present:
                unrecorded.add(digest)
                found.add(digest)
    return found


def _describe(kind: RecordKind, key: RecordKey, value: Any) -> str:
    if kind is K.TAGS:
        return f"tag {key[0]}:{key[1]} -> {value.digest}"
    names = {K.MANIFESTS: "manifest", K.LINKS: "link", K.PINS: "pin", K.LOCALS: "pushed repository",
             K.REPOSITORIES: "repository"}
    return f"{names[kind]} {'@'.join(key)}"


@dataclass
class Comparison:
    """A source compared with its copy: *counts* of the source's records by kind (the summary's
    names, :func:`weight`), and how the copy differs (empty when it holds every record)."""

    counts: dict[str, int] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)


def compare(source: Metadata, copy: Metadata) -> Comparison:
    """Whether *copy* (the target after copying) holds every record of *source*, with the same values
    (access times as late or later), and no other (access times of its own aside); the usage count
    and the reasons held the same."""
    out = Comparison()
    for kind in RecordKind:
        mine, differ = 0, 0
        for batch in _batches(source.records(kind)):
            mine += sum(weight(kind, value) for _, value in batch)
            theirs = copy.find_records(kind, [key for key, _ in batch])
            differ += sum(not _same(kind, value, theirs.get(key)) for key, value in batch)
        out.counts[kind.value] = mine
        if kind is K.ACCESS:
            if differ:
                out.differences.append(f"access times: {differ} of {mine} missing or older in the target")
            continue
        there = sum(weight(kind, value) for _, value in copy.records(kind))
        if differ or there != mine:
            out.differences.append(f"{kind.value}: {mine} in the source, {there} in the target"
                                   + ("" if there != mine else " (values differ)"))
    if (source.held(), source.usage()) != (copy.held(), copy.usage()):
        out.differences.append(f"usage or held: {source.usage()} {source.held()} in the source,"
                               f" {copy.usage()} {copy.held()} in the target")
    return out


def _same(kind: RecordKind, mine: Any, theirs: Any) -> bool:
    if kind is K.ACCESS:
        return theirs is not None and theirs >= mine
    return theirs is not None and bool(theirs == mine)


def _batches(items: Iterable[T]) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, BATCH)):
        yield batch
