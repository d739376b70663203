"""The server's upkeep: access times collected in memory and merged into the index in batches,
and the task that runs the collector (``gc.py``) on schedule, when the store passes its budget,
and again after a collection that could not reach its target.

What waits on the index (merging access times, reading the store's size, a collection, which
reads and writes the index throughout) runs on a worker thread of the upkeep's own, never on one of
anyio's default threads, which open and send stored blobs: a locked or slow database holds up the
upkeep alone.  The store's own work (counting its objects, its filesystem's size) stays on those.

May import: ``config``, ``observe``, ``storage``, ``metadata``, and ``gc`` of this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread
from anyio import CapacityLimiter

from ..config.values import human
from ..metadata.driver import Metadata, MetadataUnavailable
from ..observe.metrics import Metrics
from ..storage.driver import StoreUnavailable
from ..storage.refusals import refusal
from .gc import Collector
from .gcreport import Report

log = logging.getLogger("mirror.maintenance.gc")
T = TypeVar("T")


#: How often the server merges access times into the index.
FLUSH_INTERVAL = 5.0


#: After a collection that could not reach its target: first delay before the next one, and the
#: longest, while what holds the store will pass by itself (transfers, recent use) or not.
RETRY_FIRST = 0.5


RETRY_MAX_PASSING = 5.0


RETRY_MAX = 60.0


#: Seconds before the same failure of the upkeep is logged again (at WARNING).
FAILURE_LOG_INTERVAL = 60.0


#: The least time between two collector runs asked for by writes that found the store full.
ROOM_INTERVAL = 10.0


class AccessTracker:
    """Last-use times of manifests, per repository, batched in memory."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self._seen: dict[tuple[str, str], float] = {}

    def touch(self, repo: str, digest: str) -> None:
        self._seen[repo, digest] = time.time()

    def used(self, repo: str, digest: str) -> Callable[[], None]:
        """Record a use of *digest* in *repo* now; the call that records another, for an answer
        given again from memory (``api/memo.py``)."""
        self.touch(repo, digest)
        return functools.partial(self.touch, repo, digest)

    def flush(self) -> int:
        """Write the batch to the index (blocking: call from a worker thread); while the index is
        unavailable (:class:`MetadataUnavailable`, raised) the batch is kept for the next flush."""
        batch, self._seen = self._seen, {}
        if batch:
            try:
                self.metadata.record_access(batch)
            except MetadataUnavailable:
                for key, when in batch.items():  # a use since the swap is the later one
                    self._seen.setdefault(key, when)
                raise
        return len(batch)


class Maintenance:
    """The server's upkeep task: flush access times, collect on schedule or when over budget
    (checked on every commit here, and every :data:`FLUSH_INTERVAL` for other processes' writes).

    The sizes of objects committed while the index was unavailable are kept here and added to the
    store's byte count with the next flush, and before any collection (whose scan counts them too).

    A collection that leaves the store above its low watermark is followed by another one
    (after :data:`RETRY_FIRST`, doubling) until one reaches it: transfers end, images stop
    being recent.  The reasons are logged when they change.
    """

    def __init__(self, collector: Collector, tracker: AccessTracker, interval: float, *,
                 metrics: Metrics | None = None) -> None:
        self.collector = collector
        self.tracker = tracker
        self.interval = interval
        self.metrics = metrics if metrics is not None else Metrics(enabled=False)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry_at = float("inf")
        self._retry_delay = RETRY_FIRST
        self._reported: tuple[bool, frozenset[str]] | None = None  # what the log last said about held content
        self._room_asked = -ROOM_INTERVAL
        self._own: CapacityLimiter | None = None  # made by run(), on its event loop
        self._uncounted = 0  # bytes committed that the index could not add yet
        self._failures = 0  # turns failed in a row
        self._failing: tuple[str, float] | None = None  # the failure last logged, and when
        self._uncounted_lock = threading.Lock()

    def note_commit(self, size: int) -> None:
        """Count a new object (called from any thread); wake the collector when over budget.

        While the index is unavailable the size is kept for the next flush (which logs the outage,
        once per flush rather than once per object), and so are the sizes committed after it until
        then, without waiting for the index again (the caller may be a thread that sends blobs).
        One such commit during a collection, before the collector's scan reached its object, is
        counted by the scan and again by the flush: the figure is that much too high until the
        next collection.
        """
        with self._uncounted_lock:
            if self._uncounted:
                self._uncounted += size
                return
        try:
            usage = self.collector.metadata.add_usage(size)
        except MetadataUnavailable:
            with self._uncounted_lock:
                self._uncounted += size
            return
        if self._loop is not None and self.collector.over_high_watermark(usage):
            self._loop.call_soon_threadsafe(self._wake.set)

    def _count_uncounted(self) -> None:
        """Add the sizes :meth:`note_commit` kept to the index (blocking: call from a worker thread);
        while the index is unavailable (raised) they are kept for the next time."""
        with self._uncounted_lock:
            pending, self._uncounted = self._uncounted, 0
        if pending:
            try:
                self.collector.metadata.add_usage(pending)
            except Exception:
                with self._uncounted_lock:
                    self._uncounted += pending
                raise

    def flush(self) -> None:
        """Write what waits in memory to the index: the uncounted sizes, then the access times
        (blocking: call from a worker thread)."""
        self._count_uncounted()
        self.tracker.flush()

    def make_room(self, room: int) -> None:
        """A write found no room on the store's filesystem: evict to free *room* bytes, now or at the
        latest :data:`ROOM_INTERVAL` seconds after the last such run (called from any thread)."""
        self.collector.room_wanted = max(self.collector.room_wanted, room)
        now = time.monotonic()
        if self._loop is not None and now - self._room_asked >= ROOM_INTERVAL:
            self._room_asked = now
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _in_own_thread(self, call: Callable[[], T]) -> T:
        """``call()`` from the upkeep's own worker thread (it does one thing at a time)."""
        if self._own is None:
            self._own = CapacityLimiter(1)
        return await anyio.to_thread.run_sync(call, limiter=self._own)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._recount()
            recounted = True
        except Exception as exc:  # the index or the store does not answer yet: counted on a later turn
            self._failed(exc, "counting the store")
            recounted = False
        next_run = time.monotonic() + self.interval if self.interval else float("inf")
        while True:
            timeout = max(0.0, min(FLUSH_INTERVAL, self._retry_at - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            woken = self._wake.is_set()
            self._wake.clear()
            now = time.monotonic()
            try:
                if not recounted:
                    await self._recount()
                    recounted = True
                await self._in_own_thread(self.flush)
                # Other processes (`mirror preload --data`) add to the store too: their count is in the index.
                grown = not woken and self._retry_at == float("inf") and await self._grown()
                if woken or grown or now >= next_run or now >= self._retry_at:
                    await self._collect(woken or grown)
                    if self.interval and now >= next_run:
                        next_run = time.monotonic() + self.interval
            except Exception as exc:  # the upkeep must outlive any one failure
                self.metrics.gc_failed()
                self._failed(exc, "maintenance run")
            else:
                if self._failures:
                    log.info("maintenance runs again, after %d failed turns", self._failures)
                self._failures, self._failing = 0, None

    def _failed(self, exc: Exception, what: str) -> None:
        """Log that *what* failed: one line when ``/readyz`` says why too, else with the traceback;
        the same failure again within :data:`FAILURE_LOG_INTERVAL` at DEBUG only (an outage fails
        every turn, every :data:`FLUSH_INTERVAL`)."""
        self._failures += 1
        said = f"{what} failed: {exc.strerror if isinstance(exc, StoreUnavailable) else str(exc) or type(exc).__name__}"
        now = time.monotonic()
        if self._failing is not None and self._failing[0] == said and now - self._failing[1] < FAILURE_LOG_INTERVAL:
            log.debug("%s", said)
            return
        self._failing = (said, now)
        if isinstance(exc, StoreUnavailable) or refusal(exc) is not None or isinstance(exc, MetadataUnavailable):
            log.warning("%s", said)  # /readyz (and mirror_store_up, mirror_index_up) say so too
        else:
            log.error("%s", said, exc_info=exc)

    async def _collect(self, woken: bool) -> None:
        resume = self._retry_at != float("inf")

        def collect() -> Report | None:
            # What was committed before the scan must be in the count the collector reconciles the
            # scan with, or the flush after it would count it a second time.
            self._count_uncounted()
            return self.collector.run(resume=resume)

        report = await self._in_own_thread(collect)
        if report is None:  # another process is collecting; look again later if the target is not reached
            if resume:
                self._retry_at = time.monotonic() + self._retry_delay
            return
        self.metrics.gc_finished(seconds=report.seconds, bytes_freed=report.bytes_freed,
                                 objects_removed=report.objects_removed, images_evicted=len(report.evicted))
        if report.objects_removed or report.evicted:
            log.info("collector: %s", report.summary())
        if not report.held:
            if self._reported is not None and self._reported != (False, frozenset()):
                log.info("store %s is back under its low watermark", human(report.usage_after))
            self._reported = (False, frozenset())
            self._retry_at, self._retry_delay = float("inf"), RETRY_FIRST
            return
        if woken or not resume:
            self._retry_delay = RETRY_FIRST
        passing = bool(report.held.get("in_use") or report.held.get("recent"))
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_PASSING if passing else RETRY_MAX)
        state = (report.over_budget, frozenset(r for r, n in report.held.items() if n))
        if state != self._reported:
            log.log(logging.WARNING if report.over_budget else logging.INFO, "%s; evicting again in %.1fs",
                    report.held_summary(), self._retry_at - time.monotonic())
            self._reported = state

    async def _grown(self) -> bool:
        """Is the store, as the index counts it, over its high watermark?  (The budget may be a share
        of the store's filesystem.)"""
        usage = await self._in_own_thread(self.collector.metadata.usage)
        return await anyio.to_thread.run_sync(self.collector.over_high_watermark, usage)

    async def _recount(self) -> None:
        """The store's size in the index, as the store's objects add up now (the sizes kept
        uncounted so far are among them)."""
        with self._uncounted_lock:
            self._uncounted = 0
        total = await anyio.to_thread.run_sync(lambda: sum(found.size for found in self.collector.store.objects()))
        await self._in_own_thread(lambda: self.collector.metadata.set_usage(total))

