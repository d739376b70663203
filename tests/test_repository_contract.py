"""The repository contract (``mirror/registry/repository.py``): what every kind of repository answers.

The routes call one protocol whatever holds a repository; these tests hold each implementation
to it through the real mirror over HTTP.  A case is a mirror in which a repository of one kind
holds the same content: an image tagged ``v1`` (a config and a layer) and a signature artifact
whose ``subject`` is that image.

* ``cached``: the cache of a real docker-registry upstream (behind a :class:`FaultProxy` that
  answers the Referrers API, which docker-registry 2.8 lacks), outside ``push.prefixes``:
  read-only, its writes refused with ``DENIED``.
* ``cached-push-disabled``: the same with ``push.enabled: false``: writes refused with
  ``UNSUPPORTED``.
* ``local``: a repository pushed to the mirror: writable.

A new implementation (a repository kept elsewhere) adds a case here and must pass every test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror.registry.repository import Outcome
from tests.support import client
from tests.support.faults import FaultProxy
from tests.support.images import OCI_INDEX, OCI_MANIFEST, sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import settle

SIGNATURE = "application/vnd.example.signature"
SBOM = "application/vnd.example.sbom"
EMPTY = "application/vnd.oci.empty.v1+json"
OUTCOMES = {o.value for o in Outcome}
#: How an answer given from what the repository holds is labelled (no upstream involved).
STORED = {Outcome.HIT.value, Outcome.LOCAL.value}
UNKNOWN_DIGEST = "sha256:" + "0" * 64


def descriptor(media_type: str, body: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(body), "size": len(body), **extra}


@dataclass(frozen=True)
class Content:
    """What a case's repository holds."""

    config: bytes
    layer: bytes
    image: bytes
    signature: bytes

    @classmethod
    def make(cls) -> Content:
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        layer = os.urandom(64 * 1024)
        image = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
        }, indent=2).encode()  # unusual formatting: the bytes must come back as they were
        signature = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SIGNATURE,
            "config": descriptor(EMPTY, b"{}"), "layers": [descriptor("application/octet-stream", b"signed")],
            "subject": descriptor(OCI_MANIFEST, image),
        }).encode()
        return cls(config, layer, image, signature)

    def publish(self, base_url: str, name: str, tmp_path: Path) -> None:
        """Push it all to the registry at *base_url*, as a client would."""
        with client.session() as http:
            for data in (self.config, self.layer, b"{}", b"signed"):
                path = tmp_path / sha256(data).replace(":", "-")
                path.write_bytes(data)
                client.push_blob(http, base_url, name, sha256(data), path)
            client.put_manifest(http, base_url, name, "v1", OCI_MANIFEST, self.image)
            client.put_manifest(http, base_url, name, sha256(self.signature), OCI_MANIFEST, self.signature)

    def referrers_index(self) -> bytes:
        """The referrers of :attr:`image` as a registry with the Referrers API lists them."""
        return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            descriptor(OCI_MANIFEST, self.signature, artifactType=SIGNATURE)]}).encode()


@dataclass(frozen=True)
class Case:
    mirror: MirrorServer
    name: str
    content: Content
    #: ``(status, code, message)`` of every refused write; None for a repository that takes pushes.
    refusal: tuple[int, str, str] | None

    def url(self, path: str) -> str:
        return f"{self.mirror.url}/v2/{self.name}/{path}"


READ_ONLY = ["cached", "cached-push-disabled"]
WRITABLE = ["local"]


@contextlib.contextmanager
def _case(kind: str, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
          tmp_path: Path) -> Iterator[Case]:
    content = Content.make()
    token = secrets.token_hex(4)
    if kind == "local":
        mirror = mirror_factory(env={"MIRROR_PUSH_PREFIXES": "team"})
        name = f"team/contract-{token}"
        content.publish(mirror.url, name, tmp_path)
        yield Case(mirror, name, content, None)
        return
    name = f"contract/cached-{token}"  # outside push.prefixes: the upstream's, read-only
    content.publish(upstream.url, name, tmp_path)
    with FaultProxy(upstream.url) as proxy:
        proxy.add("status", rf"^/v2/{name}/referrers/{sha256(content.image)}$", status=200,
                  body=content.referrers_index(), headers={"content-type": OCI_INDEX})
        if kind == "cached":
            mirror = mirror_factory(proxy.url, env={"MIRROR_PUSH_PREFIXES": "team"})
            refusal = (403, "DENIED", f"push to {name} is not allowed here")
        else:
            mirror = mirror_factory(proxy.url, env={"MIRROR_PUSH_ENABLED": "false"})
            refusal = (405, "UNSUPPORTED", "push is disabled on this registry")
        yield Case(mirror, name, content, refusal)


@pytest.fixture(params=READ_ONLY + WRITABLE)
def case(request: pytest.FixtureRequest, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
         tmp_path: Path) -> Iterator[Case]:
    """Every kind of repository."""
    with _case(request.param, upstream, mirror_factory, tmp_path) as made:
        yield made


@pytest.fixture(params=READ_ONLY)
def read_only_case(request: pytest.FixtureRequest, upstream: UpstreamRegistry,
                   mirror_factory: Callable[..., MirrorServer], tmp_path: Path) -> Iterator[Case]:
    """The kinds that refuse writes."""
    with _case(request.param, upstream, mirror_factory, tmp_path) as made:
        assert made.refusal is not None
        yield made


@pytest.fixture(params=WRITABLE)
def writable_case(request: pytest.FixtureRequest, upstream: UpstreamRegistry,
                  mirror_factory: Callable[..., MirrorServer], tmp_path: Path) -> Iterator[Case]:
    """The kinds that take pushes."""
    with _case(request.param, upstream, mirror_factory, tmp_path) as made:
        assert made.refusal is None
        yield made


def error(answer: httpx.Response) -> tuple[int, str]:
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    return answer.status_code, str(answer.json()["errors"][0]["code"])


# -- manifests ------------------------------------------------------------------------------------


def test_manifest_by_tag_and_by_digest_is_the_bytes_as_pushed(case: Case, http: httpx.Client) -> None:
    digest = sha256(case.content.image)
    for reference in ("v1", digest):
        answer = http.get(case.url(f"manifests/{reference}"), headers={"accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})
        assert answer.status_code == 200, answer.text
        assert answer.content == case.content.image
        assert answer.headers["content-type"] == OCI_MANIFEST
        assert answer.headers["docker-content-digest"] == digest
        assert answer.headers["etag"] == f'"{digest}"'
        assert answer.headers["x-mirror-cache"] in OUTCOMES


def test_manifest_head_announces_what_a_get_sends(case: Case, http: httpx.Client) -> None:
    answer = http.head(case.url("manifests/v1"), headers={"accept": OCI_MANIFEST})
    assert answer.status_code == 200 and answer.content == b""
    assert int(answer.headers["content-length"]) == len(case.content.image)
    assert answer.headers["docker-content-digest"] == sha256(case.content.image)
    assert answer.headers["content-type"] == OCI_MANIFEST


def test_manifest_read_again_is_answered_from_what_is_held(case: Case, http: httpx.Client) -> None:
    digest = sha256(case.content.image)
    http.get(case.url("manifests/v1"), headers={"accept": OCI_MANIFEST}).raise_for_status()
    for _ in range(2):  # the second one from the memo, if the first was remembered
        again = http.get(case.url(f"manifests/{digest}"), headers={"accept": OCI_MANIFEST})
        assert again.status_code == 200 and again.content == case.content.image
        assert again.headers["x-mirror-cache"] in STORED
    unchanged = http.get(case.url(f"manifests/{digest}"), headers={"if-none-match": f'"{digest}"'})
    assert unchanged.status_code == 304 and unchanged.content == b""


def test_unknown_manifests_are_manifest_unknown(case: Case, http: httpx.Client) -> None:
    for reference in ("no-such-tag", UNKNOWN_DIGEST):
        answer = http.get(case.url(f"manifests/{reference}"), headers={"accept": OCI_MANIFEST})
        assert error(answer) == (404, "MANIFEST_UNKNOWN")


# -- blobs ----------------------------------------------------------------------------------------


def test_blob_head_get_and_range(case: Case, http: httpx.Client) -> None:
    layer = case.content.layer
    digest = sha256(layer)
    head = http.head(case.url(f"blobs/{digest}"))
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(layer)
    assert head.headers["docker-content-digest"] == digest
    assert head.headers["x-mirror-cache"] in OUTCOMES
    whole = http.get(case.url(f"blobs/{digest}"))
    assert whole.status_code == 200 and whole.content == layer
    assert whole.headers["x-mirror-cache"] in OUTCOMES
    part = http.get(case.url(f"blobs/{digest}"), headers={"range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == layer[100:200]
    settle(case.mirror.data_dir)  # a blob fetched for the GET reaches the store just after its last byte
    again = http.head(case.url(f"blobs/{digest}"))
    assert again.status_code == 200 and again.headers["x-mirror-cache"] in STORED


def test_unknown_blobs_are_blob_unknown(case: Case, http: httpx.Client) -> None:
    assert error(http.get(case.url(f"blobs/{UNKNOWN_DIGEST}"))) == (404, "BLOB_UNKNOWN")
    head = http.head(case.url(f"blobs/{UNKNOWN_DIGEST}"))
    assert head.status_code == 404 and head.content == b""


# -- tags and referrers ---------------------------------------------------------------------------


def test_tags_are_listed_in_pages(case: Case, http: httpx.Client) -> None:
    answer = http.get(case.url("tags/list"))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"name": case.name, "tags": ["v1"]}
    assert answer.headers["x-mirror-cache"] in OUTCOMES
    for n, page in (("0", []), ("1", ["v1"])):
        answer = http.get(case.url("tags/list"), params={"n": n})
        assert answer.status_code == 200 and answer.json()["tags"] == page and "link" not in answer.headers
    after = http.get(case.url("tags/list"), params={"last": "v1"})
    assert after.status_code == 200 and after.json()["tags"] == []


def test_referrers_list_the_artifacts_whose_subject_is_the_digest(case: Case, http: httpx.Client) -> None:
    subject = sha256(case.content.image)
    answer = http.get(case.url(f"referrers/{subject}"))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == OCI_INDEX and answer.headers["x-mirror-cache"] in OUTCOMES
    listed = answer.json()
    assert listed["schemaVersion"] == 2 and listed["mediaType"] == OCI_INDEX
    assert [(d["digest"], d.get("artifactType")) for d in listed["manifests"]] == \
        [(sha256(case.content.signature), SIGNATURE)]
    assert "oci-filters-applied" not in answer.headers
    for artifact_type, expected in ((SIGNATURE, [sha256(case.content.signature)]), (SBOM, [])):
        filtered = http.get(case.url(f"referrers/{subject}"), params={"artifactType": artifact_type})
        assert filtered.status_code == 200, filtered.text
        assert [d["digest"] for d in filtered.json()["manifests"]] == expected
        assert filtered.headers["oci-filters-applied"] == "artifactType"


# -- writes ---------------------------------------------------------------------------------------


def test_writes_are_refused_by_a_read_only_repository(read_only_case: Case, http: httpx.Client) -> None:
    case = read_only_case
    assert case.refusal is not None
    status, code, message = case.refusal
    body = json.dumps({"schemaVersion": 2}).encode()
    layer = sha256(case.content.layer)
    refused = [
        http.put(case.url("manifests/v2"), content=body, headers={"content-type": OCI_MANIFEST}),
        http.post(case.url("blobs/uploads/")),
        http.post(case.url("blobs/uploads/"), params={"digest": sha256(b"x")}, content=b"x"),
        http.post(case.url("blobs/uploads/"), params={"mount": layer, "from": case.name}),
    ]
    for answer in refused:
        assert answer.status_code == status, answer.text
        assert answer.json()["errors"][0]["code"] == code and answer.json()["errors"][0]["message"] == message
    # Nothing changed: the tag is still the image, no v2 appeared.
    assert http.get(case.url("tags/list")).json()["tags"] == ["v1"]
    unknown = http.patch(case.url("blobs/uploads/0123456789abcdef0123456789abcdef"), content=b"x")
    assert error(unknown) == (404, "BLOB_UPLOAD_UNKNOWN")


def test_uploads_in_chunks_then_a_manifest_put_then_deletes(writable_case: Case, http: httpx.Client) -> None:
    case = writable_case
    data = os.urandom(3000)
    digest = sha256(data)
    started = http.post(case.url("blobs/uploads/"))
    assert started.status_code == 202, started.text
    location = started.headers["location"]
    uuid = started.headers["docker-upload-uuid"]
    assert location == f"/v2/{case.name}/blobs/uploads/{uuid}"
    chunk = http.patch(case.mirror.url + location, content=data[:1000],
                       headers={"content-range": "0-999", "content-type": "application/octet-stream"})
    assert chunk.status_code == 202 and chunk.headers["range"] == "0-999"
    status = http.get(case.mirror.url + location)
    assert status.status_code == 204 and status.headers["range"] == "0-999"
    wrong = http.patch(case.mirror.url + location, content=data[1000:], headers={"content-range": "5-2004"})
    assert error(wrong) == (416, "BLOB_UPLOAD_INVALID")
    done = http.put(case.mirror.url + location, params={"digest": digest}, content=data[1000:])
    assert done.status_code == 201, done.text
    assert done.headers["location"] == f"/v2/{case.name}/blobs/{digest}"
    assert http.get(case.url(f"blobs/{digest}")).content == data

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", case.content.config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", data)],
    }).encode()
    put = http.put(case.url("manifests/v2"), content=manifest, headers={"content-type": OCI_MANIFEST})
    assert put.status_code == 201, put.text
    assert put.headers["docker-content-digest"] == sha256(manifest)
    assert put.headers["location"] == f"/v2/{case.name}/manifests/{sha256(manifest)}"
    assert http.get(case.url("tags/list")).json()["tags"] == ["v1", "v2"]

    cancelled = http.post(case.url("blobs/uploads/"))
    assert http.delete(case.mirror.url + cancelled.headers["location"]).status_code == 204
    assert error(http.get(case.mirror.url + cancelled.headers["location"])) == (404, "BLOB_UPLOAD_UNKNOWN")

    assert http.delete(case.url("manifests/v2")).status_code == 202
    assert error(http.get(case.url("manifests/v2"), headers={"accept": OCI_MANIFEST})) == (404, "MANIFEST_UNKNOWN")
    assert http.delete(case.url(f"blobs/{digest}")).status_code == 202
    assert error(http.get(case.url(f"blobs/{digest}"))) == (404, "BLOB_UNKNOWN")


def test_a_blob_is_mounted_from_another_repository(writable_case: Case, http: httpx.Client, tmp_path: Path) -> None:
    case = writable_case
    other = f"{case.name}-other"
    data = os.urandom(2000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with client.session() as session:
        client.push_blob(session, case.mirror.url, other, sha256(data), path)
    mounted = http.post(case.url("blobs/uploads/"), params={"mount": sha256(data), "from": other})
    assert mounted.status_code == 201, mounted.text
    assert http.get(case.url(f"blobs/{sha256(data)}")).content == data
    missing = http.post(case.url("blobs/uploads/"), params={"mount": UNKNOWN_DIGEST, "from": other})
    assert missing.status_code == 202  # not mountable: an ordinary upload starts instead
