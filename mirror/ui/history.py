"""The last hours of the cache page's figures: disk usage and traffic, one sample a minute, in memory.

A :class:`History` is a ring of :class:`Sample` (at most :data:`SPAN` seconds of them, one every
:data:`INTERVAL`), each the mirror's totals at that moment as ``/metrics`` reports them: bytes in
the store (``mirror_store_size_bytes``), bytes sent from the store (``mirror_cache_served_bytes_total``
of the outcomes :data:`~mirror.ui.figures.FROM_STORE` and ``local``) and bytes fetched from the
upstreams (``mirror_upstream_received_bytes_total``).  The traffic of a minute is the difference
of two samples.

Each worker process keeps its own ring, sampled by its own task (:meth:`History.run`, started
with the app), but what it samples is every worker's totals (the counters of every worker,
merged as a scrape merges them, and the index's running total of the store's size): any worker
draws the whole mirror's history, from its own start on.  A sample reads nothing else (not the
store's object counts, a scan of ``blobs/`` or a LIST of the bucket).  Nothing is written to
disk; a restart begins a new history.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio.to_thread
from prometheus_client import CollectorRegistry

from ..metadata.driver import MetadataUnavailable
from ..registry.reads import in_index_thread
from .figures import FROM_STORE, Samples, samples

#: Seconds between two samples, and the seconds of samples kept (6 hours).
INTERVAL = 60.0
SPAN = 6 * 3600.0
log = logging.getLogger("mirror.ui")


@dataclass(frozen=True)
class Sample:
    #: ``time.time()`` of the sample.
    at: float
    #: Bytes in the store (None while the index cannot be read).
    stored: int | None
    #: Bytes sent from the store and fetched from the upstreams, since the mirror started.
    from_store: int
    from_upstream: int


def read(found: Samples, at: float) -> Sample:
    """The totals of one exposition's samples (:func:`~mirror.ui.figures.samples`)."""
    served = sum(v for labels, v in found.get("mirror_cache_served_bytes_total", ())
                 if labels.get("outcome") in (*FROM_STORE, "local"))
    fetched = sum(v for _, v in found.get("mirror_upstream_received_bytes_total", ()))
    size = [v for _, v in found.get("mirror_store_size_bytes", ())]
    return Sample(at, int(size[0]) if size else None, int(served), int(fetched))


class History:
    """A ring of samples of *registry* (every worker's metrics, as ``exposition_registry`` merges
    them) and of *usage* (the store's size in bytes, from the index)."""

    def __init__(self, registry: CollectorRegistry, usage: Callable[[], int], interval: float = INTERVAL,
                 span: float = SPAN) -> None:
        self.registry = registry
        self.usage = usage
        self.interval = interval
        self._ring: deque[Sample] = deque(maxlen=int(span // interval) + 1)

    def counted(self, at: float | None = None) -> Sample:
        """The traffic's totals now, without the store's size (blocking: reads every worker's samples)."""
        return read(samples(self.registry), time.time() if at is None else at)

    def stored(self) -> int | None:
        """The store's size now (blocking: reads the index); None while its database is down."""
        try:
            return self.usage()
        except MetadataUnavailable:  # a gap in the disk's line
            return None

    async def sample(self) -> Sample:
        """The totals now: the workers' samples read from a default worker thread, the store's size
        from one of the index's own (``registry/reads.py``), so a locked database holds up this alone."""
        taken = await anyio.to_thread.run_sync(self.counted)
        return dataclasses.replace(taken, stored=await in_index_thread(self.stored))

    def record(self, sample: Sample) -> None:
        """Keep *sample*; the oldest goes once the ring holds :data:`SPAN` seconds of them."""
        self._ring.append(sample)

    def samples(self) -> list[Sample]:
        """The samples kept, oldest first."""
        return list(self._ring)

    async def run(self) -> None:
        """Sample now and every :attr:`interval` seconds until cancelled."""
        while True:
            try:
                self.record(await self.sample())
            except Exception as exc:  # noqa: BLE001 (a sample missed is a gap in a chart, not a reason to stop)
                log.warning("figures not sampled for the cache page's chart: %s", exc)
            await asyncio.sleep(self.interval)
