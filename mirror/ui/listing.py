"""The repositories the web UI lists: each one's kind, tag count and last pull, filtered and paged.

Read from the index (:class:`~mirror.metadata.driver.Metadata`) only; nothing here asks an
upstream.  Calls block (the index's driver does): the pages run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..maintenance.upkeep import FLUSH_INTERVAL
from ..metadata.driver import LOCAL, Metadata
from ..registry.local import LocalRegistry

#: Repositories on one page of the list.
PER_PAGE = 100


@dataclass(frozen=True)
class RepositoryRow:
    #: The name as clients write it (``library/alpine``, ``ghcr.io/org/app``).
    name: str
    #: Its key in the index (``docker.io/library/alpine``, ``local/team/app``).
    key: str
    #: The registry it is a cache of; None for a pushed repository.
    upstream: str | None
    pinned: bool
    tags: int
    #: ``time.time()`` of the last pull of one of its manifests, None if unknown.
    last_pulled: float | None

    @property
    def pushed(self) -> bool:
        return self.upstream is None


@dataclass(frozen=True)
class Page:
    rows: list[RepositoryRow]
    #: Repositories that match the filter (on every page).
    total: int
    #: 1-based.
    number: int
    pages: int


class LastPulls:
    """When each repository and manifest was last pulled, from the index's access times.

    The whole list is read again at most every ``max(FLUSH_INTERVAL, 50 x`` the last read's
    duration) seconds: the servers write access times in batches every :data:`FLUSH_INTERVAL`
    anyway, and on a large index the read takes a while (~0.3 s for 30,000 with diskcache).  Only
    the first read is waited for: later ones run in a thread of their own while pages are drawn
    from the list read before.  One per app, shared by its requests.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._manifests: dict[tuple[str, str], float] = {}
        self._repositories: dict[str, float] = {}
        self._read_at: float | None = None
        self._every = FLUSH_INTERVAL
        self._reading = False

    def read(self, metadata: Metadata) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
        """``({(repo, digest): last pull}, {repo: last pull})`` (``time.time()`` values)."""
        with self._lock:
            if self._read_at is None:
                self._refresh(metadata)
            elif not self._reading and time.monotonic() - self._read_at >= self._every:
                self._reading = True
                threading.Thread(target=self._refresh_behind, args=(metadata,), name="last-pulls", daemon=True).start()
            return self._manifests, self._repositories

    def _refresh_behind(self, metadata: Metadata) -> None:
        try:
            with contextlib.suppress(Exception):  # the index is down, say: the old list stays, tried again later
                self._refresh(metadata)
        finally:
            self._reading = False

    def _refresh(self, metadata: Metadata) -> None:
        started = time.monotonic()
        manifests = metadata.access_times()
        repositories: dict[str, float] = {}
        for (repo, _), when in manifests.items():
            if when > repositories.get(repo, 0.0):
                repositories[repo] = when
        self._manifests, self._repositories = manifests, repositories  # replaced whole: readers see one or the other
        self._read_at = time.monotonic()
        self._every = max(FLUSH_INTERVAL, 50 * (self._read_at - started))


def names(metadata: Metadata, local: LocalRegistry) -> list[tuple[str, str]]:
    """``(name, key)`` of every repository, sorted by name; a name both pushed and cached (pushed
    over its cache) is the pushed one, as the API serves it; none that no request reaches."""
    found: dict[str, str] = {}
    for key in filter(local.served, metadata.repositories()):
        name = local.catalog_name(key)
        if name not in found or key.startswith(LOCAL + "/"):
            found[name] = key
    return sorted(found.items())


def matches(name: str, query: str) -> bool:
    """Does *name* match the filter *query*: every word of it is part of the name, case ignored."""
    lowered = name.lower()
    return all(word in lowered for word in query.lower().split())


def repository_page(metadata: Metadata, local: LocalRegistry, last_pulls: LastPulls, query: str, number: int,
                    visible: Callable[[str], bool], per_page: int = PER_PAGE) -> Page:
    """Page *number* (1-based, clamped to the last) of the repositories *visible* to the viewer
    whose name matches *query*, with their tag counts, pins and last pulls."""
    selected = [(name, key) for name, key in names(metadata, local) if matches(name, query) and visible(name)]
    pages = max(1, math.ceil(len(selected) / per_page))
    number = min(max(number, 1), pages)
    shown = selected[(number - 1) * per_page:number * per_page]
    keys = {key for _, key in shown}
    pinned = {repo for repo, _ in metadata.pins() if repo in keys}
    last = last_pulls.read(metadata)[1] if keys else {}
    rows = []
    for name, key in shown:
        registry, _, _ = key.partition("/")
        rows.append(RepositoryRow(name, key, None if registry == LOCAL else registry, key in pinned,
                                  len(metadata.tags(key)), last.get(key)))
    return Page(rows, len(selected), number, pages)
