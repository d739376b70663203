"""Referrers of cached repositories: the upstream's Referrers API, or the tag schema when it has none.

A real docker-registry (2.8: it answers ``/referrers/`` with 404) holds an image, a signature and an
SBOM whose ``subject`` is that image, and the referrers tag-schema index under ``sha256-<hex>``
(distribution-spec v1.1).  A :class:`FaultProxy` in front of it answers ``/referrers/`` itself and
stands in for an upstream that implements the API.  The mirror must never answer "no referrers" for
what it cannot know: a client reading an empty list concludes "not signed".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import client
from tests.support.faults import FaultProxy
from tests.support.hub import HubEmulator
from tests.support.images import OCI_INDEX, OCI_MANIFEST, sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import assert_store_sound

SIGNATURE = "application/vnd.example.signature"
SBOM = "application/vnd.example.sbom"
COUNTER = "application/vnd.example.countersignature"
EMPTY = "application/vnd.oci.empty.v1+json"
NAME = "team/signed"
#: Quick failures against a stopped upstream.
ENV = {"MIRROR_UPSTREAM_RETRIES": "1", "MIRROR_UPSTREAM_CONNECT_TIMEOUT": "2s",
       "MIRROR_UPSTREAM_READ_TIMEOUT": "10s"}


def descriptor(media_type: str, body: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(body), "size": len(body), **extra}


def index(*descriptors: dict[str, Any]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(descriptors)}).encode()


@dataclass(frozen=True)
class Signed:
    """What :func:`publish` pushed: manifests as bytes."""

    image: bytes
    signature: bytes
    sbom: bytes
    fallback: bytes

    @property
    def subject(self) -> str:
        return sha256(self.image)

    @property
    def fallback_tag(self) -> str:
        return self.subject.replace(":", "-")

    def listed(self, *manifests: bytes) -> bytes:
        """The referrers list of :attr:`image` naming *manifests*, as a registry with the API sends it."""
        return index(*(descriptor(OCI_MANIFEST, m, artifactType=json.loads(m)["artifactType"]) for m in manifests))


def push_blobs(registry: UpstreamRegistry, tmp_path: Path, *blobs: bytes) -> None:
    with client.session() as http:
        for data in blobs:
            path = tmp_path / sha256(data).replace(":", "-")
            path.write_bytes(data)
            client.push_blob(http, registry.url, NAME, sha256(data), path)


def push_artifact(registry: UpstreamRegistry, tmp_path: Path, artifact_type: str, payload: bytes,
                  subject: bytes) -> bytes:
    """Push an OCI 1.1 artifact (empty config, one layer) whose subject is the manifest *subject*."""
    push_blobs(registry, tmp_path, b"{}", payload)
    body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": descriptor(EMPTY, b"{}"), "layers": [descriptor("application/octet-stream", payload)],
        "subject": descriptor(OCI_MANIFEST, subject), "annotations": {"kind": artifact_type},
    }).encode()
    with client.session() as http:
        client.put_manifest(http, registry.url, NAME, sha256(body), OCI_MANIFEST, body)
    return body


def publish(registry: UpstreamRegistry, tmp_path: Path) -> Signed:
    """Push an image, two artifacts whose subject it is, and the tag-schema index of the signature
    (as a client that found no Referrers API leaves it)."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    push_blobs(registry, tmp_path, config, b"layer of the image")
    image = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", b"layer of the image")],
    }).encode()
    with client.session() as http:
        client.put_manifest(http, registry.url, NAME, "v1", OCI_MANIFEST, image)
    signature = push_artifact(registry, tmp_path, SIGNATURE, b"signature bytes", image)
    sbom = push_artifact(registry, tmp_path, SBOM, b"sbom bytes", image)
    fallback = index(descriptor(OCI_MANIFEST, signature, artifactType=SIGNATURE, annotations={"kind": SIGNATURE}))
    with client.session() as http:
        client.put_manifest(http, registry.url, NAME, sha256(image).replace(":", "-"), OCI_INDEX, fallback)
    return Signed(image, signature, sbom, fallback)


def referrers(http: httpx.Client, mirror: MirrorServer, subject: str, artifact_type: str | None = None
              ) -> httpx.Response:
    params = {"artifactType": artifact_type} if artifact_type else None
    return http.get(f"{mirror.url}/v2/{NAME}/referrers/{subject}", params=params)


def listed(answer: httpx.Response) -> set[str]:
    """Digests of a 200 referrers answer, after checking it is the spec's image index."""
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == OCI_INDEX
    doc = answer.json()
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX
    return {d["digest"] for d in doc["manifests"]}


def assert_no_api(answer: httpx.Response, signed: Signed) -> None:
    """The answer that sends spec clients to the tag schema: 404, and not ``NAME_UNKNOWN`` (which
    oras-go and notation read as "no such repository")."""
    assert answer.status_code == 404, answer.text
    error = answer.json()["errors"][0]
    assert error["code"] == "UNSUPPORTED" and error["detail"] == {"tag": signed.fallback_tag}


def manifest(http: httpx.Client, mirror: MirrorServer, reference: str) -> httpx.Response:
    return http.get(f"{mirror.url}/v2/{NAME}/manifests/{reference}", headers={"accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})


def test_upstream_without_referrers_api_sends_clients_to_the_tag_schema_online_and_offline(
        upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
        http: httpx.Client, tmp_path: Path) -> None:
    registry = upstream_factory()
    signed = publish(registry, tmp_path)
    mirror = mirror_factory(registry.url, env=ENV)
    assert manifest(http, mirror, "v1").content == signed.image

    assert_no_api(referrers(http, mirror, signed.subject), signed)
    assert_no_api(referrers(http, mirror, signed.subject, SIGNATURE), signed)
    # What the client does next: the fallback tag, through the mirror.
    fallback = manifest(http, mirror, signed.fallback_tag)
    assert fallback.status_code == 200 and fallback.content == signed.fallback
    assert_no_api(referrers(http, mirror, signed.subject), signed)
    # The signature pulled by digest is recorded, but the upstream's list is still the tag's to give.
    assert manifest(http, mirror, sha256(signed.signature)).content == signed.signature
    assert_no_api(referrers(http, mirror, signed.subject), signed)

    registry.stop()
    assert_no_api(referrers(http, mirror, signed.subject), signed)
    offline = manifest(http, mirror, signed.fallback_tag)
    assert offline.status_code == 200 and offline.content == signed.fallback
    assert offline.headers["x-mirror-cache"] in {"HIT", "STALE"}

    # A mirror that never reached this upstream knows nothing: no empty list either.
    fresh = mirror_factory(registry.url, env=ENV)
    unknown = referrers(http, fresh, signed.subject)
    assert unknown.status_code == 503 and unknown.json()["errors"][0]["code"] == "UNAVAILABLE"
    mirror.stop()
    assert_store_sound(mirror.data_dir)


def test_upstream_with_referrers_api_is_answered_filtered_here_when_it_did_not_filter(
        upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
        http: httpx.Client, tmp_path: Path) -> None:
    registry = upstream_factory()
    signed = publish(registry, tmp_path)
    both = {sha256(signed.signature), sha256(signed.sbom)}
    with FaultProxy(registry.url) as proxy:
        # An upstream with the API that ignores artifactType (the spec allows it).
        unfiltered = proxy.add("status", r"/referrers/", status=200, body=signed.listed(signed.signature, signed.sbom),
                               headers={"content-type": OCI_INDEX})
        mirror = mirror_factory(proxy.url, env=ENV)
        everything = referrers(http, mirror, signed.subject)
        assert listed(everything) == both
        assert "oci-filters-applied" not in everything.headers and everything.headers["x-mirror-cache"] == "MISS"
        only = referrers(http, mirror, signed.subject, SBOM)
        assert listed(only) == {sha256(signed.sbom)} and only.headers["oci-filters-applied"] == "artifactType"

        # An upstream that filters: its answer as it is, the header kept.
        proxy.remove(unfiltered)
        proxy.add("status", r"/referrers/", status=200, body=signed.listed(signed.signature),
                  headers={"content-type": OCI_INDEX, "oci-filters-applied": "artifactType"})
        filtered = referrers(http, mirror, signed.subject, SIGNATURE)
        assert listed(filtered) == {sha256(signed.signature)}
        assert filtered.headers["oci-filters-applied"] == "artifactType"
        assert proxy.count("GET", "/referrers/") == 3  # every answer was the upstream's


def test_upstream_with_referrers_api_offline_answers_what_is_known(
        upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
        http: httpx.Client, tmp_path: Path) -> None:
    registry = upstream_factory()
    signed = publish(registry, tmp_path)
    with FaultProxy(registry.url) as proxy:
        # When it was asked, the upstream listed the signature only; the SBOM came later.
        proxy.add("status", r"/referrers/", status=200, body=signed.listed(signed.signature),
                  headers={"content-type": OCI_INDEX})
        mirror = mirror_factory(proxy.url, env=ENV)
        assert listed(referrers(http, mirror, signed.subject)) == {sha256(signed.signature)}
        assert manifest(http, mirror, sha256(signed.sbom)).content == signed.sbom  # pulled through: recorded
        # A countersignature of the signature, pulled through; the signature's referrers were never listed.
        counter = push_artifact(registry, tmp_path, COUNTER, b"countersignature bytes", signed.signature)
        assert manifest(http, mirror, sha256(counter)).content == counter
    registry.stop()  # and the proxy is gone: nothing answers on the upstream's address

    known = referrers(http, mirror, signed.subject)
    assert listed(known) == {sha256(signed.signature), sha256(signed.sbom)}
    assert known.headers["x-mirror-cache"] == "STALE"
    sboms = referrers(http, mirror, signed.subject, SBOM)
    assert listed(sboms) == {sha256(signed.sbom)} and sboms.headers["oci-filters-applied"] == "artifactType"
    # Never listed: what was pulled through is known to exist; an empty list would be a guess.
    countersigned = referrers(http, mirror, sha256(signed.signature))
    assert listed(countersigned) == {sha256(counter)} and countersigned.headers["x-mirror-cache"] == "STALE"
    for unknown in (referrers(http, mirror, sha256(signed.signature), SBOM), referrers(http, mirror, sha256(counter))):
        assert unknown.status_code == 503 and unknown.json()["errors"][0]["code"] == "UNAVAILABLE"
    by_digest = {d["digest"]: d for d in known.json()["manifests"]}
    assert by_digest[sha256(signed.sbom)] == descriptor(OCI_MANIFEST, signed.sbom, artifactType=SBOM,
                                                         annotations={"kind": SBOM})
    mirror.stop()
    assert_store_sound(mirror.data_dir)


def test_every_page_of_an_upstream_referrers_list_is_read(
        upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
        http: httpx.Client, tmp_path: Path) -> None:
    registry = upstream_factory()
    signed = publish(registry, tmp_path)
    with FaultProxy(registry.url) as proxy:
        proxy.add("status", r"/referrers/[^/]+/next$", status=200, body=signed.listed(signed.sbom),
                  headers={"content-type": OCI_INDEX})
        proxy.add("status", r"/referrers/[^/]+$", status=200, body=signed.listed(signed.signature), headers={
            "content-type": OCI_INDEX, "link": f'</v2/{NAME}/referrers/{signed.subject}/next>; rel="next"'})
        mirror = mirror_factory(proxy.url, env=ENV)
        assert listed(referrers(http, mirror, signed.subject)) == {sha256(signed.signature), sha256(signed.sbom)}
        assert proxy.count("GET", "/referrers/") == 2


@pytest.mark.parametrize("answer", [b"<html>not here</html>", b'{"errors": []}'])
def test_an_upstream_answer_that_is_not_an_index_means_no_referrers_api(
        answer: bytes, upstream_factory: Callable[[], UpstreamRegistry],
        mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path) -> None:
    registry = upstream_factory()
    signed = publish(registry, tmp_path)
    with FaultProxy(registry.url) as proxy:
        proxy.add("status", r"/referrers/", status=200, body=answer, headers={"content-type": "text/html"})
        mirror = mirror_factory(proxy.url, env=ENV)
        assert_no_api(referrers(http, mirror, signed.subject), signed)


def test_a_referrers_request_carries_the_repository_pull_token(
        upstream_factory: Callable[[], UpstreamRegistry], hub_factory: Callable[..., HubEmulator],
        mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path) -> None:
    registry = upstream_factory()
    signed = publish(registry, tmp_path)
    hub = hub_factory(registry.url)
    mirror = mirror_factory(hub.url, env=ENV)
    assert manifest(http, mirror, "v1").content == signed.image
    assert_no_api(referrers(http, mirror, signed.subject), signed)  # docker-registry behind the Hub front
    assert hub.count("GET", "/referrers/", status=404) == 1
    assert hub.count(None, "/referrers/", status=401) == 0  # the token of the manifest's scope, sent at once
    assert hub.tokens_issued == {f"repository:{NAME}:pull": 1}
