"""What the upstream client hands back: a manifest's HEAD, a verified manifest, a referrers list
and a blob body being received; and whether a 404 is the registry's own answer.

Imports ``codings`` (identity lengths), ``rawbody``, ``drain`` and ``reference`` only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from ..spec.reference import Digest
from .codings import identity_length
from .drain import Drain, drainable
from .rawbody import raw_body


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
    """A blob body being received; ``size`` is the announced identity length, if any (never a coded one's)."""

    def __init__(self, response: httpx.Response, count: Callable[[int], None] | None = None,
                 body: AsyncIterator[bytes] | None = None, invalid: Callable[[], None] | None = None) -> None:
        self.response = response
        self.size = identity_length(response)
        self._count = count
        self._body = body
        self._invalid = invalid

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
