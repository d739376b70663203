"""The cache page's chart of the last hours, as pure logic: the ring of per-minute samples keeps
six hours, and the chart's figures are the differences of the samples (the server and the browser
are in ``tests/test_web_ui_browser.py``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from mirror.ui.chart import HEIGHT, WIDTH, draw
from mirror.ui.history import SPAN, History, Sample

MiB = 1 << 20


def test_the_ring_keeps_six_hours_of_minutes() -> None:
    history = History(CollectorRegistry())
    for minute in range(400):
        history.record(Sample(minute * 60.0, minute, minute, minute))
    kept = history.samples()
    assert len(kept) == SPAN / 60 + 1 == 361
    assert kept[0].at == (400 - 361) * 60 and kept[-1].at == 399 * 60


def test_the_chart_draws_each_minutes_traffic_and_the_store_size() -> None:
    kept = [Sample(0.0, 0, 0, 0), Sample(60.0, 3 * MiB, 0, 3 * MiB), Sample(120.0, 3 * MiB, 0, 3 * MiB),
            Sample(180.0, 3 * MiB, 2 * MiB, 3 * MiB)]
    chart = draw(kept, Sample(210.0, 4 * MiB, 2 * MiB, 4 * MiB))
    # Minutes in which something changed; the last, half a minute, too.
    assert [(r.at, r.from_store, r.from_upstream, r.stored) for r in chart.rows] == [
        (60.0, 0, 3 * MiB, 3 * MiB), (180.0, 2 * MiB, 0, 3 * MiB), (210.0, 0, MiB, 4 * MiB)]
    assert (chart.from_store, chart.from_upstream, chart.stored) == (2 * MiB, 4 * MiB, 4 * MiB)
    assert chart.traffic_top == 5 * MiB and chart.disk_top == 5 * MiB
    # Steps over each interval, x over the whole width, y from the bottom (HEIGHT) up.
    upstream = [tuple(map(float, p.split(","))) for p in chart.upstream_line.split()]
    assert upstream[0] == (0.0, HEIGHT - 3 / 5 * HEIGHT) and upstream[1] == (round(60 / 210 * WIDTH, 1), 48.0)
    assert upstream[-1] == (WIDTH, HEIGHT - 1 / 5 * HEIGHT)
    assert len(chart.disk_line.split()) == 5
    assert "2.0 MiB sent from the store, 4.0 MiB fetched from upstreams" in chart.traffic_summary


def test_before_the_first_minute_there_is_nothing_to_draw() -> None:
    chart = draw([], Sample(10.0, None, 0, 0))
    assert chart.rows == [] and chart.store_line == chart.disk_line == ""
    assert chart.disk_summary == "The store's size is not known while its index cannot be read."
