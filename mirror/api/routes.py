"""HTTP routes of the /v2/ API: parse, call the repository the name is (``registry/namespaces.py``), render.

Routes know nothing of the disk layout, the upstream, or which kind of repository they call;
every parameter is validated by ``spec/reference.py`` before it goes further, and every error leaves
as the spec's JSON.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..registry.namespaces import Namespaces
from ..registry.repository import Repository, paginate
from ..registry.uploads import upload_headers
from ..spec.endpoints import API_HEADERS, CACHE_HEADER, Endpoint, Kind, endpoint
from ..spec.errors import APIError, error_response
from ..spec.manifest import OCI_INDEX, accepted
from ..spec.pushed import referrers_index
from ..spec.reference import (
    Digest,
    InvalidRange,
    ParseError,
    UnsupportedDigest,
    parse_digest,
    parse_listed_name,
    parse_media_type,
    parse_name,
    parse_range,
    parse_reference,
    parse_tag,
)
from ..storage.bypass import BypassBlob
from ..storage.driver import BlobStore
from ..storage.growing import GrowingBlob
from . import admin
from .memo import ManifestMemo, accept_key
from .responses import BlobResponse

MAX_PAGE = 10000


async def base(request: Request) -> Response:
    return JSONResponse({}, headers=API_HEADERS)


async def dispatch(request: Request) -> Response:
    """Every ``/v2/<name>/...`` request, as :func:`~mirror.spec.endpoints.endpoint` reads its path."""
    path = request.path_params["path"]
    head = request.method == "HEAD"
    try:
        found = endpoint(f"/v2/{path}", request.method)
        handler = _HANDLERS.get(found.kind)
        if handler is None or found.name is None:
            raise APIError("NAME_UNKNOWN", "unknown endpoint", detail={"path": path}, status=404)
        if not found.allowed:  # with the methods it does answer (RFC 9110 section 15.5.6)
            raise APIError("UNSUPPORTED", f"{request.method} is not supported on this endpoint",
                           headers={"Allow": ", ".join(sorted(found.methods))})
        return await handler(request, _name(found.name), found)
    except APIError as exc:
        return error_response(exc, head=head)


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


async def _repository(request: Request, name: str) -> Repository:
    namespaces: Namespaces = request.state.namespaces
    return await namespaces.repository(name, request.query_params.get("ns"))


async def _manifest(request: Request, name: str, found: Endpoint) -> Response:
    memo: ManifestMemo = request.state.memo
    # Read before the index is (the repository's kind included): see ``api/memo.py``.
    stamp = memo.stamp() if not request.scope["query_string"] else None
    repository = await _repository(request, name)
    reference = _reference(found.reference or "", request.method)
    if request.method == "PUT":
        return await _put_manifest(request, repository, reference)
    if request.method == "DELETE":
        await repository.delete_manifest(reference)
        return Response(status_code=202, headers=API_HEADERS)
    # Clients such as dockerd send one Accept header per media type.
    accept = accepted(", ".join(request.headers.getlist("accept")))
    read = repository.manifest_head if request.method == "HEAD" else repository.manifest
    result = await read(reference, accept)
    # The same answer for this path from now on, until the index withdraws it, or for a tag while
    # it is fresh (``api/memo.py``); unless the repository says it may not be given again.
    if stamp is not None and result.memorable:
        memo.remember(request.scope["path"], stamp, body=result.body, media_type=result.media_type,
                      digest=result.digest, outcome=result.remembered_outcome, touch=result.touch,
                      accept=None if isinstance(reference, Digest) else accept_key(request.scope["headers"]),
                      expires=result.fresh_until)
    headers = {
        **API_HEADERS,
        "Docker-Content-Digest": result.digest,
        "ETag": f'"{result.digest}"',
        CACHE_HEADER: result.outcome.value,
    }
    if request.headers.get("if-none-match") == f'"{result.digest}"':
        return Response(status_code=304, headers=headers)
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(result.body))
        return Response(None, headers=headers, media_type=result.media_type)
    return Response(result.body, headers=headers, media_type=result.media_type)


async def _put_manifest(request: Request, repository: Repository, reference: str | Digest) -> Response:
    pushed = await repository.put_manifest(reference, request.headers.get("content-type", ""), request.stream(),
                                           request.headers.get("content-length"))
    headers = {**API_HEADERS, "Location": f"/v2/{repository.name}/manifests/{pushed.digest}",
               "Docker-Content-Digest": pushed.digest}
    if pushed.subject:
        headers["OCI-Subject"] = pushed.subject
    return Response(status_code=201, headers=headers)


async def _blob(request: Request, name: str, found: Endpoint) -> Response:
    repository = await _repository(request, name)
    digest = _digest(found.digest or "")
    if request.method == "DELETE":
        await repository.delete_blob(digest)
        return Response(status_code=202, headers={**API_HEADERS, "Docker-Content-Digest": str(digest)})
    headers = {**API_HEADERS, "Docker-Content-Digest": str(digest), "ETag": f'"{digest}"'}
    if request.method == "HEAD":
        head = await repository.blob_head(digest)
        headers[CACHE_HEADER] = head.outcome.value
        headers.update({"Content-Length": str(head.size), "Accept-Ranges": "bytes"})
        return Response(None, headers=headers, media_type="application/octet-stream")
    result = await repository.blob(digest)
    source = result.source
    headers[CACHE_HEADER] = result.outcome.value
    if not isinstance(source, (GrowingBlob, BypassBlob)):  # stored: the store may hand it out itself
        store: BlobStore = request.state.store
        if (url := store.redirect_url(digest, source)) is not None:  # storage.s3.redirect: a presigned GET
            source.close()
            request.state.metrics.handed_out(result.outcome.value, source.size or 0)  # fetched from the bucket
            return Response(status_code=307, headers={**headers, "Location": url})
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


async def _upload(request: Request, name: str, found: Endpoint) -> Response:
    namespaces: Namespaces = request.state.namespaces
    uuid = found.upload or ""
    # An upload goes on by its name alone (its location carries no ``?ns=``); it starts only for a name
    # of this registry's: one ``?ns=`` gives to another upstream is refused (``registry/namespaces.py``).
    repository = await namespaces.repository(name, None if uuid else request.query_params.get("ns"))
    method = request.method
    if not uuid:
        if method != "POST":
            raise APIError("UNSUPPORTED", f"{method} is not supported on this endpoint", headers={"Allow": "POST"})
        return await _start_upload(request, repository)
    if method == "POST":
        raise APIError("UNSUPPORTED", "POST is not supported on an upload in progress",
                       headers={"Allow": "DELETE, GET, HEAD, PATCH, PUT"})
    if method in ("GET", "HEAD"):
        state = await repository.upload_status(uuid)
        return Response(status_code=204, headers={**API_HEADERS, **upload_headers(name, state.uuid, state.offset)})
    if method == "DELETE":
        await repository.cancel(uuid)
        return Response(status_code=204, headers=API_HEADERS)
    if method == "PATCH":
        state = await repository.append(uuid, request.stream(), request.headers.get("content-range"),
                                        _content_length(request))
        return Response(status_code=202, headers={**API_HEADERS, "Content-Length": "0",
                                                  **upload_headers(name, state.uuid, state.offset)})
    # PUT: the last chunk (optional) and the digest.
    digest = _query_digest(request)
    await repository.finish(uuid, digest, request.stream(), request.headers.get("content-range"),
                            _content_length(request))
    return _blob_created(name, digest)


def _content_length(request: Request) -> int | None:
    """The request's ``Content-Length`` (RFC 9110 section 8.6), ``None`` when absent (chunked)."""
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


async def _start_upload(request: Request, repository: Repository) -> Response:
    name = repository.name
    mount = request.query_params.get("mount")
    mount_digest = _digest(mount) if mount is not None else None
    upload_digest = _query_digest(request) if "digest" in request.query_params else None
    source = request.query_params.get("from")
    if mount_digest is not None and source and await repository.mount(mount_digest, source):
        return _blob_created(name, mount_digest)
    state = await repository.start_upload()
    if upload_digest is not None:  # monolithic upload
        await repository.finish(state.uuid, upload_digest, request.stream())
        return _blob_created(name, upload_digest)
    return Response(status_code=202, headers={**API_HEADERS, "Content-Length": "0",
                                              **upload_headers(name, state.uuid, state.offset)})


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


async def _referrers(request: Request, name: str, found: Endpoint) -> Response:
    repository = await _repository(request, name)
    digest = _digest(found.digest or "")
    artifact_type = _artifact_type(request.query_params.get("artifactType"))
    result = await repository.referrers(digest, artifact_type)
    headers = {**API_HEADERS, CACHE_HEADER: result.outcome.value}
    if artifact_type is not None:  # applied here, whether or not the upstream did
        headers["OCI-Filters-Applied"] = "artifactType"
    return Response(referrers_index(result.manifests), headers=headers, media_type=OCI_INDEX)


async def _tags(request: Request, name: str, found: Endpoint) -> Response:
    repository = await _repository(request, name)
    n = _page_size(request.query_params.get("n"))
    last = _last(request.query_params.get("last"), parse_tag, "TAG_INVALID")
    page = await repository.tags(n, last)
    tags = page.tags
    headers = {**API_HEADERS, CACHE_HEADER: page.outcome.value}
    if page.more and tags:
        # The next page is of the same repository: of the same registry too (``?ns=``).
        ns = {"ns": ns} if (ns := request.query_params.get("ns")) else {}
        query = urlencode({**ns, "n": n, "last": tags[-1]} if n is not None else {**ns, "last": tags[-1]})
        headers["Link"] = f'</v2/{name}/tags/list?{query}>; rel="next"'
    return JSONResponse({"name": name, "tags": tags}, headers=headers)


async def catalog(request: Request) -> Response:
    namespaces: Namespaces = request.state.namespaces
    try:
        n = _page_size(request.query_params.get("n"))
        last = _last(request.query_params.get("last"), parse_listed_name, "NAME_INVALID")
    except APIError as exc:
        return error_response(exc, head=request.method == "HEAD")
    page, more = paginate(await namespaces.catalog(), n, last)
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


_HANDLERS: dict[Kind, Callable[[Request, str, Endpoint], Awaitable[Response]]] = {
    Kind.MANIFEST: _manifest,
    Kind.BLOB: _blob,
    Kind.TAGS: _tags,
    Kind.UPLOAD: _upload,
    Kind.REFERRERS: _referrers,
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
