"""A minimal Registry HTTP API V2 client for tests: push and fetch images.

Uploads are monolithic (``POST`` an upload session, then one ``PUT`` with
``?digest=``) and stream each blob from its file, so big layers are never
read into memory.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from .images import CHUNK, MANIFEST_MEDIA_TYPES, Image, Index

#: Client timeout for pushes and fetches: generous, uploads can be 256 MiB.
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


@contextlib.contextmanager
def session(client: httpx.Client | None = None) -> Iterator[httpx.Client]:
    """Yield *client*, or a fresh one (closed afterwards) if it is None."""
    if client is not None:
        yield client
        return
    with httpx.Client(timeout=TIMEOUT, trust_env=False) as fresh:
        yield fresh


def iter_file(path: Path, chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield the content of *path* in chunks of *chunk* bytes."""
    with path.open("rb") as handle:
        while data := handle.read(chunk):
            yield data


def blob_exists(client: httpx.Client, base_url: str, name: str, digest: str) -> bool:
    """True if ``HEAD /v2/NAME/blobs/DIGEST`` answers 200."""
    return client.head(f"{base_url}/v2/{name}/blobs/{digest}").status_code == 200


def push_blob(client: httpx.Client, base_url: str, name: str, digest: str, path: Path) -> bool:
    """Upload one blob monolithically unless it exists; True if uploaded."""
    if blob_exists(client, base_url, name, digest):
        return False
    started = client.post(f"{base_url}/v2/{name}/blobs/uploads/")
    if started.status_code != 202:
        raise RuntimeError(f"upload start for {name} failed: {started.status_code} {started.text}")
    location = httpx.URL(base_url).join(started.headers["location"])
    target = location.copy_merge_params({"digest": digest})
    size = path.stat().st_size
    done = client.put(
        target,
        content=iter_file(path),
        headers={"content-type": "application/octet-stream", "content-length": str(size)},
    )
    if done.status_code != 201:
        raise RuntimeError(f"upload of {digest} to {name} failed: {done.status_code} {done.text}")
    return True


def put_manifest(
    client: httpx.Client, base_url: str, name: str, reference: str, media_type: str, data: bytes
) -> str:
    """PUT a manifest under *reference* (tag or digest); return its digest."""
    answer = client.put(
        f"{base_url}/v2/{name}/manifests/{reference}",
        content=data,
        headers={"content-type": media_type},
    )
    if answer.status_code != 201:
        raise RuntimeError(f"manifest PUT {name}:{reference} failed: {answer.status_code} {answer.text}")
    return str(answer.headers.get("docker-content-digest", ""))


def push_image(
    base_url: str, name: str, tag: str | None, image: Image, *, client: httpx.Client | None = None
) -> str:
    """Push *image*'s blobs and manifest (by *tag*, or by digest if None).

    Returns the manifest digest the registry reported, which is checked to
    equal ``image.digest``.
    """
    with session(client) as http:
        for digest, path in image.blobs.items():
            push_blob(http, base_url, name, digest, path)
        reported = put_manifest(http, base_url, name, tag or image.digest, image.media_type, image.manifest)
    if reported != image.digest:
        raise RuntimeError(f"registry reported {reported} for manifest {image.digest}")
    return reported


def push_index(
    base_url: str, name: str, tag: str | None, index: Index, *, client: httpx.Client | None = None
) -> str:
    """Push every child image by digest, then the index by *tag*; return its digest."""
    with session(client) as http:
        for child in index.children:
            push_image(base_url, name, None, child, client=http)
        reported = put_manifest(http, base_url, name, tag or index.digest, index.media_type, index.manifest)
    if reported != index.digest:
        raise RuntimeError(f"registry reported {reported} for index {index.digest}")
    return reported


def get_manifest(
    base_url: str,
    name: str,
    reference: str,
    *,
    accept: Sequence[str] = MANIFEST_MEDIA_TYPES,
    method: str = "GET",
    client: httpx.Client | None = None,
) -> httpx.Response:
    """GET (or HEAD) a manifest with an ``Accept`` header listing *accept*."""
    with session(client) as http:
        return http.request(
            method, f"{base_url}/v2/{name}/manifests/{reference}", headers={"accept": ", ".join(accept)}
        )


def fetch_blob_digest(
    base_url: str, name: str, digest: str, *, client: httpx.Client | None = None
) -> tuple[str, int]:
    """Stream a blob and return ``(sha256:<hex> of the body, byte count)``.

    Raises :class:`httpx.HTTPStatusError` unless the answer is 200.
    """
    hasher = hashlib.sha256()
    size = 0
    with session(client) as http, http.stream(
        "GET", f"{base_url}/v2/{name}/blobs/{digest}", follow_redirects=True
    ) as answer:
        answer.raise_for_status()
        for data in answer.iter_bytes(CHUNK):
            hasher.update(data)
            size += len(data)
    return "sha256:" + hasher.hexdigest(), size


def pull_checked(http: httpx.Client, base_url: str, name: str, tag: str, image: Image) -> list[str]:
    """GET *image*'s manifest by *tag*, then its config and layers, checking every byte; the
    ``X-Mirror-Cache`` of the manifest and of each blob, in that order."""
    answer = http.get(f"{base_url}/v2/{name}/manifests/{tag}", headers={"accept": ", ".join(MANIFEST_MEDIA_TYPES)})
    assert answer.status_code == 200, answer.text
    assert answer.content == image.manifest
    outcomes = [answer.headers["x-mirror-cache"]]
    for digest in (image.config_digest, *(layer.digest for layer in image.layers)):
        blob = http.get(f"{base_url}/v2/{name}/blobs/{digest}")
        assert blob.status_code == 200, (digest, blob.text[:200])
        assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
        outcomes.append(blob.headers["x-mirror-cache"])
    return outcomes
