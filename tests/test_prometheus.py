"""The Grafana dashboard and the alert rules, proven against a real Prometheus scraping a real mirror.

A mirror pulls through a fault proxy in front of the session upstream while Prometheus scrapes
it every second: misses and hits, a fetch two clients share (coalesced), a rate-limited
revalidation and an upstream that is gone (both served stale), an upload, collector runs.
Then every query of every panel of ``grafana/mirror.json`` must return at least one series.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.catalog import StandardImages
from tests.support.faults import FaultProxy
from tests.support.images import MANIFEST_MEDIA_TYPES, sha256_digest as sha256
from tests.support.mirror import PROJECT_ROOT, MirrorServer
from tests.support.procs import require_tool
from tests.support.prometheus import Prometheus, QueryError, panel_queries

DASHBOARD = PROJECT_ROOT / "grafana" / "mirror.json"
ALERTS = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.test.yml"
PROVISIONING = PROJECT_ROOT / "grafana" / "provisioning"
ALL_TYPES = ", ".join(MANIFEST_MEDIA_TYPES)
KIB = 1024


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool", "prometheus"), *args], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=60, cwd=ALERTS.parent, check=False)


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


# Static checks ----------------------------------------------------------------------------


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    example = promtool("check", "config", str(ALERTS.parent / "prometheus.yml"))
    assert example.returncode == 0, example.stdout + example.stderr


def test_dashboard_uses_a_data_source_variable_and_no_fixed_uids() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    text = DASHBOARD.read_text()
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', text)) - {dashboard["uid"]}
    assert uids == {"${datasource}"}, f"data source UIDs other than the variable: {uids}"
    queries = panel_queries(dashboard)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {q.panel for q in queries} == {p["title"] for p in panels}, "a panel without a query"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    for name in ("datasources", "dashboards"):
        files = list((PROVISIONING / name).glob("*.yml"))
        assert files and all("apiVersion: 1" in f.read_text() for f in files), name


# Against a real Prometheus ---------------------------------------------------------------


def coalesced_pull(url: str, digest: str) -> tuple[str, str]:
    """Two clients ask for one blob: the second while the first one's fetch is still arriving."""
    first_bytes = threading.Event()
    outcomes: dict[str, str] = {}

    def leader() -> None:
        with httpx.Client(timeout=60.0, trust_env=False) as http, http.stream("GET", url) as answer:
            hasher = hashlib.sha256()
            for chunk in answer.iter_bytes():
                hasher.update(chunk)
                first_bytes.set()
            assert "sha256:" + hasher.hexdigest() == digest
            outcomes["leader"] = answer.headers["x-mirror-cache"]

    thread = threading.Thread(target=leader)
    thread.start()
    try:
        assert first_bytes.wait(30)
        follower = httpx.get(url, timeout=60.0, trust_env=False)
        assert sha256(follower.content) == digest
        outcomes["follower"] = follower.headers["x-mirror-cache"]
    finally:
        first_bytes.set()
        thread.join(60)
    return outcomes["leader"], outcomes["follower"]


def test_every_dashboard_panel_has_data_in_a_real_prometheus(
    images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client, tmp_path: Path,
) -> None:
    mirror = mirror_factory(fault_proxy.url, env={
        "MIRROR_CACHE_TAG_TTL": "1s", "MIRROR_GC_INTERVAL": "1s", "MIRROR_UPSTREAM_RETRIES": "1"})
    with Prometheus(tmp_path / "prometheus", [mirror.address], rule_files=[ALERTS]) as prometheus:
        small, big = images.small, images.big
        manifest_url = f"{mirror.url}/v2/library/small/manifests/1"

        # Misses, then hits.
        for expected in ("MISS", "HIT"):
            assert http.get(manifest_url, headers={"accept": ALL_TYPES}).headers["x-mirror-cache"] == expected
            for digest in (small.config_digest, *(layer.digest for layer in small.layers)):
                blob = http.get(f"{mirror.url}/v2/library/small/blobs/{digest}")
                assert blob.headers["x-mirror-cache"] == expected and sha256(blob.content) == digest

        # A fetch two clients share: the upstream sends the 1 MiB layer slowly.
        layer = big.layers[0]
        fault_proxy.add("slow", layer.digest, method="GET", times=1, chunk_size=64 * KIB, delay=0.04)
        assert coalesced_pull(f"{mirror.url}/v2/library/big/blobs/{layer.digest}", layer.digest) \
            == ("MISS", "COALESCED")

        # The tag's revalidation is rate-limited (Docker Hub's headers): the cached copy is served.
        time.sleep(1.1)
        fault_proxy.add("status", "/manifests/", method="HEAD", times=1, status=429,
                        headers={"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "0;w=21600"})
        assert http.get(manifest_url, headers={"accept": ALL_TYPES}).headers["x-mirror-cache"] == "STALE"

        # A push.
        pushed = b"pushed through the mirror" * 100
        assert http.post(f"{mirror.url}/v2/team/app/blobs/uploads/", params={"digest": sha256(pushed)},
                         content=pushed).status_code == 201

        # The upstream goes away: cached content is served stale, the rest fails.
        fault_proxy.stop()
        time.sleep(1.1)
        assert http.get(manifest_url, headers={"accept": ALL_TYPES}).headers["x-mirror-cache"] == "STALE"
        assert http.get(f"{mirror.url}/v2/library/dlist/manifests/1").status_code == 503
        for _ in range(20):  # traffic while Prometheus scrapes
            assert http.get(f"{mirror.url}/v2/library/small/blobs/{small.config_digest}").status_code == 200

        # Every panel query returns data once Prometheus has scraped all of the above.
        queries = panel_queries(load_dashboard())
        empty: dict[str, str] = {}
        deadline = time.monotonic() + 40
        while True:
            empty = {}
            for query in queries:
                try:
                    if not prometheus.query(query.expr):
                        empty[f"{query.panel} [{query.ref_id}]"] = query.expr
                except QueryError as exc:
                    pytest.fail(f"panel {query.panel!r} [{query.ref_id}]: Prometheus refused {query.expr!r}: {exc}")
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert not empty, "panels whose query returns no series:\n" + "\n".join(
            f"  {panel}: {expr}" for panel, expr in empty.items())

        # What Prometheus holds is what happened.
        def scraped(expr: str, expected: float) -> bool:
            deadline = time.monotonic() + 10
            while (found := prometheus.value(expr)) != expected and time.monotonic() < deadline:
                time.sleep(0.5)
            assert found == expected, expr
            return True

        scraped('sum(mirror_cache_requests_total{kind="manifest", outcome="stale"})', 2)
        scraped('sum(mirror_cache_requests_total{kind="blob", outcome="coalesced"})', 1)
        scraped('sum(mirror_upstream_errors_total{reason="rate_limited"})', 1)
        scraped('sum(mirror_upstream_ratelimit_remaining)', 0)
        scraped('sum(mirror_upstream_ratelimit_limit)', 100)
        scraped('sum(mirror_upstream_received_bytes_total{kind="blob"})',
                len(small.config) + sum(x.size for x in small.layers) + layer.size)
        scraped('sum(mirror_uploads_total)', 1)
        assert (prometheus.value('sum(mirror_gc_runs_total{result="ok"})') or 0) >= 1
        assert prometheus.value('up{job="mirror"}') == 1

        # The alert rules load and evaluate against the real series.
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        expected = sum(len(group["rules"]) for group in yaml.safe_load(ALERTS.read_text())["groups"])
        assert len(rules) == expected and all(rule["health"] == "ok" for rule in rules), rules

        # promtool accepts the exposition.
        exposition = http.get(f"{mirror.url}/metrics").content
        linted = promtool("check", "metrics", stdin=exposition)
        assert linted.returncode == 0, linted.stdout + linted.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_the_first_stale_serve_and_429_show_in_their_panels(
    images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client, tmp_path: Path, workers: int,
) -> None:
    """Series start at 0, so the very first event of its kind is an increase Prometheus can see."""
    mirror = mirror_factory(fault_proxy.url, workers=workers,
                            env={"MIRROR_CACHE_TAG_TTL": "1s", "MIRROR_UPSTREAM_RETRIES": "0"})
    manifest_url = f"{mirror.url}/v2/library/small/manifests/1"
    assert http.get(manifest_url, headers={"accept": ALL_TYPES}).headers["x-mirror-cache"] == "MISS"
    panels = {(q.panel, q.expr) for q in panel_queries(load_dashboard())}
    stale_panel = [expr for panel, expr in panels if panel == "Stale serves"]
    limited_panel = [expr for panel, expr in panels if panel == "Rate-limited upstream answers"]
    errors_panel = [expr for panel, expr in panels if panel == "Upstream errors by reason"]
    status_panel = [expr for panel, expr in panels if panel == "Upstream requests by status"]
    route_panel = [expr for panel, expr in panels if panel == "Request rate by route"]
    assert len(stale_panel) == len(limited_panel) == len(errors_panel) == len(status_panel) == len(route_panel) == 1

    with Prometheus(tmp_path / "prometheus", [mirror.address]) as prometheus:
        # A few scrapes before anything goes wrong: the series are there, at 0.
        deadline = time.monotonic() + 20
        while (prometheus.value('count_over_time(up{job="mirror"}[1m])') or 0) < 3:
            assert time.monotonic() < deadline, prometheus.log_tail()
            time.sleep(0.5)
        assert prometheus.value('sum(mirror_upstream_errors_total{reason="rate_limited"})') == 0
        assert prometheus.value('sum(mirror_cache_requests_total{outcome="stale"})') == 0

        # The tag's revalidation is answered 429: the cached manifest is served stale.
        time.sleep(1.1)
        fault_proxy.add("status", "/manifests/", method="HEAD", times=1, status=429)
        assert http.get(manifest_url, headers={"accept": ALL_TYPES}).headers["x-mirror-cache"] == "STALE"
        # The first blob GET since the start, and the upstream's first answer of its kind (the 429).
        assert http.get(f"{mirror.url}/v2/library/small/blobs/{images.small.layers[0].digest}").status_code == 200

        def shown(expr: str, labels: dict[str, str]) -> float:
            return sum(float(s["value"][1]) for s in prometheus.query(expr)
                       if all(s["metric"].get(k) == v for k, v in labels.items()))

        deadline = time.monotonic() + 20
        while True:
            seen = {"stale": shown(stale_panel[0], {"kind": "manifest"}),
                    "rate-limited": shown(limited_panel[0], {"upstream": "docker.io"}),
                    "errors": shown(errors_panel[0], {"reason": "rate_limited"}),
                    "upstream 429": shown(status_panel[0], {"upstream": "docker.io", "status": "429"}),
                    "blob requests": shown(route_panel[0], {"route": "blob"})}
            if all(seen.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert all(value > 0 for value in seen.values()), seen
        # Summed over every worker, each happened once.
        assert prometheus.value('sum(mirror_upstream_errors_total{reason="rate_limited"})') == 1
        assert prometheus.value('sum(mirror_cache_requests_total{kind="manifest", outcome="stale"})') == 1
        assert prometheus.value('sum(mirror_cache_requests_total{kind="manifest", outcome="miss"})') == 1
