"""A push of a blob whose stored copy is damaged (of another size: truncated, or written over by
someone with access to the store) replaces it with the pushed bytes, which were verified; it used to be
answered ``201`` while the damaged copy stayed, which the next read then removed as corrupt, losing the
pushed blob.  A copy of the right size is kept (a push of a blob stored already writes nothing).

Each test runs on the filesystem and diskcache, and on a real SeaweedFS bucket with the index in a real
PostgreSQL database (``tests/test_fsck.py``'s backends), the real mirror under uvicorn.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import httpx

from tests.support.images import sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.test_fsck import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Backend, backend, clean, descriptor, put_manifest

__all__ = ["backend"]  # the fixture, from test_fsck

MIB = 1 << 20


def push_chunked(http: httpx.Client, base: str, name: str, data: bytes, chunk: int = 2 * MIB) -> None:
    """A chunked upload (``PATCH``es of *chunk* bytes, then ``PUT ?digest=``), as docker sends a layer."""
    answer = http.post(f"{base}/v2/{name}/blobs/uploads/")
    assert answer.status_code == 202, answer.text
    location = answer.headers["location"]
    for start in range(0, len(data), chunk):
        part = data[start:start + chunk]
        answer = http.patch(location if location.startswith("http") else base + location, content=part, headers={
            "content-range": f"{start}-{start + len(part) - 1}", "content-type": "application/octet-stream"})
        assert answer.status_code == 202, answer.text
        location = answer.headers["location"]
    answer = http.put(location if location.startswith("http") else base + location, params={"digest": sha256(data)})
    assert answer.status_code == 201, answer.text


def test_a_push_over_a_damaged_copy_of_another_size_replaces_it(
    backend: Backend, mirror_factory: Callable[..., MirrorServer],
) -> None:
    mirror = mirror_factory(env=backend.env())
    base, name = mirror.url, "team/damaged"
    config = b'{"architecture":"amd64","os":"linux"}'
    small, large = os.urandom(5000), os.urandom(7 * MIB + 123)  # one PutObject; parts then a copy on S3
    with httpx.Client(timeout=60, trust_env=False) as http:
        for blob in (config, small):
            assert http.post(f"{base}/v2/{name}/blobs/uploads/", params={"digest": sha256(blob)},
                             content=blob).status_code == 201
        push_chunked(http, base, name, large)
        assert backend.objects(mirror)[sha256(large)] == len(large)
        # Damaged behind the mirror's back: both layers truncated.
        for blob in (small, large):
            backend.overwrite(mirror, sha256(blob), blob[:1000])
        # Pushed again, as a client repairing them (or pushing the image once more) would.
        assert http.post(f"{base}/v2/{name}/blobs/uploads/", params={"digest": sha256(small)},
                         content=small).status_code == 201
        push_chunked(http, base, name, large)
        put_manifest(http, base, name, "1", {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, small), descriptor(OCI_LAYER, large)]})
        for blob in (small, large):
            url = f"{base}/v2/{name}/blobs/{sha256(blob)}"
            head = http.head(url)
            assert head.status_code == 200 and head.headers["content-length"] == str(len(blob)), head.headers
            answer = http.get(url)
            assert answer.status_code == 200 and answer.content == blob
            assert backend.objects(mirror)[sha256(blob)] == len(blob)
        # Pushed again whole: the copy of the right size is kept, nothing is written.
        before = backend.objects(mirror)
        push_chunked(http, base, name, large)
        assert backend.objects(mirror) == before
    mirror.stop()
    clean(mirror, backend, "--verify-content")
