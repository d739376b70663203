"""HTTP routes of the /v2/ API: parse, dispatch to the pull-through policy, render.

Routes know nothing of the disk layout or the upstream; every parameter is validated by
``reference.py`` before it goes further, and every error leaves as the spec's JSON.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import APIError, error_response
from .manifest import accepted
from .pullthrough import PullThrough
from .reference import (
    InvalidRange,
    ParseError,
    UnsupportedDigest,
    parse_digest,
    parse_name,
    parse_range,
    parse_reference,
)
from .responses import BlobResponse

API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
CACHE_HEADER = "X-Mirror-Cache"
MAX_PAGE = 10000

_ROUTES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?P<name>.+)/blobs/uploads/(?P<upload>[^/]*)"), "upload"),
    (re.compile(r"(?P<name>.+)/manifests/(?P<reference>[^/]+)"), "manifest"),
    (re.compile(r"(?P<name>.+)/blobs/(?P<digest>[^/]+)"), "blob"),
    (re.compile(r"(?P<name>.+)/tags/list"), "tags"),
]


async def base(request: Request) -> Response:
    return JSONResponse({}, headers=API_HEADERS)


async def dispatch(request: Request) -> Response:
    """Every ``/v2/<name>/...`` request."""
    path = request.path_params["path"]
    head = request.method == "HEAD"
    try:
        for pattern, kind in _ROUTES:
            m = pattern.fullmatch(path)
            if m is None:
                continue
            if kind == "upload" or request.method not in ("GET", "HEAD"):
                raise APIError("UNSUPPORTED", f"{request.method} is not supported on this endpoint")
            name = _name(m.group("name"))
            handler = _HANDLERS[kind]
            return await handler(request, name, m)
        raise APIError("NAME_UNKNOWN", "unknown endpoint", detail={"path": path}, status=404)
    except APIError as exc:
        return error_response(exc, head=head)


def _name(raw: str) -> str:
    try:
        return parse_name(raw)
    except ParseError as exc:
        raise APIError("NAME_INVALID", detail=str(exc)) from exc


async def _manifest(request: Request, name: str, m: re.Match[str]) -> Response:
    pull: PullThrough = request.state.pull
    try:
        reference = parse_reference(m.group("reference"))
    except UnsupportedDigest as exc:
        raise APIError("UNSUPPORTED", detail=str(exc), status=400) from exc
    except ParseError as exc:
        code = "DIGEST_INVALID" if exc.kind == "digest" else "TAG_INVALID"
        raise APIError(code, "invalid reference", detail=str(exc)) from exc
    result = await pull.manifest(name, reference, accepted(request.headers.get("accept")))
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


async def _blob(request: Request, name: str, m: re.Match[str]) -> Response:
    pull: PullThrough = request.state.pull
    try:
        digest = parse_digest(m.group("digest"))
    except UnsupportedDigest as exc:
        raise APIError("UNSUPPORTED", detail=str(exc), status=400) from exc
    except ParseError as exc:
        raise APIError("DIGEST_INVALID", "invalid digest", detail=str(exc)) from exc
    headers = {**API_HEADERS, "Docker-Content-Digest": str(digest), "ETag": f'"{digest}"'}
    if request.method == "HEAD":
        found = await pull.blob_head(name, digest)
        headers[CACHE_HEADER] = found.outcome.value
        headers.update({"Content-Length": str(found.size), "Accept-Ranges": "bytes"})
        return Response(None, headers=headers, media_type="application/octet-stream")
    result = await pull.blob(name, digest)
    headers[CACHE_HEADER] = result.outcome.value
    byte_range = None
    range_header = request.headers.get("range")
    if range_header and result.source.size is not None:
        try:
            byte_range = parse_range(range_header, result.source.size)
        except InvalidRange as exc:
            result.source.close()
            raise APIError("RANGE_INVALID", detail=str(exc),
                           headers={"Content-Range": f"bytes */{result.source.size}"}) from exc
    return BlobResponse(result.source, headers, byte_range=byte_range)  # type: ignore[return-value]


async def _tags(request: Request, name: str, m: re.Match[str]) -> Response:
    pull: PullThrough = request.state.pull
    n = _page_size(request.query_params.get("n"))
    last = request.query_params.get("last")
    tags, more = await pull.tags(name, n, last)
    headers = dict(API_HEADERS)
    if more and tags:
        query = urlencode({"n": n, "last": tags[-1]} if n is not None else {"last": tags[-1]})
        headers["Link"] = f'</v2/{name}/tags/list?{query}>; rel="next"'
    return JSONResponse({"name": name, "tags": tags}, headers=headers)


def _page_size(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or int(raw) > MAX_PAGE:
        raise APIError("PAGINATION_NUMBER_INVALID", detail=f"n must be an integer between 0 and {MAX_PAGE}")
    return int(raw)


_HANDLERS: dict[str, Callable[[Request, str, re.Match[str]], Awaitable[Response]]] = {
    "manifest": _manifest,
    "blob": _blob,
    "tags": _tags,
}

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]

routes = [
    Route("/v2/", base, methods=["GET", "HEAD"]),
    Route("/v2", base, methods=["GET", "HEAD"]),
    Route("/v2/{path:path}", dispatch, methods=ALL_METHODS),
]
