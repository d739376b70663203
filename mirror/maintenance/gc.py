"""Keeping the store within its budget: access tracking, LRU eviction and garbage collection.

* **Access times** are collected in memory (``upkeep.AccessTracker``) and merged into the index in
  batches, so serving a manifest costs no disk write.
* **Eviction** drops the least recently used *cached* images when the store passes the high watermark of
  ``cache.max_size`` (down to the low watermark), and images not pulled for ``cache.unused_for``; and, when a
  write found the filesystem full, as many as free the room it wanted (:attr:`Collector.room_wanted`), within
  the budget or not.  An image here is a manifest linked to a cached repository; evicting it removes its tags
  and links, and the objects no retained image references are deleted.  Pushed repositories (``local/...``)
  and pinned roots (preloaded images) are never candidates, nor is an image *in use*: one of its objects is
  being filled (``tmp/<alg>-<hex>.partial`` locked) or served (``BlobStore.serving``: on the filesystem its
  file held with a shared ``flock``): see ``storage/growing.py``; nor, on a bucket and an index that hosts
  share, one with an object another replica serves or fills (its mark in the index: ``maintenance/inuse.py``).
  When the budget needs it, an image whose open objects all are shared with other images goes too (a base
  layer always being read for one of them would keep them all); no open object is deleted.
  Images used within ``cache.keep_recent`` go only when the store would otherwise stay above the high
  watermark. When the target cannot be reached, ``upkeep.Maintenance`` runs the collector again after a short
  delay until it is, and the reasons (``Report.held``) go to the log and to the index, for the
  ``mirror_store_over_budget`` gauge.
* **Garbage collection** marks from every linked manifest, tag and pin through indexes, manifests, configs
  and layers (not a referrer's subject), and sweeps unmarked objects older than ``gc.grace``.

One collector runs at a time, across worker processes and the CLI: it holds ``DATA/gc.lock``
exclusively, and across hosts sharing the index the index's lease too (``maintenance/collecting.py``).
Writers that make a stored object reachable again (a manifest push, a mount) hold the lock file
shared for that moment, so an object cannot be swept between their check and their write by a
collector of their host (one of another host could: its grace period is what protects them then).
An object marked in use in the index is never deleted: the check and the delete exclude new marks
(``Metadata.unmarked``).  Objects being served stay readable (the reader holds an open descriptor),
fetches and uploads in progress live outside ``blobs/``, and the grace period protects objects that
are stored but not yet referenced (a pushed layer whose manifest is still to come).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..config.sections import CacheConfig, GcConfig
from ..config.values import human
from ..metadata.driver import LOCAL, Metadata
from ..spec.manifest import MAX_MANIFEST_BYTES, references
from ..spec.reference import ParseError, parse_digest
from ..storage.driver import BlobStore
from ..storage.growing import fills_in_progress
from .collecting import CollectorBusy, CollectorLease, collector_lease
from .gcreport import Report

log = logging.getLogger("mirror.maintenance.gc")

#: Seconds an object no repository links must be old before eviction counts it as the cache's orphan.
ORPHAN_AGE = 300.0


@dataclass
class _State:
    files: dict[str, tuple[int, float]]          # digest -> (size, mtime) of every object in blobs/
    manifests: set[str]                          # digests with a manifest record, or a tag's or a pin's
    links: dict[str, set[str]]                   # repo -> linked digests
    tags: dict[str, dict[str, tuple[str, float]]]  # repo -> tag -> (digest, fetched_at)
    pins: dict[str, set[str]]                    # repo -> pinned manifest digests
    access: dict[tuple[str, str], float]         # (repo, digest) -> last use


class Collector:
    def __init__(self, store: BlobStore, metadata: Metadata, cache: CacheConfig, gc: GcConfig) -> None:
        self.store, self.metadata, self.cache, self.gc = store, metadata, cache, gc
        self._refs: dict[str, list[str]] = {}
        self._manifests: set[str] = set()  # the manifests this run reads (_load)
        #: Bytes the next run should free whatever the budget says: a write found the filesystem full.
        self.room_wanted = 0
        self._lease: CollectorLease | None = None  # the cluster's lease while a run holds it

    # -- budget --

    def budget(self) -> int | None:
        """``cache.max_size`` in bytes (a fraction is of the filesystem holding the store; a store
        without a fixed size has no budget then, which the configuration refuses), or None."""
        limit = self.cache.max_size
        if isinstance(limit, float):
            space = self.store.space()
            return int(space.total * limit) if space is not None else None
        return limit or None

    def over_high_watermark(self, usage: int) -> bool:
        budget = self.budget()
        return budget is not None and usage > budget * self.cache.high_watermark

    # -- running --

    def run(self, *, dry_run: bool = False, wait: bool = False, resume: bool = False) -> Report | None:
        """Evict and collect once; None if another collector holds the lock and *wait* is false.  *resume*: a
        previous run did not reach the low watermark; evict down to it even if now below the high watermark."""
        fd = os.open(self.store.layout.gc_lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                with collector_lease(self.metadata, wait=wait) as self._lease:
                    return self._collect(dry_run, resume)
            except (BlockingIOError, CollectorBusy):
                return None
        finally:
            self._lease = None
            os.close(fd)

    def _collect(self, dry_run: bool, resume: bool = False) -> Report:
        room, self.room_wanted = self.room_wanted, 0
        started = time.monotonic()
        now = time.time()
        counted = self.metadata.usage()  # the running total, as of the scan below
        state = self._load()
        self._manifests = state.manifests
        report = Report(dry_run=dry_run, budget=self.budget())
        report.usage_before = sum(size for size, _ in state.files.values())

        roots = self._roots(state)
        evicted, freed_by_eviction = self._choose_evictions(state, roots, report, now, resume, room)

        # Index changes of the eviction: tags, links and access times of the evicted images.
        tag_removals: list[tuple[str, str]] = []
        link_removals: set[tuple[str, str]] = set()
        evicted_in: dict[str, set[str]] = defaultdict(set)  # per repository: one pass, not one per repository
        for repo, digest in evicted:
            report.evicted.append(f"{repo}@{digest}")
            roots[repo].discard(digest)
            evicted_in[repo].add(digest)
        for repo, dropped_roots in evicted_in.items():
            tag_removals += [(repo, tag) for tag, (d, _) in state.tags.get(repo, {}).items() if d in dropped_roots]
            kept = self._closure_of(roots[repo] | state.pins.get(repo, set()))
            dropped = self._closure_of(dropped_roots)
            link_removals |= {(repo, d) for d in dropped - kept if d in state.links.get(repo, set())}

        # Mark from every remaining root; sweep what is unmarked (and old, unless eviction freed it).
        marked = self._closure_of(set().union(*roots.values()) | set().union(*state.pins.values(), set()))
        # On the clock that dates the objects too (an object store's may be behind this host's): the earlier.
        cutoff = min(now, self.store.clock()) - self.gc.grace
        # Not freed if a pushed repository links it (its manifest to come: the grace's); a cached one's
        # link without an image reaching the object goes with it (fetched again if asked for).
        elsewhere = {d for r, ds in state.links.items() if r.startswith(LOCAL + "/") for d in ds & freed_by_eviction}
        doomed = {d for d, (_, mtime) in state.files.items()
                  if d not in marked and ((d in freed_by_eviction and d not in elsewhere) or mtime < cutoff)}
        holders: dict[str, list[str]] = defaultdict(list)
        for repo, digests in state.links.items():
            for d in digests & doomed:
                holders[d].append(repo)
        for d in doomed:
            link_removals |= {(repo, d) for repo in holders.get(d, [])}

        report.tags_removed = len(tag_removals)
        report.links_removed = len(link_removals)
        report.objects_removed = len(doomed)
        report.bytes_freed = sum(state.files[d][0] for d in doomed)
        report.objects_kept = len(state.files) - len(doomed)
        report.usage_after = report.usage_before - report.bytes_freed
        if report.held and report.target is not None and report.usage_after <= report.target:
            report.held = {}  # the collection of old, unreferenced objects made up for it
        if report.held:
            # What the collector could not remove, by reason; the rest is unreferenced and young.
            report.held["grace"] = max(0, report.usage_after - sum(report.held.values()))
        if not dry_run:
            report.kept(self._apply(tag_removals, link_removals, doomed, evicted), state.files)
            # The scan's figure, less what was freed, plus what was committed meanwhile.
            self.metadata.add_usage(report.usage_after - counted)
            self.metadata.set_held(report.held)
        report.seconds = time.monotonic() - started
        return report

    def _apply(self, tags: list[tuple[str, str]], links: set[tuple[str, str]], doomed: set[str],
               evicted: list[tuple[str, str]]) -> set[str]:
        """Change the index, then delete the *doomed* objects; return those kept (being read or
        filled, on this host or another: unreferenced now, the next run removes them)."""
        # Index first: once nothing points at an object, deleting the file cannot break a reader
        # that looks it up afterwards (it refetches, or gets a clean 404 for a pushed one).
        by_repo: dict[str, list[str]] = defaultdict(list)
        for repo, tag in tags:
            by_repo[repo].append(tag)
        for repo, repo_tags in by_repo.items():
            self.metadata.untag_many(repo, repo_tags)
        self.metadata.forget(links=links, manifests=doomed, accesses=evicted)
        for repo in {repo for repo, _ in tags} | {repo for repo, _ in links}:
            if not repo.startswith(LOCAL + "/"):  # a cached one left empty leaves the catalog (pushed: pinned)
                self.metadata.release_repository(repo)
        kept = set(doomed)
        for d in doomed:
            if self._lease is not None and self._lease.lost.is_set():
                break  # another collector may run by now
            with contextlib.suppress(ParseError), self.metadata.unmarked(d) as free:
                digest = parse_digest(d)
                if (free and self.store.delete(digest)) or not self.store.exists(digest):
                    kept.discard(d)  # (gone already: another collector's, or a DELETE's)
            self._refs.pop(d, None)
        return kept

    # -- the graph --

    def _load(self) -> _State:
        files = {found.name: (found.size, found.mtime) for found in self.store.objects()}
        links: dict[str, set[str]] = defaultdict(set)
        for repo, digest in self.metadata.all_links():
            links[repo].add(digest)
        tags: dict[str, dict[str, tuple[str, float]]] = defaultdict(dict)
        for repo, tag, record in self.metadata.all_tags():
            tags[repo][tag] = (record.digest, record.fetched_at)
        pins: dict[str, set[str]] = defaultdict(set)
        for repo, digest in self.metadata.pins():
            pins[repo].add(digest)
        manifests = set(self.metadata.manifest_digests())
        # What a tag or a pin names is a manifest, its record lost or not (a damaged index): it is read too.
        named = {d for repo_tags in tags.values() for d, _ in repo_tags.values()}.union(*pins.values())
        manifests |= {d for d in named if files.get(d, (MAX_MANIFEST_BYTES + 1, 0.0))[0] <= MAX_MANIFEST_BYTES}
        return _State(files, manifests, links, tags, pins, self.metadata.access_times())

    def _roots(self, state: _State) -> dict[str, set[str]]:
        """Per repository, the manifests it holds: linked manifests and tag targets."""
        roots: dict[str, set[str]] = defaultdict(set)
        for repo, digests in state.links.items():
            roots[repo] |= {d for d in digests if d in state.manifests}
        for repo, repo_tags in state.tags.items():
            roots[repo] |= {d for d, _ in repo_tags.values()}
        return roots

    def _serving(self, digest: str) -> bool:
        try:
            return self.store.serving(parse_digest(digest))
        except ParseError:
            return False

    def _references(self, digest: str) -> list[str]:
        # Only manifests (objects with a manifest record) are read: layers and configs reference
        # nothing, and a layer may be gigabytes.  An object not stored yet is not remembered as a
        # leaf: it may be a manifest by the next run.
        if digest not in self._refs:
            if digest not in self._manifests:
                return []
            try:
                body = self.store.read_bytes(parse_digest(digest))
            except ParseError:
                body = None
            if body is None:
                return []
            self._refs[digest] = [d.digest for d in references(body, subject=False)]  # (a DELETE frees it)
        return self._refs[digest]

    def _closure_of(self, roots: set[str]) -> set[str]:
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            d = stack.pop()
            if d in seen:
                continue
            seen.add(d)
            stack.extend(self._references(d))
        return seen

    def _orphans(self, state: _State, roots: dict[str, set[str]], filling: set[str], now: float) -> set[str]:
        """Objects no image reaches that only the cache holds, not in use: blobs fetched by digest whose
        manifest never came, or kept by an earlier run because they were being read as their image
        went.  They can be fetched again, and waiting ``gc.grace`` for them kept the store above its
        budget while the images in use were evicted instead.  An object a pushed repository links
        (its manifest to come) is not one, nor one no repository links that is younger than
        :data:`ORPHAN_AGE` (an upload's blob stored a moment before its link)."""
        reached = self._closure_of(set().union(*roots.values(), *state.pins.values()))
        pushed: set[str] = set()
        cached: set[str] = set()
        for repo, digests in state.links.items():
            (pushed if repo.startswith(LOCAL + "/") else cached).update(digests)
        young = min(now, self.store.clock()) - min(ORPHAN_AGE, self.gc.grace)
        return {d for d, (_, mtime) in state.files.items()
                if d not in reached and d not in pushed and d not in filling and (d in cached or mtime < young)
                and not self._serving(d)}

    def _choose_evictions(self, state: _State, roots: dict[str, set[str]], report: Report, now: float,
                          resume: bool, room: int = 0) -> tuple[list[tuple[str, str]], set[str]]:
        """Cached images to evict, least recently used first, and the objects that frees.

        For space: the cache's orphans (:meth:`_orphans`), then images not in use and not used
        within ``keep_recent`` down to the low watermark (or further, to free *room* bytes a write
        found missing), then recently used ones too while the store would stay above the high
        watermark.  Fills ``report.target``, and ``report.held`` when the target is not reached.
        """
        usage = report.usage_before
        budget = report.budget
        low = int(budget * self.cache.low_watermark) if budget is not None else None
        high = budget * self.cache.high_watermark if budget is not None else None
        over = low is not None and high is not None and (usage > high or resume and usage > low)
        unused_cutoff = now - self.cache.unused_for if self.cache.unused_for else None
        target = low if over else None
        if room:
            target = usage - room if target is None else min(target, usage - room)
        if target is None and unused_cutoff is None:
            return [], set()
        report.target = target

        candidates: list[tuple[float, str, str]] = []
        retained_roots: list[str] = []
        for repo, digests in roots.items():
            protected = self._closure_of(state.pins.get(repo, set()))
            tagged_at: dict[str, float] = {}  # digest -> latest fetch of a tag on it (one pass over the tags)
            for td, t in state.tags.get(repo, {}).values():
                tagged_at[td] = max(t, tagged_at.get(td, 0.0))
            for d in digests:
                if repo.startswith(LOCAL + "/") or d in protected:
                    retained_roots.append(d)
                    continue
                fetched = tagged_at.get(d, 0.0)
                last_used = max(state.access.get((repo, d), 0.0), fetched,
                                state.files.get(d, (0, 0.0))[1])
                candidates.append((last_used, repo, d))
        for pinned in state.pins.values():
            retained_roots.extend(pinned)
        candidates.sort()
        recent = now - self.cache.keep_recent

        # Objects a retained image reaches are never freed; the rest are freed when the last
        # candidate image reaching them is evicted.
        protected_objects = self._closure_of(set(retained_roots))
        counts: Counter[str] = Counter()
        for _, _, d in candidates:
            counts.update(self._closure_of({d}))
        filling = fills_in_progress(self.store) | self.metadata.in_use()  # here, and on every host

        evicted: list[tuple[str, str]] = []
        chosen: set[tuple[str, str]] = set()  # what evicted holds
        in_use: set[str] = set()  # candidate roots skipped because a transfer is open
        # For space, the cache's orphans go first, before any image (see _orphans); those stored or
        # made young within keep_recent, before any recently used image.
        orphans = self._orphans(state, roots, filling, now) if target is not None else set()
        freed = {x for x in orphans if state.files[x][1] < min(recent, self.store.clock() - self.cache.keep_recent)}
        projected = usage - sum(state.files[x][0] for x in freed)

        def evict(repo: str, d: str) -> None:
            nonlocal projected
            evicted.append((repo, d))
            chosen.add((repo, d))
            for x in self._closure_of({d}):
                counts[x] -= 1
                if counts[x] == 0 and x not in protected_objects and x in state.files:
                    freed.add(x)
                    projected -= state.files[x][0]

        # Which images reach an object: a child manifest its repository's index reaches (linked once pulled
        # by digest) is part of that image, not another one sharing its layers with it.
        inner = {(r, x) for _, r, d in candidates for x in self._closure_of({d}) - {d} if x in self._manifests}
        reach = Counter(x for d in {d for _, r, d in candidates if (r, d) not in inner} for x in self._closure_of({d}))
        opened: dict[str, set[str]] = {}  # candidate image -> the objects it reaches that are read or filled

        def busy(d: str, strict: bool) -> bool:
            """Whether an object *d* reaches is open (on any host); not *strict*, only one no other image
            reaches counts: a layer many images share, always being read for one of them, kept them all."""
            if d not in opened:
                opened[d] = {x for x in self._closure_of({d}) if x in filling or x in state.files and self._serving(x)}
            found = any(strict or x == d or reach[x] == 1 for x in opened[d])
            if found:
                in_use.add(d)
            return found

        # Oldest first: both reasons stop holding at some point.  Then, for space, the images whose open
        # objects are all shared with others (their bytes stay while they are read: _apply).
        for strict in (True, False):
            for last_used, repo, d in candidates:
                needed = target is not None and projected > target and last_used < recent
                if not needed and (not strict or unused_cutoff is None or last_used >= unused_cutoff):
                    break
                if (repo, d) not in chosen and not busy(d, strict):
                    evict(repo, d)
        # Still above the high watermark: recent orphans, then recently used images go too (never those in use).
        if over and high is not None and projected > high:
            projected -= sum(state.files[x][0] for x in orphans - freed)
            freed |= orphans
            for strict in (True, False):
                for _last_used, repo, d in candidates:
                    if projected <= high:
                        break
                    if (repo, d) not in chosen and not busy(d, strict):
                        evict(repo, d)

        if evicted:
            log.info("evicting %d cached images (store %s, budget %s)", len(evicted), human(usage),
                     human(budget) if budget else "none")
        if over and low is not None and projected > low:
            gone = {d for _, d in evicted}
            in_use -= gone
            kept_recent = {d for t, _, d in candidates if d not in gone and d not in in_use and t >= recent}

            def size_of(objects: set[str]) -> int:
                return sum(state.files[x][0] for x in objects if x in state.files and x not in freed)

            held_in_use = self._closure_of(in_use) - protected_objects
            held_recent = self._closure_of(kept_recent) - protected_objects - held_in_use
            report.held = {"in_use": size_of(held_in_use), "recent": size_of(held_recent),
                           "pinned": size_of(protected_objects)}
        return evicted, freed
