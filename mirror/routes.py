"""HTTP routes of the /v2/ API: parse, dispatch to the pull-through policy, render.

Routes know nothing of the disk layout or the upstream; every parameter is validated by
``reference.py`` before it goes further, and every error leaves as the spec's JSON.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import admin
from .blobstore import BlobReader
from .bypass import BypassBlob
from .errors import APIError, error_response
from .growing import GrowingBlob
from .local import MAX_MANIFEST_BYTES, LocalRegistry, StoredManifest
from .manifest import OCI_INDEX, accepted
from .memo import ManifestMemo, accept_key
from .pullthrough import ManifestResult, PullThrough, _paginate
from .pushed import referrers_index
from .reference import (
    Digest,
    InvalidRange,
    ParseError,
    UnsupportedDigest,
    parse_digest,
    parse_media_type,
    parse_name,
    parse_range,
    parse_reference,
    parse_tag,
)
from .responses import BlobResponse

API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
CACHE_HEADER = "X-Mirror-Cache"
MAX_PAGE = 10000

_ROUTES: list[tuple[re.Pattern[str], str, frozenset[str]]] = [
    (re.compile(r"(?P<name>.+)/blobs/uploads/(?P<upload>[^/]*)"), "upload",
     frozenset({"POST", "PATCH", "PUT", "GET", "HEAD", "DELETE"})),
    (re.compile(r"(?P<name>.+)/manifests/(?P<reference>[^/]+)"), "manifest",
     frozenset({"GET", "HEAD", "PUT", "DELETE"})),
    (re.compile(r"(?P<name>.+)/blobs/(?P<digest>[^/]+)"), "blob", frozenset({"GET", "HEAD", "DELETE"})),
    (re.compile(r"(?P<name>.+)/tags/list"), "tags", frozenset({"GET", "HEAD"})),
    (re.compile(r"(?P<name>.+)/referrers/(?P<digest>[^/]+)"), "referrers", frozenset({"GET", "HEAD"})),
]


async def base(request: Request) -> Response:
    return JSONResponse({}, headers=API_HEADERS)


async def dispatch(request: Request) -> Response:
    """Every ``/v2/<name>/...`` request."""
    path = request.path_params["path"]
    head = request.method == "HEAD"
    try:
        for pattern, kind, methods in _ROUTES:
            m = pattern.fullmatch(path)
            if m is None:
                continue
            if request.method not in methods:
                raise APIError("UNSUPPORTED", f"{request.method} is not supported on this endpoint")
            name = _name(m.group("name"))
            handler = _HANDLERS[kind]
            return await handler(request, name, m)
        raise APIError("NAME_UNKNOWN", "unknown endpoint", detail={"path": path}, status=404)
    except APIError as exc:
        return error_response(exc, head=head)


DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def _upstream_for(request: Request, name: str) -> tuple[PullThrough, str]:
    """The upstream a request is for, and the name to ask it for.

    containerd names the registry in ``?ns=``; other clients can prefix the repository with it
    (``/v2/ghcr.io/org/app/...``); anything else goes to the default upstream.
    """
    pulls: dict[str, PullThrough] = request.state.pulls
    default: PullThrough = request.state.pull
    ns = request.query_params.get("ns")
    if ns:
        registry = "docker.io" if ns.lower() in DOCKER_HUB_ALIASES else ns.lower()
        if registry in pulls:
            return pulls[registry], name
        raise APIError("NAME_UNKNOWN", f"no upstream is configured for {ns}", detail={"ns": ns})
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first):
        registry = "docker.io" if first in DOCKER_HUB_ALIASES else first
        if registry in pulls:
            return pulls[registry], rest
    return default, name


def _name(raw: str) -> str:
    try:
        return parse_name(raw)
    except ParseError as exc:
        raise APIError("NAME_INVALID", detail=str(exc)) from exc


def _reference(raw: str, method: str) -> str | Digest:
    """A manifest reference; a tag that cannot exist is unknown to a read, invalid to a write.

    The spec's conformance suite reads ``.INVALID_MANIFEST_NAME`` and expects ``404
    MANIFEST_UNKNOWN`` (distribution-spec, "Pulling manifests": a manifest that does not exist
    is 404); a PUT or DELETE of such a tag is ``400 TAG_INVALID``.
    """
    try:
        return parse_reference(raw)
    except UnsupportedDigest as exc:
        raise APIError("UNSUPPORTED", detail=str(exc), status=400) from exc
    except ParseError as exc:
        if exc.kind == "digest":
            raise APIError("DIGEST_INVALID", "invalid reference", detail=str(exc)) from exc
        if method in ("GET", "HEAD"):
            raise APIError("MANIFEST_UNKNOWN", detail={"reference": raw[:200], "reason": str(exc)}) from exc
        raise APIError("TAG_INVALID", "invalid reference", detail=str(exc)) from exc


def _digest(raw: str) -> Digest:
    try:
        return parse_digest(raw)
    except UnsupportedDigest as exc:
        raise APIError("UNSUPPORTED", detail=str(exc), status=400) from exc
    except ParseError as exc:
        raise APIError("DIGEST_INVALID", "invalid digest", detail=str(exc)) from exc


async def _manifest(request: Request, name: str, m: re.Match[str]) -> Response:
    pull, cached_name = _upstream_for(request, name)
    local: LocalRegistry = request.state.local
    reference = _reference(m.group("reference"), request.method)
    if request.method == "PUT":
        return await _put_manifest(request, name, reference)
    if request.method == "DELETE":
        await local.delete_manifest(name, reference)
        return Response(status_code=202, headers=API_HEADERS)
    # Clients such as dockerd send one Accept header per media type.
    accept = accepted(", ".join(request.headers.getlist("accept")))
    memo: ManifestMemo = request.state.memo
    stamp = memo.stamp() if not request.scope["query_string"] else None
    touch = None
    result: StoredManifest | ManifestResult
    # How long an answer by tag may be given from memory: a pushed tag until the index moves.
    fresh_until: float | None = None
    if local.is_local(name):
        result = await local.manifest(name, reference, accept)
        outcome = "LOCAL"
    else:
        pulled = await pull.manifest(cached_name, reference, accept)
        result, outcome = pulled, pulled.outcome.value
        touch = pull.toucher(cached_name, result.digest)
        fresh_until = pulled.fresh_until
        if not isinstance(reference, Digest) and fresh_until is None:
            stamp = None  # stale, or not stored: ask again next time
    # The same answer for this path from now on, until the index withdraws it (unless it was not
    # stored), or for a tag while it is fresh (``memo.py``).
    if stamp is not None and outcome not in ("BYPASS", "STALE"):
        memo.remember(request.scope["path"], stamp, body=result.body, media_type=result.media_type,
                      digest=result.digest, outcome="LOCAL" if outcome == "LOCAL" else "HIT", touch=touch,
                      accept=None if isinstance(reference, Digest) else accept_key(request.scope["headers"]),
                      expires=fresh_until)
    headers = {
        **API_HEADERS,
        "Docker-Content-Digest": result.digest,
        "ETag": f'"{result.digest}"',
        CACHE_HEADER: outcome,
    }
    if request.headers.get("if-none-match") == f'"{result.digest}"':
        return Response(status_code=304, headers=headers)
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(result.body))
        return Response(None, headers=headers, media_type=result.media_type)
    return Response(result.body, headers=headers, media_type=result.media_type)


async def _put_manifest(request: Request, name: str, reference: str | Digest) -> Response:
    local: LocalRegistry = request.state.local
    with local.storing():
        local.check_push(name)
        body = await _read_limited(request, MAX_MANIFEST_BYTES)
        digest, subject = await local.put_manifest(name, reference, request.headers.get("content-type", ""), body)
    headers = {**API_HEADERS, "Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest}
    if subject:
        headers["OCI-Subject"] = subject
    return Response(status_code=201, headers=headers)


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise APIError("MANIFEST_INVALID", f"manifest is larger than {limit} bytes", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError("MANIFEST_INVALID", f"manifest is larger than {limit} bytes", status=413)
    return bytes(body)


async def _blob(request: Request, name: str, m: re.Match[str]) -> Response:
    pull, cached_name = _upstream_for(request, name)
    local: LocalRegistry = request.state.local
    digest = _digest(m.group("digest"))
    if request.method == "DELETE":
        await local.delete_blob(name, digest)
        return Response(status_code=202, headers={**API_HEADERS, "Docker-Content-Digest": str(digest)})
    headers = {**API_HEADERS, "Docker-Content-Digest": str(digest), "ETag": f'"{digest}"'}
    is_local = local.is_local(name)
    if request.method == "HEAD":
        if is_local:
            size, outcome = await local.blob_size(name, digest), "LOCAL"
        else:
            found = await pull.blob_head(cached_name, digest, pushable=local.takes_pushes(name))
            size, outcome = found.size, found.outcome.value
        headers[CACHE_HEADER] = outcome
        headers.update({"Content-Length": str(size), "Accept-Ranges": "bytes"})
        return Response(None, headers=headers, media_type="application/octet-stream")
    source: BlobReader | GrowingBlob | BypassBlob
    if is_local:
        source = await local.open_blob(name, digest)
        headers[CACHE_HEADER] = "LOCAL"
    else:
        result = await pull.blob(cached_name, digest)
        source = result.source
        headers[CACHE_HEADER] = result.outcome.value
    byte_range = None
    range_header = request.headers.get("range")
    if range_header and source.size is not None:
        try:
            byte_range = parse_range(range_header, source.size)
        except InvalidRange as exc:
            source.close()
            raise APIError("RANGE_INVALID", detail=str(exc),
                           headers={"Content-Range": f"bytes */{source.size}"}) from exc
    return BlobResponse(source, headers, byte_range=byte_range)  # type: ignore[return-value]


async def _upload(request: Request, name: str, m: re.Match[str]) -> Response:
    local: LocalRegistry = request.state.local
    with local.storing():
        return await _upload_step(request, local, name, m)


async def _upload_step(request: Request, local: LocalRegistry, name: str, m: re.Match[str]) -> Response:
    uuid = m.group("upload")
    method = request.method
    if not uuid:
        if method != "POST":
            raise APIError("UNSUPPORTED", f"{method} is not supported on this endpoint")
        return await _start_upload(request, name)
    if method == "POST":
        raise APIError("UNSUPPORTED", "POST is not supported on an upload in progress")
    if method in ("GET", "HEAD"):
        state = await local.upload_status(name, uuid)
        return Response(status_code=204, headers={**API_HEADERS, **local.upload_headers(name, state)})
    if method == "DELETE":
        await local.cancel(name, uuid)
        return Response(status_code=204, headers=API_HEADERS)
    if method == "PATCH":
        state = await local.append(name, uuid, request.stream(), request.headers.get("content-range"))
        return Response(status_code=202, headers={**API_HEADERS, "Content-Length": "0",
                                                  **local.upload_headers(name, state)})
    # PUT: the last chunk (optional) and the digest.
    digest = _query_digest(request)
    await local.finish(name, uuid, digest, request.stream(), request.headers.get("content-range"))
    return _blob_created(name, digest)


async def _start_upload(request: Request, name: str) -> Response:
    local: LocalRegistry = request.state.local
    mount = request.query_params.get("mount")
    mount_digest = _digest(mount) if mount is not None else None
    upload_digest = _query_digest(request) if "digest" in request.query_params else None
    local.check_push(name)
    if mount_digest is not None:
        digest = mount_digest
        source = request.query_params.get("from")
        if source:
            mounted: bool = await anyio.to_thread.run_sync(local.mount, name, digest, source)
            if mounted:
                return _blob_created(name, digest)
    state = await local.start_upload(name)
    if upload_digest is not None:  # monolithic upload
        await local.finish(name, state.uuid, upload_digest, request.stream())
        return _blob_created(name, upload_digest)
    return Response(status_code=202, headers={**API_HEADERS, "Content-Length": "0",
                                              **local.upload_headers(name, state)})


def _query_digest(request: Request) -> Digest:
    raw = request.query_params.get("digest")
    if not raw:
        raise APIError("DIGEST_INVALID", detail="the digest query parameter is required")
    return _digest(raw)


def _blob_created(name: str, digest: Digest) -> Response:
    return Response(status_code=201, headers={
        **API_HEADERS, "Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": str(digest),
        "Content-Length": "0",
    })


async def _referrers(request: Request, name: str, m: re.Match[str]) -> Response:
    local: LocalRegistry = request.state.local
    pull, cached_name = _upstream_for(request, name)
    digest = _digest(m.group("digest"))
    artifact_type = _artifact_type(request.query_params.get("artifactType"))
    if local.is_local(name):
        found, outcome = local.referrers(name, digest, artifact_type), "LOCAL"
    else:
        result = await pull.referrers(cached_name, digest, artifact_type)
        found, outcome = result.manifests, result.outcome.value
    headers = {**API_HEADERS, CACHE_HEADER: outcome}
    if artifact_type is not None:  # applied here, whether or not the upstream did
        headers["OCI-Filters-Applied"] = "artifactType"
    return Response(referrers_index(found), headers=headers, media_type=OCI_INDEX)


async def _tags(request: Request, name: str, m: re.Match[str]) -> Response:
    pull, cached_name = _upstream_for(request, name)
    local: LocalRegistry = request.state.local
    n = _page_size(request.query_params.get("n"))
    last = _last(request.query_params.get("last"), parse_tag, "TAG_INVALID")
    if local.is_local(name):
        tags, more = _paginate(local.tags(name), n, last)
        outcome = "LOCAL"
    else:
        tags, more, served = await pull.tags(cached_name, n, last)
        outcome = served.value
    headers = {**API_HEADERS, CACHE_HEADER: outcome}
    if more and tags:
        query = urlencode({"n": n, "last": tags[-1]} if n is not None else {"last": tags[-1]})
        headers["Link"] = f'</v2/{name}/tags/list?{query}>; rel="next"'
    return JSONResponse({"name": name, "tags": tags}, headers=headers)


async def catalog(request: Request) -> Response:
    local: LocalRegistry = request.state.local
    try:
        n = _page_size(request.query_params.get("n"))
        last = _last(request.query_params.get("last"), parse_name, "NAME_INVALID")
    except APIError as exc:
        return error_response(exc, head=request.method == "HEAD")
    names = sorted({local.catalog_name(repo) for repo in local.metadata.repositories()})
    page, more = _paginate(names, n, last)
    headers = dict(API_HEADERS)
    if more and page:
        query = urlencode({"n": n, "last": page[-1]} if n is not None else {"last": page[-1]})
        headers["Link"] = f'</v2/_catalog?{query}>; rel="next"'
    return JSONResponse({"repositories": page}, headers=headers)


def _page_size(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not re.fullmatch(r"[0-9]{1,9}", raw) or int(raw) > MAX_PAGE:
        raise APIError("PAGINATION_NUMBER_INVALID", detail=f"n must be an integer between 0 and {MAX_PAGE}")
    return int(raw)


def _last(raw: str | None, parse: Callable[[str], str], code: str) -> str | None:
    """The ``last`` pagination marker: a tag (tags list) or a repository name (catalog)."""
    if raw is None or raw == "":
        return None
    try:
        return parse(raw)
    except ParseError as exc:
        raise APIError(code, "invalid last parameter", detail=str(exc)) from exc


def _artifact_type(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        return parse_media_type(raw)
    except ParseError as exc:
        raise APIError("UNSUPPORTED", "invalid artifactType filter", detail=str(exc), status=400) from exc


_HANDLERS: dict[str, Callable[[Request, str, re.Match[str]], Awaitable[Response]]] = {
    "manifest": _manifest,
    "blob": _blob,
    "tags": _tags,
    "upload": _upload,
    "referrers": _referrers,
}

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]

routes = [
    Route("/v2/", base, methods=["GET", "HEAD"]),
    Route("/v2", base, methods=["GET", "HEAD"]),
    Route("/v2/_catalog", catalog, methods=["GET", "HEAD"]),
    Route("/v2/{path:path}", dispatch, methods=ALL_METHODS),
    Route("/_mirror/", admin.operator, methods=["GET"]),
    Route("/_mirror/preload", admin.preload, methods=["POST"]),
]
