"""Which way blob bodies leave a real mirror: ``sendfile(2)`` for stored blobs on plain HTTP, and the
ordinary body path, with one warning, when uvicorn lacks the protocol internals the zero-copy path
builds on (``mirror/api/hardening.py``: ``missing_internals``).

The path is read from ``mirror_http_sendfile_bytes_total``, which counts the bytes the kernel copied,
next to ``mirror_http_response_bytes_total`` and the access log's ``bytes``.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.support.catalog import StandardImages
from tests.support.images import sha256_digest as sha256
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer

SENDFILE = "mirror_http_sendfile_bytes_total"
WARNING = "lacks internals the zero-copy protocol uses"


def get_blobs(mirror: MirrorServer, images: StandardImages) -> list[str]:
    """GET each layer of the small image (checking its bytes); the X-Mirror-Cache of each."""
    outcomes = []
    with httpx.Client(base_url=mirror.url, trust_env=False, timeout=30) as client:
        for layer in images.small.layers:
            answer = client.get(f"/v2/library/small/blobs/{layer.digest}")
            assert answer.status_code == 200 and sha256(answer.content) == layer.digest
            outcomes.append(answer.headers["x-mirror-cache"])
    return outcomes


def blob_bytes_logged(mirror: MirrorServer) -> int:
    return sum(int(e["bytes"]) for e in mirror.access_entries() if e["route"] == "blob")


def test_stored_blobs_go_out_through_sendfile(
    mirror_factory: Callable[..., MirrorServer], images: StandardImages,
) -> None:
    mirror = mirror_factory()
    metrics = f"{mirror.url}/metrics"
    assert value(scrape(metrics), SENDFILE) == 0
    assert get_blobs(mirror, images) == ["MISS"] * len(images.small.layers)
    total = sum(layer.size for layer in images.small.layers)
    # A fill's readers may get what is already written by sendfile too (GrowingBlob.spans).
    cold = value(scrape(metrics), SENDFILE)
    assert 0 <= cold <= total
    logged = blob_bytes_logged(mirror)

    assert get_blobs(mirror, images) == ["HIT"] * len(images.small.layers)
    samples = scrape(metrics)
    assert value(samples, SENDFILE) - cold == total  # every byte of a stored blob
    assert value(samples, "mirror_http_response_bytes_total", route="blob") == 2 * total
    assert blob_bytes_logged(mirror) - logged == total
    # A range, too.
    layer = images.small.layers[-1]
    answer = httpx.get(f"{mirror.url}/v2/library/small/blobs/{layer.digest}", headers={"range": "bytes=100-4195"},
                       trust_env=False, timeout=30)
    assert answer.status_code == 206 and answer.content == layer.path.read_bytes()[100:4196]
    assert value(scrape(metrics), SENDFILE) - cold == total + 4096
    assert WARNING not in mirror.log_tail(200)


def test_without_the_uvicorn_internals_blobs_take_the_ordinary_path(
    mirror_factory: Callable[..., MirrorServer], images: StandardImages,
) -> None:
    """tests/support/renamed_uvicorn.py renames an attribute of uvicorn's request cycle, as a release
    might: the mirror says so once at start-up and serves everything, without sendfile(2)."""
    mirror = mirror_factory(module="tests.support.renamed_uvicorn")
    metrics = f"{mirror.url}/metrics"
    assert get_blobs(mirror, images) == ["MISS"] * len(images.small.layers)
    assert get_blobs(mirror, images) == ["HIT"] * len(images.small.layers)
    total = sum(layer.size for layer in images.small.layers)
    samples = scrape(metrics)
    assert value(samples, "mirror_http_response_bytes_total", route="blob") == 2 * total
    assert value(samples, SENDFILE) == 0
    manifest = httpx.get(f"{mirror.url}/v2/library/small/manifests/1", trust_env=False, timeout=30,
                         headers={"accept": images.small.media_type})
    assert manifest.status_code == 200 and manifest.headers["docker-content-digest"] == images.small.digest
    log = mirror.log_tail(400)
    assert log.count(WARNING) == 1 and "RequestResponseCycle.expected_content_length" in log, log
    assert "Traceback" not in log, log
