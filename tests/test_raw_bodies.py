"""Large blob bodies read from the upstream connection past httpx (``mirror/upstream/rawbody.py``):
the same bytes and the same errors as through httpx, against the real registry and the fault proxy,
and through the mirror a cut or corrupt body still aborts the client and stores nothing."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import httpx
import pytest

from mirror.upstream.answers import BlobDownload
from mirror.upstream.rawbody import RAW_AT_LEAST, raw_body
from tests.support.faults import FaultProxy
from tests.support.images import Image, build_image, random_layer
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
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


@pytest.mark.parametrize("kind", ["corrupt", "reset"])
def test_a_large_blob_cut_or_corrupt_aborts_the_client_stores_nothing_and_is_fetched_whole_next(
    kind: str, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry,
    large: Image,
) -> None:
    """As ``test_faults`` does for an 8 MiB layer, for one read from the connection."""
    layer = large.layers[0]
    mirror = mirror_factory(fault_proxy.url, env=ENV)
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
