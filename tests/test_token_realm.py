"""The upstream's token realm: its failures are the upstream's, and it is found under a path prefix.

A token request that gets no token (the realm down, 5xx, 429, 404, a 200 web page, a 200 JSON
document without ``token``) fails the registry request it was for; its answer is never passed on
as the registry's.  The Hub emulator's challenges name a :class:`FaultProxy` in front of its token
server as the realm; after a first pull the emulator refuses every token issued, so the mirror has
to ask the realm again, and gets the fault.  A cached tag is then served ``STALE``; what is not
cached gets the spec's JSON error (502/503, or 429 for a rate limit), never a 404 that would say
the manifest, blob or repository does not exist, nor the realm's bytes as a blob.

A registry served under a path (``--upstream http://host/artifactory/api/docker/remote``,
nginx in front of the Hub emulator stripping the prefix) is authenticated as one at the root:
a request carries its repository's cached token, and a refused token is renewed at once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.faults import FaultProxy
from tests.support.hub import HubEmulator
from tests.support.images import MANIFEST_MEDIA_TYPES, Image, build_image, random_layer, sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.nginx import NginxProxy
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import assert_store_sound

ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}
TTL = 0.3
ENV = {"MIRROR_UPSTREAM_RETRIES": "0", "MIRROR_UPSTREAM_READ_TIMEOUT": "10s",
       "MIRROR_CACHE_TAG_TTL": f"{int(TTL * 1000)}ms"}
HTML = b"<!DOCTYPE html><html><body><h1>Sign in</h1></body></html>"


def scope(name: str) -> str:
    return f"repository:{name}:pull"


def own_images(tmp_path: Path, count: int) -> list[Image]:
    """*count* small images, no layer shared with any other image."""
    seeds = uuid.uuid4().int % 10_000_000
    return [build_image(tmp_path, [random_layer(tmp_path, 3000 + i, seed=seeds + i)]) for i in range(count)]


def api_error(answer: httpx.Response) -> str:
    """The code of the answer's one spec error (OCI distribution spec, "Error Codes")."""
    assert answer.headers["content-type"].startswith("application/json"), (answer.status_code, answer.text)
    errors = answer.json()["errors"]
    assert len(errors) == 1, errors
    return str(errors[0]["code"])


# (what the realm does, the mirror's status and error code for what is not cached)
TOKEN_FAULTS = {
    "404": ({"kind": "status", "status": 404}, 502, "UNAVAILABLE"),
    "500": ({"kind": "status", "status": 500}, 503, "UNAVAILABLE"),
    "429": ({"kind": "status", "status": 429, "headers": {"retry-after": "60"}}, 429, "TOOMANYREQUESTS"),
    "html-200": ({"kind": "status", "status": 200, "body": HTML, "headers": {"content-type": "text/html"}},
                 502, "UNAVAILABLE"),
    "json-200-without-token": ({"kind": "status", "status": 200, "body": b'{"details":"no token today"}'},
                               502, "UNAVAILABLE"),
    "connection-closed": ({"kind": "refuse"}, 503, "UNAVAILABLE"),
}


@pytest.mark.parametrize("fault", list(TOKEN_FAULTS))
def test_a_token_request_that_fails_is_an_upstream_failure(
    fault: str, hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    upstream: UpstreamRegistry, tmp_path: Path, http: httpx.Client,
) -> None:
    rule, status, code = TOKEN_FAULTS[fault]
    name, unlisted = f"realm/{uuid.uuid4().hex[:8]}", f"realm/never-{uuid.uuid4().hex[:8]}"
    cached, uncached = own_images(tmp_path, 2)
    upstream.push_image(name, "cached", cached)
    upstream.push_image(name, "uncached", uncached)
    upstream.push_image(unlisted, "a", uncached)
    hub = hub_factory()
    with FaultProxy(hub.auth_url) as realm:
        hub.realm_url = realm.url
        mirror = mirror_factory(hub.url, env=ENV)
        base = f"{mirror.url}/v2/{name}"
        first = http.get(f"{base}/manifests/cached", headers=ACCEPT)
        assert (first.status_code, first.content) == (200, cached.manifest), first.text
        assert hub.tokens_issued == {scope(name): 1}

        hub.revoke_tokens()  # the mirror's token is refused: it must ask the realm again
        realm.add(**rule)  # type: ignore[arg-type]
        time.sleep(TTL + 0.1)
        for method in ("GET", "HEAD"):
            stale = http.request(method, f"{base}/manifests/cached", headers=ACCEPT)
            assert (stale.status_code, stale.headers.get("x-mirror-cache")) == (200, "STALE"), stale.text
            assert stale.headers["docker-content-digest"] == cached.digest
        assert http.get(f"{base}/manifests/cached", headers=ACCEPT).content == cached.manifest

        blob = next(iter(uncached.blobs))
        for method, url in [("GET", f"{base}/manifests/uncached"), ("HEAD", f"{base}/manifests/uncached"),
                            ("GET", f"{base}/blobs/{blob}"), ("HEAD", f"{base}/blobs/{blob}"),
                            ("GET", f"{mirror.url}/v2/{unlisted}/tags/list")]:
            answer = http.request(method, url, headers=ACCEPT)
            assert answer.status_code == status, (method, url, answer.status_code, answer.headers, answer.content)
            assert answer.content != HTML and "text/html" not in answer.headers.get("content-type", "")
            if method == "GET":
                assert api_error(answer) == code, (url, answer.text)
            if code == "TOOMANYREQUESTS":
                assert answer.headers.get("retry-after") == "60", answer.headers
        # The repository with a cached tag lists it; the realm's answer never stands for the registry's.
        listed = http.get(f"{base}/tags/list")
        assert (listed.status_code, listed.json().get("tags")) == (200, ["cached"]), listed.text
        assert realm.count("GET", "/token") >= 1

        realm.clear_rules()  # the realm is back: everything is served again
        answer = http.get(f"{base}/blobs/{blob}")
        assert (answer.status_code, sha256(answer.content)) == (200, blob)
        assert http.get(f"{base}/manifests/uncached", headers=ACCEPT).content == uncached.manifest
    assert_store_sound(mirror.data_dir, {cached.digest, uncached.digest, blob})


def test_a_token_realm_that_does_not_answer_is_given_up_after_the_read_timeout(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    upstream: UpstreamRegistry, tmp_path: Path, http: httpx.Client,
) -> None:
    """Before, the token request had no timeout: a stalled realm held a cold pull for as long as it stalled."""
    name = f"realm/{uuid.uuid4().hex[:8]}"
    cached, uncached = own_images(tmp_path, 2)
    upstream.push_image(name, "cached", cached)
    upstream.push_image(name, "uncached", uncached)
    hub = hub_factory()
    with FaultProxy(hub.auth_url) as realm:
        hub.realm_url = realm.url
        mirror = mirror_factory(hub.url, env={**ENV, "MIRROR_UPSTREAM_READ_TIMEOUT": "2s"})
        base = f"{mirror.url}/v2/{name}"
        assert http.get(f"{base}/manifests/cached", headers=ACCEPT).status_code == 200
        hub.revoke_tokens()
        realm.add("late", "/token", delay=60)
        time.sleep(TTL + 0.1)
        started = time.monotonic()
        answer = http.get(f"{base}/manifests/uncached", headers=ACCEPT, timeout=60)
        assert answer.status_code == 503 and api_error(answer) == "UNAVAILABLE", answer.text
        assert answer.headers.get("retry-after"), answer.headers
        assert time.monotonic() - started < 15, time.monotonic() - started
        stale = http.get(f"{base}/manifests/cached", headers=ACCEPT, timeout=60)
        assert (stale.status_code, stale.headers.get("x-mirror-cache")) == (200, "STALE"), stale.text


def test_a_registry_under_a_path_prefix_sends_cached_tokens_and_renews_refused_ones(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    upstream: UpstreamRegistry, tmp_path: Path, http: httpx.Client,
) -> None:
    name = f"prefixed/{uuid.uuid4().hex[:8]}"
    images = own_images(tmp_path, 2)
    for number, image in enumerate(images, 1):
        upstream.push_image(name, str(number), image)
    hub = hub_factory()
    prefix = "/artifactory/api/docker/remote"
    with NginxProxy(tmp_path / "nginx", hub.url, prefix=prefix) as nginx:
        mirror = mirror_factory(f"{nginx.url}{prefix}", env=ENV)
        base = f"{mirror.url}/v2/{name}"
        manifest = http.get(f"{base}/manifests/1", headers=ACCEPT)
        assert (manifest.status_code, manifest.content) == (200, images[0].manifest), manifest.text
        for digest in images[0].blobs:
            blob = http.get(f"{base}/blobs/{digest}")
            assert (blob.status_code, sha256(blob.content)) == (200, digest)
        # One challenge, one token: every later request of the repository carried it.
        assert hub.tokens_issued == {scope(name): 1}
        assert hub.count(None, name, 401) == 1, [r for r in hub.requests() if r.status == 401]

        hub.revoke_tokens()
        renewed = http.get(f"{base}/manifests/2", headers=ACCEPT)
        assert (renewed.status_code, renewed.content) == (200, images[1].manifest), renewed.text
        assert hub.tokens_issued == {scope(name): 2}
        assert hub.count(None, name, 401) == 2
        for digest in images[1].blobs:
            blob = http.get(f"{base}/blobs/{digest}")
            assert (blob.status_code, sha256(blob.content)) == (200, digest)
        assert hub.count(None, name, 401) == 2
    assert_store_sound(mirror.data_dir, {images[0].digest, images[1].digest})
