"""The store's figures for ``/metrics``, read at scrape time: size and budget from the index,
object counts from a scan of the store, and the filesystem's room.  Either may be down (a
PostgreSQL index, an S3 bucket): the scrape still answers, without what it would have read there,
and says which is down (``mirror_index_up``, ``mirror_store_up``).

May import: ``config``, ``observe``, ``storage``, ``metadata``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..config.sections import CacheConfig
from ..metadata.driver import Metadata, MetadataUnavailable
from ..observe.labels import HELD_REASONS
from ..spec.reference import Digest
from ..storage.driver import BlobStore, Space

#: The object looked at between two counts of a remote store's objects (any answer will do: the empty blob).
ALIVE = Digest("sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@dataclass(frozen=True)
class _Indexed:
    usage: int
    held: dict[str, int]
    manifests: int
    repositories: int


class StoreCollector(Collector):
    """The store's figures, read at scrape time by the process that answers the scrape.

    Size comes from the index's running total; object counts from a scan of ``blobs/`` that is
    repeated at most every ``50 x`` its own duration (so a large store is not walked every second).
    While the index's database cannot be reached, what only the index knows (size, manifests,
    repositories, what holds the store over budget) is left out and the rest is still reported; so is
    the object count while the store cannot be listed (an object store down or hung: the listing
    is asked again at the next scrape, a second on at least).  Uploads in progress are counted in the
    index when it keeps a ``count_uploads`` (PostgreSQL, one ``COUNT`` a scrape: the same figure on every
    replica, where each one's spool keeps the files of uploads finished on another until its sweep), else
    in this host's spool.
    """

    def __init__(self, store: BlobStore, metadata: Metadata, cache: CacheConfig,
                 budget: Callable[[], int | None], workers: int = 1) -> None:
        self.store = store
        self.metadata = metadata
        self.cache = cache
        self.budget = budget
        self.workers = workers
        self._lock = threading.Lock()
        self._counts: tuple[int | None, int] = (None, 0)  # objects (None: the store did not answer), uploads
        self._counted_at = float("-inf")
        self._manifest_count: int | None = None
        self._manifests_at = -1.0
        self._count_every = 1.0

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("mirror_build_info", "The mirror's version (always 1).", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("mirror_workers", "Worker processes configured.", value=self.workers)
        budget = self.budget()
        objects, spooled = self._count()
        uploads: int | None = spooled
        count_uploads = getattr(self.metadata, "count_uploads", None)  # a database every replica shares
        try:
            usage, held, manifests, repositories = self._from_index(budget)
            if count_uploads is not None:
                uploads = count_uploads()
        except MetadataUnavailable:  # its database is down: the figures read from it are left out
            indexed = False
            if count_uploads is not None:
                uploads = None
        else:
            indexed = True
        yield GaugeMetricFamily("mirror_index_up", "1 if the index answered this scrape; 0 leaves out the figures "
                                "read from it (store size, over budget, manifests, repositories, a shared "
                                "index's uploads in progress).", value=int(indexed))
        if indexed:
            yield GaugeMetricFamily("mirror_store_size_bytes", "Bytes in the store.", value=usage)
        if budget is not None:
            yield GaugeMetricFamily("mirror_store_max_size_bytes", "The store's budget (cache.max_size).",
                                    value=budget)
            yield GaugeMetricFamily("mirror_store_high_watermark_bytes", "Eviction starts above this size.",
                                    value=budget * self.cache.high_watermark)
            yield GaugeMetricFamily("mirror_store_low_watermark_bytes", "Eviction stops below this size.",
                                    value=budget * self.cache.low_watermark)
            if indexed:
                over = GaugeMetricFamily(
                    "mirror_store_over_budget", "1 while the store is above its budget and the last collection "
                    "could not evict enough, by what held the content back.", labels=["reason"])
                for reason in HELD_REASONS:
                    over.add_metric([reason], 1 if held.get(reason) else 0)
                yield over
        yield GaugeMetricFamily("mirror_store_up", "1 if the store answered the last count of its objects (and a "
                                "bucket a look since); 0 leaves out mirror_store_objects.",
                                value=int(objects is not None))
        if objects is not None:
            yield GaugeMetricFamily("mirror_store_objects", "Objects (blobs and manifests) in the store.",
                                    value=objects)
        if indexed:
            yield GaugeMetricFamily("mirror_store_manifests", "Manifests in the index.", value=manifests)
            yield GaugeMetricFamily("mirror_store_repositories", "Repositories in the index (cached and pushed).",
                                    value=repositories)
        if uploads is not None:
            yield GaugeMetricFamily("mirror_uploads_in_progress", "Blob uploads started and not finished (on every "
                                    "replica, as a shared index records them).", value=uploads)
        try:
            space = self.store.space()
            if space is None:  # an object store: the data directory's filesystem, the spool of fills and uploads
                fs = os.statvfs(self.store.layout.root)
                space = Space(fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize)
        except OSError:
            return
        yield GaugeMetricFamily("mirror_store_filesystem_size_bytes", "Size of the filesystem holding the store (on an "
                                "object store, its local data directory: fills and uploads in progress).",
                                value=space.total)
        yield GaugeMetricFamily("mirror_store_filesystem_avail_bytes", "Bytes available on that filesystem.",
                                value=space.available)

    def _count(self) -> tuple[int | None, int]:
        """Objects and uploads in the store, counted again once the last count is old enough (a
        second after one the store did not answer: objects None, whatever ``OSError`` its listing
        raised, ``StoreUnavailable`` for a bucket; ``/readyz`` names the problem).  Between two
        counts, a store that is not local is looked at (one object's ``HEAD``): one that does not
        answer is down at once, not only at the next count, which a large bucket's listing makes rare."""
        with self._lock:
            now = time.monotonic()
            if now - self._counted_at < self._count_every and self._counts[0] is not None and not self.store.local:
                try:
                    self.store.exists(ALIVE)
                except OSError:
                    self._counts, self._counted_at, self._count_every = (None, self._counts[1]), now, 1.0
            if now - self._counted_at >= self._count_every:
                try:
                    objects: int | None = sum(1 for _ in self.store.objects())
                except OSError:
                    objects = None
                self._counts = (objects, len(self.store.layout.upload_entries()))
                self._counted_at = time.monotonic()
                self._count_every = 1.0 if objects is None else max(1.0, 50 * (self._counted_at - now))
            return self._counts

    def _from_index(self, budget: int | None) -> tuple[int, dict[str, int], int, int]:
        """Usage, what holds it over *budget* (if it is), manifests and repositories, from the index."""
        usage = self.metadata.usage()
        held = self.metadata.held() if budget is not None and usage > budget else {}
        return usage, held, self._manifests(), len(self.metadata.repositories())

    def _manifests(self) -> int:
        """Manifests in the index, counted again as often as the store's objects."""
        with self._lock:
            if self._manifest_count is None or self._manifests_at != self._counted_at:
                self._manifest_count = self.metadata.count_manifests()
                self._manifests_at = self._counted_at
            return self._manifest_count
