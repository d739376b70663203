"""The ``/v2/`` API's URL grammar, and the headers that belong to the API rather than to one answer.

:func:`endpoint` is the one reading of a request path: the routes dispatch on it, the request
metrics and access log label by its :attr:`Endpoint.kind` (a bounded set of names, whatever
clients send), and access control takes the repository and the action from it.  The patterns are
the spec's endpoint table (distribution-spec, "Endpoints": end-1 to end-13, plus the tags list
and the catalog), tried most specific first::

    /v2/ or /v2                          base       GET HEAD
    /v2/_catalog                         catalog    GET HEAD
    /v2/<name>/blobs/uploads/[<upload>]  upload     POST PATCH PUT GET HEAD DELETE
    /v2/<name>/manifests/<reference>     manifest   GET HEAD PUT DELETE
    /v2/<name>/blobs/<digest>            blob       GET HEAD DELETE
    /v2/<name>/tags/list                 tags       GET HEAD
    /v2/<name>/referrers/<digest>        referrers  GET HEAD
    anything else                        unknown    (no method)

The name, reference, digest and upload id are the raw strings of the path: this module says
where they stand, ``spec/reference.py`` says whether they are valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

from .reference import ParseError, parse_name

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
#: Sent with every answer under ``/v2/`` (distribution-spec, "API Version Check").
API_HEADERS = MappingProxyType({API_VERSION_HEADER: API_VERSION})
#: How an answer was served: ``HIT``, ``MISS``, ``STALE``, ``COALESCED``, ``BYPASS`` or ``LOCAL``.
CACHE_HEADER = "X-Mirror-Cache"

Action = Literal["ping", "pull", "push", "delete"]
READS = frozenset({"GET", "HEAD"})


class Kind(StrEnum):
    """An endpoint; its value is the ``route`` label of the request metrics and the access log."""

    BASE = "base"
    CATALOG = "catalog"
    UPLOAD = "upload"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"
    UNKNOWN = "unknown"


_PATTERNS: tuple[tuple[re.Pattern[str], Kind, frozenset[str]], ...] = (
    (re.compile(r"(?P<name>.+)/blobs/uploads/(?P<upload>[^/]*)"), Kind.UPLOAD,
     frozenset({"POST", "PATCH", "PUT", "GET", "HEAD", "DELETE"})),
    (re.compile(r"(?P<name>.+)/manifests/(?P<reference>[^/]+)"), Kind.MANIFEST,
     frozenset({"GET", "HEAD", "PUT", "DELETE"})),
    (re.compile(r"(?P<name>.+)/blobs/(?P<digest>[^/]+)"), Kind.BLOB, frozenset({"GET", "HEAD", "DELETE"})),
    (re.compile(r"(?P<name>.+)/tags/list"), Kind.TAGS, READS),
    (re.compile(r"(?P<name>.+)/referrers/(?P<digest>[^/]+)"), Kind.REFERRERS, READS),
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a ``/v2/`` request path names, for one method."""

    kind: Kind
    method: str
    #: The methods the endpoint answers (empty for ``unknown``).
    methods: frozenset[str]
    #: The repository part of the path as sent, not validated; None when the path names none.
    name: str | None = None
    #: ``manifest``: the tag or digest as sent.
    reference: str | None = None
    #: ``blob`` and ``referrers``: the digest as sent.
    digest: str | None = None
    #: ``upload``: the upload id as sent; ``""`` to start an upload.
    upload: str | None = None

    @property
    def allowed(self) -> bool:
        """Whether the endpoint answers this method."""
        return self.method in self.methods

    @property
    def repository(self) -> str | None:
        """The repository name when the path names a valid one (the spec's name grammar), else None."""
        if self.name is None:
            return None
        try:
            return parse_name(self.name)
        except ParseError:
            return None

    @property
    def action(self) -> Action:
        """What access the request needs: ``ping`` (the base endpoint), ``pull``, ``push`` or ``delete``.

        Every step of an upload is a push, its status and its cancelling included, as with
        distribution's token scopes; any other write to the base endpoint is a push too.
        """
        if self.kind is Kind.UPLOAD:
            return "push"
        if self.method in READS:
            return "ping" if self.kind is Kind.BASE else "pull"
        if self.method == "DELETE" and self.kind is not Kind.BASE:
            return "delete"
        return "push"

    @property
    def writes(self) -> bool:
        """Whether the request may change what is stored (a push or a delete)."""
        return self.action in ("push", "delete")


def endpoint(path: str, method: str) -> Endpoint:
    """The endpoint that *path* (the request's path, ``/v2/...``) names; ``unknown`` if none."""
    if path in ("/v2/", "/v2"):
        return Endpoint(Kind.BASE, method, READS)
    if not path.startswith("/v2/"):
        return Endpoint(Kind.UNKNOWN, method, frozenset())
    if path == "/v2/_catalog":
        return Endpoint(Kind.CATALOG, method, READS)
    rest = path[4:]
    for pattern, kind, methods in _PATTERNS:
        m = pattern.fullmatch(rest)
        if m is not None:
            groups = m.groupdict()
            return Endpoint(kind, method, methods, name=groups["name"], reference=groups.get("reference"),
                            digest=groups.get("digest"), upload=groups.get("upload"))
    return Endpoint(Kind.UNKNOWN, method, frozenset())
