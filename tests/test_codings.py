"""Content codings: upstreams, token servers and CDNs that compress what they answer.

Digests are over the identity bytes.  The mirror asks every server for ``Accept-Encoding:
identity``; a server that codes its answers anyway (a misbehaving CDN or proxy) is decoded
before anything is hashed, stored or served, and the client never sees the upstream's coding.
Each test puts a :class:`~tests.support.codings.Coder` in front of the session's real
docker-registry (or the Hub emulator's three servers), pulls through the mirror, checks
every byte and header the client got, what every upstream request asked for, and that the
store holds only verified content (``DATA/`` walked, ``mirror fsck --verify-content``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.client import push_blob, push_image, put_manifest
from tests.support.codings import CODINGS, Coder, CodingProxy
from tests.support.faults import FaultProxy
from tests.support.hub import HubEmulator
from tests.support.images import MANIFEST_MEDIA_TYPES, OCI_MANIFEST, Image, sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import assert_store_sound

ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}
TTL = 0.5
ENV = {
    "MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true",
    "MIRROR_UPSTREAM_RETRIES": "1",
    "MIRROR_UPSTREAM_READ_TIMEOUT": "10s",
    "MIRROR_CACHE_TAG_TTL": f"{int(TTL * 1000)}ms",
}


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A client that shows the bytes as sent: it offers no coding and decodes none by itself."""
    with httpx.Client(timeout=60.0, trust_env=False, headers={"accept-encoding": "identity"}) as session:
        yield session


# What the client got, what the store holds ------------------------------------------------------------


def get_raw(http: httpx.Client, url: str, method: str = "GET", *,
            headers: dict[str, str] | None = None) -> tuple[httpx.Response, bytes]:
    """An answer and its body exactly as it came over the wire (no decoding)."""
    with http.stream(method, url, headers=headers) as answer:
        body = b"".join(answer.iter_raw())
    return answer, body


def assert_identity(answer: httpx.Response, body: bytes, expected: bytes | None = None, *,
                    digest: str | None = None) -> None:
    """A 200 with identity bytes: no coding, the right length, the right content or digest."""
    assert answer.status_code == 200, (answer.status_code, body[:300])
    assert "content-encoding" not in answer.headers, answer.headers
    if expected is not None:
        assert body == expected
    if digest is not None:
        assert sha256(body) == digest
    if "content-length" in answer.headers and answer.request.method != "HEAD":
        assert int(answer.headers["content-length"]) == len(body)


def pull(http: httpx.Client, mirror: MirrorServer, name: str, image: Image, tag: str | None, *,
         head_blobs: bool = False, coded_heads: bool = False) -> None:
    """Manifest (by tag if given, by digest, and HEAD), then every blob (HEAD first if asked), byte-exact.

    A blob HEAD the upstream answers coded (*coded_heads*) cannot tell the identity size: 502.
    """
    base = f"{mirror.url}/v2/{name}"
    if tag is not None:
        answer, body = get_raw(http, f"{base}/manifests/{tag}", headers=ACCEPT)
        assert_identity(answer, body, image.manifest)
        assert answer.headers["docker-content-digest"] == image.digest
    answer, body = get_raw(http, f"{base}/manifests/{image.digest}", headers=ACCEPT)
    assert_identity(answer, body, image.manifest)
    head, _ = get_raw(http, f"{base}/manifests/{image.digest}", "HEAD", headers=ACCEPT)
    assert_identity(head, b"")
    assert (head.headers["docker-content-digest"], head.headers["content-length"]) == \
        (image.digest, str(len(image.manifest)))
    for digest in image.blobs:
        if head_blobs:  # answered from the upstream's HEAD, before the blob is fetched
            head, _ = get_raw(http, f"{base}/blobs/{digest}", "HEAD")
            if coded_heads:
                assert head.status_code == 502 and "content-encoding" not in head.headers, head.headers
            else:
                assert_identity(head, b"")
                assert (head.headers["x-mirror-cache"], head.headers["content-length"]) == \
                    ("MISS", str(image.blobs[digest].stat().st_size))
        answer, body = get_raw(http, f"{base}/blobs/{digest}")
        assert_identity(answer, body, digest=digest)


def assert_asked_for_identity(coder: Coder, *, coded: bool, server: str | None = None) -> None:
    """Every request said ``Accept-Encoding: identity``; answers were coded (anyway) or not at all."""
    seen = coder.requests(server)
    assert seen, "no request reached the coding server"
    assert {r.accept_encoding for r in seen} == {"identity"}, [(r.path, r.accept_encoding) for r in seen]
    if coded:
        assert all(r.coded for r in seen if r.method == "GET"), [r for r in seen if not r.coded]
    else:
        assert not any(r.coded for r in seen)


# The registry itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("always", [False, True], ids=["when-allowed", "regardless"])
@pytest.mark.parametrize("coding", CODINGS)
def test_manifests_blobs_and_tags_of_a_coding_registry(
    coding: str, always: bool, mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry,
    images: StandardImages, http: httpx.Client,
) -> None:
    coder = Coder(coding, always=always)
    with CodingProxy(upstream.url, coder) as proxy:
        mirror = mirror_factory(proxy.url, env=ENV)
        image = images.small
        pull(http, mirror, "small", image, "1", head_blobs=True, coded_heads=always)
        fetched = time.monotonic()  # the tag was stored before this (its first GET can take a while)
        tags, body = get_raw(http, f"{mirror.url}/v2/small/tags/list")
        assert_identity(tags, body)
        assert json.loads(body) == {"name": "small", "tags": ["1"]}
        # An error answer is read for its spec code, coded or not.
        missing = http.get(f"{mirror.url}/v2/no-such-repository/tags/list")
        assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == "NAME_UNKNOWN", missing.text

        # Past the tag's TTL it is revalidated with a HEAD, coded too, and not fetched again.
        time.sleep(max(fetched + TTL + 0.1 - time.monotonic(), 0))
        again, body = get_raw(http, f"{mirror.url}/v2/small/manifests/1", headers=ACCEPT)
        assert_identity(again, body, image.manifest)
        assert again.headers["x-mirror-cache"] == "HIT"
        for digest in image.blobs:  # from the store now
            answer, body = get_raw(http, f"{mirror.url}/v2/small/blobs/{digest}")
            assert_identity(answer, body, digest=digest)
            assert answer.headers["x-mirror-cache"] == "HIT"
        asked = [(r.method, r.path) for r in coder.requests()]
        assert asked.count(("HEAD", "/v2/library/small/manifests/1")) == 1
        assert asked.count(("GET", "/v2/library/small/manifests/1")) == 1
        for digest in image.blobs:
            assert asked.count(("GET", f"/v2/library/small/blobs/{digest}")) == 1

        assert_asked_for_identity(coder, coded=always)
        assert_store_sound(mirror.data_dir, no_fills_left=True, expected={image.digest, *image.blobs})


def test_referrers_of_a_registry_that_codes_regardless(
    mirror_factory: Callable[..., MirrorServer], images: StandardImages, http: httpx.Client,
) -> None:
    # docker-registry has no referrers API: the upstream is a second mirror, a registry in its own right.
    origin = mirror_factory(env=ENV)
    image = images.small
    push_image(origin.url, "team/app", "v1", image, client=http)
    signature = os.urandom(300)
    push_blob(http, origin.url, "team/app", sha256(b"{}"), _file(origin, b"{}"))
    push_blob(http, origin.url, "team/app", sha256(signature), _file(origin, signature))
    artifact = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha256(signature), "size": 300}],
        "subject": image.descriptor(),
    }).encode()
    put_manifest(http, origin.url, "team/app", sha256(artifact), OCI_MANIFEST, artifact)

    coder = Coder("gzip", always=True)
    with CodingProxy(origin.url, coder) as proxy:
        mirror = mirror_factory(proxy.url, env=ENV)
        pull(http, mirror, "team/app", image, "v1")
        answer, body = get_raw(http, f"{mirror.url}/v2/team/app/referrers/{image.digest}")
        assert_identity(answer, body)
        found = json.loads(body)["manifests"]
        assert [(d["digest"], d["artifactType"]) for d in found] == \
            [(sha256(artifact), "application/vnd.example.sig")]
        tags, body = get_raw(http, f"{mirror.url}/v2/team/app/tags/list")
        assert_identity(tags, body)
        assert json.loads(body)["tags"] == ["v1"]
        assert any(r.coded and "/referrers/" in r.path for r in coder.requests())
        assert_asked_for_identity(coder, coded=True)
        assert_store_sound(mirror.data_dir, no_fills_left=True, expected={image.digest, *image.blobs})


def _file(mirror: MirrorServer, data: bytes) -> Path:
    path = mirror.data_dir.parent / f"upload-{sha256(data).removeprefix('sha256:')}"
    path.write_bytes(data)
    return path


# Docker Hub: token server and CDN too -----------------------------------------------------------------


@pytest.mark.parametrize("coding", CODINGS)
def test_hub_whose_token_server_and_cdn_code_regardless(
    coding: str, hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    images: StandardImages, http: httpx.Client,
) -> None:
    coder = Coder(coding, always=True)
    hub = hub_factory(coder=coder)
    mirror = mirror_factory(hub.url, env=ENV)
    index = images.multi
    answer, body = get_raw(http, f"{mirror.url}/v2/multi/manifests/1", headers=ACCEPT)
    assert_identity(answer, body, index.manifest)
    for child in index.children:
        pull(http, mirror, "multi", child, None)

    blobs = sum(len(child.blobs) for child in index.children)
    assert hub.tokens_issued == {"repository:library/multi:pull": 1}  # the coded token answer was read
    assert hub.count("GET", "/blobs/", status=307) == blobs
    assert [r.status for r in hub.cdn_requests()] == [200] * blobs
    assert not hub.cdn_saw_authorization
    for server in ("front", "auth", "cdn"):
        assert_asked_for_identity(coder, coded=True, server=server)
    assert_store_sound(mirror.data_dir, {index.digest, *(c.digest for c in index.children),
                                         *(d for c in index.children for d in c.blobs)}, no_fills_left=True)


# Wrong bytes are still wrong ---------------------------------------------------------------------------


def test_wrong_bytes_under_a_coding_abort_and_store_nothing(
    mirror_factory: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages,
    http: httpx.Client,
) -> None:
    image = images.small
    layer = image.layers[1].digest
    # The identity bytes are wrong (flipped before coding): the digest check still catches them.
    fault_proxy.add("corrupt", f"/blobs/{layer}$", method="GET", after_bytes=100_000)
    fault_proxy.add("corrupt", f"/manifests/{image.digest}$", method="GET", after_bytes=10)
    with CodingProxy(fault_proxy.url, Coder("gzip", always=True)) as proxy:
        mirror = mirror_factory(proxy.url, env=ENV)
        bad = http.get(f"{mirror.url}/v2/small/manifests/{image.digest}", headers=ACCEPT)
        assert bad.status_code == 502 and bad.json()["errors"][0]["code"] == "UNAVAILABLE", bad.text
        # Flipped bytes are caught as not JSON or as not matching the digest, whichever shows first.
        assert bad.json()["errors"][0]["message"] == "upstream sent an invalid answer", bad.text
        assert_aborted(http, f"{mirror.url}/v2/small/blobs/{layer}", layer)
        assert_store_sound(mirror.data_dir, no_fills_left=True, absent={image.digest, layer})


def test_a_corrupt_coded_stream_aborts_and_stores_nothing(
    mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry, images: StandardImages,
    http: httpx.Client,
) -> None:
    image = images.small
    layer = image.layers[1].digest
    # The coded bytes are damaged on the way: they do not decode.
    with CodingProxy(upstream.url, Coder("gzip", always=True)) as coding, FaultProxy(coding.url) as faults:
        faults.add("corrupt", f"/blobs/{layer}$", method="GET", after_bytes=200_000, flip_bytes=64)
        faults.add("corrupt", f"/manifests/{image.digest}$", method="GET", after_bytes=20, flip_bytes=8)
        mirror = mirror_factory(faults.url, env=ENV)
        bad = http.get(f"{mirror.url}/v2/small/manifests/{image.digest}", headers=ACCEPT)
        assert bad.status_code == 502 and bad.json()["errors"][0]["code"] == "UNAVAILABLE", bad.text
        assert_aborted(http, f"{mirror.url}/v2/small/blobs/{layer}", layer)
        assert_store_sound(mirror.data_dir, no_fills_left=True, absent={image.digest, layer})


def test_a_coding_the_mirror_cannot_decode_is_a_clear_error(
    mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry, images: StandardImages,
    http: httpx.Client,
) -> None:
    image = images.small
    layer = image.layers[1].digest
    with CodingProxy(upstream.url, Coder("gzip", always=True, label="x-proprietary")) as proxy:
        mirror = mirror_factory(proxy.url, env=ENV)
        for url in (f"{mirror.url}/v2/small/manifests/{image.digest}", f"{mirror.url}/v2/small/blobs/{layer}"):
            bad = http.get(url, headers=ACCEPT)
            assert bad.status_code == 502 and bad.json()["errors"][0]["code"] == "UNAVAILABLE", bad.text
            assert "content coding x-proprietary" in bad.json()["errors"][0]["detail"]
        assert_store_sound(mirror.data_dir, no_fills_left=True, absent={image.digest, layer})


def test_x_gzip_is_gzip_for_the_registry_its_token_server_and_cdn(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    images: StandardImages, http: httpx.Client,
) -> None:
    # RFC 9110 section 8.4.1.3: a recipient should treat "x-gzip" as "gzip".
    coder = Coder("gzip", always=True, label="x-gzip")
    hub = hub_factory(coder=coder)
    mirror = mirror_factory(hub.url, env=ENV)
    image = images.small
    pull(http, mirror, "small", image, "1")
    assert hub.tokens_issued == {"repository:library/small:pull": 1}  # the coded token answer was read
    for server in ("front", "auth", "cdn"):
        assert_asked_for_identity(coder, coded=True, server=server)
    assert_store_sound(mirror.data_dir, no_fills_left=True, expected={image.digest, *image.blobs})


def test_a_blob_coded_wrong_from_its_first_byte_is_a_502_not_a_cut_200(
    mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry, images: StandardImages,
    http: httpx.Client,
) -> None:
    image = images.small
    layer = image.layers[1].digest
    with CodingProxy(upstream.url, Coder("gzip", always=True)) as coding, FaultProxy(coding.url) as faults:
        faults.add("corrupt", f"/blobs/{layer}$", method="GET", after_bytes=0, flip_bytes=4)  # the gzip header
        mirror = mirror_factory(faults.url, env=ENV)
        for _ in range(2):  # nothing was kept of the first attempt
            bad = http.get(f"{mirror.url}/v2/small/blobs/{layer}")
            assert (bad.status_code, bad.json()["errors"][0]["code"]) == (502, "UNAVAILABLE"), bad.text
            assert "undecodable content coding" in bad.json()["errors"][0]["detail"]
        assert faults.count("GET", f"/blobs/{layer}") == 2
        assert_store_sound(mirror.data_dir, no_fills_left=True, absent={layer})


def assert_aborted(http: httpx.Client, url: str, digest: str) -> None:
    """The transfer did not complete with the right bytes."""
    hasher, error = hashlib.sha256(), None
    with http.stream("GET", url) as answer:
        try:
            for data in answer.iter_raw():
                hasher.update(data)
        except httpx.TransportError as exc:
            error = exc
    assert error is not None or answer.status_code != 200, "a wrong blob was answered as complete"
    assert "sha256:" + hasher.hexdigest() != digest


# A real client ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("always", [False, True], ids=["when-allowed", "regardless"])
def test_skopeo_copies_through_the_mirror_from_a_gzip_registry(
    always: bool, skopeo: str, mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry,
    images: StandardImages, tmp_path: Path,
) -> None:
    coder = Coder("gzip", always=always)
    with CodingProxy(upstream.url, coder) as proxy:
        mirror = mirror_factory(proxy.url, env=ENV)
        layout = tmp_path / "layout"
        done = subprocess.run([skopeo, "copy", "--src-tls-verify=false", "--preserve-digests",
                               f"docker://{mirror.address}/library/small:1", f"oci:{layout}:pulled"],
                              capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr
        copied = {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()}
        for digest in copied:
            assert sha256((layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()) == digest
        image = images.small
        assert {image.digest, *image.blobs} <= copied
        assert_asked_for_identity(coder, coded=always)
        assert_store_sound(mirror.data_dir, no_fills_left=True, expected={image.digest, *image.blobs})
