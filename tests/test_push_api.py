"""The write side of the /v2/ API, endpoint by endpoint, against a real mirror process.

Uploads (monolithic, chunked, resumed after a restart, mounted), manifest puts with their
checks, deletes, tags and catalog pagination, referrers, and the namespace policy that keeps
pushed repositories apart from the upstream's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.faults import FaultProxy
from tests.support.images import (
    DOCKER_MANIFEST,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    sha256_digest as sha256,
)
from tests.support.mirror import PROJECT_ROOT, MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import stored_objects
from tests.support.waiting import eventually

ALL_TYPES = ", ".join(MANIFEST_MEDIA_TYPES)
EMPTY_CONFIG = b"{}"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"


def error_code(answer: httpx.Response) -> str:
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    errors = answer.json()["errors"]
    assert errors and all({"code", "message"} <= set(e) for e in errors), errors
    return str(errors[0]["code"])


@pytest.fixture
def registry(mirror_factory: Callable[..., MirrorServer]) -> MirrorServer:
    return mirror_factory(env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"})


def push_blob(http: httpx.Client, base: str, name: str, data: bytes) -> str:
    digest = sha256(data)
    answer = http.post(f"{base}/v2/{name}/blobs/uploads/", params={"digest": digest}, content=data,
                       headers={"content-type": "application/octet-stream"})
    assert answer.status_code == 201, answer.text
    return digest


def image_manifest(config: bytes, layers: list[bytes], **extra: object) -> bytes:
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer),
                    "size": len(layer)} for layer in layers],
        **extra,
    }, indent=3).encode()  # unusual formatting: the registry must keep the bytes as sent


def push_image(http: httpx.Client, base: str, name: str, tag: str, seed: int) -> tuple[bytes, list[bytes]]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    layers = [os.urandom(1000 + seed), os.urandom(5000)]
    for blob in (config, *layers):
        push_blob(http, base, name, blob)
    manifest = image_manifest(config, layers)
    answer = http.put(f"{base}/v2/{name}/manifests/{tag}", content=manifest,
                      headers={"content-type": OCI_MANIFEST})
    assert answer.status_code == 201, answer.text
    return manifest, [config, *layers]


def stored_files(data_dir: Path) -> set[str]:
    return {p.name for p in stored_objects(data_dir).values()}


# Blob uploads -------------------------------------------------------------------------


def test_monolithic_upload_then_read_back(registry: MirrorServer, http: httpx.Client) -> None:
    data = os.urandom(300_000)
    digest = sha256(data)
    answer = http.post(f"{registry.url}/v2/team/app/blobs/uploads/", params={"digest": digest}, content=data)
    assert answer.status_code == 201
    assert answer.headers["location"] == f"/v2/team/app/blobs/{digest}"
    assert answer.headers["docker-content-digest"] == digest
    got = http.get(f"{registry.url}/v2/team/app/blobs/{digest}")
    assert got.status_code == 200 and got.content == data
    assert got.headers["x-mirror-cache"] == "LOCAL"
    head = http.head(f"{registry.url}/v2/team/app/blobs/{digest}")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
    part = http.get(f"{registry.url}/v2/team/app/blobs/{digest}", headers={"range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]


def test_chunked_upload_with_status_and_out_of_order_chunk(registry: MirrorServer, http: httpx.Client) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = sha256(data)
    started = http.post(f"{registry.url}/v2/team/app/blobs/uploads/")
    assert started.status_code == 202
    location = started.headers["location"]
    uuid = started.headers["docker-upload-uuid"]
    assert location == f"/v2/team/app/blobs/uploads/{uuid}"
    assert started.headers["range"] == "0-0"

    first, second, third = data[:1_000_000], data[1_000_000:2_500_000], data[2_500_000:]
    answer = http.patch(registry.url + location, content=first,
                        headers={"content-range": f"0-{len(first) - 1}", "content-type": "application/octet-stream"})
    assert answer.status_code == 202
    assert answer.headers["range"] == f"0-{len(first) - 1}"
    status = http.get(registry.url + location)
    assert status.status_code == 204 and status.headers["range"] == f"0-{len(first) - 1}"
    assert status.headers["docker-upload-uuid"] == uuid

    # A chunk that does not start where the upload ends is refused and changes nothing.
    wrong = http.patch(registry.url + location, content=second, headers={"content-range": f"5-{5 + len(second) - 1}"})
    assert wrong.status_code == 416
    assert http.get(registry.url + location).headers["range"] == f"0-{len(first) - 1}"

    # A chunk without Content-Range (docker's streaming PATCH) is appended.
    answer = http.patch(registry.url + location, content=second)
    assert answer.status_code == 202 and answer.headers["range"] == f"0-{len(first) + len(second) - 1}"
    done = http.put(registry.url + location, params={"digest": digest}, content=third)
    assert done.status_code == 201 and done.headers["docker-content-digest"] == digest
    assert http.get(f"{registry.url}/v2/team/app/blobs/{digest}").content == data
    # The finished upload is gone.
    gone = http.get(registry.url + location)
    assert gone.status_code == 404 and error_code(gone) == "BLOB_UPLOAD_UNKNOWN"


def test_a_chunks_content_range_may_be_written_as_rfc_9110_writes_it(
    registry: MirrorServer, http: httpx.Client,
) -> None:
    """``bytes 0-999/*`` and ``bytes 1000-1999/3000`` (RFC 9110 section 14.4) as well as the spec's
    ``0-999``; they were refused with 416.  A total that is no number is still refused, and so is a
    range that is no range, each with the ``Range`` the upload holds (``0-0`` for an empty one, as a
    POST answers): before, such a 416 had no ``Range``, so its client could not tell where to go on."""
    data = os.urandom(3000)
    location = http.post(f"{registry.url}/v2/team/rfc/blobs/uploads/").headers["location"]
    for garbage in ("bytes 0-999/lots", "garbage"):
        bad = http.patch(registry.url + location, content=data[:1000], headers={"content-range": garbage})
        assert bad.status_code == 416 and error_code(bad) == "BLOB_UPLOAD_INVALID", bad.text
        assert bad.headers.get("range") == "0-0" and bad.headers["docker-upload-uuid"], bad.headers
    for header, chunk in (("bytes 0-999/*", data[:1000]), ("bytes 1000-1999/3000", data[1000:2000])):
        answer = http.patch(registry.url + location, content=chunk, headers={"content-range": header})
        assert answer.status_code == 202, (header, answer.text)
    done = http.put(registry.url + location, params={"digest": sha256(data)}, content=data[2000:])
    assert done.status_code == 201
    assert http.get(f"{registry.url}/v2/team/rfc/blobs/{sha256(data)}").content == data


def test_a_chunk_whose_length_is_not_its_content_ranges_is_refused_and_writes_nothing(
    registry: MirrorServer, http: httpx.Client,
) -> None:
    """A PATCH (or the closing PUT) whose ``Content-Length`` differs from the size of its
    ``Content-Range`` is refused with ``416`` and the ``Range`` the upload holds, as distribution
    refuses it; before, its bytes were appended and the upload ended where the client's next range
    did not expect it."""
    data = os.urandom(3000)
    location = http.post(f"{registry.url}/v2/team/lengths/blobs/uploads/").headers["location"]
    first = http.patch(registry.url + location, content=data[:1000], headers={"content-range": "0-999"})
    assert first.status_code == 202
    for header, chunk in (("1000-2999", data[1000:2000]), ("1000-1499", data[1000:2000]), ("bytes 1000-1999/*", b"")):
        wrong = http.patch(registry.url + location, content=chunk, headers={"content-range": header})
        assert wrong.status_code == 416 and error_code(wrong) == "BLOB_UPLOAD_INVALID", (header, wrong.text)
        assert wrong.headers["range"] == "0-999" and wrong.headers["location"] == location
        assert http.get(registry.url + location).headers["range"] == "0-999"
    assert http.patch(registry.url + location, content=data[1000:2000],
                      headers={"content-range": "1000-1999"}).status_code == 202
    # The closing PUT's last chunk is held to its range alike.
    short = http.put(registry.url + location, params={"digest": sha256(data)}, content=data[2000:2500],
                     headers={"content-range": "2000-2999"})
    assert short.status_code == 416 and error_code(short) == "BLOB_UPLOAD_INVALID", short.text
    assert short.headers["range"] == "0-1999" and http.get(registry.url + location).headers["range"] == "0-1999"
    assert http.put(registry.url + location, params={"digest": sha256(data)}, content=data[2000:],
                    headers={"content-range": "2000-2999"}).status_code == 201
    assert http.get(f"{registry.url}/v2/team/lengths/blobs/{sha256(data)}").content == data


@pytest.mark.parametrize("ns", ["docker.io", "Index.Docker.IO"])
def test_an_upload_started_with_the_registrys_own_prefix_and_ns_goes_on_at_its_location(
    registry: MirrorServer, http: httpx.Client, ns: str
) -> None:
    """``/v2/docker.io/team/ns/...?ns=docker.io`` names ``team/ns``, as without ``?ns=``: its upload's
    ``Location`` (which a client follows as given) reaches it.  Before, the upload was bound to the
    name ``docker.io/team/ns`` and its location to ``team/ns``: every PATCH answered 404."""
    data = os.urandom(100_000)
    started = http.post(f"{registry.url}/v2/docker.io/team/ns/blobs/uploads/", params={"ns": ns})
    assert started.status_code == 202, started.text
    location = started.headers["location"]
    assert location.startswith("/v2/team/ns/blobs/uploads/"), location
    assert http.patch(registry.url + location, content=data).status_code == 202
    done = http.put(registry.url + location, params={"digest": sha256(data)})
    assert done.status_code == 201, done.text
    for url in (f"{registry.url}/v2/team/ns/blobs/{sha256(data)}",
                f"{registry.url}/v2/docker.io/team/ns/blobs/{sha256(data)}?ns={ns}"):
        assert http.get(url).content == data
    assert http.get(f"{registry.url}/v2/_catalog").json() == {"repositories": ["team/ns"]}


def test_closing_put_with_a_range_that_does_not_follow_the_upload_is_refused(
    registry: MirrorServer, http: httpx.Client
) -> None:
    """distribution-spec, "Pushing a blob in chunks": a chunk out of order is ``416 Requested Range
    Not Satisfiable``, and the registry answers with the ``Range`` of what it holds.  The closing
    ``PUT ?digest=`` may carry the last chunk, so the same holds for it: refused, the upload kept."""
    data = os.urandom(200_000)
    digest = sha256(data)
    first, rest = data[:70_000], data[70_000:]
    location = http.post(f"{registry.url}/v2/team/app/blobs/uploads/").headers["location"]
    assert http.patch(registry.url + location, content=first,
                      headers={"content-range": f"0-{len(first) - 1}"}).status_code == 202
    held = f"0-{len(first) - 1}"
    early = http.patch(registry.url + location, content=rest[10:],
                       headers={"content-range": f"{len(first) + 10}-{len(data) - 1}"})
    assert early.status_code == 416 and early.headers["range"] == held

    for start in (len(first) + 10, 0, len(first) - 1):
        wrong = http.put(registry.url + location, params={"digest": digest}, content=rest,
                         headers={"content-range": f"{start}-{start + len(rest) - 1}",
                                  "content-type": "application/octet-stream"})
        assert wrong.status_code == 416, (start, wrong.text)
        assert wrong.headers["range"] == held
        assert wrong.headers["location"] == location
        assert error_code(wrong) == "BLOB_UPLOAD_INVALID"
        status = http.get(registry.url + location)  # the upload is intact and can go on
        assert status.status_code == 204 and status.headers["range"] == held
    assert http.head(f"{registry.url}/v2/team/app/blobs/{digest}").status_code == 404

    done = http.put(registry.url + location, params={"digest": digest}, content=rest,
                    headers={"content-range": f"{len(first)}-{len(data) - 1}",
                             "content-type": "application/octet-stream"})
    assert done.status_code == 201 and done.headers["docker-content-digest"] == digest
    assert http.get(f"{registry.url}/v2/team/app/blobs/{digest}").content == data


def test_wrong_digest_stores_nothing(registry: MirrorServer, http: httpx.Client) -> None:
    data = os.urandom(100_000)
    claimed = sha256(b"something else")
    before = stored_files(registry.data_dir)
    answer = http.post(f"{registry.url}/v2/team/app/blobs/uploads/", params={"digest": claimed}, content=data)
    assert answer.status_code == 400 and error_code(answer) == "DIGEST_INVALID"
    started = http.post(f"{registry.url}/v2/team/app/blobs/uploads/")
    location = started.headers["location"]
    http.patch(registry.url + location, content=data)
    finished = http.put(registry.url + location, params={"digest": claimed})
    assert finished.status_code == 400 and error_code(finished) == "DIGEST_INVALID"
    assert stored_files(registry.data_dir) == before
    assert http.get(f"{registry.url}/v2/team/app/blobs/{claimed}").status_code == 404
    assert http.get(f"{registry.url}/v2/team/app/blobs/{sha256(data)}").status_code == 404
    assert not list((registry.data_dir / "uploads").iterdir())


def test_unknown_and_cancelled_uploads(registry: MirrorServer, http: httpx.Client) -> None:
    fake = f"/v2/team/app/blobs/uploads/{'0' * 32}"
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        answer = http.request(method, registry.url + fake, params={"digest": sha256(b"")} if method == "PUT" else None)
        assert answer.status_code == 404 and error_code(answer) == "BLOB_UPLOAD_UNKNOWN", method
    bad_id = http.get(f"{registry.url}/v2/team/app/blobs/uploads/not-an-id")
    assert bad_id.status_code == 404 and error_code(bad_id) == "BLOB_UPLOAD_UNKNOWN"

    location = http.post(f"{registry.url}/v2/team/app/blobs/uploads/").headers["location"]
    # An upload belongs to its repository.
    other = http.get(registry.url + location.replace("team/app", "team/other"))
    assert other.status_code == 404 and error_code(other) == "BLOB_UPLOAD_UNKNOWN"
    assert http.delete(registry.url + location).status_code == 204
    assert http.get(registry.url + location).status_code == 404
    assert not list((registry.data_dir / "uploads").iterdir())

    no_digest = http.put(registry.url + http.post(f"{registry.url}/v2/team/app/blobs/uploads/").headers["location"])
    assert no_digest.status_code == 400 and error_code(no_digest) == "DIGEST_INVALID"


def test_upload_resumes_after_a_restart(registry: MirrorServer, http: httpx.Client) -> None:
    data = os.urandom(2 * 1024 * 1024)
    location = http.post(f"{registry.url}/v2/team/app/blobs/uploads/").headers["location"]
    assert http.patch(registry.url + location, content=data[:700_000]).status_code == 202
    registry.restart()
    status = http.get(registry.url + location)
    assert status.status_code == 204 and status.headers["range"] == "0-699999"
    assert http.patch(registry.url + location, content=data[700_000:],
                      headers={"content-range": f"700000-{len(data) - 1}"}).status_code == 202
    done = http.put(registry.url + location, params={"digest": sha256(data)})
    assert done.status_code == 201
    assert http.get(f"{registry.url}/v2/team/app/blobs/{sha256(data)}").content == data


def test_sha512_blobs(registry: MirrorServer, http: httpx.Client) -> None:
    data = os.urandom(10_000)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    answer = http.post(f"{registry.url}/v2/team/app/blobs/uploads/", params={"digest": digest}, content=data)
    assert answer.status_code == 201 and answer.headers["docker-content-digest"] == digest
    got = http.get(f"{registry.url}/v2/team/app/blobs/{digest}")
    assert got.content == data and got.headers["docker-content-digest"] == digest
    odd = http.post(f"{registry.url}/v2/team/app/blobs/uploads/", params={"digest": "md5:" + "0" * 32}, content=data)
    assert odd.status_code == 400 and error_code(odd) == "UNSUPPORTED"


def test_cross_repository_mount(registry: MirrorServer, http: httpx.Client) -> None:
    data = os.urandom(50_000)
    digest = push_blob(http, registry.url, "team/app", data)
    mounted = http.post(f"{registry.url}/v2/team/other/blobs/uploads/", params={"mount": digest, "from": "team/app"})
    assert mounted.status_code == 201
    assert mounted.headers["location"] == f"/v2/team/other/blobs/{digest}"
    assert http.get(f"{registry.url}/v2/team/other/blobs/{digest}").content == data
    # Not mountable (the source does not have it): a normal upload starts instead.
    fallback = http.post(f"{registry.url}/v2/team/third/blobs/uploads/",
                         params={"mount": sha256(b"absent"), "from": "team/app"})
    assert fallback.status_code == 202 and "docker-upload-uuid" in fallback.headers


# Manifests ----------------------------------------------------------------------------


def test_manifest_put_and_get_byte_for_byte(registry: MirrorServer, http: httpx.Client) -> None:
    manifest, _ = push_image(http, registry.url, "team/app", "v1", seed=1)
    digest = sha256(manifest)
    for reference in ("v1", digest):
        got = http.get(f"{registry.url}/v2/team/app/manifests/{reference}", headers={"accept": ALL_TYPES})
        assert got.status_code == 200 and got.content == manifest
        assert got.headers["content-type"] == OCI_MANIFEST
        assert got.headers["docker-content-digest"] == digest
        assert got.headers["x-mirror-cache"] == "LOCAL"
    by_digest = http.put(f"{registry.url}/v2/team/app/manifests/{digest}", content=manifest,
                         headers={"content-type": OCI_MANIFEST})
    assert by_digest.status_code == 201
    assert by_digest.headers["location"] == f"/v2/team/app/manifests/{digest}"
    assert by_digest.headers["docker-content-digest"] == digest


def test_manifest_put_errors(registry: MirrorServer, http: httpx.Client) -> None:
    config = b'{"architecture":"amd64","os":"linux"}'
    layer = os.urandom(2000)
    push_blob(http, registry.url, "team/app", config)
    url = f"{registry.url}/v2/team/app/manifests/v1"
    missing = http.put(url, content=image_manifest(config, [layer]), headers={"content-type": OCI_MANIFEST})
    assert missing.status_code == 400 and error_code(missing) == "MANIFEST_BLOB_UNKNOWN"
    assert sha256(layer) in missing.text

    cases = [
        (b"{not json", OCI_MANIFEST, 400, "MANIFEST_INVALID"),
        (b"[1, 2]", OCI_MANIFEST, 400, "MANIFEST_INVALID"),
        (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": "nope"}}).encode(),
         OCI_MANIFEST, 400, "MANIFEST_INVALID"),
        (image_manifest(config, []), OCI_INDEX, 400, "MANIFEST_INVALID"),  # type mismatch
        (image_manifest(config, []), "text/plain", 400, "MANIFEST_INVALID"),
        (b"{" + b" " * (4 * 1024 * 1024 + 1) + b"}", OCI_MANIFEST, 413, "MANIFEST_INVALID"),
    ]
    for body, content_type, status, code in cases:
        answer = http.put(url, content=body, headers={"content-type": content_type})
        assert answer.status_code == status, (body[:60], answer.text)
        assert error_code(answer) == code

    good = image_manifest(config, [])
    wrong_digest = http.put(f"{registry.url}/v2/team/app/manifests/{sha256(b'other')}", content=good,
                            headers={"content-type": OCI_MANIFEST})
    assert wrong_digest.status_code == 400 and error_code(wrong_digest) == "DIGEST_INVALID"
    bad_tag = http.put(f"{registry.url}/v2/team/app/manifests/-bad", content=good,
                       headers={"content-type": OCI_MANIFEST})
    assert bad_tag.status_code == 400 and error_code(bad_tag) == "TAG_INVALID"
    assert http.get(url).status_code == 404  # nothing was tagged by any of these


def test_a_reference_that_is_no_tag_is_unknown_to_reads_and_invalid_to_writes(
    registry: MirrorServer, upstream: UpstreamRegistry, http: httpx.Client
) -> None:
    """distribution-spec, "Pulling manifests": a manifest that does not exist is ``404`` with
    ``MANIFEST_UNKNOWN``, and no tag can be ``.INVALID_MANIFEST_NAME`` (the conformance suite's
    probe); "Pushing manifests": a PUT to a reference that is neither a tag nor a digest is invalid."""
    manifest, _ = push_image(http, registry.url, "team/app", "v1", seed=11)
    upstream.clear_counts()
    for name in ("team/app", "library/small"):  # pushed, and pulled through
        url = f"{registry.url}/v2/{name}/manifests/.INVALID_MANIFEST_NAME"
        got = http.get(url, headers={"accept": ALL_TYPES})
        assert got.status_code == 404 and error_code(got) == "MANIFEST_UNKNOWN", got.text
        head = http.head(url, headers={"accept": ALL_TYPES})
        assert head.status_code == 404 and head.content == b""
        assert head.headers["docker-distribution-api-version"] == "registry/2.0"
    assert upstream.count(None, re.compile("INVALID_MANIFEST_NAME")) == 0
    put = http.put(f"{registry.url}/v2/team/app/manifests/.INVALID_MANIFEST_NAME", content=manifest,
                   headers={"content-type": OCI_MANIFEST})
    assert put.status_code == 400 and error_code(put) == "TAG_INVALID"
    assert http.get(f"{registry.url}/v2/team/app/tags/list").json()["tags"] == ["v1"]


NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


def test_manifests_with_non_distributable_layers_are_accepted_without_them(
    registry: MirrorServer, http: httpx.Client
) -> None:
    """image-spec, "Non-distributable layers": clients fetch them from the descriptor's ``urls``,
    not from the registry; distribution-spec, "Pushing manifests": a registry only MAY reject a
    manifest whose blobs it lacks.  Accepted (201), then pullable by tag and by digest."""
    config = b'{"architecture":"amd64","os":"windows"}'
    layer = os.urandom(3000)
    push_blob(http, registry.url, "team/win", config)
    push_blob(http, registry.url, "team/win", layer)
    foreign = os.urandom(5000)  # never pushed
    url = f"https://downloads.example.com/layers/{sha256(foreign)}"
    cases = [
        ("oci", OCI_MANIFEST, "application/vnd.oci.image.config.v1+json", NONDISTRIBUTABLE,
         "application/vnd.oci.image.layer.v1.tar+gzip"),
        ("docker", DOCKER_MANIFEST, "application/vnd.docker.container.image.v1+json", DOCKER_FOREIGN,
         "application/vnd.docker.image.rootfs.diff.tar.gzip"),
    ]
    for tag, media_type, config_type, foreign_type, layer_type in cases:
        body = json.dumps({
            "schemaVersion": 2, "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": foreign_type, "digest": sha256(foreign), "size": len(foreign), "urls": [url]},
                       {"mediaType": layer_type, "digest": sha256(layer), "size": len(layer)}],
        }).encode()
        put = http.put(f"{registry.url}/v2/team/win/manifests/{tag}", content=body,
                       headers={"content-type": media_type})
        assert put.status_code == 201, (tag, put.text)
        assert put.headers["docker-content-digest"] == sha256(body)
        assert put.headers["location"] == f"/v2/team/win/manifests/{sha256(body)}"
        for reference in (tag, sha256(body)):
            got = http.get(f"{registry.url}/v2/team/win/manifests/{reference}", headers={"accept": ALL_TYPES})
            assert got.status_code == 200 and got.content == body, (tag, reference)
            assert got.headers["content-type"] == media_type
            assert got.headers["docker-content-digest"] == sha256(body)
            head = http.head(f"{registry.url}/v2/team/win/manifests/{reference}", headers={"accept": ALL_TYPES})
            assert head.status_code == 200 and head.headers["content-length"] == str(len(body))
    # The layer itself is not here: clients go to its urls.
    absent = http.get(f"{registry.url}/v2/team/win/blobs/{sha256(foreign)}")
    assert absent.status_code == 404 and error_code(absent) == "BLOB_UNKNOWN"
    assert http.get(f"{registry.url}/v2/team/win/tags/list").json()["tags"] == ["docker", "oci"]

    # Only the non-distributable layer may be missing, and its urls must be http(s) URLs.
    missing = image_manifest(config, [os.urandom(10)])
    answer = http.put(f"{registry.url}/v2/team/win/manifests/bad", content=missing,
                      headers={"content-type": OCI_MANIFEST})
    assert answer.status_code == 400 and error_code(answer) == "MANIFEST_BLOB_UNKNOWN"
    for bad_urls in (["file:///etc/passwd"], "https://example.com/x", [7], ["https://example.com/x#frag"]):
        doc = json.loads(image_manifest(config, []))
        doc["layers"] = [{"mediaType": NONDISTRIBUTABLE, "digest": sha256(foreign), "size": len(foreign),
                          "urls": bad_urls}]
        answer = http.put(f"{registry.url}/v2/team/win/manifests/bad", content=json.dumps(doc).encode(),
                          headers={"content-type": OCI_MANIFEST})
        assert answer.status_code == 400 and error_code(answer) == "MANIFEST_INVALID", bad_urls
    assert http.get(f"{registry.url}/v2/team/win/manifests/bad").status_code == 404

    registry.stop()
    check = subprocess.run([sys.executable, "-m", "mirror", "fsck", "--data", str(registry.data_dir)],
                           capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert check.returncode == 0, check.stdout + check.stderr


def test_index_needs_its_children(registry: MirrorServer, http: httpx.Client) -> None:
    child, _ = push_image(http, registry.url, "team/multi", "amd64", seed=2)
    absent = image_manifest(b"{}", [])
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha256(child), "size": len(child),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": OCI_MANIFEST, "digest": sha256(absent), "size": len(absent),
         "platform": {"os": "linux", "architecture": "arm64"}},
    ]}).encode()
    refused = http.put(f"{registry.url}/v2/team/multi/manifests/1", content=index,
                       headers={"content-type": OCI_INDEX})
    assert refused.status_code == 400 and error_code(refused) == "MANIFEST_BLOB_UNKNOWN"
    doc = json.loads(index)
    doc["manifests"] = doc["manifests"][:1]
    ok_index = json.dumps(doc).encode()
    assert http.put(f"{registry.url}/v2/team/multi/manifests/1", content=ok_index,
                    headers={"content-type": OCI_INDEX}).status_code == 201
    got = http.get(f"{registry.url}/v2/team/multi/manifests/1", headers={"accept": ALL_TYPES})
    assert got.content == ok_index and got.headers["content-type"] == OCI_INDEX
    # A client that cannot read indexes gets the amd64 child, as from the cache.
    old = http.get(f"{registry.url}/v2/team/multi/manifests/1", headers={"accept": OCI_MANIFEST})
    assert old.content == child
    # One that takes neither the index nor that child's type gets neither.
    older = http.get(f"{registry.url}/v2/team/multi/manifests/1",
                     headers={"accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert older.status_code == 404 and error_code(older) == "MANIFEST_UNKNOWN", older.text


# Referrers ----------------------------------------------------------------------------


def test_referrers(registry: MirrorServer, http: httpx.Client) -> None:
    subject, _ = push_image(http, registry.url, "team/app", "v1", seed=3)
    push_blob(http, registry.url, "team/app", EMPTY_CONFIG)
    signature = os.urandom(300)
    push_blob(http, registry.url, "team/app", signature)

    def artifact(artifact_type: str) -> bytes:
        return json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": EMPTY_TYPE, "digest": sha256(EMPTY_CONFIG), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sha256(signature), "size": 300}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": sha256(subject), "size": len(subject)},
            "annotations": {"kind": artifact_type},
        }).encode()

    sig, sbom = artifact("application/vnd.example.sig"), artifact("application/vnd.example.sbom")
    for body in (sig, sbom):
        answer = http.put(f"{registry.url}/v2/team/app/manifests/{sha256(body)}", content=body,
                          headers={"content-type": OCI_MANIFEST})
        assert answer.status_code == 201
        assert answer.headers["oci-subject"] == sha256(subject)

    listed = http.get(f"{registry.url}/v2/team/app/referrers/{sha256(subject)}")
    assert listed.status_code == 200 and listed.headers["content-type"] == OCI_INDEX
    doc = listed.json()
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX
    by_digest = {d["digest"]: d for d in doc["manifests"]}
    assert set(by_digest) == {sha256(sig), sha256(sbom)}
    assert by_digest[sha256(sig)] == {"mediaType": OCI_MANIFEST, "digest": sha256(sig), "size": len(sig),
                                      "artifactType": "application/vnd.example.sig",
                                      "annotations": {"kind": "application/vnd.example.sig"}}
    filtered = http.get(f"{registry.url}/v2/team/app/referrers/{sha256(subject)}",
                        params={"artifactType": "application/vnd.example.sbom"})
    assert [d["digest"] for d in filtered.json()["manifests"]] == [sha256(sbom)]
    assert filtered.headers["oci-filters-applied"] == "artifactType"
    none = http.get(f"{registry.url}/v2/team/app/referrers/{sha256(b'nothing')}")
    assert none.status_code == 200 and none.json()["manifests"] == []
    bad = http.get(f"{registry.url}/v2/team/app/referrers/sha256:xyz")
    assert bad.status_code == 400 and error_code(bad) == "DIGEST_INVALID"

    # Deleting a referrer takes it out of the list.
    assert http.delete(f"{registry.url}/v2/team/app/manifests/{sha256(sig)}").status_code == 202
    after = http.get(f"{registry.url}/v2/team/app/referrers/{sha256(subject)}").json()
    assert [d["digest"] for d in after["manifests"]] == [sha256(sbom)]


# Deletes ------------------------------------------------------------------------------


def test_deletes(registry: MirrorServer, http: httpx.Client) -> None:
    manifest, blobs = push_image(http, registry.url, "team/app", "v1", seed=4)
    digest = sha256(manifest)
    assert http.put(f"{registry.url}/v2/team/app/manifests/v2", content=manifest,
                    headers={"content-type": OCI_MANIFEST}).status_code == 201

    assert http.delete(f"{registry.url}/v2/team/app/manifests/v2").status_code == 202  # untag
    assert http.get(f"{registry.url}/v2/team/app/manifests/v2").status_code == 404
    assert http.get(f"{registry.url}/v2/team/app/manifests/v1").status_code == 200
    assert http.get(f"{registry.url}/v2/team/app/tags/list").json()["tags"] == ["v1"]

    assert http.delete(f"{registry.url}/v2/team/app/manifests/{digest}").status_code == 202
    for reference in (digest, "v1"):
        gone = http.get(f"{registry.url}/v2/team/app/manifests/{reference}")
        assert gone.status_code == 404 and error_code(gone) == "MANIFEST_UNKNOWN"
    again = http.delete(f"{registry.url}/v2/team/app/manifests/{digest}")
    assert again.status_code == 404 and error_code(again) == "MANIFEST_UNKNOWN"

    layer = sha256(blobs[1])
    assert http.delete(f"{registry.url}/v2/team/app/blobs/{layer}").status_code == 202
    gone_blob = http.get(f"{registry.url}/v2/team/app/blobs/{layer}")
    assert gone_blob.status_code == 404 and error_code(gone_blob) == "BLOB_UNKNOWN"
    assert http.delete(f"{registry.url}/v2/team/app/blobs/{layer}").status_code == 404


def test_a_delete_reaches_what_every_worker_remembers(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """Each worker answers repeated GETs by digest from memory; a DELETE in one stops them all at once."""
    registry = mirror_factory(workers=2)
    manifest, _ = push_image(http, registry.url, "team/app", "v1", seed=8)
    url = f"{registry.url}/v2/team/app/manifests/{sha256(manifest)}"
    before = get_from_both_workers(registry, url, times=3)
    assert all(status == 200 for statuses in before.values() for status in statuses), before
    assert http.delete(url).status_code == 202
    after = get_from_both_workers(registry, url, times=2)
    assert all(status == 404 for statuses in after.values() for status in statuses), after
    assert set(after) == set(before)


def get_from_both_workers(mirror: MirrorServer, url: str, times: int) -> dict[object, list[int]]:
    """GET *url* on new connections (the kernel spreads them over the workers) until each of the
    two workers answered at least *times* times; the statuses each one gave."""
    by_pid: dict[object, list[int]] = {}
    for _ in range(40):
        sent = {}
        for _ in range(10):
            answer = httpx.get(url, trust_env=False)
            sent[answer.headers["x-request-id"]] = answer.status_code
        eventually(lambda sent=sent: {e["request_id"] for e in mirror.access_entries()} >= set(sent), 5)
        for entry in mirror.access_entries():
            if entry["request_id"] in sent:
                by_pid.setdefault(entry["pid"], []).append(sent[entry["request_id"]])
        if len(by_pid) == 2 and all(len(statuses) >= times for statuses in by_pid.values()):
            return by_pid
    raise AssertionError(f"the kernel did not spread 400 connections over two workers: {by_pid}")


@pytest.mark.parametrize("index", ["diskcache", "postgres"])
def test_a_delete_of_a_digest_racing_with_a_push_of_it_under_a_tag_leaves_no_tag_without_its_manifest(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client, index: str, request: pytest.FixtureRequest,
) -> None:
    """``DELETE /manifests/<digest>`` and ``PUT /manifests/<new tag>`` of that manifest at once, in two
    workers: either ordering may win (the tag gone, or the tag and its manifest there), never a tag
    listed whose manifest answers 404 (the DELETE read the tags before the PUT set its own, then
    unlinked the manifest)."""
    env = {}
    if index == "postgres":
        env = {"MIRROR_METADATA_DRIVER": "postgres",
               "MIRROR_METADATA_POSTGRES_DSN": request.getfixturevalue("postgres").create_database()}
    registry = mirror_factory(workers=2, env=env)
    manifest, _ = push_image(http, registry.url, "team/race", "t0", seed=9)
    url, digest = f"{registry.url}/v2/team/race/manifests", sha256(manifest)
    broken = []
    for n in range(1, 41):
        assert http.put(f"{url}/t0", content=manifest, headers={"content-type": OCI_MANIFEST}).status_code == 201
        with httpx.Client(timeout=30, trust_env=False) as one, httpx.Client(timeout=30, trust_env=False) as two, \
                ThreadPoolExecutor(2) as pool:
            deleted = pool.submit(one.delete, f"{url}/{digest}")
            pushed = pool.submit(two.put, f"{url}/t{n}", content=manifest, headers={"content-type": OCI_MANIFEST})
            assert (deleted.result().status_code, pushed.result().status_code) == (202, 201)
        listed = http.get(f"{registry.url}/v2/team/race/tags/list").json().get("tags") or []
        got = http.get(f"{url}/t{n}", headers={"accept": OCI_MANIFEST}).status_code
        if (f"t{n}" in listed) != (got == 200):
            broken.append((n, listed, got))
    assert not broken, broken


def test_deletes_can_be_disabled(mirror_factory: Callable[..., MirrorServer], http: httpx.Client) -> None:
    registry = mirror_factory(env={"MIRROR_DELETE_ENABLED": "false"})
    manifest, blobs = push_image(http, registry.url, "team/app", "v1", seed=5)
    for path in (f"manifests/{sha256(manifest)}", "manifests/v1", f"blobs/{sha256(blobs[0])}"):
        answer = http.delete(f"{registry.url}/v2/team/app/{path}")
        assert answer.status_code == 405 and error_code(answer) == "UNSUPPORTED"
        assert answer.headers["allow"] == ("GET, HEAD" if "blobs" in path else "GET, HEAD, PUT")
    assert http.get(f"{registry.url}/v2/team/app/manifests/v1").content == manifest


# Discovery ----------------------------------------------------------------------------


def test_tags_and_catalog_pagination(
    registry: MirrorServer, images: StandardImages, http: httpx.Client
) -> None:
    manifest, _ = push_image(http, registry.url, "team/app", "a", seed=6)
    for tag in ("c", "b", "d"):
        assert http.put(f"{registry.url}/v2/team/app/manifests/{tag}", content=manifest,
                        headers={"content-type": OCI_MANIFEST}).status_code == 201
    page = http.get(f"{registry.url}/v2/team/app/tags/list", params={"n": 2})
    assert page.json() == {"name": "team/app", "tags": ["a", "b"]}
    assert page.headers["link"] == '</v2/team/app/tags/list?n=2&last=b>; rel="next"'
    assert page.headers["x-mirror-cache"] == "LOCAL"
    last = http.get(f"{registry.url}/v2/team/app/tags/list", params={"n": 2, "last": "b"})
    assert last.json()["tags"] == ["c", "d"] and "link" not in last.headers
    assert http.get(f"{registry.url}/v2/team/app/tags/list", params={"n": 0}).json()["tags"] == []

    push_image(http, registry.url, "team/zeta", "1", seed=7)
    # A cached repository shows up beside the pushed ones.
    assert http.get(f"{registry.url}/v2/small/manifests/1", headers={"accept": ALL_TYPES}).status_code == 200
    catalog = http.get(f"{registry.url}/v2/_catalog")
    assert catalog.json() == {"repositories": ["library/small", "team/app", "team/zeta"]}
    first = http.get(f"{registry.url}/v2/_catalog", params={"n": 1})
    assert first.json() == {"repositories": ["library/small"]}
    assert first.headers["link"] == '</v2/_catalog?n=1&last=library%2Fsmall>; rel="next"'
    rest = http.get(f"{registry.url}/v2/_catalog", params={"n": 5, "last": "library/small"})
    assert rest.json() == {"repositories": ["team/app", "team/zeta"]}
    for bad in ("x", "-3", "99999999"):
        answer = http.get(f"{registry.url}/v2/_catalog", params={"n": bad})
        assert answer.status_code == 400 and error_code(answer) == "PAGINATION_NUMBER_INVALID"


# Policy: pushed and cached side by side ------------------------------------------------------------


def test_pushed_repositories_never_reach_the_upstream(
    registry: MirrorServer, images: StandardImages, upstream: UpstreamRegistry, http: httpx.Client
) -> None:
    upstream.clear_counts()
    manifest, blobs = push_image(http, registry.url, "team/app", "v1", seed=8)
    cached = http.get(f"{registry.url}/v2/library/small/manifests/1", headers={"accept": ALL_TYPES})
    assert cached.status_code == 200 and cached.headers["x-mirror-cache"] == "MISS"
    for path in ("manifests/v1", f"manifests/{sha256(manifest)}", f"blobs/{sha256(blobs[1])}"):
        assert http.get(f"{registry.url}/v2/team/app/{path}").status_code == 200
    for path in ("manifests/nope", f"blobs/{sha256(b'nope')}"):
        assert http.get(f"{registry.url}/v2/team/app/{path}").status_code == 404
    assert http.get(f"{registry.url}/v2/team/app/tags/list").json()["tags"] == ["v1"]
    # Only the question, before the first push, whether the upstream serves that repository.
    assert upstream.count(None, re.compile("team/app")) == 1
    assert upstream.count("GET", re.compile("^/v2/team/app/tags/list$"), 404) == 1
    assert upstream.count("GET", re.compile("^/v2/library/small/manifests/1$")) == 1


def test_push_policy(
    mirror_factory: Callable[..., MirrorServer], images: StandardImages, upstream: UpstreamRegistry,
    http: httpx.Client
) -> None:
    disabled = mirror_factory(env={"MIRROR_PUSH_ENABLED": "false"})
    answer = http.post(f"{disabled.url}/v2/team/app/blobs/uploads/")
    assert answer.status_code == 405 and error_code(answer) == "UNSUPPORTED"
    put = http.put(f"{disabled.url}/v2/team/app/manifests/v1", content=b"{}", headers={"content-type": OCI_MANIFEST})
    assert put.status_code == 405 and error_code(put) == "UNSUPPORTED"
    assert answer.headers["allow"] == put.headers["allow"] == "GET, HEAD"  # RFC 9110 section 15.5.6: a MUST
    for method, path, allowed in (("POST", "team/app/manifests/v1", "DELETE, GET, HEAD, PUT"),
                                  ("PUT", "team/app/blobs/uploads/", "POST"),
                                  ("PATCH", "team/app/tags/list", "GET, HEAD")):
        other = http.request(method, f"{disabled.url}/v2/{path}")
        assert (other.status_code, other.headers.get("allow")) == (405, allowed), (method, path, other.text)
    assert http.get(f"{disabled.url}/v2/_catalog").json() == {"repositories": []}

    limited = mirror_factory(env={"MIRROR_PUSH_PREFIXES": "team,ops/ci", "MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"})
    upstream.clear_counts()
    for name, status in (("team/app", 202), ("team", 202), ("ops/ci/runner", 202), ("teams/app", 403),
                         ("ops/other", 403)):
        answer = http.post(f"{limited.url}/v2/{name}/blobs/uploads/")
        assert answer.status_code == status, name
        if status == 403:
            assert error_code(answer) == "DENIED"
    # The site's own names (under push.prefixes) are never asked about upstream.
    assert upstream.count(None, "/tags/list") == 0

    # Pushing over a cached repository is refused, unless configured otherwise.
    default = mirror_factory(env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"})
    assert http.get(f"{default.url}/v2/small/manifests/1", headers={"accept": ALL_TYPES}).status_code == 200
    over = http.post(f"{default.url}/v2/library/small/blobs/uploads/")
    assert over.status_code == 403 and error_code(over) == "DENIED"
    over_short = http.post(f"{default.url}/v2/small/blobs/uploads/")
    assert over_short.status_code == 403 and error_code(over_short) == "DENIED"
    put = http.put(f"{default.url}/v2/library/small/manifests/1", content=images.small.manifest,
                   headers={"content-type": OCI_MANIFEST})
    assert put.status_code == 403 and error_code(put) == "DENIED"
    assert http.post(f"{default.url}/v2/team/app/blobs/uploads/").status_code == 202
    # So is the first push to a repository the upstream serves that nobody pulled yet: it would stand
    # in for the upstream's image for every client, for good (docker.io/ and ?ns=docker.io included).
    upstream.clear_counts()
    for path in ("library/dlist", "dlist", "docker.io/library/dlist", "library/dlist?ns=docker.io"):
        name, _, query = path.partition("?")
        shadow = http.post(f"{default.url}/v2/{name}/blobs/uploads/" + (f"?{query}" if query else ""))
        assert (shadow.status_code, error_code(shadow)) == (403, "DENIED"), (path, shadow.text)
        assert "is a repository of the upstream registry" in shadow.json()["errors"][0]["message"]
    put = http.put(f"{default.url}/v2/dlist/manifests/1", content=images.small.manifest,
                   headers={"content-type": OCI_MANIFEST})
    assert put.status_code == 403 and error_code(put) == "DENIED"
    # Asked once for each spelling the checks see (library/dlist, dlist): an answer is kept a while.
    assert upstream.count("GET", re.compile(r"^/v2/library/dlist/tags/list$")) == 2
    assert http.get(f"{default.url}/v2/_catalog").json() == {"repositories": ["library/small", "team/app"]}
    pulled = http.get(f"{default.url}/v2/dlist/manifests/1", headers={"accept": ALL_TYPES})
    assert (pulled.status_code, pulled.headers["x-mirror-cache"]) == (200, "MISS")
    allowing = mirror_factory(env={"MIRROR_PUSH_OVER_CACHE": "true", "MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"})
    assert http.get(f"{allowing.url}/v2/small/manifests/1", headers={"accept": ALL_TYPES}).status_code == 200
    assert http.post(f"{allowing.url}/v2/library/small/blobs/uploads/").status_code == 202
    assert http.post(f"{allowing.url}/v2/library/dlist/blobs/uploads/").status_code == 202
    # An upstream that cannot answer does not hold pushes up: the push goes on, with a warning.
    offline = mirror_factory("http://127.0.0.1:9", env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"})
    assert http.post(f"{offline.url}/v2/library/dlist/blobs/uploads/").status_code == 202
    assert "did not say whether it serves that repository" in offline.log_tail(100)


def test_the_question_before_a_first_push_is_asked_again_after_a_blip_and_an_upstream_down_holds_no_push(
    mirror_factory: Callable[..., MirrorServer], fault_proxy: FaultProxy, http: httpx.Client,
) -> None:
    """The upstream answers the question (tags/list?n=1) 503 once: it is asked again, and its answer
    refuses the push of a name it serves (before, a single blip let the push through, and the pushed
    repository then answered every pull of the upstream's image).  An upstream that answers 503 on and
    on (an outage) does not hold pushes up: they go on, with a warning naming them."""
    mirror = mirror_factory(fault_proxy.url, env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true",
                                                  "MIRROR_UPSTREAM_RETRIES": "2"})
    with fault_proxy.fault("status", "/tags/list$", status=503, times=1):
        refused = http.post(f"{mirror.url}/v2/dlist/blobs/uploads/")
        assert (refused.status_code, error_code(refused)) == (403, "DENIED"), refused.text
        assert fault_proxy.count("GET", "/v2/library/dlist/tags/list") == 2
    assert http.get(f"{mirror.url}/v2/_catalog").json() == {"repositories": []}
    with fault_proxy.fault("status", "/tags/list$", status=503):
        assert http.post(f"{mirror.url}/v2/team/down/blobs/uploads/").status_code == 202
    assert "push to team/down: the upstream docker.io did not say whether it serves" in mirror.log_tail(100)


def test_a_refused_manifest_push_gives_its_name_back(
    mirror_factory: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages,
    upstream: UpstreamRegistry, http: httpx.Client,
) -> None:
    """A manifest PUT refused (a blob it names is missing, a body that is no manifest) leaves no claim on
    its name.  Before, the name stayed a pushed repository for good: in the catalog, with an empty tag
    list, and when the upstream's check blipped during the PUT, hiding the upstream's image of that name
    (every pull of it answered 404 ``MANIFEST_UNKNOWN``)."""
    mirror = mirror_factory(fault_proxy.url, env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true",
                                                  "MIRROR_UPSTREAM_RETRIES": "1"})
    upstream.push_image("squat/hidden", "1", images.small)
    config = b'{"architecture":"amd64","os":"linux"}'
    missing_blob = image_manifest(config, [])
    with fault_proxy.fault("status", "/tags/list$", status=503):  # the upstream cannot say it serves the name
        refused = http.put(f"{mirror.url}/v2/squat/hidden/manifests/1", content=missing_blob,
                           headers={"content-type": OCI_MANIFEST})
        assert (refused.status_code, error_code(refused)) == (400, "MANIFEST_BLOB_UNKNOWN"), refused.text
    pulled = http.get(f"{mirror.url}/v2/squat/hidden/manifests/1", headers={"accept": ALL_TYPES})
    assert (pulled.status_code, pulled.headers.get("x-mirror-cache")) == (200, "MISS"), pulled.text

    for body in (b"{bad", missing_blob):
        answer = http.put(f"{mirror.url}/v2/team/never/manifests/v1", content=body,
                          headers={"content-type": OCI_MANIFEST})
        assert answer.status_code == 400, answer.text
    assert http.get(f"{mirror.url}/v2/_catalog").json() == {"repositories": ["squat/hidden"]}  # (the cache's)
    assert "team/never is no pushed repository any more" in mirror.log_tail(100)

    upload = http.post(f"{mirror.url}/v2/team/open/blobs/uploads/")  # an open upload keeps its name
    assert http.put(f"{mirror.url}/v2/team/open/manifests/v1", content=b"{bad",
                    headers={"content-type": OCI_MANIFEST}).status_code == 400
    assert http.get(f"{mirror.url}/v2/_catalog").json() == {"repositories": ["squat/hidden", "team/open"]}
    assert http.delete(mirror.url + upload.headers["location"]).status_code == 204


def test_a_push_given_up_before_any_content_landed_gives_its_name_back(
    mirror_factory: Callable[..., MirrorServer], images: StandardImages, upstream: UpstreamRegistry,
    http: httpx.Client,
) -> None:
    """A started upload makes its name a pushed repository; once its last upload is cancelled or
    expires with nothing stored in it, the name is given back: it leaves the catalog, and a pull of it
    falls through to the upstream again (before, every POST claimed its name for good).  A name that
    holds a blob keeps it."""
    mirror = mirror_factory(env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true", "MIRROR_PUSH_UPLOAD_TTL": "2s"})
    base = mirror.url
    started = [http.post(f"{base}/v2/squat/later/blobs/uploads/") for _ in range(2)]
    assert [answer.status_code for answer in started] == [202] * 2
    assert http.delete(base + started[0].headers["location"]).status_code == 204
    assert http.get(f"{base}/v2/_catalog").json() == {"repositories": ["squat/later"]}  # one upload left
    assert http.delete(base + started[1].headers["location"]).status_code == 204
    missing = http.post(f"{base}/v2/squat/mounting/blobs/uploads/",
                        params={"mount": sha256(b"nowhere"), "from": "squat/later"})
    assert missing.status_code == 202  # not mounted: an upload starts instead
    assert http.delete(base + missing.headers["location"]).status_code == 204
    assert http.get(f"{base}/v2/_catalog").json() == {"repositories": []}

    upstream.push_image("squat/later", "1", images.small)
    pulled = http.get(f"{base}/v2/squat/later/manifests/1", headers={"accept": ALL_TYPES})
    assert (pulled.status_code, pulled.headers["x-mirror-cache"]) == (200, "MISS"), pulled.text

    layer = os.urandom(3000)
    digest = push_blob(http, base, "squat/mine", layer)
    extra = http.post(f"{base}/v2/squat/mine/blobs/uploads/").headers["location"]
    assert http.delete(base + extra).status_code == 204
    abandoned = http.post(f"{base}/v2/squat/abandoned/blobs/uploads/")
    assert http.patch(base + abandoned.headers["location"], content=b"x" * 100).status_code == 202
    # Expired (2 s after its last write), swept within a second or so: given back.
    expected = {"repositories": ["squat/later", "squat/mine"]}
    assert eventually(lambda: http.get(f"{base}/v2/_catalog").json() == expected, timeout=20), \
        http.get(f"{base}/v2/_catalog").json()
    assert http.get(base + abandoned.headers["location"]).status_code == 404
    mine = http.get(f"{base}/v2/squat/mine/blobs/{digest}")
    assert (mine.status_code, mine.headers["x-mirror-cache"], mine.content) == (200, "LOCAL", layer)
    assert "squat/abandoned is no pushed repository any more" in mirror.log_path.read_text()


def test_abandoned_uploads_expire(mirror_factory: Callable[..., MirrorServer], http: httpx.Client) -> None:
    registry = mirror_factory(env={"MIRROR_PUSH_UPLOAD_TTL": "1s"})
    location = http.post(f"{registry.url}/v2/team/app/blobs/uploads/").headers["location"]
    assert http.patch(registry.url + location, content=b"x" * 1000).status_code == 202
    fresh = http.post(f"{registry.url}/v2/team/app/blobs/uploads/").headers["location"]
    registry.stop()
    time.sleep(1.2)
    # Touched as if still written to (ahead of the clock: fresh however long the start takes under load,
    # while the sweeps, at start and every second, look).
    ahead = time.time() + 30
    os.utime(registry.data_dir / "uploads" / fresh.rsplit("/", 1)[1], (ahead, ahead))
    # Files without a record: an old one is left over from a crash; a new one may be an upload another
    # worker is creating (file first, then record) or finishing, and must survive a worker starting up.
    old_orphan, new_orphan = registry.data_dir / "uploads" / ("0" * 32), registry.data_dir / "uploads" / ("1" * 32)
    old_orphan.write_bytes(b"left over")
    os.utime(old_orphan, (time.time() - 60, time.time() - 60))
    new_orphan.write_bytes(b"")
    os.utime(new_orphan, (ahead, ahead))
    registry.start()
    gone = http.get(registry.url + location)
    assert gone.status_code == 404 and error_code(gone) == "BLOB_UPLOAD_UNKNOWN"
    assert http.get(registry.url + fresh).status_code == 204
    assert sorted(p.name for p in (registry.data_dir / "uploads").iterdir()) == sorted([fresh.rsplit("/", 1)[1],
                                                                                        new_orphan.name])
