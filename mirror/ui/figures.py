"""The cache page's figures, read from what ``/metrics`` and ``/readyz`` report.

Counters and gauges come from the app's exposition registry (every worker's samples merged, and
the store's figures from :class:`~mirror.maintenance.figures.StoreCollector`), so the page and
a Prometheus scrape agree; readiness from :func:`~mirror.api.observability.readiness_problems`;
fills in progress from the store's ``tmp/`` (one file per fetch, whatever worker leads it).
Blocking: call from a worker thread.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from ..api.observability import readiness_problems
from ..config.sections import Config
from ..metadata.driver import Metadata
from ..observe.labels import CACHE_OUTCOMES, HELD_REASONS
from ..storage.filesystem import Store

#: Outcomes answered from the store's bytes, and those fetched from an upstream for the request.
FROM_STORE = ("hit", "stale")
FROM_UPSTREAM = ("miss", "coalesced", "bypass")


@dataclass(frozen=True)
class UpstreamHealth:
    registry: str
    url: str
    requests: int
    #: Failed requests by reason (``unreachable``, ``server_error``, ``rate_limited``...).
    errors: dict[str, int]
    #: ``time.time()`` of its last answer (not a 5xx or 429) and of its last failure, and that
    #: failure's reason; None / "" if none yet.
    last_answer: float | None
    last_error: float | None
    last_error_reason: str
    received_bytes: int
    ratelimit_remaining: int | None

    @property
    def health(self) -> str:
        """``failing`` when its last request failed, ``ok`` when it answered, ``unknown`` before any."""
        if self.last_error is not None and (self.last_answer is None or self.last_error >= self.last_answer):
            return "failing"
        return "ok" if self.last_answer is not None else "unknown"


@dataclass(frozen=True)
class Fill:
    digest: str
    #: Bytes received so far.
    received: int


@dataclass(frozen=True)
class CacheFigures:
    #: Answers of cached repositories by outcome (manifests and blobs), and their body bytes.
    answers: dict[str, int]
    served_bytes: dict[str, int]
    upstreams: list[UpstreamHealth]
    #: None while the index cannot be read (its database is down), as the two below.
    usage: int | None
    budget: int | None
    high_watermark: int | None
    low_watermark: int | None
    filesystem_total: int | None
    filesystem_available: int | None
    over_budget: list[str]
    fills: list[Fill]
    problems: dict[str, str]
    coalesced_waiters: int
    repositories: int | None
    manifests: int | None
    #: None while the store cannot be listed (an object store down: ``mirror_store_up 0``).
    objects: int | None
    #: Eviction and garbage collection: images evicted, runs by result (``ok``, ``error``...),
    #: bytes freed, and ``time.time()`` of the last run (None before any).
    evicted_images: int = 0
    gc_runs: dict[str, int] | None = None
    gc_freed_bytes: int = 0
    gc_last_run: float | None = None

    @property
    def hit_ratio(self) -> float | None:
        """Share of cached answers given from the store (stale ones included); None before any."""
        total = sum(self.answers.get(o, 0) for o in (*FROM_STORE, *FROM_UPSTREAM))
        return None if not total else sum(self.answers.get(o, 0) for o in FROM_STORE) / total

    @property
    def bytes_from_store(self) -> int:
        return sum(self.served_bytes.get(o, 0) for o in (*FROM_STORE, "local"))

    @property
    def bytes_from_upstream(self) -> int:
        return sum(u.received_bytes for u in self.upstreams)

    @property
    def used_share(self) -> float | None:
        """Usage as a share of the budget (may pass 1), None without a budget."""
        return None if not self.budget or self.usage is None else self.usage / self.budget


Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(registry: CollectorRegistry) -> Samples:
    """Every sample of *registry* by sample name (``mirror_cache_requests_total``...)."""
    found: Samples = defaultdict(list)
    for family in registry.collect():
        for sample in family.samples:
            found[sample.name].append((sample.labels, sample.value))
    return found


def _sum(found: Samples, name: str, **labels: str) -> float:
    return sum(v for each, v in found.get(name, ()) if all(each.get(k) == x for k, x in labels.items()))


def _one(found: Samples, name: str) -> float | None:
    values = [v for _, v in found.get(name, ())]
    return values[0] if values else None


def _integer(value: float | None) -> int | None:
    return None if value is None else int(value)


def read(registry: CollectorRegistry, store: Store, metadata: Metadata, config: Config,
         found: Samples | None = None) -> CacheFigures:
    """The figures of *registry* (or of its samples *found*, when already read)."""
    found = samples(registry) if found is None else found
    answers = {o: int(_sum(found, "mirror_cache_requests_total", outcome=o)) for o in CACHE_OUTCOMES}
    served = {o: int(_sum(found, "mirror_cache_served_bytes_total", outcome=o)) for o in CACHE_OUTCOMES}
    upstreams = []
    for each in config.upstreams:
        registry_name = each.registry
        errors = {reason: int(v) for labels, v in found.get("mirror_upstream_errors_total", ())
                  if labels.get("upstream") == registry_name and (reason := labels.get("reason", "")) and v}
        failures = sorted((v, labels.get("reason", "")) for labels, v in
                          found.get("mirror_upstream_last_error_timestamp_seconds", ())
                          if labels.get("upstream") == registry_name and v)
        answered = [v for labels, v in found.get("mirror_upstream_last_answer_timestamp_seconds", ())
                    if labels.get("upstream") == registry_name and v]
        remaining = [v for labels, v in found.get("mirror_upstream_ratelimit_remaining", ())
                     if labels.get("upstream") == registry_name]
        upstreams.append(UpstreamHealth(
            registry=registry_name, url=each.url,
            requests=int(_sum(found, "mirror_upstream_requests_total", upstream=registry_name)),
            errors=errors,
            last_answer=max(answered) if answered else None,
            last_error=failures[-1][0] if failures else None,
            last_error_reason=failures[-1][1] if failures else "",
            received_bytes=int(_sum(found, "mirror_upstream_received_bytes_total", upstream=registry_name)),
            ratelimit_remaining=int(remaining[0]) if remaining else None))
    budget = _one(found, "mirror_store_max_size_bytes")
    high = _one(found, "mirror_store_high_watermark_bytes")
    low = _one(found, "mirror_store_low_watermark_bytes")
    total = _one(found, "mirror_store_filesystem_size_bytes")
    available = _one(found, "mirror_store_filesystem_avail_bytes")
    over = [HELD_REASONS[labels["reason"]] for labels, v in found.get("mirror_store_over_budget", ())
            if v and labels.get("reason") in HELD_REASONS]
    return CacheFigures(
        answers=answers, served_bytes=served, upstreams=upstreams,
        usage=_integer(_one(found, "mirror_store_size_bytes")),
        budget=None if budget is None else int(budget),
        high_watermark=None if high is None else int(high), low_watermark=None if low is None else int(low),
        filesystem_total=None if total is None else int(total),
        filesystem_available=None if available is None else int(available),
        over_budget=over, fills=fills(store), problems=readiness_problems(store, metadata),
        coalesced_waiters=int(_sum(found, "mirror_coalesced_waiters")),
        repositories=_integer(_one(found, "mirror_store_repositories")),
        manifests=_integer(_one(found, "mirror_store_manifests")),
        objects=_integer(_one(found, "mirror_store_objects")),
        evicted_images=int(_sum(found, "mirror_evicted_images_total")),
        gc_runs={result: int(v) for labels, v in found.get("mirror_gc_runs_total", ())
                 if (result := labels.get("result", "")) and v},
        gc_freed_bytes=int(_sum(found, "mirror_gc_freed_bytes_total")),
        gc_last_run=max((v for _, v in found.get("mirror_gc_last_run_timestamp_seconds", ()) if v), default=None))


def fills(store: Store) -> list[Fill]:
    """The fetches from an upstream being written now (their ``.partial`` files), largest first."""
    found = []
    for digest, path in store.layout.fill_entries():
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:  # finished meanwhile
            continue
        found.append(Fill(digest, size))
    return sorted(found, key=lambda f: -f.received)
