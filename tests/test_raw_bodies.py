"""Large blob bodies read from the upstream connection past httpx (``mirror/upstream/rawbody.py``),
or drained from it by a thread of their own (``mirror/upstream/drain.py``, what a fill does over
plain TCP): the same bytes and the same errors as through httpx, against the real registry and the
fault proxy; a cancelled drain stops its thread; a TLS answer is not drained; and through the mirror
a cut or corrupt body still aborts the client and stores nothing."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mirror.upstream.answers import BlobDownload
from mirror.upstream.drain import RECV_BYTES, drainable
from mirror.upstream.rawbody import RAW_AT_LEAST, raw_body
from tests.support.faults import FaultProxy
from tests.support.images import Image, build_image, random_layer
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.tls import server_certificate
from tests.support.waiting import wait_for
from tests.test_faults import ENV, blob_path, get_blob, stored, temp_files

MIB = 1 << 20


@pytest.fixture(scope="module")
def large(upstream: UpstreamRegistry, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """``library/rawbody:1``: one 24 MiB layer (read from the connection) and a small config (not)."""
    dir = tmp_path_factory.mktemp("rawbody")
    image = build_image(dir, [random_layer(dir, 24 * MIB, seed=777, compressed=False)])
    upstream.push_image("library/rawbody", "1", image)
    return image


async def _read(url: str, *, read_timeout: float = 10.0) -> tuple[bool, int, str, BaseException | None]:
    """GET *url*: whether its body was read from the connection, the bytes received, their sha256
    and the error that ended it, if any."""
    hasher, got, error = hashlib.sha256(), 0, None
    async with httpx.AsyncClient(timeout=httpx.Timeout(read_timeout), trust_env=False) as client, \
            client.stream("GET", url) as response:
        assert response.status_code == 200, response.status_code
        raw = raw_body(response) is not None
        try:
            async for chunk in BlobDownload(response).chunks():
                hasher.update(chunk)
                got += len(chunk)
        except httpx.HTTPError as exc:
            error = exc
    return raw, got, "sha256:" + hasher.hexdigest(), error


def test_a_large_body_is_read_from_the_connection_and_a_small_one_through_httpx(
    upstream: UpstreamRegistry, large: Image,
) -> None:
    layer = large.layers[0]
    assert layer.size >= RAW_AT_LEAST > len(large.config)
    raw, got, digest, error = asyncio.run(_read(f"{upstream.url}/v2/library/rawbody/blobs/{layer.digest}"))
    assert (raw, got, digest, error) == (True, layer.size, layer.digest, None)
    raw, got, digest, error = asyncio.run(_read(f"{upstream.url}/v2/library/rawbody/blobs/{large.config_digest}"))
    assert (raw, got, digest, error) == (False, len(large.config), large.config_digest, None)

    async def small_drainable() -> bool:
        async with httpx.AsyncClient(trust_env=False) as client, \
                client.stream("GET", f"{upstream.url}/v2/library/rawbody/blobs/{large.config_digest}") as response:
            return drainable(response) is not None

    assert asyncio.run(small_drainable()) is False


def test_a_large_body_cut_short_or_stalled_ends_in_httpx_errors(
    fault_proxy: FaultProxy, large: Image,
) -> None:
    layer = large.layers[0]
    url = f"{fault_proxy.url}/v2/library/rawbody/blobs/{layer.digest}"
    fault_proxy.add("reset", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=5 * MIB)
    raw, got, _, error = asyncio.run(_read(url))
    assert raw and got <= 5 * MIB and isinstance(error, (httpx.ReadError, httpx.RemoteProtocolError)), (got, error)

    # 64 KiB every 3 s against a 1 s read timeout: the first read past the headers times out.
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1, chunk_size=64 << 10, delay=3.0)
    raw, got, _, error = asyncio.run(_read(url, read_timeout=1.0))
    assert raw and got < layer.size and isinstance(error, httpx.ReadTimeout), (got, error)

    raw, got, digest, error = asyncio.run(_read(url))  # the rules used up: the whole blob
    assert (raw, got, digest, error) == (True, layer.size, layer.digest, None)


class Drained:
    """What :func:`_drain` saw: the bytes the writer got (their count, sha256 and threads), the
    bytes counted, the wake-ups on the event loop and the error that ended the drain."""

    def __init__(self) -> None:
        self.hasher, self.got, self.counted, self.wakes = hashlib.sha256(), 0, 0, 0
        self.threads: set[int] = set()
        #: (thread, bytes) of each write, in order.
        self.writes: list[tuple[int, int]] = []
        self.error: BaseException | None = None

    def write(self, data: memoryview) -> None:
        self.hasher.update(data)
        self.got += len(data)
        self.threads.add(threading.get_ident())
        self.writes.append((threading.get_ident(), len(data)))

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


async def _drain(url: str, *, read_timeout: float = 10.0, cancel_after: int | None = None,
                 cancel_on_wake: bool = False) -> Drained:
    """GET *url* and drain its body into a :class:`Drained`; with *cancel_after*, cancel the drain
    once that many bytes were written, with *cancel_on_wake* at its first wake-up (the error is then
    the cancellation)."""
    seen = Drained()
    async with httpx.AsyncClient(timeout=httpx.Timeout(read_timeout), trust_env=False) as client, \
            client.stream("GET", url) as response:
        assert response.status_code == 200, response.status_code
        drain = drainable(response, lambda size: setattr(seen, "counted", seen.counted + size))
        assert drain is not None

        def woken() -> None:
            seen.wakes += 1
            if cancel_on_wake and seen.wakes == 1:
                task.cancel()

        task = asyncio.create_task(drain.into(seen.write, woken))
        if cancel_after is not None:
            while seen.got < cancel_after and not task.done():
                await asyncio.sleep(0.01)
            task.cancel()
        try:
            await task
        except (httpx.HTTPError, asyncio.CancelledError) as exc:
            seen.error = exc
    return seen


def test_a_large_body_is_drained_by_a_thread_of_its_own_with_the_same_bytes_and_counts(
    upstream: UpstreamRegistry, large: Image,
) -> None:
    layer = large.layers[0]
    seen = asyncio.run(_drain(f"{upstream.url}/v2/library/rawbody/blobs/{layer.digest}"))
    assert (seen.got, seen.digest, seen.error, seen.counted) == (layer.size, layer.digest, None, layer.size)
    # What was read before the drain began (a few KiB) is written at once from the event loop, the
    # rest from the drain's thread, after it.
    loop = threading.get_ident()
    from_loop = [size for thread, size in seen.writes if thread == loop]
    assert sum(from_loop) < RECV_BYTES, f"{sum(from_loop)} bytes written from the event loop's thread"
    assert [thread for thread, _ in seen.writes[:len(from_loop)]] == [loop] * len(from_loop), seen.writes[:10]
    assert len(seen.threads - {loop}) == 1
    assert seen.wakes >= 1


def test_a_drained_body_cut_short_or_stalled_ends_in_httpx_errors(fault_proxy: FaultProxy, large: Image) -> None:
    layer = large.layers[0]
    url = f"{fault_proxy.url}/v2/library/rawbody/blobs/{layer.digest}"
    fault_proxy.add("reset", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=5 * MIB)
    seen = asyncio.run(_drain(url))
    assert seen.got <= 5 * MIB and isinstance(seen.error, (httpx.ReadError, httpx.RemoteProtocolError)), seen.error

    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1, chunk_size=64 << 10, delay=3.0)
    seen = asyncio.run(_drain(url, read_timeout=1.0))
    assert seen.got < layer.size and isinstance(seen.error, httpx.ReadTimeout), (seen.got, seen.error)

    seen = asyncio.run(_drain(url))  # the rules used up: the whole blob
    assert (seen.got, seen.digest, seen.error) == (layer.size, layer.digest, None)


def test_a_cancelled_drain_stops_its_thread_at_once_and_writes_no_more(fault_proxy: FaultProxy, large: Image) -> None:
    """64 KiB a second against a 30 s read timeout: the cancellation, not a timeout, ends the read."""
    layer = large.layers[0]
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1, chunk_size=64 << 10, delay=1.0)
    started = time.monotonic()
    seen = asyncio.run(_drain(f"{fault_proxy.url}/v2/library/rawbody/blobs/{layer.digest}", read_timeout=30.0,
                              cancel_after=1))
    took, written = time.monotonic() - started, seen.got
    assert isinstance(seen.error, asyncio.CancelledError), seen.error
    assert 0 < written < layer.size and took < 10, (written, took)
    time.sleep(2.5)
    assert seen.got == written, "the drain's thread wrote after it was cancelled"
    assert not [t for t in threading.enumerate() if t.name == "upstream-drain"]


def test_a_drain_cancelled_before_its_thread_began_ends_it_at_once(upstream: UpstreamRegistry, large: Image) -> None:
    """The first bytes (read before the drain began) are written from the event loop, and the thread
    waits for the readers woken by them: a cancellation meanwhile must still end it."""
    layer = large.layers[0]

    async def run() -> Drained:
        return await asyncio.wait_for(_drain(f"{upstream.url}/v2/library/rawbody/blobs/{layer.digest}",
                                             cancel_on_wake=True), 10)

    seen = asyncio.run(run())
    assert isinstance(seen.error, asyncio.CancelledError), seen.error
    assert seen.wakes >= 1 and 0 < seen.got < RECV_BYTES, (seen.wakes, seen.got)
    assert seen.threads == {threading.get_ident()}, "the drain's thread wrote after it was cancelled"
    for _ in range(50):
        if not [t for t in threading.enumerate() if t.name == "upstream-drain"]:
            break
        time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name == "upstream-drain"]


def test_a_tls_answer_is_not_drained_and_is_read_from_the_connection_instead(
    mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry, large: Image, tmp_path: Path,
) -> None:
    """A mirror serving TLS stands in for an https upstream: its bytes are decrypted on the event
    loop, so the thread cannot read the socket; ``rawbody.py`` reads them."""
    pki = server_certificate(tmp_path / "pki")
    verify = ssl.create_default_context(cafile=str(pki.ca))
    mirror = mirror_factory(upstream.url, scheme="https", verify=verify,
                            env={"MIRROR_HTTP_TLS_CERTIFICATE": str(pki.certificate),
                                 "MIRROR_HTTP_TLS_KEY": str(pki.key)})
    layer = large.layers[0]

    async def read() -> tuple[bool, bool, int, str]:
        hasher, got = hashlib.sha256(), 0
        async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=30) as client, \
                client.stream("GET", f"{mirror.url}/v2/library/rawbody/blobs/{layer.digest}") as response:
            assert response.status_code == 200, response.status_code
            drained, raw = drainable(response) is not None, raw_body(response) is not None
            async for chunk in BlobDownload(response).chunks():
                hasher.update(chunk)
                got += len(chunk)
        return drained, raw, got, "sha256:" + hasher.hexdigest()

    assert asyncio.run(read()) == (False, True, layer.size, layer.digest)


@pytest.mark.parametrize("kind", ["corrupt", "reset"])
def test_a_large_blob_cut_or_corrupt_aborts_the_client_stores_nothing_and_is_fetched_whole_next(
    kind: str, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry,
    large: Image,
) -> None:
    """As ``test_faults`` does for an 8 MiB layer, for one read from the connection (a reset with no
    retries left: with them, the rest is asked for)."""
    layer = large.layers[0]
    mirror = mirror_factory(fault_proxy.url, env=ENV if kind == "corrupt" else {**ENV, "MIRROR_UPSTREAM_RETRIES": "0"})
    if kind == "corrupt":
        fault_proxy.add("corrupt", f"/blobs/{layer.digest}$", method="GET", times=1,
                        after_bytes=layer.size - 1000, flip_bytes=3)
    else:
        fault_proxy.add("reset", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=20 * MIB)
    bad = get_blob(mirror, "rawbody", layer.digest)
    assert bad.status == 200 and isinstance(bad.error, httpx.RemoteProtocolError), bad
    assert bad.received < layer.size
    assert stored(mirror) == []
    wait_for(lambda: temp_files(mirror) == [], what="the failed fill's temp files to go")
    assert "aborting transfer" in mirror.log_tail(400)

    good = get_blob(mirror, "rawbody", layer.digest)
    assert (good.status, good.error, good.digest, good.received) == (200, None, layer.digest, layer.size)
    wait_for(lambda: blob_path(mirror, layer.digest).exists(), what="the blob to be stored")
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 2
