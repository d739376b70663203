"""Observability of a real mirror: /healthz, /readyz, JSON access logs, and /metrics counters that
agree with what the test did (cross-checked with the upstream's own log and the store on disk).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.archives import docker_save
from tests.support.catalog import StandardImages
from tests.support.client import pull_checked as pull, push_image
from tests.support.images import MANIFEST_MEDIA_TYPES, Image, build_image, random_layer, sha256_digest as sha256
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.procs import free_port
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import settle
from tests.support.waiting import eventually

ALL_TYPES = ", ".join(MANIFEST_MEDIA_TYPES)
MIB = 1024 * 1024
ACCESS_FIELDS = {"ts", "request_id", "method", "route", "path", "status", "cache", "bytes", "duration_ms", "client"}


def access_entries(mirror: MirrorServer) -> list[dict[str, object]]:
    """The JSON access-log lines the mirror wrote so far."""
    return mirror.access_entries()


def catalog_entries_are(mirror: MirrorServer, count: int) -> bool:
    return sum(e["route"] == "catalog" for e in access_entries(mirror)) == count


def blobs_of(image: Image) -> list[str]:
    return [image.config_digest, *(layer.digest for layer in image.layers)]


def blob_bytes(image: Image) -> int:
    return len(image.config) + sum(layer.size for layer in image.layers)


def store_files(data_dir: Path) -> list[Path]:
    settle(data_dir)  # fills are synced and moved into blobs/ just after their last byte
    return [p for p in (data_dir / "blobs").rglob("*") if p.is_file()]


# Health ----------------------------------------------------------------------------------


def test_healthz_and_readyz_answer_and_echo_the_request_id(mirror: MirrorServer, http: httpx.Client) -> None:
    alive = http.get(f"{mirror.url}/healthz", headers={"x-request-id": "probe-1"})
    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
    assert alive.headers["x-request-id"] == "probe-1"
    ready = http.get(f"{mirror.url}/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert re.fullmatch(r"[0-9a-f]{32}", ready.headers["x-request-id"])  # made up when none was sent
    # A request id that is not a sane token is replaced, not echoed into headers and logs.
    odd = http.get(f"{mirror.url}/healthz", headers={"x-request-id": "a b\tc"})
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    assert http.head(f"{mirror.url}/readyz").status_code == 200
    assert not list((mirror.data_dir / "tmp").glob("readyz-*")), "the write probe is removed"


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """Make *directory* refuse new files, even to root (immutable attribute; permissions otherwise)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.fail("chattr not installed: apt-get install -y e2fsprogs", pytrace=False)
    done = subprocess.run([chattr, "+i", str(directory)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"cannot make {directory} immutable here: {done.stderr.strip()}", pytrace=False)
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)


def test_the_root_path_answers_as_registry_2s_does_for_probes_that_ask_it(
    mirror: MirrorServer, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """``GET /`` answered 404; registry:2 answers 200 (no body, ``Cache-Control: no-cache``), and
    health checks carried over from it ask there.  With the web UI, a redirect to it (Kubernetes,
    HAProxy and ``curl -f`` take a 3xx as a success too); never asking for a password."""
    for method in ("GET", "HEAD"):
        answer = http.request(method, f"{mirror.url}/", follow_redirects=False)
        assert (answer.status_code, answer.headers["location"]) == (302, "/ui/"), (method, answer.text)
    ui = http.get(f"{mirror.url}/", follow_redirects=True)
    assert (ui.status_code, ui.url.path) == (200, "/ui/") and "text/html" in ui.headers["content-type"]
    bare = mirror_factory(env={"MIRROR_UI_ENABLED": "false"})
    for method in ("GET", "HEAD"):
        answer = http.request(method, f"{bare.url}/", follow_redirects=False)
        assert (answer.status_code, answer.content) == (200, b""), method
        assert answer.headers["cache-control"] == "no-cache"


def test_readyz_fails_while_the_store_is_not_writable(mirror: MirrorServer, http: httpx.Client) -> None:
    with unwritable(mirror.data_dir / "tmp"):
        answer = http.get(f"{mirror.url}/readyz")
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["status"] == "unavailable"
        assert set(body["problems"]) == {"store"} and "not writable" in body["problems"]["store"]
        # Alive all the same: a restart would not help.
        assert http.get(f"{mirror.url}/healthz").status_code == 200
    assert http.get(f"{mirror.url}/readyz").status_code == 200


@pytest.mark.slow
def test_a_request_that_waits_out_an_index_locked_by_another_process_gets_a_503_without_a_traceback(
        mirror_factory: Callable[..., MirrorServer], http: httpx.Client, images: StandardImages) -> None:
    """A tool holding the diskcache index's write lock (``sqlite3`` with ``BEGIN EXCLUSIVE``): a
    request that must write waits out diskcache's 60 s, then gets the registry's 503, not a 500 with
    two tracebacks in the log."""
    mirror = mirror_factory(env={"MIRROR_CACHE_TAG_TTL": "0s"})  # each GET by tag writes the tag again
    pull(http, mirror.url, "library/small", "1", images.small)
    holder = sqlite3.connect(mirror.data_dir / "index" / "cache.db", timeout=5, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        answer = http.get(f"{mirror.url}/v2/library/small/manifests/1", headers={"accept": images.small.media_type},
                          timeout=120)
    finally:
        holder.close()
    assert answer.status_code == 503 and int(answer.headers["retry-after"]) > 0, answer.text
    error = answer.json()["errors"][0]
    assert (error["code"], error["message"]) == ("UNAVAILABLE", "the index is locked by another process"), error
    log = mirror.log_tail(200)
    assert "stayed locked by another process" in log and "Traceback" not in log, log
    assert http.get(f"{mirror.url}/v2/library/small/manifests/1",
                    headers={"accept": images.small.media_type}).status_code == 200


def test_a_store_directory_gone_is_a_store_down_not_an_empty_store(mirror: MirrorServer, http: httpx.Client,
                                                                   tiny: Image) -> None:
    """``DATA/blobs`` moved away (a volume not mounted): a pushed blob answers 503, not 404 (it looked
    lost), and ``mirror_store_up`` is 0 (it counted the store empty, and the store-down alert could not fire)."""
    push_image(mirror.url, "team/app", "1", tiny, client=http)
    blob = f"{mirror.url}/v2/team/app/blobs/{tiny.layers[0].digest}"
    blobs = mirror.data_dir / "blobs"
    blobs.rename(mirror.data_dir / "blobs.away")
    try:
        time.sleep(1.1)  # the last count of the objects is a second old: the next scrape counts again
        for method in ("HEAD", "GET"):
            answer = http.request(method, blob)
            assert answer.status_code == 503, (method, answer.status_code, answer.text)
        assert "is missing: is its volume mounted?" in mirror.log_tail(50)
        assert value(scrape(f"{mirror.url}/metrics"), "mirror_store_up") == 0
        assert http.get(f"{mirror.url}/readyz").status_code == 503
    finally:
        (mirror.data_dir / "blobs.away").rename(blobs)
    time.sleep(1.1)
    assert http.get(blob).status_code == 200
    assert value(scrape(f"{mirror.url}/metrics"), "mirror_store_up") == 1


# Access log -------------------------------------------------------------------------------


def test_access_log_has_one_json_line_per_request(
    images: StandardImages, mirror: MirrorServer, http: httpx.Client,
) -> None:
    layer = images.small.layers[-1]
    manifest = http.get(f"{mirror.url}/v2/library/small/manifests/1",
                        headers={"accept": ALL_TYPES, "x-request-id": "pull-42", "user-agent": "obs-test/1"})
    blob = http.get(f"{mirror.url}/v2/library/small/blobs/{layer.digest}")
    again = http.get(f"{mirror.url}/v2/library/small/blobs/{layer.digest}", headers={"range": "bytes=0-99"})
    missing = http.get(f"{mirror.url}/v2/library/small/manifests/no-such-tag", params={"n": "1"})
    # Answered from memory, before the middleware: logged all the same.
    remembered = http.get(f"{mirror.url}/v2/library/small/manifests/1",
                          headers={"accept": ALL_TYPES, "x-request-id": "pull-43", "user-agent": "obs-test/2"})
    assert (manifest.status_code, blob.status_code, again.status_code, missing.status_code) == (200, 200, 206, 404)
    assert remembered.status_code == 200 and remembered.headers["x-request-id"] == "pull-43"
    ids = {"pull-42", "pull-43", *(answer.headers["x-request-id"] for answer in (blob, again, missing))}
    # Each line is written once the response is complete: maybe a moment after the client has it.
    assert eventually(lambda: ids <= {e["request_id"] for e in access_entries(mirror)}, timeout=5)

    by_id = {e["request_id"]: e for e in access_entries(mirror)}
    first = by_id["pull-42"]
    assert ACCESS_FIELDS <= set(first)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(first["ts"]))
    assert first["method"] == "GET" and first["route"] == "manifest"
    assert first["path"] == "/v2/library/small/manifests/1"
    assert (first["status"], first["cache"], first["bytes"]) == (200, "MISS", len(images.small.manifest))
    assert first["client"] == "127.0.0.1" and first["user_agent"] == "obs-test/1"
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] > 0

    served = by_id[blob.headers["x-request-id"]]
    assert (served["route"], served["status"], served["cache"], served["bytes"]) == ("blob", 200, "MISS", layer.size)
    ranged = by_id[again.headers["x-request-id"]]
    assert (ranged["status"], ranged["cache"], ranged["bytes"]) == (206, "HIT", 100)
    memo_hit = by_id["pull-43"]
    assert ACCESS_FIELDS <= set(memo_hit) and memo_hit["user_agent"] == "obs-test/2"
    assert (memo_hit["route"], memo_hit["path"], memo_hit["status"], memo_hit["cache"], memo_hit["bytes"]) == \
        ("manifest", "/v2/library/small/manifests/1", 200, "HIT", len(images.small.manifest))
    failed = by_id[missing.headers["x-request-id"]]
    assert (failed["status"], failed["cache"], failed["query"]) == (404, None, "n=1")
    # uvicorn's own access log is off: one line per request, ours.
    assert not re.search(r'"GET /v2/\S+ HTTP/1\.1" \d{3}', mirror.log_path.read_text())


def test_access_log_can_be_turned_off(mirror_factory: Callable[..., MirrorServer], http: httpx.Client) -> None:
    mirror = mirror_factory(env={"MIRROR_LOG_ACCESS": "false"})
    for _ in range(3):
        assert http.get(f"{mirror.url}/v2/_catalog").status_code == 200
    answer = http.get(f"{mirror.url}/v2/_catalog")
    assert answer.headers["x-request-id"]
    # Request metrics are written when access lines would be: once they count all four, no line came.
    assert eventually(lambda: value(scrape(f"{mirror.url}/metrics"), "mirror_http_requests_total",
                                    route="catalog") == 4, 5)
    assert access_entries(mirror) == []


# Counters ---------------------------------------------------------------------------------


def test_counters_agree_with_what_was_pulled(
    images: StandardImages, upstream: UpstreamRegistry, mirror: MirrorServer, http: httpx.Client,
) -> None:
    image = images.small
    upstream.clear_counts()
    assert pull(http, mirror.url, "library/small", "1", image) == ["MISS"] * (1 + len(blobs_of(image)))
    assert pull(http, mirror.url, "library/small", "1", image) == ["HIT"] * (1 + len(blobs_of(image)))
    assert http.head(f"{mirror.url}/v2/library/small/manifests/1", headers={"accept": ALL_TYPES}).status_code == 200
    metrics = scrape(f"{mirror.url}/metrics")
    n = len(blobs_of(image))

    def cache(kind: str, outcome: str) -> float:
        return value(metrics, "mirror_cache_requests_total", kind=kind, outcome=outcome)

    assert (cache("manifest", "miss"), cache("manifest", "hit")) == (1, 2)  # the HEAD was a hit too
    assert (cache("blob", "miss"), cache("blob", "hit")) == (n, n)
    # Every blob came from the upstream exactly once, and went to the client twice.
    assert value(metrics, "mirror_upstream_received_bytes_total", kind="blob") == blob_bytes(image)
    assert value(metrics, "mirror_upstream_received_bytes_total", kind="manifest") == len(image.manifest)
    assert value(metrics, "mirror_cache_served_bytes_total", kind="blob", outcome="miss") == blob_bytes(image)
    assert value(metrics, "mirror_cache_served_bytes_total", kind="blob", outcome="hit") == blob_bytes(image)
    assert value(metrics, "mirror_cache_served_bytes_total", kind="manifest") == 2 * len(image.manifest)
    # What the mirror says it asked the upstream is what the upstream logged.
    upstream_log = upstream.log.requests()
    assert value(metrics, "mirror_upstream_requests_total") == len(upstream_log) == 1 + n
    assert value(metrics, "mirror_upstream_requests_total", method="GET", status="200") == 1 + n
    assert value(metrics, "mirror_upstream_errors_total") == 0
    assert value(metrics, "mirror_upstream_request_duration_seconds_count") == 1 + n
    # Requests by route, method and status; latency observed for each.
    assert value(metrics, "mirror_http_requests_total", route="blob", method="GET", status="200") == 2 * n
    assert value(metrics, "mirror_http_requests_total", route="manifest", method="GET", status="200") == 2
    assert value(metrics, "mirror_http_requests_total", route="manifest", method="HEAD", status="200") == 1
    assert value(metrics, "mirror_http_request_duration_seconds_count", route="blob") == 2 * n
    assert value(metrics, "mirror_http_response_bytes_total", route="blob") == 2 * blob_bytes(image)
    assert value(metrics, "mirror_http_requests_in_flight") == 1  # this scrape
    assert value(metrics, "mirror_coalesced_waiters") == 0
    # The store's figures.
    files = store_files(mirror.data_dir)
    assert value(metrics, "mirror_store_objects") == len(files) == 1 + n
    assert value(metrics, "mirror_store_size_bytes") == sum(p.stat().st_size for p in files)
    assert value(metrics, "mirror_store_manifests") == 1
    assert value(metrics, "mirror_store_max_size_bytes") > 0
    assert value(metrics, "mirror_workers") == 1


def test_stale_serves_and_upstream_errors_are_counted(
    images: StandardImages, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    own = upstream_factory()
    own.push_image("library/small", "1", images.small)
    mirror = mirror_factory(own.url, env={"MIRROR_CACHE_TAG_TTL": "0.2s", "MIRROR_UPSTREAM_RETRIES": "1"})
    pull(http, mirror.url, "library/small", "1", images.small)
    own.stop()
    time.sleep(0.3)
    assert pull(http, mirror.url, "library/small", "1", images.small)[0] == "STALE"
    gone = http.get(f"{mirror.url}/v2/library/other/manifests/1")
    assert gone.status_code == 503
    metrics = scrape(f"{mirror.url}/metrics")
    assert value(metrics, "mirror_cache_requests_total", kind="manifest", outcome="stale") == 1
    # The stale HEAD and the failed GET each failed after one retry: 2 errors, 4 requests without answer.
    assert value(metrics, "mirror_upstream_errors_total", reason="unreachable") == 2
    assert value(metrics, "mirror_upstream_requests_total", status="error") == 4
    assert value(metrics, "mirror_http_requests_total", route="manifest", status="503") == 1


def test_uploads_and_preloads_are_counted(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path,
) -> None:
    token = tmp_path / "operator-token"
    token.write_text(secrets.token_hex(32))
    operator = {"authorization": f"Bearer {token.read_text()}"}
    mirror = mirror_factory(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)})
    monolithic = os.urandom(70_000)
    assert http.post(f"{mirror.url}/v2/team/app/blobs/uploads/", params={"digest": sha256(monolithic)},
                     content=monolithic).status_code == 201
    chunked = os.urandom(50_000)
    start = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/")
    location = start.headers["location"]
    assert http.patch(f"{mirror.url}{location}", content=chunked[:30_000],
                      headers={"content-range": "0-29999"}).status_code == 202
    done = http.put(f"{mirror.url}{location}", params={"digest": sha256(chunked)}, content=chunked[30_000:])
    assert done.status_code == 201, done.text
    wrong = http.post(f"{mirror.url}/v2/team/app/blobs/uploads/", params={"digest": sha256(b"other")},
                      content=b"not other")
    assert wrong.status_code == 400
    mounted = http.post(f"{mirror.url}/v2/team/copy/blobs/uploads/",
                        params={"mount": sha256(monolithic), "from": "team/app"})
    assert mounted.status_code == 201

    layer_dir = tmp_path / "layers"
    layer_dir.mkdir()
    image = build_image(layer_dir, [random_layer(layer_dir, 64 * 1024, 901, compressed=False)], media="docker")
    archive = docker_save(tmp_path / "save.tar", [(image, ["obs/preloaded:1"])])
    summary = http.post(f"{mirror.url}/_mirror/preload", content=archive.read_bytes(), headers=operator)
    assert summary.status_code == 200, summary.text
    refused = http.post(f"{mirror.url}/_mirror/preload", content=b"this is no archive", headers=operator)
    assert refused.status_code == 400

    metrics = scrape(f"{mirror.url}/metrics")
    assert value(metrics, "mirror_uploads_total") == 2
    assert value(metrics, "mirror_upload_bytes_total") == len(monolithic) + len(chunked)
    assert value(metrics, "mirror_upload_failures_total") == 1
    assert value(metrics, "mirror_upload_mounts_total") == 1
    assert value(metrics, "mirror_preloads_total") == 1
    assert value(metrics, "mirror_preload_failures_total") == 1
    assert value(metrics, "mirror_preload_images_total") == summary.json()["images"] == 1
    assert value(metrics, "mirror_preload_bytes_total") == summary.json()["new_bytes"] > 0
    assert value(metrics, "mirror_http_requests_total", route="upload", method="PATCH", status="202") == 1
    assert value(metrics, "mirror_http_requests_total", route="admin", method="POST") == 2


@pytest.fixture(scope="module")
def three_images(tmp_path_factory: pytest.TempPathFactory) -> list[Image]:
    root = tmp_path_factory.mktemp("obs-images")
    return [build_image(root, [random_layer(root, 2 * MIB, seed=700 + i)]) for i in range(3)]


def test_evictions_and_gc_runs_are_counted(
    three_images: list[Image], upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    own = upstream_factory()
    for i, image in enumerate(three_images):
        own.push_image(f"library/img{i}", "1", image)
    budget = 5 * MIB  # two images fit; the third crosses the high watermark
    mirror = mirror_factory(own.url, env={"MIRROR_CACHE_MAX_SIZE": str(budget), "MIRROR_CACHE_KEEP_RECENT": "0.3s"})
    stored = 0
    for i, image in enumerate(three_images):
        pull(http, mirror.url, f"library/img{i}", "1", image)
        stored += blob_bytes(image) + len(image.manifest)
        time.sleep(0.4)

    def settled() -> bool:
        metrics = scrape(f"{mirror.url}/metrics")
        files = store_files(mirror.data_dir)
        return (value(metrics, "mirror_evicted_images_total") >= 1
                and value(metrics, "mirror_store_objects") == len(files)
                and value(metrics, "mirror_store_size_bytes") == sum(p.stat().st_size for p in files))

    assert eventually(settled), mirror.log_tail(30)
    metrics = scrape(f"{mirror.url}/metrics")
    runs = value(metrics, "mirror_gc_runs_total", result="ok")
    assert runs >= 1 and value(metrics, "mirror_gc_runs_total", result="failed") == 0
    assert value(metrics, "mirror_gc_duration_seconds_count") == runs
    assert value(metrics, "mirror_gc_last_run_timestamp_seconds") > time.time() - 60
    on_disk = sum(p.stat().st_size for p in store_files(mirror.data_dir))
    assert value(metrics, "mirror_gc_freed_bytes_total") == stored - on_disk > 0
    assert value(metrics, "mirror_gc_removed_objects_total") == 3 * 3 - len(store_files(mirror.data_dir))
    assert value(metrics, "mirror_store_max_size_bytes") == budget
    assert value(metrics, "mirror_store_high_watermark_bytes") == budget * 0.95


# Several workers ----------------------------------------------------------------------------


def test_one_scrape_reports_the_sum_over_two_workers(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer],
) -> None:
    mirror = mirror_factory(workers=2)
    image = images.small
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        pull(http, mirror.url, "library/small", "1", image)
    # A new connection per request: the kernel hands them to both workers.
    sent = 0
    while sent < 400:
        for _ in range(20):
            assert httpx.get(f"{mirror.url}/v2/_catalog", trust_env=False).status_code == 200
        sent += 20
        assert eventually(functools.partial(catalog_entries_are, mirror, sent), timeout=5)
        if len({e["pid"] for e in access_entries(mirror) if e["route"] == "catalog"}) == 2:
            break
    by_pid: dict[object, int] = {}
    for entry in access_entries(mirror):
        if entry["route"] == "catalog":
            by_pid[entry["pid"]] = by_pid.get(entry["pid"], 0) + 1
    assert len(by_pid) == 2 and all(0 < count < sent for count in by_pid.values()), by_pid

    for _ in range(6):
        metrics = scrape(f"{mirror.url}/metrics")
        assert value(metrics, "mirror_http_requests_total", route="catalog") == sent
        assert value(metrics, "mirror_upstream_received_bytes_total", kind="blob") == blob_bytes(image)
        assert value(metrics, "mirror_cache_requests_total", kind="blob", outcome="miss") == len(blobs_of(image))
        # The store's figures come once, from whichever worker answers, never doubled.
        assert [n for n, _, _ in metrics].count("mirror_store_size_bytes") == 1
        assert value(metrics, "mirror_store_objects") == len(store_files(mirror.data_dir))
        assert value(metrics, "mirror_workers") == 2
    answered_by = {e["pid"] for e in access_entries(mirror) if e["route"] == "metrics"}
    assert answered_by <= set(by_pid)


def test_metrics_listen_serves_every_worker_on_its_own_port(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    port = free_port()
    mirror = mirror_factory(workers=2, env={"MIRROR_METRICS_LISTEN": f"127.0.0.1:{port}"})
    pull(http, mirror.url, "library/small", "1", images.small)
    assert http.get(f"{mirror.url}/metrics").status_code == 404  # not on the registry's listener
    metrics = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(metrics, "mirror_cache_requests_total", kind="blob", outcome="miss") == len(blobs_of(images.small))
    assert value(metrics, "mirror_upstream_received_bytes_total", kind="blob") == blob_bytes(images.small)
    assert value(metrics, "mirror_store_objects") == len(store_files(mirror.data_dir))
    assert value(metrics, "mirror_http_requests_total", route="metrics", status="200") == 0


def worker_pids(mirror: MirrorServer) -> set[int]:
    """The mirror's worker processes (uvicorn spawns them; its resource tracker is not one)."""
    children = Path(f"/proc/{mirror.pid}/task/{mirror.pid}/children").read_text().split()

    def command(pid: str) -> bytes | None:  # None: it ended (a killed worker being reaped)
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ProcessLookupError, FileNotFoundError):
            return None

    return {int(pid) for pid in children if (line := command(pid)) is not None and b"resource_tracker" not in line}


def test_a_killed_worker_leaves_no_requests_in_flight_behind(
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """Live gauges of a worker that died without a clean exit (SIGKILL, the OOM killer) are dropped
    when uvicorn starts its replacement: only the scrape itself is then in flight."""
    mirror = mirror_factory(workers=2)
    stalled = []
    with contextlib.ExitStack() as stack:
        for _ in range(6):  # uploads whose body stops arriving: in flight until their worker dies
            location = httpx.post(f"{mirror.url}/v2/team/app/blobs/uploads/", trust_env=False).headers["location"]
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", mirror.port)))
            sock.sendall(f"PATCH {location} HTTP/1.1\r\nHost: mirror\r\nContent-Type: application/octet-stream\r\n"
                         "Content-Length: 1000000\r\n\r\n".encode() + bytes(1000))
            stalled.append(sock)
        assert eventually(lambda: value(scrape(f"{mirror.url}/metrics"), "mirror_http_requests_in_flight") == 7,
                        timeout=10)
        killed = worker_pids(mirror)
        assert len(killed) == 2
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        assert eventually(lambda: len(worker_pids(mirror) - killed) == 2, timeout=30)
        assert eventually(lambda: value(scrape(f"{mirror.url}/metrics"), "mirror_http_requests_in_flight") == 1,
                        timeout=10)
        for _ in range(6):  # new connections: either worker may answer
            assert value(scrape(f"{mirror.url}/metrics"), "mirror_http_requests_in_flight") == 1
