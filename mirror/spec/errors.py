"""API errors: the spec's error codes, registered once with their HTTP status and message.

Every error a client sees under ``/v2/`` is an :class:`APIError`, rendered in one place
(:func:`error_response`) as ``{"errors": [{"code", "message", "detail"}]}``.  Lower layers
(store, upstream client, config) raise their own exceptions; only the pull-through policy
and the routes translate them into API errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from .endpoints import API_HEADERS


@dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int
    message: str


_CODES = [
    ErrorCode("BLOB_UNKNOWN", 404, "blob unknown to registry"),
    ErrorCode("BLOB_UPLOAD_INVALID", 400, "blob upload invalid"),
    ErrorCode("BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"),
    ErrorCode("DIGEST_INVALID", 400, "provided digest did not match uploaded content"),
    ErrorCode("MANIFEST_BLOB_UNKNOWN", 404, "manifest references a manifest or blob unknown to registry"),
    ErrorCode("MANIFEST_INVALID", 400, "manifest invalid"),
    ErrorCode("MANIFEST_UNKNOWN", 404, "manifest unknown to registry"),
    ErrorCode("NAME_INVALID", 400, "invalid repository name"),
    ErrorCode("NAME_UNKNOWN", 404, "repository name not known to registry"),
    ErrorCode("SIZE_INVALID", 400, "provided length did not match content length"),
    ErrorCode("TAG_INVALID", 400, "manifest tag did not match URI"),
    ErrorCode("PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"),
    ErrorCode("RANGE_INVALID", 416, "requested range not satisfiable"),
    ErrorCode("UNAUTHORIZED", 401, "authentication required"),
    ErrorCode("DENIED", 403, "requested access to the resource is denied"),
    ErrorCode("UNSUPPORTED", 405, "the operation is unsupported"),
    ErrorCode("TOOMANYREQUESTS", 429, "too many requests"),
    ErrorCode("UNAVAILABLE", 503, "upstream registry unavailable and no cached copy"),
]
CODES: dict[str, ErrorCode] = {c.code: c for c in _CODES}


class APIError(Exception):
    """An error answered to the client with a spec error code."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        known = CODES[code]
        self.code = code
        self.message = message or known.message
        self.detail = detail
        self.status = status or known.status
        self.headers = headers or {}
        super().__init__(f"{code}: {self.message}")


def error_response(exc: APIError, *, head: bool = False) -> Response:
    """Render an :class:`APIError` in the spec's JSON error format."""
    entry: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.detail is not None:
        entry["detail"] = exc.detail
    body = json.dumps({"errors": [entry]}).encode()
    headers = {**API_HEADERS, "X-Content-Type-Options": "nosniff", **exc.headers}
    if head:
        headers["Content-Length"] = str(len(body))
        return Response(None, status_code=exc.status, headers=headers, media_type="application/json")
    return Response(body, status_code=exc.status, headers=headers, media_type="application/json")
