"""A 404 web page is not the registry saying "does not exist".

A misrouted ingress or a proxy's error page answers ``404`` with ``text/html`` in the registry's
place, on GET and HEAD alike.  That says nothing of what the registry holds: a cached tag stays
served (``STALE``), what is not cached gets ``502 UNAVAILABLE`` in the spec's JSON format (never
``MANIFEST_UNKNOWN``/``BLOB_UNKNOWN``), and a referrers request answered so does not record the
upstream as having no Referrers API.  The registry's own 404s keep their meaning: its JSON errors
(a tag it does not have) and its plain-text route 404 (docker-registry 2.8 has no Referrers API,
``tests/test_referrers.py``).  A :class:`FaultProxy` in front of the real docker-registry serves
the pages.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.faults import FaultProxy
from tests.support.images import MANIFEST_MEDIA_TYPES, Image, build_image, random_layer, sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import assert_store_sound

ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}
TTL = 0.3
ENV = {"MIRROR_UPSTREAM_RETRIES": "0", "MIRROR_UPSTREAM_READ_TIMEOUT": "10s",
       "MIRROR_CACHE_TAG_TTL": f"{int(TTL * 1000)}ms"}
PAGE = b"<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1></center></body></html>"
HTML = {"status": 404, "body": PAGE, "headers": {"content-type": "text/html"}}


def error_code(answer: httpx.Response) -> str:
    assert answer.headers["content-type"].startswith("application/json"), (answer.status_code, answer.text)
    return str(answer.json()["errors"][0]["code"])


def own_images(tmp_path: Path, count: int) -> list[Image]:
    seeds = uuid.uuid4().int % 10_000_000
    return [build_image(tmp_path, [random_layer(tmp_path, 2500 + i, seed=seeds + i)]) for i in range(count)]


def test_a_404_web_page_leaves_cached_tags_and_is_an_invalid_answer(
    mirror_factory: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry,
    tmp_path: Path, http: httpx.Client,
) -> None:
    name = f"pages/{uuid.uuid4().hex[:8]}"
    cached, uncached = own_images(tmp_path, 2)
    upstream.push_image(name, "cached", cached)
    upstream.push_image(name, "uncached", uncached)
    mirror = mirror_factory(fault_proxy.url, env=ENV)
    base = f"{mirror.url}/v2/{name}"
    assert http.get(f"{base}/manifests/cached", headers=ACCEPT).content == cached.manifest

    fault_proxy.add("status", f"/v2/{name}/", **HTML)  # type: ignore[arg-type]
    time.sleep(TTL + 0.1)
    for method in ("GET", "HEAD", "GET"):  # the revalidating HEAD, then the GET, answered by the page
        stale = http.request(method, f"{base}/manifests/cached", headers=ACCEPT)
        assert (stale.status_code, stale.headers.get("x-mirror-cache")) == (200, "STALE"), stale.text
        assert stale.headers["docker-content-digest"] == cached.digest
    assert fault_proxy.count("HEAD", "/manifests/cached", 404) >= 1
    blob = next(iter(uncached.blobs))
    for method, url in [("GET", f"{base}/manifests/uncached"), ("HEAD", f"{base}/manifests/uncached"),
                        ("GET", f"{base}/manifests/{uncached.digest}"), ("GET", f"{base}/blobs/{blob}"),
                        ("HEAD", f"{base}/blobs/{blob}")]:
        answer = http.request(method, url, headers=ACCEPT)
        assert answer.status_code == 502, (method, url, answer.status_code, answer.content)
        if method == "GET":
            assert error_code(answer) == "UNAVAILABLE", answer.text

    fault_proxy.clear_rules()
    # The registry's own 404 still says "does not exist".
    missing = http.get(f"{base}/manifests/never-pushed", headers=ACCEPT)
    assert (missing.status_code, error_code(missing)) == (404, "MANIFEST_UNKNOWN"), missing.text
    fresh = http.get(f"{base}/manifests/cached", headers=ACCEPT)
    assert (fresh.status_code, fresh.headers["x-mirror-cache"], fresh.content) == (200, "HIT", cached.manifest)
    answer = http.get(f"{base}/blobs/{blob}")
    assert (answer.status_code, sha256(answer.content)) == (200, blob)
    assert_store_sound(mirror.data_dir, {cached.digest, blob})


def test_a_404_web_page_for_referrers_does_not_mean_no_referrers_api(
    mirror_factory: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry,
    tmp_path: Path, http: httpx.Client,
) -> None:
    name = f"pages/{uuid.uuid4().hex[:8]}"
    (image,) = own_images(tmp_path, 1)
    upstream.push_image(name, "v1", image)
    mirror = mirror_factory(fault_proxy.url, env=ENV)
    url = f"{mirror.url}/v2/{name}/referrers/{image.digest}"
    assert http.get(f"{mirror.url}/v2/{name}/manifests/v1", headers=ACCEPT).status_code == 200

    fault_proxy.add("status", "/referrers/", **HTML)  # type: ignore[arg-type]
    page = http.get(url)
    assert (page.status_code, error_code(page)) == (502, "UNAVAILABLE"), page.text
    # Nothing was recorded: while the upstream is down, the mirror does not claim it has no API.
    fault_proxy.clear_rules()
    fault_proxy.add("status", "/referrers/", status=503)
    down = http.get(url)
    assert (down.status_code, error_code(down)) == (503, "UNAVAILABLE"), down.text

    fault_proxy.clear_rules()
    # docker-registry's own plain-text route 404: no Referrers API, the tag schema it is.
    answer = http.get(url)
    assert (answer.status_code, error_code(answer)) == (404, "UNSUPPORTED"), answer.text
    assert answer.json()["errors"][0]["detail"] == {"tag": image.digest.replace(":", "-")}
