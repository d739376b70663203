"""Tokens the upstream refuses before they expire (key rotation, revocation, clock skew).

The Hub emulator issues tokens for an hour (``expires_in: 3600``); after a first pull it
refuses them all (``401``, ``error="invalid_token"``) while its token server keeps issuing new
ones.  Every kind of upstream request the mirror makes must then drop the refused token, fetch
exactly one new token and answer the client as before; a refusal that persists with a fresh
token keeps its meaning.  Each test counts the token server's requests and the registry
front's 401s, and checks the store afterwards.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.hub import HubEmulator
from tests.support.images import (
    MANIFEST_MEDIA_TYPES,
    Image,
    build_image,
    file_digest,
    random_layer,
    sha256_digest as sha256,
)
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import assert_store_sound

ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}
ENV = {"MIRROR_UPSTREAM_RETRIES": "1", "MIRROR_UPSTREAM_READ_TIMEOUT": "10s"}
TOKEN_TTL = 3600


def scope(name: str) -> str:
    return f"repository:{name}:pull"


def images_of_own(tmp_path: Path, count: int) -> list[Image]:
    """*count* small images, no layer shared with any other image."""
    seeds = uuid.uuid4().int % 10_000_000
    return [build_image(tmp_path, [random_layer(tmp_path, 2048 + i, seed=seeds + i)]) for i in range(count)]


def pull(http: httpx.Client, mirror: MirrorServer, name: str, tag: str, image: Image) -> None:
    """Pull an image through the mirror, checking every byte."""
    manifest = http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT)
    assert (manifest.status_code, manifest.content) == (200, image.manifest), manifest.text
    for digest in image.blobs:
        blob = http.get(f"{mirror.url}/v2/{name}/blobs/{digest}")
        assert blob.status_code == 200, blob.text
        assert sha256(blob.content) == digest


def api_error(answer: httpx.Response) -> dict[str, object]:
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    errors = answer.json()["errors"]
    assert len(errors) == 1, errors
    return dict(errors[0])


@pytest.fixture
def repo(upstream: UpstreamRegistry, tmp_path: Path) -> tuple[str, list[Image]]:
    """A repository of the test's own on the upstream, tags "1".."6", one image each."""
    name = f"tokens/refused-{uuid.uuid4().hex[:8]}"
    built = images_of_own(tmp_path, 6)
    for number, image in enumerate(built, 1):
        upstream.push_image(name, str(number), image)
    return name, built


def test_a_refused_token_is_replaced_once_for_every_kind_of_request(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    repo: tuple[str, list[Image]], http: httpx.Client,
) -> None:
    name, built = repo
    hub = hub_factory(token_ttl=TOKEN_TTL)
    mirror = mirror_factory(hub.url, env=ENV)
    pull(http, mirror, name, "1", built[0])
    assert hub.tokens_issued == {scope(name): 1}

    def refused_then(what: str, answer: Callable[[], httpx.Response]) -> httpx.Response:
        """Revoke every token, make one request through the mirror; it needed exactly one new token."""
        hub.revoke_tokens()
        hub.clear_counts()
        got = answer()
        assert got.status_code == 200, (what, got.status_code, got.text)
        assert [(r.scopes, r.granted) for r in hub.token_requests()] == [((scope(name),), True)], what
        assert hub.count(None, "", status=401) == 1, (what, hub.requests())  # the refused token, once
        return got

    manifest = refused_then("manifest GET", lambda: http.get(f"{mirror.url}/v2/{name}/manifests/2", headers=ACCEPT))
    assert manifest.content == built[1].manifest
    assert hub.count("GET", f"/v2/{name}/manifests/2", status=200) == 1

    head = refused_then("manifest HEAD",
                        lambda: http.head(f"{mirror.url}/v2/{name}/manifests/3", headers=ACCEPT))
    assert head.headers["docker-content-digest"] == built[2].digest

    layer = built[3].layers[0].digest
    blob = refused_then("blob GET", lambda: http.get(f"{mirror.url}/v2/{name}/blobs/{layer}"))
    assert sha256(blob.content) == layer
    assert hub.count("GET", f"/v2/{name}/blobs/{layer}", status=307) == 1

    other = built[4].layers[0].digest
    size = refused_then("blob HEAD", lambda: http.head(f"{mirror.url}/v2/{name}/blobs/{other}"))
    assert int(size.headers["content-length"]) == built[4].layers[0].size
    assert hub.count("HEAD", f"/v2/{name}/blobs/{other}", status=200) == 1

    tags = refused_then("tags list", lambda: http.get(f"{mirror.url}/v2/{name}/tags/list"))
    assert tags.json() == {"name": name, "tags": ["1", "2", "3", "4", "5", "6"]}
    assert hub.count("GET", f"/v2/{name}/tags/list", status=200) == 1

    hub.revoke_tokens()
    hub.clear_counts()
    referrers = http.get(f"{mirror.url}/v2/{name}/referrers/{built[0].digest}")
    # docker-registry has no referrers API: its 404, asked with a new token, sends clients to the tag schema.
    assert referrers.status_code == 404 and referrers.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert [(r.scopes, r.granted) for r in hub.token_requests()] == [((scope(name),), True)]
    assert hub.count("GET", f"/v2/{name}/referrers/", status=401) == 1
    assert hub.count("GET", f"/v2/{name}/referrers/", status=404) == 1

    # The new token is cached again: no further token request, no further 401.
    hub.clear_counts()
    pull(http, mirror, name, "6", built[5])
    assert hub.token_requests() == [] and hub.count(None, "", status=401) == 0
    assert not hub.cdn_saw_authorization
    assert_store_sound(mirror.data_dir, set(built[0].blobs) | set(built[5].blobs) | {layer})


def test_concurrent_requests_refused_together_share_one_new_token(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    repo: tuple[str, list[Image]],
) -> None:
    name, built = repo
    hub = hub_factory(token_ttl=TOKEN_TTL)
    mirror = mirror_factory(hub.url, env=ENV)
    with httpx.Client(timeout=30.0, trust_env=False) as http:
        pull(http, mirror, name, "1", built[0])
    hub.revoke_tokens()
    hub.clear_counts()
    def get(tag: int) -> httpx.Response:
        with httpx.Client(timeout=30.0, trust_env=False) as http:
            return http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT)

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(get, range(2, 7)))
    assert [(a.status_code, a.content) for a in answers] == [(200, image.manifest) for image in built[1:]]
    assert len(hub.token_requests()) == 1


def test_skopeo_copies_through_the_mirror_after_the_registry_refuses_its_token(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    repo: tuple[str, list[Image]], skopeo: str, http: httpx.Client, tmp_path: Path,
) -> None:
    name, built = repo
    hub = hub_factory(token_ttl=TOKEN_TTL)
    mirror = mirror_factory(hub.url, env=ENV)
    pull(http, mirror, name, "1", built[0])
    hub.revoke_tokens()
    hub.clear_counts()
    layout = tmp_path / "copied"
    done = subprocess.run([skopeo, "copy", "--src-tls-verify=false", "--preserve-digests",
                           f"docker://{mirror.address}/{name}:2", f"oci:{layout}:copied"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    index = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [built[1].digest]
    for digest in built[1].blobs:
        assert file_digest(layout / "blobs" / "sha256" / digest.removeprefix("sha256:")) == digest
    assert len(hub.token_requests()) == 1
    assert_store_sound(mirror.data_dir, set(built[0].blobs) | set(built[1].blobs))


def test_a_fresh_token_refused_anonymously_means_the_repository_does_not_exist(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    repo: tuple[str, list[Image]], http: httpx.Client,
) -> None:
    name, built = repo
    hub = hub_factory(token_ttl=TOKEN_TTL)
    mirror = mirror_factory(hub.url, env=ENV)
    pull(http, mirror, name, "1", built[0])
    hub.hidden.add(name)  # gone upstream: new tokens carry no access to it (insufficient_scope)
    hub.revoke_tokens()
    hub.clear_counts()
    missing = http.get(f"{mirror.url}/v2/{name}/manifests/2", headers=ACCEPT)
    assert (missing.status_code, api_error(missing)["code"]) == (404, "NAME_UNKNOWN")
    assert len(hub.token_requests()) == 1  # one new token, one retry, no loop
    assert hub.count(None, "", status=401) == 2
    cached = http.get(f"{mirror.url}/v2/{name}/manifests/{built[0].digest}", headers=ACCEPT)
    assert (cached.status_code, cached.content) == (200, built[0].manifest)
    assert_store_sound(mirror.data_dir, set(built[0].blobs))


def test_credentials_refused_when_the_token_is_renewed_name_the_settings(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    repo: tuple[str, list[Image]], http: httpx.Client,
) -> None:
    name, built = repo
    hub = hub_factory(token_ttl=TOKEN_TTL, username="alice", password="s3cret-Pa55")
    mirror = mirror_factory(hub.url, env={**ENV, "MIRROR_UPSTREAM_USERNAME": "alice",
                                          "MIRROR_UPSTREAM_PASSWORD": "s3cret-Pa55"})
    pull(http, mirror, name, "1", built[0])
    hub.password = "rotated-Pa55"  # the account's password changed: old tokens go, new ones are refused
    hub.revoke_tokens()
    hub.clear_counts()
    refused = http.get(f"{mirror.url}/v2/{name}/manifests/2", headers=ACCEPT)
    error = api_error(refused)
    assert (refused.status_code, error["code"]) == (503, "UNAVAILABLE")
    assert "upstream.username and upstream.password" in str(error["detail"])
    assert [(r.user, r.granted) for r in hub.token_requests()] == [("alice", False)]
    assert_store_sound(mirror.data_dir, set(built[0].blobs))
