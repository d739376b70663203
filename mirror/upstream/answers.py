"""What the upstream client hands back: a manifest's HEAD, a verified manifest, a referrers list
and a blob body being received; and whether a 404 is the registry's own answer.

Also the error tree's (``errors.py``) member for an answer that is not a success (:func:`upstream_error`).
Imports ``codings`` (identity lengths), ``rawbody``, ``drain``, ``errors`` and ``reference`` only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx

from ..spec.reference import Digest
from .codings import identity_length
from .drain import Drain, drainable
from .errors import (
    UpstreamDenied,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from .rawbody import raw_body

#: Most bytes of an error answer's body read for its error code.
MAX_ERROR_BYTES = 64 << 10


@dataclass(frozen=True)
class ManifestHead:
    digest: str | None
    media_type: str
    size: int | None


@dataclass(frozen=True)
class Manifest:
    body: bytes
    media_type: str
    digest: Digest


@dataclass(frozen=True)
class Referrers:
    """An upstream's answer to ``GET /v2/<name>/referrers/<digest>``, every page of it.

    ``manifests`` is None when the answer was not an image index (the upstream has no Referrers
    API, as oras-go and go-containerregistry read such an answer); ``filtered`` says the upstream
    applied the ``artifactType`` filter (``OCI-Filters-Applied``, distribution-spec v1.1).
    """

    manifests: list[dict[str, Any]] | None
    filtered: bool


class BlobDownload:
    """A blob body being received; ``size`` is the announced identity length, if any (never a coded one's),
    the whole blob's for a body that starts at byte ``start`` (the rest asked for with ``Range``).

    ``resume``, when set, fetches the rest of a body that broke off (:meth:`broken`): called with the
    identity bytes received, it gives an async context manager of a :class:`BlobDownload` of the bytes
    from there on (``Upstream._blob_rest``, a ``Range`` request), or raises an
    :class:`~.errors.UpstreamError`; ``resumes`` is how many times in a row it may be asked with no
    byte received in between (``upstream.retries``).
    """

    def __init__(self, response: httpx.Response, count: Callable[[int], None] | None = None,
                 body: AsyncIterator[bytes] | None = None, invalid: Callable[[], None] | None = None,
                 resume: Callable[[int], AbstractAsyncContextManager[BlobDownload]] | None = None,
                 resumes: int = 0) -> None:
        self.response = response
        self.size = identity_length(response)
        self.start = 0
        self._count = count
        self._body = body
        self._invalid = invalid
        self.resume = resume
        self.resumes = resumes

    @staticmethod
    def broken(exc: BaseException) -> bool:
        """Whether *exc*, raised while the body was read, is the body breaking off (a reset, a read
        timing out, the connection closed early: RFC 9112 section 6.3), not the store's or the
        reader's failure."""
        return isinstance(exc, httpx.TransportError)

    def mismatched(self) -> None:
        """The body did not hash to the digest asked for: an invalid answer of the upstream's (counted
        in ``mirror_upstream_errors_total{reason="invalid"}``)."""
        if self._invalid is not None:
            self._invalid()

    def chunks(self) -> AsyncIterator[bytes]:
        """The identity bytes: decoded if the answer is content-coded; a large one read from the
        connection (``rawbody.py``)."""
        body = self._body if self._body is not None else raw_body(self.response) or self.response.aiter_bytes()
        return body if self._count is None else _Counted(body, self._count)

    def drain(self) -> Drain | None:
        """The body handed to a thread of its own (``drain.py``), if it is large, announced and
        received over plain TCP; else None, and :meth:`chunks` reads it.  Use one or the other."""
        return drainable(self.response, self._count) if self._body is None else None


class _Counted:
    """Pass chunks through, reporting their sizes to *count* in batches (and when the body ends)."""

    BATCH = 1 << 20

    def __init__(self, chunks: AsyncIterator[bytes], count: Callable[[int], None]) -> None:
        self._chunks = chunks
        self._count = count
        self._pending = 0

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.__anext__()
        except BaseException:
            self._count(self._pending)
            self._pending = 0
            raise
        self._pending += len(chunk)
        if self._pending >= self.BATCH:
            self._count(self._pending)
            self._pending = 0
        return chunk


#: Content types of a 404 that is a web page, not a registry's answer (:func:`registry_not_found`).
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})


def registry_not_found(response: httpx.Response) -> bool:
    """Whether a 404 is the registry's "does not exist", to be passed on as such.

    A registry says it in the spec's JSON error format (OCI distribution spec, "Error Codes"),
    on a HEAD with no body but its ``Content-Type``; a route it does not serve, in Go's plain
    ``404 page not found`` (docker-registry 2.8 for the Referrers API, which :mod:`referrers`
    reads as "no Referrers API").  A 404 served as a web page (``text/html`` or XHTML: a
    misrouted ingress, a proxy's error page) is not the registry's answer, and says nothing of
    what the registry holds: False, for the caller to take as an invalid answer.  Any other
    404 (JSON, plain text, no type) is the registry's.
    """
    return media_type_of(response.headers.get("content-type")) not in HTML_TYPES


def media_type_of(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` value, lower case, without its parameters ("" for none)."""
    return (content_type or "").split(";")[0].strip().lower()


async def upstream_error(method: str, path: str, response: httpx.Response) -> UpstreamError:
    """The failure a non-2xx *response* to ``method path`` means, with its error code (OCI distribution
    spec, "Error Codes") when its body has one."""
    status = response.status_code
    code = None
    if method != "HEAD":
        try:
            body = response.content[:MAX_ERROR_BYTES]  # already read (a non-streaming request)
        except httpx.ResponseNotRead:
            body = b""
            with contextlib.suppress(httpx.DecodingError):
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ERROR_BYTES:
                        break
        try:
            code = json.loads(body)["errors"][0]["code"]
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            code = None
    message = f"{method} {path}: upstream answered {status}"
    kind: type[UpstreamError]
    if status == 429:
        kind = UpstreamRateLimited
    elif status == 404 and not registry_not_found(response):
        kind = UpstreamInvalid
        page = media_type_of(response.headers.get("content-type"))
        message += f" with a web page ({page}), not a registry's answer"
    elif status == 404:
        kind = UpstreamNotFound
    elif refused_redirect(response):  # a blob's signed CDN URL that expired on its way: not the registry's
        kind = UpstreamUnavailable
        message += f" from {response.url.host}, where the registry redirected it"
    elif status in (401, 403):
        kind = UpstreamDenied
    elif status >= 500:
        kind = UpstreamUnavailable
    else:
        kind = UpstreamInvalid
    return kind(message, status, code if isinstance(code, str) else None, response.headers.get("retry-after"))


def refused_redirect(response: httpx.Response) -> bool:
    """A 401/403 from another origin the registry redirected to (a blob's signed CDN URL, expired or
    refused): asking the registry again gets a new URL, unlike the registry's own refusal."""
    if response.status_code not in (401, 403) or not response.history:
        return False
    first, last = response.history[0].url, response.url
    return (first.scheme, first.host, first.port) != (last.scheme, last.host, last.port)
