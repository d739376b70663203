"""Upstream faults, injected by a real HTTP server between the mirror and its upstream.

Every test runs a fresh mirror against the :class:`FaultProxy` (or the Hub
emulator) in front of the session's docker-registry, injects one kind of fault,
and checks three things: what the client got, what reached the store, and how
often the upstream was asked (the proxy's own log, and where it matters the
registry's access log too).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror.registry.failures import UPSTREAM_RETRY_AFTER
from mirror.storage.batches import write_in_batches
from tests.support.catalog import StandardImages
from tests.support.faults import FaultProxy
from tests.support.hub import HubEmulator
from tests.support.images import MANIFEST_MEDIA_TYPES, Image, build_image, random_layer, sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import stored_objects
from tests.support.waiting import wait_for

ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}
RETRIES = 2
#: Library namespace on for loopback upstreams; short timeouts so failures are quick.
ENV = {
    "MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true",
    "MIRROR_UPSTREAM_RETRIES": str(RETRIES),
    "MIRROR_UPSTREAM_CONNECT_TIMEOUT": "2s",
    "MIRROR_UPSTREAM_READ_TIMEOUT": "10s",
}
TTL = 0.5
SHORT_TTL = {**ENV, "MIRROR_CACHE_TAG_TTL": f"{int(TTL * 1000)}ms"}
#: An uncached request against a dead upstream must fail within this (retries and backoff included).
FAIL_FAST = 3.0
#: How long a byte the mirror received may take to reach its readers here: the mirror's bound
#: (``mirror.storage.fill.FLUSH_SECONDS``) plus room for a busy test machine.
PAUSE = 0.5


# Helpers --------------------------------------------------------------------------------------


@dataclass
class Transfer:
    """One streamed GET as the client saw it."""

    status: int
    headers: httpx.Headers
    received: int
    digest: str
    error: Exception | None
    first_byte: float | None  # seconds from the request to the first body bytes
    elapsed: float


def get_blob(mirror: MirrorServer, name: str, digest: str, *, stop_after_first: bool = False) -> Transfer:
    """Stream a blob from the mirror, recording transport errors instead of raising them."""
    hasher = hashlib.sha256()
    received, first, error = 0, None, None
    started = time.monotonic()
    with httpx.Client(timeout=30.0, trust_env=False) as http:
        with http.stream("GET", f"{mirror.url}/v2/{name}/blobs/{digest}") as answer:
            try:
                for data in answer.iter_raw():
                    if first is None:
                        first = time.monotonic() - started
                    hasher.update(data)
                    received += len(data)
                    if stop_after_first:
                        break
            except httpx.TransportError as exc:
                error = exc
    return Transfer(answer.status_code, answer.headers, received, "sha256:" + hasher.hexdigest(), error,
                    first, time.monotonic() - started)


def get_manifest(mirror: MirrorServer, name: str, reference: str, method: str = "GET") -> httpx.Response:
    return httpx.request(method, f"{mirror.url}/v2/{name}/manifests/{reference}", headers=ACCEPT,
                         timeout=30.0, trust_env=False)


def api_error(answer: httpx.Response) -> str:
    """The spec error code of a JSON error answer (and check that it is one)."""
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    errors = answer.json()["errors"]
    assert len(errors) == 1 and errors[0]["message"], errors
    return str(errors[0]["code"])


def blob_path(mirror: MirrorServer, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return mirror.data_dir / "blobs" / "sha256" / hex_[:2] / hex_


def stored(mirror: MirrorServer) -> list[Path]:
    """Every file under DATA/blobs."""
    return list(stored_objects(mirror.data_dir).values())


def temp_files(mirror: MirrorServer) -> list[str]:
    return sorted(os.listdir(mirror.data_dir / "tmp"))


def upstream_errors(mirror: MirrorServer) -> dict[str, float]:
    """``mirror_upstream_errors_total`` by reason, those above 0."""
    answer = httpx.get(f"{mirror.url}/metrics", timeout=30.0, trust_env=False)
    return {s.labels["reason"]: s.value for family in text_string_to_metric_families(answer.text)
            for s in family.samples if s.name == "mirror_upstream_errors_total" and s.value}


def past_ttl(since: float) -> None:
    """Sleep until the tag TTL counted from *since* (monotonic) has passed."""
    remaining = since + TTL + 0.1 - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


@pytest.fixture
def proxied(fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
            upstream: UpstreamRegistry) -> Callable[..., MirrorServer]:
    """Make a mirror whose upstream is the fault proxy; counters start at zero."""

    def make(env: Mapping[str, str] = ENV) -> MirrorServer:
        mirror = mirror_factory(fault_proxy.url, env=env)
        fault_proxy.clear_counts()
        upstream.clear_counts()
        return mirror

    return make


# Wrong or cut-off bytes -------------------------------------------------------------------------


def test_a_corrupt_blob_body_aborts_the_client_and_is_never_stored(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry,
    images: StandardImages,
) -> None:
    layer = images.big.layers[1]  # 8 MiB: streamed to the client while it is written
    mirror = proxied()
    # Same length, three flipped bytes near the end.
    fault_proxy.add("corrupt", f"/blobs/{layer.digest}$", method="GET", times=1,
                    after_bytes=layer.size - 1000, flip_bytes=3)

    bad = get_blob(mirror, "big", layer.digest)
    # Headers (and the announced length) went out before the fault: the only honest signal is a
    # transfer cut short, which the client detects against Content-Length.
    assert bad.status == 200 and bad.headers["x-mirror-cache"] == "MISS"
    assert int(bad.headers["content-length"]) == layer.size
    assert isinstance(bad.error, httpx.RemoteProtocolError), bad
    assert bad.received < layer.size
    assert stored(mirror) == []
    wait_for(lambda: temp_files(mirror) == [], what="the failed fill's temp files to go")
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 1
    log = mirror.log_tail(400)  # a warning of ours, not an error of the server's
    assert "aborting transfer" in log and "without completing response" not in log, log
    # A body that is not the blob is the upstream's invalid answer.
    assert upstream_errors(mirror) == {"invalid": 1.0}, upstream_errors(mirror)

    good = get_blob(mirror, "big", layer.digest)
    assert (good.status, good.error, good.headers["x-mirror-cache"]) == (200, None, "MISS")
    assert (good.digest, good.received) == (layer.digest, layer.size)
    wait_for(lambda: blob_path(mirror, layer.digest).exists(), what="the blob to be stored")
    assert stored(mirror) == [blob_path(mirror, layer.digest)]
    assert sha256(blob_path(mirror, layer.digest).read_bytes()) == layer.digest
    assert temp_files(mirror) == []

    hit = get_blob(mirror, "big", layer.digest)
    assert (hit.status, hit.error, hit.headers["x-mirror-cache"]) == (200, None, "HIT")
    assert (hit.digest, hit.received) == (layer.digest, layer.size)
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 2
    assert upstream.count("GET", f"/blobs/{layer.digest}") == 2


def upstream_blob_bytes(mirror: MirrorServer) -> float:
    """``mirror_upstream_received_bytes_total`` of blobs: the bytes of blob bodies the mirror received."""
    answer = httpx.get(f"{mirror.url}/metrics", timeout=30.0, trust_env=False)
    return sum(s.value for family in text_string_to_metric_families(answer.text) for s in family.samples
               if s.name == "mirror_upstream_received_bytes_total" and s.labels.get("kind") == "blob")


@pytest.mark.parametrize("size", [8 << 20, 20 << 20], ids=["read-on-the-loop", "drained-by-a-thread"])
def test_a_blob_body_that_breaks_off_is_resumed_where_it_broke_for_every_client_of_the_fill(
    size: int, proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry,
    tmp_path: Path,
) -> None:
    """The upstream's first two answers are reset after 3 MiB or so (a flaky CDN): the fill asks for the
    rest with ``Range`` each time, so the three clients following it get the whole blob, and no byte
    is fetched twice.  Before, the first reset cut every client off (skopeo and podman then failed)."""
    image = build_image(tmp_path, [random_layer(tmp_path, size, seed=17)])
    layer = image.layers[0]
    upstream.push_image("library/flaky", "1", image)
    mirror = proxied()
    # (3 MiB and a bit: the bytes received since the last batch written are written before the rest is asked.)
    fault_proxy.add("reset", f"/blobs/{layer.digest}$", method="GET", times=2, after_bytes=(3 << 20) + 123_456)

    with ThreadPoolExecutor(3) as pool:
        transfers = list(pool.map(lambda _: get_blob(mirror, "flaky", layer.digest), range(3)))
    for transfer in transfers:
        assert (transfer.status, transfer.error) == (200, None), transfer
        assert (transfer.digest, transfer.received) == (layer.digest, layer.size)
    wait_for(lambda: blob_path(mirror, layer.digest).exists(), what="the blob to be stored")
    assert sha256(blob_path(mirror, layer.digest).read_bytes()) == layer.digest
    assert temp_files(mirror) == []
    # One whole answer, then one ranged answer per break; each break counted once.
    breaks = 2
    gets = [r for r in fault_proxy.requests() if r.method == "GET" and r.path.endswith(f"/blobs/{layer.digest}")]
    assert [r.status for r in gets] == [200] + [206] * breaks, gets
    assert upstream_errors(mirror) == {"interrupted": float(breaks)}, upstream_errors(mirror)
    assert upstream_blob_bytes(mirror) == layer.size
    log = mirror.log_tail(400)
    assert log.count(f"the upstream body of {layer.digest} broke off") == breaks, log


def test_the_bytes_received_before_a_body_breaks_off_are_written_before_the_rest_is_asked_for() -> None:
    """``write_in_batches`` gathers up to 1 MiB (or 20 ms) per write: when the body breaks off, what it
    gathered is written before the error goes on, so the resume asks from the byte received, not from
    the last batch written (which fetched up to 1 MiB again)."""

    class Ingest:
        digest, written = "sha256:" + "0" * 64, 0

        def write(self, data: bytes) -> None:
            self.written += len(data)

    async def broken() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 40_000
        raise httpx.ReadError("reset")

    ingest = Ingest()
    with pytest.raises(httpx.ReadError):
        asyncio.run(write_in_batches(broken(), ingest, lambda: None))  # type: ignore[arg-type]
    assert ingest.written == 120_000


def test_a_blob_body_that_breaks_off_again_with_nothing_received_is_given_up_after_the_retries(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages,
) -> None:
    """The rest is asked for ``upstream.retries`` times in a row with no byte received in between;
    then the fill fails as before: its clients are cut off and nothing is stored."""
    layer = images.big.layers[1]
    mirror = proxied()
    fault_proxy.add("reset", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=3 << 20)
    fault_proxy.add("reset", f"/blobs/{layer.digest}$", method="GET", after_bytes=0)

    bad = get_blob(mirror, "big", layer.digest)
    assert bad.status == 200 and isinstance(bad.error, httpx.RemoteProtocolError), bad
    assert bad.received <= 3 << 20
    wait_for(lambda: temp_files(mirror) == [], what="the failed fill's temp files to go")
    assert stored(mirror) == []
    gets = [r for r in fault_proxy.requests() if r.method == "GET" and r.path.endswith(f"/blobs/{layer.digest}")]
    assert [r.status for r in gets] == [200] + [206] * RETRIES, gets
    assert upstream_errors(mirror) == {"interrupted": RETRIES + 1.0}, upstream_errors(mirror)


def test_a_range_of_a_blob_still_arriving_is_answered_only_once_verified(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages,
) -> None:
    layer = images.big.layers[1]
    mirror = proxied()
    fault_proxy.add("corrupt", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=10, flip_bytes=3)
    url = f"{mirror.url}/v2/big/blobs/{layer.digest}"
    expected = layer.path.read_bytes()[:100_000]

    def get_range() -> tuple[int, bytes, Exception | None]:
        received, error = b"", None
        with httpx.stream("GET", url, headers={"range": "bytes=0-99999"}, timeout=30.0, trust_env=False) as answer:
            try:
                for data in answer.iter_raw():
                    received += data
            except httpx.TransportError as exc:
                error = exc
        return answer.status_code, received, error

    # The first 100 kB are wrong, but only the whole blob's digest can tell: the transfer is cut short.
    status, received, error = get_range()
    assert status == 206 and isinstance(error, httpx.RemoteProtocolError), (status, error)
    assert len(received) < len(expected)
    # Next time the upstream sends the right bytes: the range is answered, and the blob stored.
    status, received, error = get_range()
    assert (status, error, received == expected) == (206, None, True)
    wait_for(lambda: blob_path(mirror, layer.digest).exists(), what="the blob to be stored")
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 2


@pytest.mark.parametrize(("kind", "by"), [("corrupt", "tag"), ("corrupt", "digest"), ("reset", "tag")])
def test_bad_manifest_body_is_rejected_and_never_stored(
    kind: str, by: str, proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy,
    upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    reference = "1" if by == "tag" else images.small.digest
    mirror = proxied()
    fault_proxy.add(kind, f"/manifests/{reference}$", method="GET", times=1, after_bytes=100)

    bad = get_manifest(mirror, "small", reference)
    if kind == "corrupt":  # the body does not hash to the digest asked for or announced
        assert (bad.status_code, api_error(bad)) == (502, "UNAVAILABLE")
    else:  # cut off mid-body: the upstream is unavailable, not wrong
        assert (bad.status_code, api_error(bad)) == (503, "UNAVAILABLE")
    assert "x-mirror-cache" not in bad.headers
    assert stored(mirror) == [] and temp_files(mirror) == []

    good = get_manifest(mirror, "small", reference)
    assert (good.status_code, good.headers["x-mirror-cache"]) == (200, "MISS")
    assert good.content == images.small.manifest
    assert good.headers["docker-content-digest"] == images.small.digest
    assert stored(mirror) == [blob_path(mirror, images.small.digest)]
    hit = get_manifest(mirror, "small", reference)
    assert (hit.status_code, hit.headers["x-mirror-cache"], hit.content) == (200, "HIT", images.small.manifest)
    assert fault_proxy.count("GET", f"/manifests/{reference}") == 2
    assert upstream.count("GET", f"/manifests/{reference}") == 2
    assert temp_files(mirror) == []


# Error statuses -----------------------------------------------------------------------------------


def test_a_hung_upstream_holds_a_cached_tag_for_one_attempt_then_not_at_all(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages
) -> None:
    """An upstream that takes connections and never answers: a revalidation of a cached tag (or tag
    list) waits one attempt's time (connect + read timeouts) rather than every attempt's, and while
    that upstream is quiet afterwards (three times as long) cached copies answer without asking."""
    env = {**SHORT_TTL, "MIRROR_UPSTREAM_CONNECT_TIMEOUT": "0.5s", "MIRROR_UPSTREAM_READ_TIMEOUT": "1s"}
    mirror = proxied(env)  # one attempt: 1.5 s; three attempts with their backoff: 3.4 s
    assert get_manifest(mirror, "small", "1").headers["x-mirror-cache"] == "MISS"
    assert httpx.get(f"{mirror.url}/v2/small/tags/list", timeout=30, trust_env=False).status_code == 200
    past_ttl(time.monotonic())
    fault_proxy.clear_counts()
    with fault_proxy.fault("late", "/(manifests|tags)/", delay=60.0):
        started = time.monotonic()
        first = get_manifest(mirror, "small", "1")
        waited = time.monotonic() - started
        assert (first.status_code, first.headers["x-mirror-cache"]) == (200, "STALE") and 1.4 < waited < 2.8, waited
        asked = fault_proxy.count(None, "/manifests/1")
        for _ in range(3):
            started = time.monotonic()
            again = get_manifest(mirror, "small", "1")
            assert again.headers["x-mirror-cache"] == "STALE" and time.monotonic() - started < 0.5
            listed = httpx.get(f"{mirror.url}/v2/small/tags/list", timeout=30, trust_env=False)
            assert (listed.headers["x-mirror-cache"], listed.json()["tags"]) == ("STALE", ["1"])
        assert fault_proxy.count(None, "/manifests/1") == asked and fault_proxy.count(None, "/tags/") == 0
    # Quiet for three times the wait from the time-out, then asked again; a tag list that takes its
    # time (a long list of many pages may) does not quiet the upstream.
    time.sleep(max(0.0, started + 4.6 - time.monotonic()))
    with fault_proxy.fault("late", "/tags/", delay=60.0):
        slow = httpx.get(f"{mirror.url}/v2/small/tags/list", timeout=30, trust_env=False)
        assert slow.headers["x-mirror-cache"] == "STALE"
        revalidated = get_manifest(mirror, "small", "1")
        assert revalidated.headers["x-mirror-cache"] == "HIT", revalidated.headers
    with fault_proxy.fault("late", "/manifests/", delay=60.0):  # nothing cached: the error says why
        uncached = get_manifest(mirror, "big", "1")
        assert uncached.status_code == 503 and "ReadTimeout: no answer in time" in uncached.text, uncached.text


def test_a_tag_the_upstream_deleted_leaves_the_tag_list_and_is_not_served_stale(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry, tmp_path: Path,
) -> None:
    image = build_image(tmp_path / "gone", [random_layer(tmp_path / "gone", 2048, seed=91)])
    upstream.push_image("library/gone", "2", image)
    upstream.push_image("library/gone", "1", image)
    mirror = proxied(SHORT_TTL)
    assert get_manifest(mirror, "gone", "2").status_code == 200
    assert upstream.delete_manifest("library/gone", image.digest) == 202  # both tags go upstream
    upstream.push_image("library/gone", "1", image)  # and one comes back
    past_ttl(time.monotonic())
    deleted = get_manifest(mirror, "gone", "2")
    assert (deleted.status_code, api_error(deleted)) == (404, "MANIFEST_UNKNOWN"), deleted.text
    listed = httpx.get(f"{mirror.url}/v2/gone/tags/list", timeout=30, trust_env=False).json()["tags"]
    assert listed == ["1"]
    with fault_proxy.fault("status", "/", status=503):
        gone = get_manifest(mirror, "gone", "2")
        assert gone.status_code == 503 and api_error(gone) == "UNAVAILABLE", gone.text


def test_an_error_about_the_upstream_names_its_path_never_its_address(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy,
) -> None:
    mirror = proxied()
    address = fault_proxy.url.split("://", 1)[1]
    with fault_proxy.fault("refuse", "/"):
        for path in ("/v2/never/tags/list", "/v2/never/manifests/1"):
            failed = httpx.get(f"{mirror.url}{path}", headers=ACCEPT, timeout=30, trust_env=False)
            assert failed.status_code == 503 and api_error(failed) == "UNAVAILABLE", failed.text
            assert "/v2/library/never/" in failed.text and address not in failed.text, failed.text


def test_cached_tag_is_served_stale_while_revalidation_gets_429_or_503(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages
) -> None:
    mirror = proxied(SHORT_TTL)
    first = get_manifest(mirror, "small", "1")
    fetched = time.monotonic()
    assert (first.status_code, first.headers["x-mirror-cache"]) == (200, "MISS")
    past_ttl(fetched)
    fault_proxy.clear_counts()

    with fault_proxy.fault("status", "/manifests/", status=429, headers={"Retry-After": "2"}):
        limited, answered = time.monotonic(), 0.0
        for method in ("GET", "HEAD"):
            stale = get_manifest(mirror, "small", "1", method)
            answered = answered or time.monotonic()  # after the 429 came: its Retry-After window began before
            assert (stale.status_code, stale.headers["x-mirror-cache"]) == (200, "STALE")
            assert stale.headers["docker-content-digest"] == images.small.digest
        assert stale.headers["content-length"] == str(len(images.small.manifest))
        assert stale.content == b""  # HEAD
        assert get_manifest(mirror, "small", "1").content == images.small.manifest
        assert time.monotonic() - limited < 2
    # Revalidation is a HEAD (free under Hub's pull limit); a 429 is not retried, and for its
    # Retry-After the cached copies answer without asking again.
    assert fault_proxy.count("HEAD", "/manifests/1", status=429) == 1
    assert fault_proxy.count("GET", "/manifests/") == 0
    time.sleep(max(0.0, 2.1 - (time.monotonic() - answered)))  # its Retry-After over, on a loaded machine too

    fault_proxy.clear_counts()
    with fault_proxy.fault("status", "/manifests/", status=503):
        stale = get_manifest(mirror, "small", "1")
        assert (stale.status_code, stale.headers["x-mirror-cache"]) == (200, "STALE")
        assert stale.content == images.small.manifest
    assert fault_proxy.count("HEAD", "/manifests/1", status=503) == RETRIES + 1
    assert fault_proxy.count("GET", "/manifests/") == 0

    fault_proxy.clear_counts()
    revalidated = get_manifest(mirror, "small", "1")
    assert (revalidated.headers["x-mirror-cache"], revalidated.content) == ("HIT", images.small.manifest)
    assert fault_proxy.count("HEAD", "/manifests/1", status=200) == 1
    with fault_proxy.fault("status", "/manifests/", status=429):  # fresh again: the upstream is not asked
        assert get_manifest(mirror, "small", "1").headers["x-mirror-cache"] == "HIT"
    assert fault_proxy.count(None, "/manifests/") == 1
    assert fault_proxy.count("GET", "/manifests/") == 0


@pytest.mark.parametrize(("status", "code", "attempts"),
                         [(429, "TOOMANYREQUESTS", 1), (503, "UNAVAILABLE", RETRIES + 1)])
def test_uncached_answers_429_or_503_as_the_upstream_did(
    status: int, code: str, attempts: int, proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy,
    images: StandardImages,
) -> None:
    mirror = proxied()
    layer = images.small.layers[1]
    fault_proxy.add("status", "/v2/library/small/", status=status, headers={"Retry-After": "30"})

    manifest = get_manifest(mirror, "small", "1")
    blob = httpx.get(f"{mirror.url}/v2/small/blobs/{layer.digest}", trust_env=False, timeout=30.0)
    for answer in (manifest, blob):
        assert (answer.status_code, api_error(answer)) == (status, code)
        assert "x-mirror-cache" not in answer.headers
        assert answer.headers["retry-after"] == "30"  # the upstream's own wait, passed on
    assert fault_proxy.count("GET", "/manifests/1", status=status) == attempts
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}", status=status) == attempts
    assert stored(mirror) == [] and temp_files(mirror) == []


def test_a_moved_tag_whose_new_manifest_trickles_in_is_answered_stale_within_the_revalidation_bound(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry, tmp_path: Path,
) -> None:
    """Each read within read_timeout, the whole never done: before, the client waited for all of it
    (280 s for a 563-byte manifest), though the cached copy could answer."""
    name = f"faults/trickle-{uuid.uuid4().hex[:8]}"
    old, new = (build_image(tmp_path, [random_layer(tmp_path, 4096, seed=seed)]) for seed in (3, 4))
    upstream.push_image(name, "1", old)
    mirror = proxied({**SHORT_TTL, "MIRROR_UPSTREAM_CONNECT_TIMEOUT": "1s", "MIRROR_UPSTREAM_READ_TIMEOUT": "2s"})
    assert get_manifest(mirror, name, "1").content == old.manifest
    fetched = time.monotonic()
    upstream.push_image(name, "1", new)
    fault_proxy.add("slow", f"/v2/{name}/manifests/", method="GET", chunk_size=1, delay=0.5)
    past_ttl(fetched)
    started = time.monotonic()
    answer = get_manifest(mirror, name, "1")
    assert (answer.status_code, answer.headers["x-mirror-cache"], answer.content) == (200, "STALE", old.manifest)
    assert time.monotonic() - started < 6, time.monotonic() - started  # revalidation bound: 1 s + 2 s


@pytest.mark.parametrize(("retry_after", "quiet"), [("3", 3.0), (None, 10.0)])
def test_a_rate_limited_upstream_is_not_asked_again_for_its_retry_after(
    retry_after: str | None, quiet: float, proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy,
    upstream: UpstreamRegistry, tmp_path: Path,
) -> None:
    """A moved tag whose new manifest's GET gets 429: the cached copy answers, and for the 429's
    Retry-After (none: 10 s) the upstream is not asked again (before: a HEAD and a GET per request)."""
    name = f"faults/limited-{uuid.uuid4().hex[:8]}"
    old, new = (build_image(tmp_path, [random_layer(tmp_path, 4096, seed=seed)]) for seed in (5, 6))
    upstream.push_image(name, "1", old)
    mirror = proxied(SHORT_TTL)
    assert get_manifest(mirror, name, "1").content == old.manifest
    fetched = time.monotonic()
    upstream.push_image(name, "1", new)
    headers = {"Retry-After": retry_after} if retry_after else {}
    fault_proxy.add("status", f"/v2/{name}/manifests/", method="GET", status=429, headers=headers)
    past_ttl(fetched)
    fault_proxy.clear_counts()
    limited = time.monotonic()
    for _ in range(10):
        answer = get_manifest(mirror, name, "1")
        assert (answer.headers["x-mirror-cache"], answer.content) == ("STALE", old.manifest)
    assert time.monotonic() - limited < quiet
    assert (fault_proxy.count("HEAD", "/manifests/"), fault_proxy.count("GET", "/manifests/")) == (1, 1)
    time.sleep(quiet - (time.monotonic() - limited) + 0.2)
    fault_proxy.clear_rules()  # the limit is over: the next request asks, and gets the new manifest
    answer = get_manifest(mirror, name, "1")
    assert (answer.headers["x-mirror-cache"], answer.content) == ("MISS", new.manifest)


# Upstream down ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["refuse", "stopped"])
def test_upstream_down_serves_cache_and_fails_fast_otherwise(
    how: str, proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages
) -> None:
    mirror = proxied(SHORT_TTL)
    layer = images.small.layers[1]
    assert get_manifest(mirror, "small", "1").status_code == 200
    fetched = time.monotonic()
    assert get_blob(mirror, "small", layer.digest).digest == layer.digest
    past_ttl(fetched)
    if how == "refuse":  # every connection closed without an answer
        fault_proxy.add("refuse", "")
    else:  # nothing listens any more: connection refused
        fault_proxy.stop()
    fault_proxy.clear_counts()

    tag = get_manifest(mirror, "small", "1")
    assert (tag.status_code, tag.headers["x-mirror-cache"], tag.content) == (200, "STALE", images.small.manifest)
    by_digest = get_manifest(mirror, "small", images.small.digest)
    assert (by_digest.status_code, by_digest.headers["x-mirror-cache"]) == (200, "HIT")
    assert by_digest.content == images.small.manifest
    blob = get_blob(mirror, "small", layer.digest)
    assert (blob.status, blob.headers["x-mirror-cache"], blob.digest, blob.error) == (200, "HIT", layer.digest, None)

    uncached = [
        ("GET", "/v2/multi/manifests/1"),
        ("GET", f"/v2/small/manifests/{images.multi.digest}"),
        ("GET", f"/v2/big/blobs/{images.big.layers[0].digest}"),
        # Linked by the cached manifest but never fetched (a HEAD in a never-pulled repository
        # is answered BLOB_UNKNOWN locally, so this one must be in "small").
        ("HEAD", f"/v2/small/blobs/{images.small.layers[0].digest}"),
    ]
    for method, path in uncached:
        started = time.monotonic()
        answer = httpx.request(method, mirror.url + path, headers=ACCEPT, trust_env=False, timeout=30.0)
        assert time.monotonic() - started < FAIL_FAST, (method, path)
        assert answer.status_code == 503, (method, path)
        assert answer.headers["retry-after"] == str(UPSTREAM_RETRY_AFTER), (method, path)
        if method == "GET":
            assert api_error(answer) == "UNAVAILABLE"
    if how == "refuse":  # the tag revalidation and each uncached request: one try and RETRIES retries
        assert fault_proxy.count(None, "") == (1 + len(uncached)) * (RETRIES + 1)
        assert {r.fault for r in fault_proxy.requests()} == {"refuse"}
    assert stored(mirror) == sorted([blob_path(mirror, images.small.digest), blob_path(mirror, layer.digest)])
    assert temp_files(mirror) == []
    # The tag list: only the tags cached here, and it says so.
    tags = httpx.get(f"{mirror.url}/v2/small/tags/list", trust_env=False, timeout=30.0)
    assert (tags.status_code, tags.headers.get("x-mirror-cache"), tags.json()["tags"]) == (200, "STALE", ["1"])


# Slow upstream, and a client that goes away -------------------------------------------------------


def test_slow_blob_streams_first_bytes_early_and_is_stored(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry,
    images: StandardImages,
) -> None:
    layer = images.big.layers[1]  # 8 MiB, each upstream read (<= 64 KiB) held back 20 ms
    mirror = proxied()
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", chunk_size=64 * 1024, delay=0.02)

    slow = get_blob(mirror, "big", layer.digest)
    assert (slow.status, slow.error, slow.headers["x-mirror-cache"]) == (200, None, "MISS")
    assert (slow.digest, slow.received) == (layer.digest, layer.size)
    assert slow.first_byte is not None
    assert slow.elapsed > 2.0  # at least 128 pieces, 20 ms apart
    assert slow.first_byte < 1.0 and slow.first_byte < slow.elapsed / 5, slow
    wait_for(lambda: blob_path(mirror, layer.digest).exists(), what="the blob to be stored")
    assert sha256(blob_path(mirror, layer.digest).read_bytes()) == layer.digest

    fast = get_blob(mirror, "big", layer.digest)
    assert (fast.headers["x-mirror-cache"], fast.digest) == ("HIT", layer.digest)
    assert fast.elapsed < 1.0
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 1
    assert upstream.count("GET", f"/blobs/{layer.digest}") == 1
    assert temp_files(mirror) == []


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_clients_asking_for_a_manifest_being_fetched_share_the_fetch(
    by: str, proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages,
) -> None:
    image = images.small
    reference = "1" if by == "tag" else image.digest
    mirror = proxied()
    # A few hundred bytes, 40 at a time, 0.1 s apart: a second or more in flight.
    fault_proxy.add("slow", f"/manifests/{reference}$", method="GET", chunk_size=40, delay=0.1)
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: get_manifest(mirror, "small", reference), range(5)))
    assert all(a.status_code == 200 and a.content == image.manifest for a in answers)
    outcomes = sorted(a.headers["x-mirror-cache"] for a in answers)
    assert outcomes == ["COALESCED"] * 4 + ["MISS"], outcomes
    assert fault_proxy.count("GET", f"/manifests/{reference}") == 1
    metrics = httpx.get(f"{mirror.url}/metrics", trust_env=False).text
    assert 'mirror_cache_requests_total{kind="manifest",outcome="coalesced"} 4.0' in metrics


def test_client_disconnect_mid_transfer_does_not_stop_the_fill(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry,
    images: StandardImages,
) -> None:
    layer = images.big.layers[1]  # 8 MiB trickling in for a few seconds
    mirror = proxied()
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", chunk_size=64 * 1024, delay=0.02)

    gone = get_blob(mirror, "big", layer.digest, stop_after_first=True)
    assert (gone.status, gone.headers["x-mirror-cache"]) == (200, "MISS")
    assert 0 < gone.received < layer.size and gone.elapsed < 1.0
    assert not blob_path(mirror, layer.digest).exists()  # still arriving

    wait_for(lambda: blob_path(mirror, layer.digest).exists(), timeout=15.0, what="the fill to complete")
    assert sha256(blob_path(mirror, layer.digest).read_bytes()) == layer.digest
    wait_for(lambda: temp_files(mirror) == [], what="the fill's temp files to go")
    hit = get_blob(mirror, "big", layer.digest)
    assert (hit.headers["x-mirror-cache"], hit.digest, hit.received) == ("HIT", layer.digest, layer.size)
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 1
    assert upstream.count("GET", f"/blobs/{layer.digest}") == 1


class Reader:
    """A client streaming a blob in a thread; ``received`` grows as bytes arrive."""

    def __init__(self, mirror: MirrorServer, name: str, digest: str) -> None:
        self.url = f"{mirror.url}/v2/{name}/blobs/{digest}"
        self.received = 0
        self.outcome: str | None = None
        self.result: Transfer | None = None
        self._hasher = hashlib.sha256()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        error = None
        with httpx.Client(timeout=30.0, trust_env=False) as http, http.stream("GET", self.url) as answer:
            self.outcome = answer.headers.get("x-mirror-cache")
            try:
                for data in answer.iter_raw():
                    self._hasher.update(data)
                    self.received += len(data)
            except httpx.TransportError as exc:
                error = exc
        self.result = Transfer(answer.status_code, answer.headers, self.received,
                              "sha256:" + self._hasher.hexdigest(), error, None, 0.0)

    def join(self) -> Transfer:
        self._thread.join(30.0)
        assert self.result is not None, "the reader did not finish"
        return self.result


def test_every_byte_received_reaches_every_reader_while_the_upstream_pauses(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry, tmp_path: Path,
) -> None:
    # Most of a blob at once, then a pause far longer than the mirror's flush bound, then the rest.
    name = f"faults/trickle-{uuid.uuid4().hex[:8]}"
    image = build_image(tmp_path, [random_layer(tmp_path, 600 * 1024, seed=7)])
    upstream.push_image(name, "1", image)
    layer = image.layers[0]
    mirror = proxied()
    rule = fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", after_bytes=layer.size - 4096,
                           chunk_size=4096, delay=2.0)

    leader = Reader(mirror, name, layer.digest)
    wait_for(lambda: leader.received > 0, what="the first bytes")
    follower = Reader(mirror, name, layer.digest)
    wait_for(lambda: rule.sent >= rule.after_bytes, what="the upstream to send its first part")
    sent = rule.sent
    time.sleep(PAUSE)  # far more than FLUSH_SECONDS, far less than the upstream's pause
    assert rule.sent == sent < layer.size  # the upstream is still pausing
    assert (leader.received, follower.received) == (sent, sent)

    got = leader.join(), follower.join()
    assert [(t.status, t.error, t.digest, t.received) for t in got] == [(200, None, layer.digest, layer.size)] * 2
    assert (leader.outcome, follower.outcome) == ("MISS", "COALESCED")
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 1
    wait_for(lambda: blob_path(mirror, layer.digest).exists(), what="the blob to be stored")
    assert sha256(blob_path(mirror, layer.digest).read_bytes()) == layer.digest


# Retries ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["status", "refuse"])
def test_blob_failure_before_any_byte_is_retried(
    kind: str, proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry,
    images: StandardImages,
) -> None:
    layer = images.small.layers[1]
    mirror = proxied()
    fault_proxy.add(kind, f"/blobs/{layer.digest}$", method="GET", times=1, status=503)

    got = get_blob(mirror, "small", layer.digest)
    assert (got.status, got.error, got.headers["x-mirror-cache"]) == (200, None, "MISS")
    assert (got.digest, got.received) == (layer.digest, layer.size)
    expected = [503, 200] if kind == "status" else [None, 200]
    assert [r.status for r in fault_proxy.requests() if layer.digest in r.path] == expected
    assert upstream.count("GET", f"/blobs/{layer.digest}") == 1
    wait_for(lambda: blob_path(mirror, layer.digest).exists(), what="the blob to be stored")


def test_a_request_after_a_pause_of_seconds_reuses_the_upstream_connection(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages,
) -> None:
    """The next pull after a few quiet seconds goes over the connection the last one used (with
    Docker Hub: no new TLS handshake), as distribution's proxy does; httpx alone closes an idle
    connection after 5 s."""
    mirror = proxied()
    assert get_manifest(mirror, "small", images.small.digest).content == images.small.manifest
    used = {r.peer for r in fault_proxy.requests()}
    assert len(used) == 1 and "" not in used, used
    time.sleep(6.5)
    fault_proxy.clear_counts()
    assert get_manifest(mirror, "dlist", images.dlist.digest).content == images.dlist.manifest
    after = fault_proxy.requests()
    assert after and after[0].peer in used, (used, after)


def test_a_connection_the_upstream_closed_while_idle_is_not_used_again(
    mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    """An upstream that closes idle connections sooner than the mirror would keep them: the next
    request goes over a new connection at once, neither failed nor retried."""
    with FaultProxy(upstream.url, keep_alive=1) as closing:
        mirror = mirror_factory(closing.url, env=ENV)
        assert get_manifest(mirror, "small", images.small.digest).content == images.small.manifest
        used = {r.peer for r in closing.requests()}
        time.sleep(2.5)  # the proxy has closed the connection
        closing.clear_counts()
        assert get_manifest(mirror, "dlist", images.dlist.digest).content == images.dlist.manifest
        after = closing.requests()
        assert len(after) == 1 and after[0].status == 200 and after[0].peer not in used, (used, after)


# Docker Hub emulator ------------------------------------------------------------------------------


def pull_image(mirror: MirrorServer, name: str, image: Image) -> None:
    """GET the image's manifest by digest and every blob, checking bytes."""
    manifest = get_manifest(mirror, name, image.digest)
    assert (manifest.status_code, manifest.content) == (200, image.manifest)
    for digest in image.blobs:
        blob = get_blob(mirror, name, digest)
        assert (blob.status, blob.error, blob.digest) == (200, None, digest)


def test_hub_one_token_per_scope_and_cdn_never_sees_authorization(
    hub: HubEmulator, mirror_factory: Callable[..., MirrorServer], images: StandardImages
) -> None:
    mirror = mirror_factory(hub.url, env=ENV)
    index = get_manifest(mirror, "multi", "1")
    assert (index.status_code, index.content) == (200, images.multi.manifest)
    for child in images.multi.children:
        pull_image(mirror, "multi", child)
    blobs = sum(len(child.blobs) for child in images.multi.children)

    assert hub.tokens_issued == {"repository:library/multi:pull": 1}
    assert [r.user for r in hub.token_requests()] == [None]
    assert hub.count(None, "", status=401) == 1  # only the very first request went without a token
    assert hub.count("GET", "/blobs/", status=307) == blobs
    assert [r.status for r in hub.cdn_requests()] == [200] * blobs
    assert not hub.cdn_saw_authorization

    pull_image(mirror, "small", images.small)
    assert hub.tokens_issued == {"repository:library/multi:pull": 1, "repository:library/small:pull": 1}
    assert hub.count(None, "", status=401) == 2
    assert not hub.cdn_saw_authorization


def test_a_cdn_url_refused_after_the_redirect_is_asked_for_again_never_answered_as_a_missing_repository(
    hub: HubEmulator, mirror_factory: Callable[..., MirrorServer], images: StandardImages
) -> None:
    """A signed CDN URL that expired on its way gets 403 from the CDN: not the registry refusing the
    repository (before, the client got 404 NAME_UNKNOWN, and dockerd went around the mirror)."""
    mirror = mirror_factory(hub.url, env=ENV)
    layer, other = images.small.layers[1], images.small.layers[0]
    hub.expired_redirects = 1
    answer = httpx.get(f"{mirror.url}/v2/small/blobs/{layer.digest}", trust_env=False, timeout=30.0)
    assert (answer.status_code, sha256(answer.content)) == (200, layer.digest)
    assert [r.status for r in hub.cdn_requests()] == [403, 200]
    hub.clear_counts()
    hub.expired_redirects = 100  # every new URL refused: the retries are spent
    answer = httpx.get(f"{mirror.url}/v2/small/blobs/{other.digest}", trust_env=False, timeout=30.0)
    assert (answer.status_code, api_error(answer)) == (503, "UNAVAILABLE"), answer.text
    assert answer.headers.get("retry-after"), answer.headers
    assert [r.status for r in hub.cdn_requests()] == [403] * (RETRIES + 1)


def test_hub_credentials_go_to_the_token_server_only(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer], images: StandardImages
) -> None:
    hub = hub_factory(username="alice", password="s3cret-Pa55")
    mirror = mirror_factory(hub.url, env={**ENV, "MIRROR_UPSTREAM_USERNAME": "alice",
                                          "MIRROR_UPSTREAM_PASSWORD": "s3cret-Pa55"})
    tag = get_manifest(mirror, "small", "1")
    assert (tag.status_code, tag.content) == (200, images.small.manifest)
    pull_image(mirror, "small", images.small)
    assert hub.tokens_issued == {"repository:library/small:pull": 1}
    assert [(r.user, r.granted) for r in hub.token_requests()] == [("alice", True)]
    assert not hub.cdn_saw_authorization
    assert "s3cret-Pa55" not in mirror.log_tail(10_000)


def test_hub_wrong_credentials_give_a_clear_json_error(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer], images: StandardImages
) -> None:
    hub = hub_factory(username="alice", password="s3cret-Pa55")
    mirror = mirror_factory(hub.url, env={**ENV, "MIRROR_UPSTREAM_USERNAME": "alice",
                                          "MIRROR_UPSTREAM_PASSWORD": "wrong-Pa55"})
    layer = images.small.layers[1]
    manifest = get_manifest(mirror, "small", "1")
    blob = httpx.get(f"{mirror.url}/v2/small/blobs/{layer.digest}", trust_env=False, timeout=30.0)
    for answer in (manifest, blob):
        # The token server refused the mirror's own login: the upstream is unusable, and the
        # error says which setting to check.
        assert (answer.status_code, api_error(answer)) == (503, "UNAVAILABLE")
        assert "upstream.username and upstream.password" in answer.json()["errors"][0]["detail"]
    assert hub.tokens_issued == {}
    assert {(r.user, r.granted) for r in hub.token_requests()} == {("alice", False)}
    assert hub.cdn_requests() == []
    log = mirror.log_tail(10_000)
    assert "wrong-Pa55" not in log and "Traceback" not in log


def test_hub_rate_limit_429_when_uncached_cached_copy_otherwise(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    upstream: UpstreamRegistry, images: StandardImages, tmp_path: Path,
) -> None:
    # A repository of this test's own whose tag can move upstream.
    name = f"faults/moving-{uuid.uuid4().hex[:8]}"
    old, new = (build_image(tmp_path, [random_layer(tmp_path, 4096, seed=seed)]) for seed in (1, 2))
    upstream.push_image(name, "1", old)
    hub = hub_factory(manifest_limit=2)
    mirror = mirror_factory(hub.url, env=SHORT_TTL)

    assert get_manifest(mirror, "small", "1").content == images.small.manifest
    assert get_manifest(mirror, name, "1").content == old.manifest
    fetched = time.monotonic()
    assert hub.manifest_gets == 2  # the limit is reached

    limited = get_manifest(mirror, "multi", "1")
    assert (limited.status_code, api_error(limited)) == (429, "TOOMANYREQUESTS")
    # Docker Hub's 429 names no wait: the client is told the mirror's own (README, "Upstream failures").
    assert limited.headers.get("retry-after") == "10", limited.headers
    limited = get_manifest(mirror, "small", images.small.layers[0].digest)  # uncached digest
    assert (limited.status_code, api_error(limited)) == (429, "TOOMANYREQUESTS")
    assert limited.headers.get("retry-after") == "10", limited.headers

    past_ttl(fetched)
    upstream.push_image(name, "1", new)  # the tag moves while the pull limit is spent
    hub.clear_counts()
    hub.manifest_limit = 0
    # Unchanged tag: revalidated with a free HEAD, no pull spent.
    same = get_manifest(mirror, "small", "1")
    assert (same.status_code, same.headers["x-mirror-cache"], same.content) == (200, "HIT", images.small.manifest)
    # Moved tag: the new manifest's GET is refused, so the cached copy is served.
    moved = get_manifest(mirror, name, "1")
    assert (moved.status_code, moved.headers["x-mirror-cache"]) == (200, "STALE")
    assert (moved.content, moved.headers["docker-content-digest"]) == (old.manifest, old.digest)
    by_digest = get_manifest(mirror, "small", images.small.digest)
    assert (by_digest.headers["x-mirror-cache"], by_digest.content) == ("HIT", images.small.manifest)
    assert hub.count("HEAD", "/manifests/1", status=200) == 2
    assert hub.count("GET", f"/v2/{name}/manifests/1", status=429) == 1
    assert hub.count("GET", "/manifests/", status=200) == 0
    assert hub.manifest_gets == 0


def test_a_head_of_a_blob_being_filled_is_answered_as_the_fill_is_without_asking_the_upstream(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages, http: httpx.Client,
) -> None:
    """A HEAD while a GET of the same blob streams in (dockerd and containerd ask both) was sent to the
    upstream, and answered its 429 while the GET was served: they disagreed on the blob (OCI
    distribution spec: a HEAD answers as a GET would)."""
    layer = images.big.layers[1]  # 8 MiB, each upstream read (<= 64 KiB) held back 20 ms
    mirror = proxied()
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", chunk_size=64 * 1024, delay=0.02)
    limited = fault_proxy.add("status", f"/blobs/{layer.digest}$", method="HEAD", status=429,
                              headers={"Retry-After": "30"})
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get_blob, mirror, "big", layer.digest)
        wait_for(lambda: fault_proxy.count("GET", f"/blobs/{layer.digest}") == 1, what="the fill started")
        time.sleep(0.5)  # its upstream answered: the size is known
        head = http.head(f"{mirror.url}/v2/big/blobs/{layer.digest}")
        assert head.status_code == 200 and int(head.headers["content-length"]) == layer.size, head.headers
        assert limited.hits == 0
        assert (slow.result().status, slow.result().digest) == (200, layer.digest)
