"""The cache page's chart of the last hours: the ring of per-minute samples keeps six hours, the
chart's figures are the differences of the samples, and with two workers each draws every worker's
totals (the real mirror under uvicorn; the browser's view is in ``tests/test_web_ui_browser.py``)."""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client import CollectorRegistry

from mirror.ui.chart import HEIGHT, WIDTH, draw
from mirror.ui.history import SPAN, History, Sample
from tests.support.catalog import StandardImages
from tests.support.client import pull_checked
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.waiting import eventually

MiB = 1 << 20


def test_the_ring_keeps_six_hours_of_minutes() -> None:
    history = History(CollectorRegistry(), lambda: 0)
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
    # The summaries (the charts' descriptions) give the largest figures drawn, not the axes' rounded tops.
    assert chart.traffic_summary.endswith("at most 3.0 MiB in a minute.")
    assert chart.disk_summary.endswith("the store held at most 4.0 MiB; 4.0 MiB now.")


def test_before_the_first_minute_there_is_nothing_to_draw() -> None:
    chart = draw([], Sample(10.0, None, 0, 0))
    assert chart.rows == [] and chart.store_line == chart.disk_line == ""
    assert chart.disk_summary == "The store's size is not known while its index cannot be read."


def test_with_two_workers_each_draws_every_workers_totals(
        mirror_factory: Callable[..., MirrorServer], http: httpx.Client, images: StandardImages) -> None:
    mirror = mirror_factory(workers=2)
    seen: dict[int, tuple[int, int]] = {}

    def look() -> tuple[int, tuple[int, int]]:
        """One view of the cache page on a new connection (either worker): its pid and window totals."""
        page = httpx.get(f"{mirror.url}/ui/cache", trust_env=False, timeout=30)
        assert page.status_code == 200, page.text
        pid = re.search(r"\(pid (\d+), one of 2; each keeps its own samples\)", page.text)
        totals = [re.search(f'<data id="window-{which}" value="(\\d+)">', page.text) for which in ("store", "upstream")]
        assert pid and all(totals), page.text
        seen[int(pid.group(1))] = (int(totals[0].group(1)), int(totals[1].group(1)))  # type: ignore[union-attr]
        return int(pid.group(1)), seen[int(pid.group(1))]

    assert eventually(lambda: look() and len(seen) == 2, timeout=30), seen  # both started, before any pull
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    found = scrape(f"{mirror.url}/metrics")
    sent = int(sum(value(found, "mirror_cache_served_bytes_total", outcome=o) for o in ("hit", "stale", "local")))
    fetched = int(value(found, "mirror_upstream_received_bytes_total"))
    assert sent and fetched
    seen.clear()
    assert eventually(lambda: look()[1] == (sent, fetched) and len(seen) == 2 and
                      set(seen.values()) == {(sent, fetched)}, timeout=30), (seen, sent, fetched)


@pytest.mark.slow
def test_with_two_workers_each_samples_every_workers_traffic_each_minute(
        mirror_factory: Callable[..., MirrorServer], http: httpx.Client, images: StandardImages) -> None:
    """A worker that served nothing still has the other's traffic in the minute it happened, not
    only in the figures taken when the page is drawn."""
    mirror = mirror_factory(workers=2)
    pids: set[str] = set()

    def page() -> httpx.Response:
        answer = httpx.get(f"{mirror.url}/ui/cache", trust_env=False, timeout=30)  # a new connection: any worker
        assert answer.status_code == 200, answer.text
        pids.update(re.findall(r"\(pid (\d+), one of 2;", answer.text))
        return answer

    assert eventually(lambda: bool(page()) and len(pids) == 2, timeout=30), pids  # both sampled at their start
    started = time.time()
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    time.sleep(max(0.0, started + 70 - time.time()))  # each worker's next sample is a minute after its start

    rows: dict[str, list[tuple[float, int]]] = {}
    while len(rows) < 2:
        text = page().text
        pid = re.findall(r"\(pid (\d+), one of 2;", text)[0]
        rows[pid] = [(calendar.timegm(time.strptime(at, "%Y-%m-%dT%H:%M:%SZ")), int(fetched)) for at, fetched in
                     re.findall(r'<tr><td><time datetime="([^"]+)">.*?</td><td class="num"><data value="\d+">.*?'
                                r'</data></td><td class="num"><data value="(\d+)">', text)]
        assert time.time() - started < 110, "a worker did not answer before its third sample"
    for pid, found in rows.items():
        # One minute with the traffic, sampled after the pull, well before the page was drawn.
        assert len(found) == 1 and found[0][1] > 0, (pid, found)
        assert started < found[0][0] < time.time() - 5, (pid, found, started)
