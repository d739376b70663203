"""The web UI over plain HTTP: paging and the ``?q=`` filter without JavaScript, pinned and pushed
kinds, pull commands for the host the client used, the cache page against ``/metrics``, and
``ui.enabled``.  The real mirror under uvicorn, in front of real upstream registries."""

from __future__ import annotations

import html
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from mirror.config.values import human
from tests.support.catalog import StandardImages
from tests.support.client import (
    fetch_blob_digest,
    pull_checked,
    push_blob,
    push_image,
    push_index,
    put_manifest,
    session,
)
from tests.support.faults import FaultProxy
from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    build_image,
    build_index,
    random_layer,
    sha256_digest,
    write_oci_layout,
)
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.registry import UpstreamRegistry
from tests.support.schema1 import SCHEMA1_SIGNED, signed_schema1
from tests.support.security import ALICE_PASSWORD, auth_env, basic
from tests.support.storecheck import mirror_cli
from tests.support.waiting import eventually

BULK = 150  # with one more: two pages of 100


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=60) as client:
        yield client


def names(page: httpx.Response) -> list[str]:
    """The repository names the list shows, in order."""
    assert page.status_code == 200, page.text
    return [html.unescape(n) for n in re.findall(r'<th scope="row"><a href="/ui/r/[^"]+">([^<]+)</a></th>', page.text)]


def links(page: httpx.Response) -> dict[str, str]:
    """The pager's links: ``{"prev": href, "next": href}``."""
    return {rel: html.unescape(href) for rel, href in re.findall(r'<a rel="(prev|next)" href="([^"]+)"', page.text)}


@pytest.fixture
def crowded(mirror: MirrorServer, http: httpx.Client, tiny: Image) -> MirrorServer:
    """A mirror holding ``bulk/r000`` ... ``bulk/r149`` and ``other/thing``, all pushed."""
    for n in range(BULK):
        push_image(mirror.url, f"bulk/r{n:03d}", "1", tiny, client=http)
    push_image(mirror.url, "other/thing", "1", tiny, client=http)
    return mirror


def test_list_pages_by_100_and_filters_with_a_plain_get(crowded: MirrorServer, http: httpx.Client) -> None:
    base = f"{crowded.url}/ui/"
    first = http.get(base)
    assert names(first) == [f"bulk/r{n:03d}" for n in range(100)]
    assert "151 repositories" in first.text
    assert links(first) == {"next": "?page=2"}
    # Paged above the table too (a few keystrokes away); the table's box is a labelled region to scroll.
    assert first.text.count('rel="next"') == 2 and first.text.index('rel="next"') < first.text.index("<table")
    assert '<div class="scroll" tabindex="0" role="region" aria-label="Repositories">' in first.text
    assert '<a href="/ui/" aria-current="page">Repositories</a>' in first.text
    assert "<title>Repositories, page 1 of 2 · mirror</title>" in first.text
    second = http.get(base, params={"page": "2"})
    assert names(second) == [f"bulk/r{n:03d}" for n in range(100, BULK)] + ["other/thing"]
    assert links(second) == {"prev": "?page=1"}
    assert names(http.get(base, params={"page": "99"})) == names(second)  # past the end: the last page
    assert names(http.get(base, params={"page": "x"})) == names(first)

    assert names(http.get(base, params={"q": "r01"})) == [f"bulk/r{n:03d}" for n in range(10, 20)]
    assert names(http.get(base, params={"q": "BULK r14"})) == [f"bulk/r{n:03d}" for n in range(140, 150)]
    assert names(http.get(base, params={"q": "thing"})) == ["other/thing"]
    filtered = http.get(base, params={"q": "bulk", "page": "2"})
    assert names(filtered) == [f"bulk/r{n:03d}" for n in range(100, BULK)]
    assert links(filtered) == {"prev": "?q=bulk&page=1"}
    assert "<title>Repositories matching “bulk”, page 2 of 2 · mirror</title>" in filtered.text
    assert 'value="bulk"' in filtered.text  # the form keeps the query

    hostile = http.get(base, params={"q": "<script>alert(1)</script>"})
    assert names(hostile) == [] and "0 repositories" in hostile.text
    assert "<script>alert" not in hostile.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in hostile.text

    partial = http.get(base, params={"q": "thing", "partial": "1"})
    assert names(partial) == ["other/thing"] and "<html" not in partial.text
    assert "pushed" in partial.text
    # Counted under a route of their own, not as unknown paths.
    assert value(scrape(f"{crowded.url}/metrics"), "mirror_http_requests_total", route="ui") == 10


def test_pinned_and_cached_kinds_and_pull_commands_for_the_clients_host(
        mirror: MirrorServer, http: httpx.Client, images: StandardImages, tmp_path: Path) -> None:
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    layout = tmp_path / "layout"
    write_oci_layout(layout, images.big, "docker.io/library/preloaded:7")
    done = mirror_cli("preload", "--data", mirror.data_dir, layout)
    assert done.returncode == 0, done.stderr

    page = http.get(f"{mirror.url}/ui/")
    assert names(page) == ["library/preloaded", "library/small"]
    rows = dict(zip(names(page), re.findall(r"<tr>\s*<th scope=\"row\">.*?</tr>", page.text, re.S), strict=True))
    assert "cached</span> from docker.io" in rows["library/small"] and "pinned" not in rows["library/small"]
    assert "pinned" in rows["library/preloaded"]

    repository = http.get(f"{mirror.url}/ui/r/library/preloaded", headers={"host": "mirror.example.internal:5000"})
    assert repository.status_code == 200
    assert 'cached</span> from docker.io <span class="badge pinned">pinned</span>' in repository.text
    assert "docker pull mirror.example.internal:5000/library/preloaded:7" in repository.text
    assert "podman pull mirror.example.internal:5000/library/preloaded:7" in repository.text
    assert "crane pull --insecure mirror.example.internal:5000/library/preloaded:7 preloaded.tar" in repository.text
    assert "crane copy --insecure mirror.example.internal:5000/library/preloaded:7 REGISTRY/library/preloaded:7" \
        in repository.text
    assert images.big.digest in repository.text and human(images.big.layers[2].size + images.big.layers[0].size
                                                          + images.big.layers[1].size + len(images.big.config)) \
        in repository.text
    assert "default-src 'none'" in repository.headers["content-security-policy"]
    odd = http.get(f"{mirror.url}/ui/r/library/preloaded", headers={"host": "evil\"><b>x"})
    assert f"docker pull 127.0.0.1:{mirror.port}/library/preloaded:7" in odd.text

    assert http.get(f"{mirror.url}/ui/r/library/nothing").status_code == 404
    assert http.get(f"{mirror.url}/ui/r/Not..Valid").status_code == 404
    assert http.get(f"{mirror.url}/ui/r/library/small@sha256:{'0' * 64}").status_code == 404
    # A browser gets pages, not the API's JSON errors: a file that is not there, a method not taken.
    for method, path, status in (("GET", "/ui/static/nope.js", 404), ("POST", "/ui/", 405),
                                 ("DELETE", "/ui/r/library/small", 405)):
        answer = http.request(method, f"{mirror.url}{path}")
        assert answer.status_code == status and answer.headers["content-type"].startswith("text/html"), answer.text
        assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["allow"] == "GET, HEAD" and "DELETE is not taken here" in answer.text
    image = http.get(f"{mirror.url}/ui/r/library/small@{images.small.digest}")
    assert image.status_code == 200 and images.small.layers[1].digest[7:19] in image.text


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_page_shows_what_metrics_report_and_an_upstream_failing(
        workers: int, mirror_factory: Callable[..., MirrorServer], upstream_factory: Callable[[], UpstreamRegistry],
        http: httpx.Client, tiny: Image) -> None:
    """With two workers, whichever answers the page reports every worker's figures, as /metrics does."""
    origin = upstream_factory()
    push_image(origin.url, "team/tool", "1", tiny)
    mirror = mirror_factory(origin.url, workers=workers, env={"MIRROR_CACHE_TAG_TTL": "0s"})
    for _ in range(2):
        pull_checked(http, mirror.url, "team/tool", "1", tiny)
    page = http.get(f"{mirror.url}/ui/cache")
    assert page.status_code == 200
    metrics = scrape(f"{mirror.url}/metrics")

    def shown(id: str) -> str:
        found = re.search(rf'id="{id}">([^<]*)<', page.text)
        assert found, id
        return found.group(1).strip()

    hits, misses = (value(metrics, "mirror_cache_requests_total", outcome=o) for o in ("hit", "miss"))
    assert hits > 0 and misses > 0
    assert shown("answers-hit") == str(int(hits)) and shown("answers-miss") == str(int(misses))
    assert shown("hit-ratio") == f"{hits / (hits + misses) * 100:.1f} %"
    assert shown("bytes-upstream") == human(int(value(metrics, "mirror_upstream_received_bytes_total")))
    assert 'class="badge health-ok">ok<' in page.text

    answered = value(metrics, "mirror_upstream_last_answer_timestamp_seconds", upstream="docker.io")
    assert time.time() - 60 < answered <= time.time()
    assert value(metrics, "mirror_upstream_last_error_timestamp_seconds", upstream="docker.io") == 0
    origin.stop()
    answer = http.get(f"{mirror.url}/v2/team/tool/manifests/1", headers={"accept": tiny.media_type})
    assert answer.headers["x-mirror-cache"] == "STALE"
    failed = value(scrape(f"{mirror.url}/metrics"), "mirror_upstream_last_error_timestamp_seconds",
                   upstream="docker.io", reason="unreachable")
    assert answered <= failed <= time.time()
    page = http.get(f"{mirror.url}/ui/cache")
    assert 'class="badge health-failing">failing<' in page.text
    assert "unreachable, " + time.strftime("%Y-%m-%d", time.gmtime()) in page.text
    assert shown("answers-stale") == "1"


def test_ui_enabled_false_turns_it_off(mirror_factory: Callable[..., MirrorServer], http: httpx.Client) -> None:
    mirror = mirror_factory(env={"MIRROR_UI_ENABLED": "false"})
    for path in ("/ui/", "/ui", "/ui/cache", "/ui/static/ui.css"):
        answer = http.get(f"{mirror.url}{path}")
        assert answer.status_code == 404, path
        assert answer.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert http.get(f"{mirror.url}/v2/").status_code == 200


@pytest.mark.slow
def test_last_pull_shows_once_the_access_times_are_written(mirror: MirrorServer, http: httpx.Client,
                                                           images: StandardImages, tiny: Image) -> None:
    """Of a cached repository and of a pushed one alike."""
    push_image(mirror.url, "team/mine", "1", tiny, client=http)
    before = time.time()
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    pull_checked(http, mirror.url, "team/mine", "1", tiny)
    today = time.strftime("%Y-%m-%d ", time.gmtime())
    deadline = time.monotonic() + 30  # written every 5 s, read again by the pages after 5 s or more
    while (page := http.get(f"{mirror.url}/ui/")).text.count(today) < 2:
        assert time.monotonic() < deadline, f"a last pull not shown: {page.text}"
        time.sleep(0.5)
    assert names(page) == ["library/small", "team/mine"]
    for name in ("library/small", "team/mine"):
        shown = http.get(f"{mirror.url}/ui/r/{name}").text
        stamp = re.findall(r"(\d{4}-\d\d-\d\d \d\d:\d\d) UTC", shown)
        assert len(stamp) == 1 and stamp[0] >= time.strftime("%Y-%m-%d %H:%M", time.gmtime(before)), name


def test_image_page_lists_referrers_and_an_artifact_links_its_subject(
        mirror: MirrorServer, http: httpx.Client, tiny: Image, tmp_path: Path) -> None:
    push_image(mirror.url, "team/signed", "1", tiny, client=http)
    payload = b'{"signature": "<b>not markup</b>"}'
    with session(http) as client:
        for data in (b"{}", payload):
            path = tmp_path / sha256_digest(data).replace(":", "-")
            path.write_bytes(data)
            push_blob(client, mirror.url, "team/signed", sha256_digest(data), path)
        body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.signature",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/vnd.example.payload", "digest": sha256_digest(payload),
                        "size": len(payload)}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": tiny.digest, "size": tiny.size},
            "annotations": {"signed.by": "<script>alert(3)</script>"}}).encode()
        signature = put_manifest(client, mirror.url, "team/signed", sha256_digest(body), OCI_MANIFEST, body)

    image = http.get(f"{mirror.url}/ui/r/team/signed@{tiny.digest}")
    assert image.status_code == 200
    referrers = image.text.split('id="referrers"', 1)[1]
    assert "application/vnd.example.signature" in referrers
    assert f'href="/ui/r/team/signed@{signature}"' in referrers
    artifact = http.get(f"{mirror.url}/ui/r/team/signed@{signature}")
    assert artifact.status_code == 200
    assert f'<a href="/ui/r/team/signed@{tiny.digest}">{tiny.digest}</a>' in artifact.text  # its subject
    assert "application/vnd.example.payload" in artifact.text
    annotations = artifact.text.split('id="annotations"', 1)[1]
    assert '<thead><tr><th scope="col">Key</th><th scope="col">Value</th></tr></thead>' in annotations
    assert 'aria-current' not in artifact.text  # neither the list nor the cache page
    # Its config is the empty descriptor of the OCI image spec's artifact guidelines: an artifact's, stored.
    assert "is an artifact's (<span class=\"mt\">application/vnd.oci.empty.v1+json</span>, 2 B)" in artifact.text
    assert "is not cached" not in artifact.text
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in artifact.text and "<script>alert" not in artifact.text


def test_json_nested_too_deep_to_parse_is_refused_in_a_manifest_and_shown_without_its_settings_in_a_config(
        mirror: MirrorServer, http: httpx.Client, tiny: Image, tmp_path: Path) -> None:
    """Python's JSON parser gives up on deep nesting with RecursionError, not ValueError: a manifest
    so nested answered 500, and an image whose config was so nested broke its UI pages for good."""
    nested = b"[" * 100_000 + b"]" * 100_000
    deep = b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","x":' + nested + b"}"
    refused = http.put(f"{mirror.url}/v2/team/deep/manifests/1", content=deep, headers={"content-type": OCI_MANIFEST})
    assert (refused.status_code, refused.json()["errors"][0]["code"]) == (400, "MANIFEST_INVALID"), refused.text
    config = b'{"architecture":"amd64","os":"linux","x":' + nested + b"}"
    with session(http) as client:
        path = tmp_path / "config"
        path.write_bytes(config)
        push_blob(client, mirror.url, "team/deepcfg", sha256_digest(config), path)
        for digest, blob in tiny.blobs.items():
            push_blob(client, mirror.url, "team/deepcfg", digest, blob)
        body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(config),
                       "size": len(config)},
            "layers": json.loads(tiny.manifest)["layers"]}).encode()
        digest = put_manifest(client, mirror.url, "team/deepcfg", "1", OCI_MANIFEST, body)
    for page in ("/ui/r/team/deepcfg", f"/ui/r/team/deepcfg@{digest}"):
        answer = http.get(mirror.url + page)
        assert answer.status_code == 200, (page, answer.text[:300])
    assert "Traceback" not in mirror.log_tail(400)


def test_disk_budget_bar_is_cache_max_size_against_the_usage_metrics_report(
        mirror_factory: Callable[..., MirrorServer], http: httpx.Client, images: StandardImages) -> None:
    mirror = mirror_factory(env={"MIRROR_CACHE_MAX_SIZE": "100MB"})
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    usage = int(value(scrape(f"{mirror.url}/metrics"), "mirror_store_size_bytes"))
    assert usage > 1_000_000
    page = http.get(f"{mirror.url}/ui/cache").text
    meter = re.search(r'<meter id="budget"[^>]*>', page)
    assert meter, page
    assert 'max="100000000"' in meter.group(0) and f'value="{usage}"' in meter.group(0)
    assert 'high="95000000"' in meter.group(0) and 'low="85000000"' in meter.group(0)
    assert f"{human(usage)} of {human(100_000_000)} (<code>cache.max_size</code>), 2 %" in page


def test_cache_page_shows_evictions_and_collector_runs_as_metrics_report_them(
        mirror_factory: Callable[..., MirrorServer], http: httpx.Client, images: StandardImages) -> None:
    mirror = mirror_factory(env={"MIRROR_CACHE_MAX_SIZE": "2MB", "MIRROR_CACHE_KEEP_RECENT": "0s",
                                 "MIRROR_GC_GRACE": "0s"})
    before = http.get(f"{mirror.url}/ui/cache").text
    assert '<dd id="evicted">0</dd>' in before and '<dd id="gc-runs">none yet</dd>' in before
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    pull_checked(http, mirror.url, "library/big", "1", images.big)  # over the budget: the first goes
    assert eventually(lambda: value(scrape(f"{mirror.url}/metrics"), "mirror_evicted_images_total") >= 1,
                      timeout=20), mirror.log_tail()
    metrics = scrape(f"{mirror.url}/metrics")
    page = http.get(f"{mirror.url}/ui/cache").text
    evicted, freed = value(metrics, "mirror_evicted_images_total"), value(metrics, "mirror_gc_freed_bytes_total")
    runs = value(metrics, "mirror_gc_runs_total", result="ok")
    assert f'<dd id="evicted">{int(evicted)}</dd>' in page
    assert f'<dd id="gc-runs">{int(runs)} ok</dd>' in page and runs >= 1
    assert f'<dd id="gc-freed">{html.escape(human(int(freed)))}</dd>' in page and freed > 0
    last = value(metrics, "mirror_gc_last_run_timestamp_seconds")
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) in page


def test_logging_in_when_anonymous_pulls_are_allowed(mirror_factory: Callable[..., MirrorServer],
                                                    http: httpx.Client, htpasswd: Path, tiny: Image) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=True))
    with httpx.Client(trust_env=False, timeout=60, headers=basic("alice", ALICE_PASSWORD)) as alice:
        push_image(mirror.url, "team/open", "1", tiny, client=alice)
    anonymous = http.get(f"{mirror.url}/ui/")
    assert names(anonymous) == ["team/open"]
    assert '<a href="/ui/login" class="who">Log in</a>' in anonymous.text
    challenge = http.get(f"{mirror.url}/ui/login")
    assert challenge.status_code == 401
    # Cancelled: the page says anyone may look, and links the list.
    assert "Only users may see" not in challenge.text and "Anyone may look without logging in" in challenge.text
    assert '<a href="/ui/">all repositories</a>' in challenge.text
    assert challenge.headers["www-authenticate"] == 'Basic realm="Test Registry", charset="UTF-8"'
    assert http.get(f"{mirror.url}/ui/login", headers=basic("alice", "wrong")).status_code == 401
    welcome = http.get(f"{mirror.url}/ui/login", headers=basic("alice", ALICE_PASSWORD))
    assert welcome.status_code == 303 and welcome.headers["location"] == "/ui/"
    signed_in = http.get(f"{mirror.url}/ui/", headers=basic("alice", ALICE_PASSWORD))
    assert "Signed in as <strong>alice</strong>" in signed_in.text and names(signed_in) == ["team/open"]
    assert '<a href="/ui/logout" id="logout">Log out</a>' in signed_in.text
    logged_out = http.get(f"{mirror.url}/ui/logout", headers=basic("alice", ALICE_PASSWORD))
    assert logged_out.status_code == 401 and "www-authenticate" in logged_out.headers  # the browser drops it
    assert "<h1>Logged out</h1>" in logged_out.text and "Signed in" not in logged_out.text
    assert http.get(f"{mirror.url}/ui/logout").status_code == 200  # once it is forgotten
    wrong = http.get(f"{mirror.url}/ui/", headers=basic("alice", "wrong"))  # seen as anonymous, as /v2/ would not
    assert names(wrong) == ["team/open"] and "Signed in" not in wrong.text


def test_repositories_of_several_upstreams_say_which_and_pull_through_their_prefix(
        tmp_path: Path, upstream: UpstreamRegistry, upstream_factory: Callable[[], UpstreamRegistry],
        mirror_factory: Callable[..., MirrorServer], http: httpx.Client, images: StandardImages) -> None:
    second = upstream_factory()
    second.push_image("org/app", "1", images.small)
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": [{"registry": "docker.io", "url": upstream.url},
                                                    {"registry": "ghcr.io", "url": second.url}]}))
    mirror = mirror_factory(config=config)
    pull_checked(http, mirror.url, "ghcr.io/org/app", "1", images.small)
    pull_checked(http, mirror.url, "library/small", "1", images.small)

    page = http.get(f"{mirror.url}/ui/")
    assert names(page) == ["ghcr.io/org/app", "library/small"]
    rows = dict(zip(names(page), re.findall(r"<tr>\s*<th scope=\"row\">.*?</tr>", page.text, re.S), strict=True))
    assert "cached</span> from ghcr.io" in rows["ghcr.io/org/app"]
    assert "cached</span> from docker.io" in rows["library/small"]
    repository = http.get(f"{mirror.url}/ui/r/ghcr.io/org/app")
    assert "cached</span> from ghcr.io" in repository.text
    assert f"docker pull 127.0.0.1:{mirror.port}/ghcr.io/org/app:1" in repository.text
    assert images.small.digest in repository.text
    cache = http.get(f"{mirror.url}/ui/cache").text
    assert f"ghcr.io <span class=\"meta\">{second.url}</span>" in cache
    assert f"docker.io <span class=\"meta\">{upstream.url}</span>" in cache


def test_cache_page_shows_a_fetch_in_progress_and_who_follows_it(
        fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
        images: StandardImages) -> None:
    mirror = mirror_factory(fault_proxy.url)
    layer = images.small.layers[1]  # 1 MiB: 32 KiB every 0.1 s after the first 256 KiB, ~2.5 s
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", after_bytes=256 * 1024,
                    chunk_size=32 * 1024, delay=0.1)
    assert http.get(f"{mirror.url}/v2/library/small/manifests/1", headers={"accept": OCI_MANIFEST}).is_success
    fetched: list[str] = []
    clients = [threading.Thread(target=lambda: fetched.append(
        fetch_blob_digest(mirror.url, "library/small", layer.digest)[0])) for _ in range(2)]
    for each in clients:
        each.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            page = http.get(f"{mirror.url}/ui/cache").text
            fills = page.split('id="fills"', 1)[1]
            if layer.digest[7:19] in fills and "1 request follows them" in fills:
                break
            assert time.monotonic() < deadline, fills
            time.sleep(0.05)
    finally:
        for each in clients:
            each.join(30)
    assert fetched == [layer.digest, layer.digest]
    # The fill is listed until it is stored, which may follow its clients' last byte (the sync).
    assert eventually(lambda: "Fetches in progress</h2>\n<p>None.</p>" in http.get(f"{mirror.url}/ui/cache").text,
                      timeout=10)


def test_cache_page_and_metrics_say_what_they_can_while_the_index_database_is_down(
        mirror_factory: Callable[..., MirrorServer], http: httpx.Client, images: StandardImages) -> None:
    """The page that shows the mirror's health is the one to read when its PostgreSQL stops: it
    answers, with the index named as the problem and the answers and upstreams as /metrics has
    them (which answers too, without the figures only the index holds); back once it is."""
    with PostgresServer() as own:
        mirror = mirror_factory(env={"MIRROR_METADATA_DRIVER": "postgres",
                                     "MIRROR_METADATA_POSTGRES_DSN": own.create_database()})
        for _ in range(2):
            pull_checked(http, mirror.url, "library/small", "1", images.small)
        before = scrape(f"{mirror.url}/metrics")
        hits = value(before, "mirror_cache_requests_total", outcome="hit")
        assert hits > 0 and value(before, "mirror_store_size_bytes") > 0

        own.halt()
        started = time.monotonic()
        page = http.get(f"{mirror.url}/ui/cache")
        assert page.status_code == 200, page.text
        assert time.monotonic() - started < 10
        alert = page.text.split('role="alert"', 1)[1].split("</div>", 1)[0]
        assert "index: metadata database unavailable" in alert
        assert re.search(r'id="answers-hit">(\d+)<', page.text).group(1) == str(int(hits))  # type: ignore[union-attr]
        assert 'class="badge health-ok">ok<' in page.text
        assert "<dt>Repositories</dt><dd>—</dd>" in page.text  # not known, rather than 0
        metrics = http.get(f"{mirror.url}/metrics")
        assert metrics.status_code == 200, metrics.text
        assert "mirror_cache_requests_total" in metrics.text and "mirror_store_size_bytes" not in metrics.text
        for path in ("/ui/", "/ui/r/library/small", f"/ui/r/library/small@{images.small.digest}"):
            down = http.get(f"{mirror.url}{path}")  # a page saying so, as the rest of the UI's answers are
            assert down.status_code == 503 and down.headers["content-type"].startswith("text/html"), path
            assert "<h1>Unavailable</h1>" in down.text and "index" in down.text and "retry" in down.text.lower()
            assert down.headers["retry-after"].isdigit()
            assert "default-src 'none'" in down.headers["content-security-policy"]

        own.resume()
        assert eventually(lambda: "<dt>Repositories</dt><dd>1</dd>" in http.get(f"{mirror.url}/ui/cache").text,
                          timeout=15, interval=0.25)
        assert "Traceback" not in mirror.log_tail(500)


def test_a_page_number_past_the_end_shows_the_last_page_however_many_digits_it_has(
        mirror: MirrorServer, http: httpx.Client, tiny: Image) -> None:
    push_image(mirror.url, "team/many", "t000", tiny, client=http)
    for n in range(1, 101):
        put_manifest(http, mirror.url, "team/many", f"t{n:03d}", tiny.media_type, tiny.manifest)

    def shown(path: str, page: str) -> str:
        answer = http.get(f"{mirror.url}{path}", params={"page": page})
        assert answer.status_code == 200, answer.text
        found = re.search(r"Page (\d+) of (\d+)", answer.text)
        assert found, answer.text
        return found.group(0)

    for page in ("3", "99999999", "100000000", "99999999999999999999999999", "9" * 200):
        assert shown("/ui/r/team/many", page) == "Page 2 of 2", page
    last = http.get(f"{mirror.url}/ui/r/team/many", params={"page": "2"}).text
    assert "<title>team/many, tags page 2 of 2 · mirror</title>" in last
    assert last.count('rel="prev"') == 2 and last.index('rel="prev"') < last.index('<table class="tags">')
    for page in ("0", "-1", "-99999999999", "x", "1e3", "", "٣"):
        assert shown("/ui/r/team/many", page) == "Page 1 of 2", page


def test_an_index_page_links_the_platforms_pulled_and_marks_the_others_not_cached(
        mirror: MirrorServer, http: httpx.Client, images: StandardImages) -> None:
    """As a client pulling its own platform leaves it: the index and one image; the other's link
    would lead to a page saying there is nothing of that name."""
    index, pulled = images.multi, images.multi.children[0]
    other = images.multi.children[1]
    for digest, media_type in ((index.digest, index.media_type), (pulled.digest, pulled.media_type)):
        answer = http.get(f"{mirror.url}/v2/library/multi/manifests/{digest}", headers={"accept": media_type})
        assert answer.status_code == 200, answer.text
    page = http.get(f"{mirror.url}/ui/r/library/multi@{index.digest}")
    assert page.status_code == 200
    platforms = page.text.split('id="platforms"', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    rows = dict(zip(re.findall(r"<tr>\s*<td>([^<]+)</td>", platforms), re.findall(r"<tr>.*?</tr>", platforms, re.S),
                    strict=True))
    assert f'href="/ui/r/library/multi@{pulled.digest}"' in rows["linux/amd64"]
    assert "not cached" not in rows["linux/amd64"]
    assert "href" not in rows["linux/arm64/v8"] and "not cached" in rows["linux/arm64/v8"]
    assert other.digest in rows["linux/arm64/v8"]  # still there to copy
    assert http.get(f"{mirror.url}/ui/r/library/multi@{pulled.digest}").status_code == 200


def test_an_index_rows_platforms_and_size_leave_out_attestations_and_a_nested_index(
        mirror: MirrorServer, http: httpx.Client, tiny: Image, tmp_path: Path) -> None:
    """A build attestation (platform ``unknown/unknown``) is no platform to run and no client pulls it;
    an index inside an index names no platform of its own."""
    attestation = build_image(tmp_path, [random_layer(tmp_path, 3000, seed=41)], arch="unknown", os="unknown")
    inner = build_index([tiny])
    push_image(mirror.url, "team/built", None, attestation, client=http)
    push_index(mirror.url, "team/built", None, inner, client=http)
    push_image(mirror.url, "team/built", None, tiny, client=http)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**tiny.descriptor(), "platform": tiny.platform},
        {**attestation.descriptor(), "platform": attestation.platform}, inner.descriptor()]}).encode()
    with session(http) as client:
        put_manifest(client, mirror.url, "team/built", "1", OCI_INDEX, body)
    page = http.get(f"{mirror.url}/ui/r/team/built")
    row = re.search(r'<th scope="row" class="tag">1</th>.*?</tr>', page.text, re.S)
    assert page.status_code == 200 and row, page.text
    cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(0),
                                                                                   re.S)]
    assert cells[2] == "linux/amd64", cells  # not "linux/amd64, unknown"
    assert cells[3] == human(len(tiny.config) + sum(layer.size for layer in tiny.layers)), cells


def test_a_schema1_image_shows_its_platform_settings_history_and_the_sizes_of_the_layers_cached(
        upstream: UpstreamRegistry, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
        http: httpx.Client, tmp_path: Path) -> None:
    """Schema 1 names no sizes and no config blob: the layers' sizes are the store's (unknown, not 0,
    until cached) and its settings and history are in its ``v1Compatibility`` entries."""
    layers = [random_layer(tmp_path, 3000, 931), random_layer(tmp_path, 5000, 932)]
    upstream.push_image("library/old-signed", "v2", build_image(tmp_path, layers))
    old = signed_schema1("library/old-signed", "1", layers)
    fault_proxy.add("status", f"/library/old-signed/manifests/(1|{old.digest})$", status=200, body=old.body,
                    headers={"content-type": SCHEMA1_SIGNED, "docker-content-digest": old.digest})
    mirror = mirror_factory(fault_proxy.url, env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"})
    assert http.get(f"{mirror.url}/v2/old-signed/manifests/1", headers={"accept": SCHEMA1_SIGNED}).status_code == 200

    def row() -> str:
        page = http.get(f"{mirror.url}/ui/r/old-signed")
        assert page.status_code == 200
        return re.sub(r"\s+", " ", page.text.split("<tbody>", 1)[1].split("</tbody>", 1)[0])

    image = http.get(f"{mirror.url}/ui/r/old-signed@{old.digest}").text
    assert "Image size" not in image and '<td class="num">0 B</td>' not in row()  # not known yet, not 0
    assert "<td>linux/amd64</td>" in row()
    for layer in layers:
        assert http.get(f"{mirror.url}/v2/old-signed/blobs/{layer.digest}").status_code == 200
    total = human(sum(layer.size for layer in layers))
    # A fetched blob is moved into the store right after its last byte reached the client.
    assert eventually(lambda: f'<td class="num">{total}</td>' in row()), row()
    image = http.get(f"{mirror.url}/ui/r/old-signed@{old.digest}").text
    assert f"<dt>Image size</dt><dd>{total}" in image
    shown = re.findall(r'<tr><td class="num">\d</td><td><span title="([^"]+)">.*?<td class="num">([^<]*)</td></tr>',
                       image.split('id="layers"', 1)[1])
    assert shown == [(layer.digest, human(layer.size)) for layer in layers]
    assert "<dt>Platform</dt><dd>linux/amd64</dd>" in image and "<code>[&#34;sh&#34;]</code>" in image
    history = image.split('id="history"', 1)[1]
    assert history.index("ADD layer 0") < history.index("ADD layer 1")
