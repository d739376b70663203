"""The server's upkeep: access times collected in memory and merged into the index in batches,
and the task that runs the collector (``gc.py``) on schedule, when the store passes its budget,
and again after a collection that could not reach its target.

May import: ``config``, ``observe``, ``storage``, ``metadata``, and ``gc`` of this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import anyio.to_thread

from ..config.values import human
from ..metadata.driver import Metadata, MetadataUnavailable
from ..observe.metrics import Metrics
from ..storage.refusals import refusal
from .gc import Collector

log = logging.getLogger("mirror.maintenance.gc")


#: How often the server merges access times into the index.
FLUSH_INTERVAL = 5.0


#: After a collection that could not reach its target: first delay before the next one, and the
#: longest, while what holds the store will pass by itself (transfers, recent use) or not.
RETRY_FIRST = 0.5


RETRY_MAX_PASSING = 5.0


RETRY_MAX = 60.0


#: The least time between two collector runs asked for by writes that found the store full.
ROOM_INTERVAL = 10.0


class AccessTracker:
    """Last-use times of manifests, per repository, batched in memory."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self._seen: dict[tuple[str, str], float] = {}

    def touch(self, repo: str, digest: str) -> None:
        self._seen[repo, digest] = time.time()

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

    def note_commit(self, size: int) -> None:
        """Count a new object (called from any thread); wake the collector when over budget."""
        usage = self.collector.metadata.add_usage(size)
        if self._loop is not None and self.collector.over_high_watermark(usage):
            self._loop.call_soon_threadsafe(self._wake.set)

    def make_room(self, room: int) -> None:
        """A write found no room on the store's filesystem: evict to free *room* bytes, now or at the
        latest :data:`ROOM_INTERVAL` seconds after the last such run (called from any thread)."""
        self.collector.room_wanted = max(self.collector.room_wanted, room)
        now = time.monotonic()
        if self._loop is not None and now - self._room_asked >= ROOM_INTERVAL:
            self._room_asked = now
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await anyio.to_thread.run_sync(self._recount)
        next_run = time.monotonic() + self.interval if self.interval else float("inf")
        while True:
            timeout = max(0.0, min(FLUSH_INTERVAL, self._retry_at - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            woken = self._wake.is_set()
            self._wake.clear()
            now = time.monotonic()
            try:
                await anyio.to_thread.run_sync(self.tracker.flush)
                # Other processes (`mirror preload --data`) add to the store too: their count is in the index.
                grown = not woken and self._retry_at == float("inf") and await anyio.to_thread.run_sync(self._grown)
                if woken or grown or now >= next_run or now >= self._retry_at:
                    await self._collect(woken or grown)
                    if self.interval and now >= next_run:
                        next_run = time.monotonic() + self.interval
            except Exception as exc:  # the upkeep must outlive any one failure
                self.metrics.gc_failed()
                if refusal(exc) is not None or isinstance(exc, MetadataUnavailable):  # /readyz says so: no traceback
                    log.warning("maintenance run failed: %s", exc)
                else:
                    log.exception("maintenance run failed")

    async def _collect(self, woken: bool) -> None:
        resume = self._retry_at != float("inf")
        report = await anyio.to_thread.run_sync(lambda: self.collector.run(resume=resume))
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

    def _grown(self) -> bool:
        """Is the store, as the index counts it, over its high watermark?"""
        return self.collector.over_high_watermark(self.collector.metadata.usage())

    def _recount(self) -> None:
        total = sum(found.size for found in self.collector.store.objects())
        self.collector.metadata.set_usage(total)

    def flush(self) -> None:
        self.tracker.flush()
