"""The /v2/ read API through a real mirror in front of a real docker-registry.

Every test counts what the upstream served (from its access log) to prove what
came from the store and what did not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support import client
from tests.support.asgi import ThreadedServer
from tests.support.catalog import StandardImages
from tests.support.faults import FaultProxy
from tests.support.hub import HubEmulator
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    build_image,
    random_layer,
    sha256_digest as sha256,
)
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.waiting import wait_for

LIBRARY = {"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"}
ALL_TYPES = ", ".join(MANIFEST_MEDIA_TYPES)
MIB = 1024 * 1024


def manifests_path(name: str, reference: str = "") -> re.Pattern[str]:
    return re.compile(rf"^/v2/{re.escape(name)}/manifests/{re.escape(reference)}")


def blob_path(name: str, digest: str) -> re.Pattern[str]:
    return re.compile(rf"^/v2/{re.escape(name)}/blobs/{re.escape(digest)}$")


def error_code(answer: httpx.Response) -> str:
    """The first error code of a spec-format error body (fails on anything else)."""
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    errors = answer.json()["errors"]
    assert errors and all({"code", "message"} <= set(e) for e in errors), errors
    return str(errors[0]["code"])


def files_under(root: Path) -> dict[str, float]:
    """Every file under *root* with its mtime."""
    return {os.fspath(p): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def stored_blobs(data_dir: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (data_dir / "blobs" / "sha256").glob("*/*")}


# /v2/ ------------------------------------------------------------------------------


def test_base_endpoint_answers_with_the_api_version(mirror: MirrorServer, http: httpx.Client) -> None:
    for path in ("/v2/", "/v2"):
        answer = http.get(mirror.url + path)
        assert answer.status_code == 200
        assert answer.json() == {}
        assert answer.headers["docker-distribution-api-version"] == "registry/2.0"
    assert http.head(mirror.url + "/v2/").status_code == 200


# Manifests ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["small", "multi", "dlist"])
def test_manifest_is_served_byte_exact_then_from_the_store(
    which: str, images: StandardImages, upstream: UpstreamRegistry, mirror: MirrorServer, http: httpx.Client
) -> None:
    name, tag, item = images.refs[which]
    upstream.clear_counts()
    first = http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers={"accept": ALL_TYPES})
    assert first.status_code == 200, first.text
    assert first.content == item.manifest
    assert first.headers["content-type"] == item.media_type
    assert first.headers["docker-content-digest"] == item.digest == sha256(first.content)
    assert first.headers["content-length"] == str(len(item.manifest))
    assert first.headers["etag"] == f'"{item.digest}"'
    assert first.headers["x-mirror-cache"] == "MISS"

    again = http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers={"accept": ALL_TYPES})
    by_digest = http.get(f"{mirror.url}/v2/{name}/manifests/{item.digest}", headers={"accept": ALL_TYPES})
    head = http.head(f"{mirror.url}/v2/{name}/manifests/{tag}", headers={"accept": ALL_TYPES})
    for answer in (again, by_digest):
        assert answer.status_code == 200
        assert answer.content == item.manifest
        assert answer.headers["x-mirror-cache"] == "HIT"
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(item.manifest))
    assert head.headers["docker-content-digest"] == item.digest
    assert head.headers["content-type"] == item.media_type

    # One upstream GET in all; the digest was never asked for upstream.
    assert upstream.count(None, manifests_path(name)) == 1
    assert upstream.count("GET", manifests_path(name, tag)) == 1

    not_modified = http.get(f"{mirror.url}/v2/{name}/manifests/{tag}",
                            headers={"accept": ALL_TYPES, "if-none-match": f'"{item.digest}"'})
    assert not_modified.status_code == 304 and not_modified.content == b""

    # Later GETs and HEADs by digest are answered from memory: the same bytes and headers as the first.
    remembered = http.get(f"{mirror.url}/v2/{name}/manifests/{item.digest}", headers={"accept": ALL_TYPES})
    remembered_head = http.head(f"{mirror.url}/v2/{name}/manifests/{item.digest}")
    assert remembered.status_code == remembered_head.status_code == 200
    assert remembered.content == item.manifest and remembered_head.content == b""
    for answer in (remembered, remembered_head):
        assert same_headers(answer, by_digest), (answer.headers, by_digest.headers)
        assert answer.headers["x-request-id"] != by_digest.headers["x-request-id"]
    by_digest_not_modified = http.get(f"{mirror.url}/v2/{name}/manifests/{item.digest}",
                                      headers={"if-none-match": f'"{item.digest}"'})
    assert by_digest_not_modified.status_code == 304
    assert upstream.count(None, manifests_path(name)) == 1


def same_headers(answer: httpx.Response, reference: httpx.Response) -> bool:
    """The headers a registry client reads are equal (request ids and dates aside)."""
    keys = ("content-type", "content-length", "docker-content-digest", "etag", "x-mirror-cache",
            "docker-distribution-api-version", "x-content-type-options")
    return all(answer.headers.get(key) == reference.headers.get(key) is not None for key in keys)


def test_children_of_an_index_are_served_by_digest(
    images: StandardImages, upstream: UpstreamRegistry, mirror: MirrorServer, http: httpx.Client
) -> None:
    name, tag, index = images.refs["multi"]
    assert http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers={"accept": ALL_TYPES}).status_code == 200
    upstream.clear_counts()
    for child in index.children:
        first = http.get(f"{mirror.url}/v2/{name}/manifests/{child.digest}", headers={"accept": ALL_TYPES})
        assert first.status_code == 200
        assert first.content == child.manifest
        assert first.headers["content-type"] == OCI_MANIFEST
        assert first.headers["x-mirror-cache"] == "MISS"
        again = http.get(f"{mirror.url}/v2/{name}/manifests/{child.digest}", headers={"accept": ALL_TYPES})
        assert again.headers["x-mirror-cache"] == "HIT" and again.content == child.manifest
    assert upstream.count("GET", manifests_path(name)) == len(index.children)


def test_a_client_that_cannot_read_indexes_gets_the_amd64_image(
    images: StandardImages, mirror: MirrorServer, http: httpx.Client
) -> None:
    for which, accept, child_type in (("multi", OCI_MANIFEST, OCI_MANIFEST),
                                      ("dlist", DOCKER_MANIFEST, DOCKER_MANIFEST)):
        name, tag, index = images.refs[which]
        amd64 = index.child("amd64")
        answer = http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers={"accept": accept})
        assert answer.status_code == 200, answer.text
        assert answer.content == amd64.manifest
        assert answer.headers["content-type"] == child_type
        assert answer.headers["docker-content-digest"] == amd64.digest
        # The same tag with the index type accepted gives the index itself.
        full = http.get(f"{mirror.url}/v2/{name}/manifests/{tag}",
                        headers={"accept": f"{accept}, {OCI_INDEX}, {DOCKER_LIST}"})
        assert full.content == index.manifest and full.headers["content-type"] == index.media_type
    # A client that takes neither the index nor its linux/amd64 manifest's type gets neither (as from
    # distribution, "OCI index found, but accept header does not support OCI indexes"), not a
    # manifest it cannot read.
    schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    for which, accept in (("multi", DOCKER_MANIFEST), ("multi", schema1), ("dlist", OCI_MANIFEST)):
        name, tag, index = images.refs[which]
        head = http.head(f"{mirror.url}/v2/{name}/manifests/{tag}", headers={"accept": accept})
        assert head.status_code == 404, (which, accept, head.headers)
        refused = http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers={"accept": accept})
        assert refused.status_code == 404 and error_code(refused) == "MANIFEST_UNKNOWN", refused.text
        assert "does not take" in refused.json()["errors"][0]["detail"], refused.text


def test_one_component_names_map_to_the_library_namespace(
    images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    mirror = mirror_factory(env=LIBRARY)
    short = http.get(f"{mirror.url}/v2/small/manifests/1", headers={"accept": ALL_TYPES})
    assert short.status_code == 200 and short.content == images.small.manifest
    full = http.get(f"{mirror.url}/v2/library/small/manifests/1", headers={"accept": ALL_TYPES})
    assert full.headers["x-mirror-cache"] == "HIT" and full.content == images.small.manifest
    layer = images.small.layers[-1]
    digest, size = client.fetch_blob_digest(mirror.url, "small", layer.digest, client=http)
    assert (digest, size) == (layer.digest, layer.size)


def test_names_of_any_depth(
    tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    own = upstream_factory()
    image = build_image(tmp_path / "deep", [random_layer(tmp_path / "deep", 4096, seed=7)])
    own.push_image("team/sub/app", "v1", image)
    mirror = mirror_factory(own.url)
    answer = http.get(f"{mirror.url}/v2/team/sub/app/manifests/v1", headers={"accept": ALL_TYPES})
    assert answer.status_code == 200 and answer.content == image.manifest
    digest, _ = client.fetch_blob_digest(mirror.url, "team/sub/app", image.layers[0].digest, client=http)
    assert digest == image.layers[0].digest
    tags = http.get(f"{mirror.url}/v2/team/sub/app/tags/list")
    assert tags.json() == {"name": "team/sub/app", "tags": ["v1"]}


# Tags: TTL and revalidation -----------------------------------------------------------


def test_an_expired_tag_is_revalidated_with_head_and_refetched_only_when_it_moved(
    tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    own = upstream_factory()
    first = build_image(tmp_path / "a", [random_layer(tmp_path / "a", 4096, seed=1)])
    second = build_image(tmp_path / "b", [random_layer(tmp_path / "b", 4096, seed=2)])
    own.push_image("library/app", "latest", first)
    mirror = mirror_factory(own.url, env={"MIRROR_CACHE_TAG_TTL": "1s"})
    url = f"{mirror.url}/v2/library/app/manifests/latest"

    assert http.get(url, headers={"accept": ALL_TYPES}).content == first.manifest
    own.clear_counts()
    fresh = http.get(url, headers={"accept": ALL_TYPES})
    assert fresh.headers["x-mirror-cache"] == "HIT"
    assert own.count(None, manifests_path("library/app")) == 0  # within the TTL: no upstream request

    time.sleep(1.2)
    revalidated = http.get(url, headers={"accept": ALL_TYPES})
    assert revalidated.headers["x-mirror-cache"] == "HIT" and revalidated.content == first.manifest
    assert own.count("HEAD", manifests_path("library/app", "latest")) == 1
    assert own.count("GET", manifests_path("library/app")) == 0

    own.push_image("library/app", "latest", second)
    own.clear_counts()
    time.sleep(1.2)
    moved = http.get(url, headers={"accept": ALL_TYPES})
    assert moved.headers["x-mirror-cache"] == "MISS"
    assert moved.content == second.manifest
    assert moved.headers["docker-content-digest"] == second.digest
    assert own.count("GET", manifests_path("library/app", "latest")) == 1
    # The old digest stays readable: digests are immutable.
    old = http.get(f"{mirror.url}/v2/library/app/manifests/{first.digest}", headers={"accept": ALL_TYPES})
    assert old.headers["x-mirror-cache"] == "HIT" and old.content == first.manifest


def test_tags_list_comes_from_upstream_and_pages(
    tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    own = upstream_factory()
    image = build_image(tmp_path / "t", [random_layer(tmp_path / "t", 1024, seed=3)])
    for tag in ("a", "b", "c"):
        own.push_image("library/tagged", tag, image)
    mirror = mirror_factory(own.url)
    answer = http.get(f"{mirror.url}/v2/library/tagged/tags/list")
    assert answer.status_code == 200 and answer.headers["x-mirror-cache"] == "MISS"
    assert answer.json() == {"name": "library/tagged", "tags": ["a", "b", "c"]}
    page = http.get(f"{mirror.url}/v2/library/tagged/tags/list", params={"n": 2})
    assert page.json()["tags"] == ["a", "b"]
    assert 'rel="next"' in page.headers["link"] and "last=b" in page.headers["link"]
    rest = http.get(f"{mirror.url}/v2/library/tagged/tags/list", params={"n": 2, "last": "b"})
    assert rest.json()["tags"] == ["c"]
    missing = http.get(f"{mirror.url}/v2/library/nothing-here/tags/list")
    assert missing.status_code == 404 and error_code(missing) == "NAME_UNKNOWN"


# Blobs -------------------------------------------------------------------------------


def test_blob_is_streamed_once_from_upstream_then_served_from_the_store(
    images: StandardImages, upstream: UpstreamRegistry, mirror: MirrorServer, http: httpx.Client
) -> None:
    name = "library/big"
    layer = images.big.layers[1]  # 8 MiB
    upstream.clear_counts()
    url = f"{mirror.url}/v2/{name}/blobs/{layer.digest}"
    # Before anything of the repository was pulled, a HEAD is a pusher's question: answered here.
    unseen = http.head(url)
    assert unseen.status_code == 404
    assert upstream.count(None, re.compile("^/v2/library/big/")) == 0
    assert http.get(f"{mirror.url}/v2/{name}/manifests/1", headers={"accept": ALL_TYPES}).status_code == 200
    head = http.head(url)
    assert head.status_code == 200 and head.headers["x-mirror-cache"] == "MISS"
    assert head.headers["content-length"] == str(layer.size)
    assert head.headers["docker-content-digest"] == layer.digest

    for expected in ("MISS", "HIT", "HIT"):
        answer = http.get(url)
        assert answer.status_code == 200
        assert answer.headers["x-mirror-cache"] == expected
        assert answer.headers["content-length"] == str(layer.size)
        assert answer.headers["docker-content-digest"] == layer.digest
        assert answer.headers["accept-ranges"] == "bytes"
        assert sha256(answer.content) == layer.digest
    assert upstream.count("GET", blob_path(name, layer.digest)) == 1
    assert upstream.bytes_served(blob_path(name, layer.digest)) == layer.size
    assert layer.digest in stored_blobs(mirror.data_dir)
    stored = http.head(url)
    assert stored.headers["x-mirror-cache"] == "HIT" and stored.headers["content-length"] == str(layer.size)


@pytest.mark.parametrize("push", ["disabled", "prefixes"])
def test_a_blob_head_where_nothing_was_pulled_yet_is_answered_as_a_get_would_be(
    push: str, images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client
) -> None:
    """distribution-spec, "Checking if content exists in the registry": HEAD on a blob is 200 with
    ``Content-Length`` (and ``Docker-Content-Digest``) when the registry can serve it, as a GET
    would, else 404.  A pull-through registry asks the upstream with a HEAD and fetches nothing.
    Names this registry takes pushes for never reach the upstream this way (see the
    ``pushable`` case of ``PullThrough.blob_head``)."""
    env = {"MIRROR_PUSH_ENABLED": "false"} if push == "disabled" else {"MIRROR_PUSH_PREFIXES": "team"}
    mirror = mirror_factory(env={**LIBRARY, **env})
    layer = images.big.layers[0]
    upstream.clear_counts()
    url = f"{mirror.url}/v2/library/big/blobs/{layer.digest}"
    head = http.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(layer.size)
    assert head.headers["docker-content-digest"] == layer.digest
    assert head.headers["x-mirror-cache"] == "MISS"
    assert upstream.count("HEAD", blob_path("library/big", layer.digest)) == 1
    assert upstream.count("GET", re.compile("/blobs/")) == 0
    assert layer.digest not in stored_blobs(mirror.data_dir)
    for path in (f"library/big/blobs/{sha256(b'not there')}", f"library/multi/blobs/{layer.digest}"):
        absent = http.head(f"{mirror.url}/v2/{path}")
        assert absent.status_code == 404 and absent.content == b"", path
    if push == "prefixes":  # a name pushes go to: answered here, never asked upstream
        upstream.clear_counts()
        private = http.head(f"{mirror.url}/v2/team/app/blobs/{layer.digest}")
        assert private.status_code == 404
        assert upstream.requests() == []
    got = http.get(url)
    assert got.status_code == 200 and sha256(got.content) == layer.digest
    assert http.head(url).headers["x-mirror-cache"] == "HIT"


FOREIGN_LAYER_TYPES = {  # manifest type: (config type, non-distributable layer type)
    DOCKER_MANIFEST: ("application/vnd.docker.container.image.v1+json",
                      "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
    OCI_MANIFEST: ("application/vnd.oci.image.config.v1+json",
                   "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
}


def layer_host(blobs: dict[str, bytes], seen: list[tuple[str, str, str | None]]) -> ThreadedServer:
    """A web server that is no registry, serving blobs at any path ending in their digest (as a
    layer's ``urls`` name them); it records (method, path, Authorization) of each request."""

    async def serve(request: Request) -> Response:
        seen.append((request.method, request.url.path, request.headers.get("authorization")))
        body = blobs.get(request.url.path.rpartition("/")[2])
        if body is None:
            return Response(status_code=404)
        return Response(body if request.method == "GET" else None, media_type="application/octet-stream",
                        headers={"Content-Length": str(len(body))})

    return ThreadedServer(Starlette(routes=[Route("/{path:path}", serve, methods=["GET", "HEAD"])]),
                          name="layer-host")


def named(host: ThreadedServer) -> str:
    """*host*'s URL by name (``localhost``) rather than by address."""
    return f"http://localhost:{host.port}"


def push_with_foreign_layer(registry_url: str, name: str, tag: str, media_type: str, url: Callable[[str], str],
                            tmp_path: Path) -> tuple[bytes, bytes, bytes]:
    """Push an image whose first layer is non-distributable (not pushed; ``urls``: [url(digest)]);
    return (manifest, regular layer, foreign layer)."""
    config_type, foreign_type = FOREIGN_LAYER_TYPES[media_type]
    config, layer, foreign = f'{{"os":"windows","tag":"{tag}"}}'.encode(), os.urandom(2000), os.urandom(300_000)
    with client.session() as upstream_http:
        for blob in (config, layer):
            path = tmp_path / sha256(blob).replace(":", "-")
            path.write_bytes(blob)
            client.push_blob(upstream_http, registry_url, name, sha256(blob), path)
        body = json.dumps({
            "schemaVersion": 2, "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": foreign_type, "digest": sha256(foreign), "size": len(foreign),
                        "urls": [url(sha256(foreign))]},
                       {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer),
                        "size": len(layer)}],
        }).encode()
        client.put_manifest(upstream_http, registry_url, name, tag, media_type, body)
    return body, layer, foreign


class UrlsAllowingRegistry(UpstreamRegistry):
    """docker-registry that takes manifests whose layers have ``urls`` (refused unless allowed)."""

    def config(self) -> dict[str, Any]:
        return {**super().config(), "validation": {"manifests": {"urls": {"allow": ["^https?://"]}}}}


@pytest.fixture
def urls_upstream(tmp_path: Path) -> Iterator[UpstreamRegistry]:
    registry = UrlsAllowingRegistry(tmp_path / "urls-upstream")
    try:
        yield registry.start()
    finally:
        registry.stop()


@pytest.mark.parametrize("mode", ["skip", "fetch"])
def test_non_distributable_layers_are_fetched_from_their_urls_only_when_configured(
    mode: str, urls_upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
    tmp_path: Path
) -> None:
    """image-spec, "Non-distributable layers": such a layer is downloaded from its descriptor's
    ``urls``, and the registry need not have it.  Pulled through, the manifest is served as the
    upstream has it; the layer is fetched (verified, then stored) from its urls only with
    ``upstream.foreign_layers: fetch``, else left to the client (containerd fetches the urls; dockerd
    on Linux asks the registry and gets a BLOB_UNKNOWN that says so)."""
    upstream = urls_upstream
    seen: list[tuple[str, str, str | None]] = []
    blobs: dict[str, bytes] = {}
    with layer_host(blobs, seen) as host:
        # Its layers' host is on loopback, as every test server is: a host the default refuses.
        mirror = mirror_factory(upstream.url, env={"MIRROR_UPSTREAM_FOREIGN_LAYERS": mode,
                                                   "MIRROR_UPSTREAM_FOREIGN_LAYERS_PRIVATE": "true"})
        for n, media_type in enumerate(FOREIGN_LAYER_TYPES):
            tag = f"{mode}-{n}"
            body, layer, foreign = push_with_foreign_layer(upstream.url, "team/win", tag, media_type,
                                                           lambda digest: f"{named(host)}/layers/{digest}", tmp_path)
            blobs[sha256(foreign)] = foreign
            upstream.clear_counts()
            for reference in (tag, sha256(body)):
                got = http.get(f"{mirror.url}/v2/team/win/manifests/{reference}", headers={"accept": ALL_TYPES})
                assert got.status_code == 200 and got.content == body, (media_type, reference)
            regular = http.get(f"{mirror.url}/v2/team/win/blobs/{sha256(layer)}")
            assert regular.status_code == 200 and regular.content == layer

            url = f"{mirror.url}/v2/team/win/blobs/{sha256(foreign)}"
            path = f"/layers/{sha256(foreign)}"
            seen.clear()
            if mode == "skip":
                head, got = http.head(url), http.get(url)
                assert head.status_code == 404 and got.status_code == 404 and error_code(got) == "BLOB_UNKNOWN"
                # dockerd on Linux asks the registry, not the urls: the error says what would serve it.
                error = got.json()["errors"][0]
                assert "upstream.foreign_layers: fetch" in error["message"]
                assert error["detail"] == {"digest": sha256(foreign), "urls": [f"{named(host)}{path}"]}
                assert seen == []
                assert sha256(foreign) not in stored_blobs(mirror.data_dir)
                continue
            head = http.head(url)
            assert head.status_code == 200 and head.headers["content-length"] == str(len(foreign))
            assert head.headers["docker-content-digest"] == sha256(foreign)
            assert seen == [("HEAD", path, None)]
            for expected in ("MISS", "HIT"):
                got = http.get(url)
                assert got.status_code == 200 and got.content == foreign
                assert got.headers["x-mirror-cache"] == expected
                assert got.headers["docker-content-digest"] == sha256(foreign)
            assert seen == [("HEAD", path, None), ("GET", path, None)]
            assert upstream.count(None, re.compile(f"/blobs/{sha256(foreign)}")) == 0
            assert sha256(foreign) in stored_blobs(mirror.data_dir)


def test_non_distributable_layers_are_fetched_without_the_upstream_credentials(
    urls_upstream: UpstreamRegistry, hub_factory: Callable[..., HubEmulator],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    """A layer's urls often name another registry's blob path (Windows base layers name
    mcr.microsoft.com/v2/.../blobs/...): the upstream's token or password must not go there."""
    hub = hub_factory(urls_upstream.url, username="mirror-user", password="s3cret-pass")
    seen: list[tuple[str, str, str | None]] = []
    blobs: dict[str, bytes] = {}
    with layer_host(blobs, seen) as host:
        body, _, foreign = push_with_foreign_layer(
            urls_upstream.url, "team/win", "1", OCI_MANIFEST,
            lambda digest: f"{host.url}/v2/team/win/blobs/{digest}", tmp_path)
        blobs[sha256(foreign)] = foreign
        mirror = mirror_factory(hub.url, env={
            "MIRROR_UPSTREAM_FOREIGN_LAYERS": "fetch", "MIRROR_UPSTREAM_FOREIGN_LAYERS_PRIVATE": "true",
            "MIRROR_UPSTREAM_USERNAME": "mirror-user",
            "MIRROR_UPSTREAM_PASSWORD": "s3cret-pass"})
        got = http.get(f"{mirror.url}/v2/team/win/manifests/1", headers={"accept": ALL_TYPES})
        assert got.status_code == 200 and got.content == body
        assert hub.tokens_issued, "the upstream was reached with a token"
        layer = http.get(f"{mirror.url}/v2/team/win/blobs/{sha256(foreign)}")
        assert layer.status_code == 200 and layer.content == foreign
    assert [(method, authorization) for method, _, authorization in seen] == [("GET", None)]


def test_blob_ranges(images: StandardImages, mirror: MirrorServer, http: httpx.Client) -> None:
    layer = images.big.layers[0]  # 1 MiB
    data = layer.path.read_bytes()
    url = f"{mirror.url}/v2/library/big/blobs/{layer.digest}"
    assert http.get(url).status_code == 200
    size = len(data)
    for header, start, end in (("bytes=0-99", 0, 99), ("bytes=1000-", 1000, size - 1),
                               ("bytes=-10", size - 10, size - 1), ("bytes=5-5", 5, 5),
                               (f"bytes=10-{size * 2}", 10, size - 1)):
        part = http.get(url, headers={"range": header})
        assert part.status_code == 206, header
        assert part.content == data[start:end + 1], header
        assert part.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert part.headers["content-length"] == str(end - start + 1)
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=9-1", "bytes=abc", "bytes=-0"):
        bad = http.get(url, headers={"range": header})
        assert bad.status_code == 416, header
        assert bad.headers["content-range"] == f"bytes */{size}"
        assert error_code(bad) == "RANGE_INVALID"
    # RFC 9110 14.2: a set of several ranges, or another unit, is ignored: the whole blob, 200.
    for header in ("bytes=0-9,20-29", f"bytes=0-9, {size}-", "items=0-9"):
        whole = http.get(url, headers={"range": header})
        assert whole.status_code == 200 and whole.content == data, header
        assert "content-range" not in whole.headers, header
    several_beyond = http.get(url, headers={"range": f"bytes={size}-,{size + 5}-"})
    assert several_beyond.status_code == 416 and error_code(several_beyond) == "RANGE_INVALID"


def test_blobs_are_not_shared_across_repositories_without_upstream_consent(
    images: StandardImages, upstream: UpstreamRegistry, mirror: MirrorServer, http: httpx.Client
) -> None:
    layer = images.small.layers[-1]
    digest, _ = client.fetch_blob_digest(mirror.url, "library/small", layer.digest, client=http)
    assert digest == layer.digest
    # library/multi does not hold this blob upstream, so the mirror must not serve it from its store.
    other = http.get(f"{mirror.url}/v2/library/multi/blobs/{layer.digest}")
    assert other.status_code == 404 and error_code(other) == "BLOB_UNKNOWN"


def test_a_fetch_in_progress_is_not_shared_with_a_repository_the_upstream_does_not_hold_it_in(
    images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """Joining another repository's fill asks the upstream first, as serving a stored blob does."""
    mirror = mirror_factory(fault_proxy.url)
    layer = images.small.layers[-1]  # 1 MiB, in library/small only
    # About 3 s to fill: the second request comes while the first one's fetch is running.
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1,
                    chunk_size=layer.size // 30, delay=0.1)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.fetch_blob_digest, mirror.url, "library/small", layer.digest)
        wait_for(lambda: fault_proxy.count("GET", f"/blobs/{layer.digest}") == 1, 10.0, "the fetch")
        time.sleep(0.3)  # the fill has started and published its size
        other = http.get(f"{mirror.url}/v2/library/multi/blobs/{layer.digest}")
        assert not first.done(), "the fill ended before the second request: the test proves nothing"
        assert other.status_code == 404 and error_code(other) == "BLOB_UNKNOWN"
        assert first.result(timeout=60) == (layer.digest, layer.size)
    # The repository it was fetched for joins and serves it without asking again.
    same = http.get(f"{mirror.url}/v2/library/small/blobs/{layer.digest}")
    assert same.status_code == 200 and hashlib.sha256(same.content).hexdigest() == layer.digest.split(":")[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_cold_clients_share_one_upstream_fetch(
    workers: int, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    mirror = mirror_factory(workers=workers)
    layer = images.big.layers[2]  # 64 MiB
    assert layer.size >= 64 * MIB
    upstream.clear_counts()

    def pull(_: int) -> tuple[str, int, str]:
        with httpx.Client(timeout=120.0, trust_env=False) as http, \
                http.stream("GET", f"{mirror.url}/v2/library/big/blobs/{layer.digest}") as answer:
            assert answer.status_code == 200
            hasher, size = hashlib.sha256(), 0
            for chunk in answer.iter_bytes(MIB):
                hasher.update(chunk)
                size += len(chunk)
            return "sha256:" + hasher.hexdigest(), size, answer.headers["x-mirror-cache"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(pull, range(8)))
    assert {(digest, size) for digest, size, _ in results} == {(layer.digest, layer.size)}
    outcomes = [outcome for _, _, outcome in results]
    assert set(outcomes) <= {"MISS", "COALESCED", "HIT"} and "MISS" in outcomes
    assert upstream.count("GET", blob_path("library/big", layer.digest)) == 1
    assert upstream.bytes_served(blob_path("library/big", layer.digest)) == layer.size
    assert not list((mirror.data_dir / "tmp").glob("*.partial"))
    if workers == 1:  # the fill linked the blob to its repository: the clients joining it asked nothing
        assert upstream.count("HEAD", blob_path("library/big", layer.digest)) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_cold_clients_of_a_manifest_share_one_upstream_get_across_workers(
    workers: int, images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """Each manifest GET counts against Docker Hub's pull limit: N workers must not make it N (before,
    each worker process fetched the same cold manifest)."""
    child = images.multi.children[0]
    with FaultProxy(upstream.url) as proxy:
        mirror = mirror_factory(proxy.url, workers=workers, env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"})
        proxy.add("late", "/manifests/", method="GET", delay=1.5)
        for name, reference, expected in [("library/small", "1", images.small.manifest),
                                          ("library/multi", child.digest, child.manifest)]:
            url = f"{mirror.url}/v2/{name}/manifests/{reference}"

            def get(_: int, url: str = url) -> tuple[int, bytes]:
                answer = httpx.get(url, headers={"accept": ALL_TYPES}, trust_env=False, timeout=60.0)
                return answer.status_code, answer.content

            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(get, range(12)))
            assert set(answers) == {(200, expected)}
            assert proxy.count("GET", f"/v2/{name}/manifests/") == 1, (name, proxy.count("GET", "/manifests/"))


# Upstream down -----------------------------------------------------------------------


def pull_everything(http: httpx.Client, base: str, name: str, image: Image) -> None:
    assert http.get(f"{base}/v2/{name}/manifests/1", headers={"accept": ALL_TYPES}).status_code == 200
    for digest in (image.config_digest, *(layer.digest for layer in image.layers)):
        assert client.fetch_blob_digest(base, name, digest, client=http)[0] == digest


def test_cached_content_is_served_while_the_upstream_is_down_and_across_restarts(
    tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    own = upstream_factory()
    image = build_image(tmp_path / "img", [random_layer(tmp_path / "img", 2 * MIB, seed=9)])
    other = build_image(tmp_path / "other", [random_layer(tmp_path / "other", 4096, seed=10)])
    own.push_image("library/app", "1", image)
    own.push_image("library/app", "2", other)
    mirror = mirror_factory(own.url, env={"MIRROR_CACHE_TAG_TTL": "0s", "MIRROR_UPSTREAM_RETRIES": "1",
                                          "MIRROR_UPSTREAM_CONNECT_TIMEOUT": "1s"})
    pull_everything(http, mirror.url, "library/app", image)
    own.stop()

    def check_served() -> None:
        by_tag = http.get(f"{mirror.url}/v2/library/app/manifests/1", headers={"accept": ALL_TYPES})
        assert by_tag.status_code == 200 and by_tag.content == image.manifest
        assert by_tag.headers["x-mirror-cache"] == "STALE"
        by_digest = http.get(f"{mirror.url}/v2/library/app/manifests/{image.digest}",
                             headers={"accept": ALL_TYPES})
        assert by_digest.headers["x-mirror-cache"] == "HIT" and by_digest.content == image.manifest
        for digest in (image.config_digest, image.layers[0].digest):
            blob = http.get(f"{mirror.url}/v2/library/app/blobs/{digest}")
            assert blob.status_code == 200 and sha256(blob.content) == digest
        tags = http.get(f"{mirror.url}/v2/library/app/tags/list")
        assert tags.status_code == 200 and tags.json() == {"name": "library/app", "tags": ["1"]}
        started = time.monotonic()
        unknown = http.get(f"{mirror.url}/v2/library/app/manifests/2", headers={"accept": ALL_TYPES})
        assert unknown.status_code == 503 and error_code(unknown) == "UNAVAILABLE"
        blob = http.get(f"{mirror.url}/v2/library/app/blobs/{other.layers[0].digest}")
        assert blob.status_code == 503 and error_code(blob) == "UNAVAILABLE"
        # Stored, but for another repository: not served without the upstream's word, and said so.
        elsewhere = http.get(f"{mirror.url}/v2/library/elsewhere/blobs/{image.layers[0].digest}")
        assert elsewhere.status_code == 503 and error_code(elsewhere) == "UNAVAILABLE"
        assert "cached for other repositories only" in elsewhere.json()["errors"][0]["message"], elsewhere.text
        assert time.monotonic() - started < 10

    check_served()
    mirror.restart()  # start-up must not need the upstream
    check_served()


# Bad input ---------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, str, dict[str, str], int, str]] = [
    ("GET", "/v2/UPPER/manifests/1", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/a..b/manifests/1", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/-lead/manifests/1", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/a//b/manifests/1", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/..%2f..%2fetc/manifests/1", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/a/%2e%2e/b/blobs/sha256:" + "0" * 64, {}, 400, "NAME_INVALID"),
    ("GET", "/v2/" + "a/" * 200 + "x/manifests/1", {}, 400, "NAME_INVALID"),
    # A reference that is no valid tag names no manifest: unknown to a read (a PUT is TAG_INVALID).
    ("GET", "/v2/library/small/manifests/-bad-tag", {}, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/library/small/manifests/" + "t" * 129, {}, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/library/small/manifests/.INVALID_MANIFEST_NAME", {}, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/library/small/manifests/sha256:abc", {}, 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/small/manifests/sha256:" + "Z" * 64, {}, 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/small/blobs/sha256:%2e%2e", {}, 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/small/blobs/sha256:%2e%2e%2f%2e%2e%2fetc%2fpasswd", {}, 404, "NAME_UNKNOWN"),
    ("GET", "/v2/library/small/manifests/%2e%2e%2f%2e%2e%2fetc%2fpasswd", {}, 404, "NAME_UNKNOWN"),
    ("GET", "/v2/library/small/blobs/sha256:" + "0" * 63, {}, 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/small/blobs/not-a-digest", {}, 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/small/blobs/md5:" + "0" * 32, {}, 400, "UNSUPPORTED"),
    ("GET", "/v2/library/small/blobs/sha256:" + "0" * 64, {}, 404, "BLOB_UNKNOWN"),
    ("GET", "/v2/library/small/manifests/no-such-tag", {}, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/library/small/manifests/sha256:" + "0" * 64, {}, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/library/small/tags/list?n=abc", {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/library/small/tags/list?n=-1", {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/library/small/nothing", {}, 404, "NAME_UNKNOWN"),
    ("POST", "/v2/library/small/manifests/1", {}, 405, "UNSUPPORTED"),
    ("PUT", "/v2/library/small/tags/list", {}, 405, "UNSUPPORTED"),
    ("PATCH", "/v2/library/small/blobs/uploads/x", {}, 404, "BLOB_UPLOAD_UNKNOWN"),
    ("PATCH", "/v2/library/small/blobs/uploads/%2e%2e%2f%2e%2e%2fx", {}, 404, "NAME_UNKNOWN"),
]


def test_bad_input_gets_the_right_error_and_touches_nothing(
    images: StandardImages, mirror: MirrorServer, tmp_path: Path, http: httpx.Client
) -> None:
    outside = {path: mtime for path, mtime in files_under(tmp_path).items()
               if not path.startswith(os.fspath(mirror.data_dir)) and not path.endswith(".log")}
    for method, path, headers, status, code in BAD_REQUESTS:
        answer = http.request(method, mirror.url + path, headers=headers)
        assert answer.status_code == status, (method, path, answer.status_code, answer.text)
        if method != "HEAD":
            assert error_code(answer) == code, (method, path, answer.text)
        head = http.head(mirror.url + path) if method == "GET" else None
        if head is not None:
            assert head.status_code == status and head.content == b"", (path, head.status_code)
    after = {path: mtime for path, mtime in files_under(tmp_path).items()
             if not path.startswith(os.fspath(mirror.data_dir)) and not path.endswith(".log")}
    assert after == outside
    assert not Path("/etc/passwd.partial").exists()
    # Still healthy after all of that.
    good = http.get(f"{mirror.url}/v2/library/small/manifests/1", headers={"accept": ALL_TYPES})
    assert good.status_code == 200 and good.content == images.small.manifest


def test_upstream_answers_are_read_a_mebibyte_at_a_time_or_httpcores_way(caplog: pytest.LogCaptureFixture) -> None:
    """httpcore's read size is its own class constant: set where it exists, a warning where it is gone."""
    import httpcore

    from mirror.upstream import reads as httpcore_reads

    assert httpcore_reads.larger_reads() is True
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == httpcore_reads.READ_BYTES == 1 << 20
    saved = httpcore.AsyncHTTP11Connection.READ_NUM_BYTES
    try:
        del httpcore.AsyncHTTP11Connection.READ_NUM_BYTES
        with caplog.at_level("WARNING", logger="mirror.upstream.client"):
            assert httpcore_reads.larger_reads() is False
        assert "READ_NUM_BYTES" in caplog.text and "64 KiB" in caplog.text
    finally:
        httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = saved
