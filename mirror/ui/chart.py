"""The cache page's chart of the last hours, drawn on the server as inline SVG (``cache.html``).

From a :class:`~mirror.ui.history.History`'s samples and one taken now: the traffic of each
interval between two samples (bytes sent from the store and fetched from the upstreams: a minute's,
and the last one's since the last sample) and the store's size at each sample.  The same figures
are given as a table (the minutes in which something changed) and the window's totals, for screen
readers and for a browser without SVG.  Coordinates are in a fixed ``viewBox`` (:data:`WIDTH` x
:data:`HEIGHT`); the template scales it to the page.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config.values import human
from .history import Sample

WIDTH = 600
HEIGHT = 120


@dataclass(frozen=True)
class Row:
    """One interval: when it ended, the store's size then, and its traffic in bytes."""

    at: float
    stored: int | None
    from_store: int
    from_upstream: int


@dataclass(frozen=True)
class Chart:
    start: float
    end: float
    #: ``points`` of the SVG polylines: bytes sent from the store and fetched in each interval, as
    #: steps over it, and the store's size at each sample ("" when nothing to draw).
    store_line: str
    upstream_line: str
    disk_line: str
    #: The largest value of each chart's y axis (its top, rounded up), in bytes (of an interval, of the store).
    traffic_top: int
    disk_top: int
    #: The largest value drawn on each chart: the busiest interval's bytes, the store's largest size.
    traffic_peak: int
    disk_peak: int
    rows: list[Row]
    #: Bytes sent from the store and fetched from the upstreams from the first sample to now.
    from_store: int
    from_upstream: int
    #: The store's size now (None while the index cannot be read).
    stored: int | None

    @property
    def traffic_summary(self) -> str:
        return (f"From {_clock(self.start)} to {_clock(self.end)} UTC: {human(self.from_store)} sent from the "
                f"store, {human(self.from_upstream)} fetched from upstreams; at most "
                f"{human(self.traffic_peak)} in a minute.")

    @property
    def disk_summary(self) -> str:
        if self.stored is None:
            return "The store's size is not known while its index cannot be read."
        return (f"From {_clock(self.start)} to {_clock(self.end)} UTC the store held at most "
                f"{human(self.disk_peak)}; {human(self.stored)} now.")


def _clock(at: float) -> str:
    return time.strftime("%H:%M", time.gmtime(at))


def _top(value: float) -> int:
    """A round axis top at or above *value*: 1, 2 or 5 times a power of ten of KiB, MiB... (at least 1 KiB)."""
    unit = 1024
    while True:
        for step in (1, 2, 5, 10, 20, 50, 100, 200, 500):
            if value <= step * unit:
                return step * unit
        unit *= 1024


def _fmt(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def draw(kept: list[Sample], now: Sample) -> Chart:
    """The chart of *kept* (oldest first) and *now*, taken after them."""
    points = [s for s in kept if s.at < now.at] + [now]
    start, end = points[0].at, now.at
    span = max(end - start, 1.0)

    def x(at: float) -> str:
        return _fmt((at - start) / span * WIDTH)

    rows, rates = [], []
    for before, after in zip(points, points[1:], strict=False):
        row = Row(after.at, after.stored, max(0, after.from_store - before.from_store),
                  max(0, after.from_upstream - before.from_upstream))
        rates.append((before.at, after.at, row.from_store, row.from_upstream))
        if row.from_store or row.from_upstream or row.stored != before.stored:
            rows.append(row)
    traffic_peak = max([max(r[2], r[3]) for r in rates], default=0)
    sizes = [(s.at, s.stored) for s in points if s.stored is not None]
    disk_peak = max([size for _, size in sizes], default=0)
    traffic_top, disk_top = _top(traffic_peak), _top(disk_peak)

    def y(value: float, top: int) -> str:
        return _fmt(HEIGHT - value / top * HEIGHT)

    def steps(which: int) -> str:
        drawn = []
        for begin, finish, *values in rates:
            drawn += [f"{x(begin)},{y(values[which], traffic_top)}", f"{x(finish)},{y(values[which], traffic_top)}"]
        return " ".join(drawn)

    disk = " ".join(f"{x(at)},{y(size, disk_top)}" for at, size in sizes) if len(sizes) > 1 else ""
    return Chart(start=start, end=end, store_line=steps(0), upstream_line=steps(1), disk_line=disk,
                 traffic_top=traffic_top, disk_top=disk_top, traffic_peak=traffic_peak, disk_peak=disk_peak, rows=rows,
                 from_store=max(0, now.from_store - points[0].from_store),
                 from_upstream=max(0, now.from_upstream - points[0].from_upstream), stored=now.stored)
