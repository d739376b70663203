"""The upstream registry client: the /v2/ read API over httpx, with registry auth.

Exceptions (each carries the upstream's status and spec error code when it sent one)::

    UpstreamError
     +-- UpstreamUnavailable    connection refused or reset, timeout, 5xx
     +-- UpstreamRateLimited    429 (Docker Hub's pull limit)
     +-- UpstreamNotFound       404 from the registry (see :func:`registry_not_found`)
     +-- UpstreamDenied         401 / 403 after authenticating
     +-- UpstreamInvalid        an answer that breaks the protocol: wrong digest, oversize manifest,
                                a manifest answer that is not a manifest (a login page), an HTML 404

A token request that fails is the registry request's failure, never its answer: the token
server's connection errors and 5xx are ``UpstreamUnavailable``, its 429 ``UpstreamRateLimited``,
its 401/403 ``UpstreamCredentialsRejected`` with configured credentials (else ``UpstreamDenied``),
and any other status, or a 200 that is not a JSON object with a ``token`` or ``access_token``
(Docker registry token authentication), ``UpstreamInvalid``.

This module knows nothing of the cache: it fetches, checks that a manifest answer is a manifest
(``manifest.checked_manifest``) and verifies it against its registry digest, and streams blobs.
Digests are over the identity bytes: every request (to the registry, its
token realm and any redirect's target) carries ``Accept-Encoding: identity``, and an answer
content-coded anyway (gzip or its alias x-gzip, deflate, br or zstd; RFC 9110 section 8.4) is
decoded before anything hashes or keeps it; one in a coding the mirror cannot decode, or that does
not decode, is ``UpstreamInvalid`` (a blob's first bytes are decoded before it is handed on, so a
coding corrupt from the start fails before anything is served).  Idempotent requests that fail
before any byte arrived are retried with backoff.  Credentials go only to the token realm (or, for
Basic auth, to the registry itself); httpx drops ``Authorization`` when a redirect leaves the
registry's origin (Docker Hub's CDN), and
a challenge from such a redirect's target is not answered; an https registry's credentials never
go to a plain-http realm; a tag list's next-page link is followed only on the registry's origin.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from .config import UpstreamConfig
from .manifest import (
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    PLAIN_JSON,
    InvalidManifest,
    checked_manifest,
    registry_digest,
)
from .metrics import Metrics
from .reference import Digest, ParseError, parse_digest

log = logging.getLogger("mirror.upstream")

MAX_ERROR_BYTES = 64 << 10
RETRY_STATUSES = {502, 503, 504}
#: Bytes asked of the socket per read of an upstream answer.  httpcore asks 64 KiB; a blob body
#: then costs a pass through httpcore, h11 and httpx every 64 KiB, which kept a cold fill on the
#: event loop at ~300 MB/s (``tests/bench/README.md``).  A read returns what the socket holds, so a
#: larger one never waits for more.
READ_BYTES = 1 << 20


def larger_reads() -> bool:
    """Make httpcore's HTTP/1.1 connections read :data:`READ_BYTES` at a time; whether they do.

    ``AsyncHTTP11Connection.READ_NUM_BYTES`` is httpcore's own class constant, not public API
    (pyproject bounds httpcore to the releases that have it).  When it is gone, one warning is logged
    and answers are read httpcore's way: slower cold fills, nothing else.
    """
    connection = getattr(httpcore, "AsyncHTTP11Connection", None)
    if not isinstance(getattr(connection, "READ_NUM_BYTES", None), int):
        log.warning("httpcore %s has no AsyncHTTP11Connection.READ_NUM_BYTES: upstream answers are read "
                    "64 KiB at a time (slower cold pulls)", getattr(httpcore, "__version__", "?"))
        return False
    connection.READ_NUM_BYTES = READ_BYTES  # type: ignore[union-attr]
    return True
#: Pages of an upstream tag list followed for one listing (50 tags a page: 10,000 tags).
MAX_TAG_PAGES = 200
#: Pages of a referrers list followed (``Link: <...>; rel="next"``) before the answer is refused.
MAX_REFERRER_PAGES = 16
#: RFC 9110 section 12.5.3: only the identity coding is acceptable in answers to the mirror.
ACCEPT_ENCODING = "identity"
#: Codings decoded anyway (httpx does it; ``br`` needs ``brotli``, ``zstd`` needs ``zstandard``).
SUPPORTED_CODINGS = frozenset({"gzip", "deflate", "br", "zstd"})
#: RFC 9110 section 8.4.1: "x-gzip" and "x-compress" are the same codings as "gzip" and "compress".
CODING_ALIASES = {"x-gzip": "gzip", "x-compress": "compress"}
#: Content types of a 404 that is a web page, not a registry's answer (:func:`registry_not_found`).
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_PATH_NAME_RE = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)=(?:"([^"]*)"|([^\s,]*))')


class UpstreamError(Exception):
    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamCredentialsRejected(UpstreamUnavailable):
    """The token server refused the mirror's own credentials (``upstream.username``/``password``)."""


class UpstreamRateLimited(UpstreamError):
    pass


class UpstreamNotFound(UpstreamError):
    pass


class UpstreamDenied(UpstreamError):
    pass


class UpstreamInvalid(UpstreamError):
    pass


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
                 body: AsyncIterator[bytes] | None = None) -> None:
        self.response = response
        self.size = identity_length(response)
        self._count = count
        self._body = body

    def chunks(self) -> AsyncIterator[bytes]:
        """The identity bytes: decoded if the answer is content-coded."""
        body = self._body if self._body is not None else self.response.aiter_bytes()
        return body if self._count is None else _Counted(body, self._count)


async def _primed(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """*chunks* with the first one already received: a coding that does not decode fails here."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = b""

    async def body() -> AsyncIterator[bytes]:
        if first:
            yield first
            async for chunk in chunks:
                yield chunk

    return body()


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


class RegistryAuth(httpx.Auth):
    """The registry token dance as an httpx auth flow.

    On a ``401`` with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` a token is
    fetched from the realm (anonymously, or with the configured user and password) and cached
    per scope until it expires; concurrent requests for one scope share one token request.
    Registries refuse tokens before their ``expires_in`` (key rotation, revocation, clock skew;
    RFC 6750 section 3.1 ``error="invalid_token"``): a token answered with ``401`` is dropped at
    once for every scope it served, and the request is retried once with a new token.  A ``401``
    to that new token is the answer (Docker Hub's ``insufficient_scope`` for a repository that
    does not exist, or a refusal of the configured credentials).
    A token request that fails raises the :class:`UpstreamError` of its kind (see the module's
    docstring): the token server's answer is never passed on as the registry's.
    ``Basic`` challenges are answered with the configured credentials.

    *prefix* is the path the registry's ``/v2/`` API sits under (``/artifactory/api/docker/remote``
    for ``http://host/artifactory/api/docker/remote``; ``""`` at the root): the repository a
    request's token is for is read after it.
    """

    def __init__(self, username: str | None, password: str | None, prefix: str = "") -> None:
        self._prefix = prefix.rstrip("/")
        self._basic = _basic_header(username, password) if username else None
        self._tokens: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._use_basic = False
        self._rejection_logged = False
        self.tokens_fetched = 0

    def _scope_for(self, request: httpx.Request) -> str | None:
        path = request.url.path
        if self._prefix:
            if not path.startswith(self._prefix + "/"):
                return None
            path = path[len(self._prefix):]
        m = _PATH_NAME_RE.match(path)
        return f"repository:{m.group(1)}:pull" if m else None

    def _cached(self, scope: str | None) -> str | None:
        entry = self._tokens.get(scope or "")
        if entry and entry[1] > time.monotonic():
            return entry[0]
        return None

    def _authorize(self, request: httpx.Request, scope: str | None) -> str | None:
        """Set the request's ``Authorization``; the bearer token sent, if one was."""
        token = self._cached(scope)
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._use_basic and self._basic is not None:
            request.headers["Authorization"] = self._basic
        return token

    def _drop(self, token: str) -> None:
        """Forget a refused token under every scope it was cached for."""
        for key in [key for key, (cached, _) in self._tokens.items() if cached == token]:
            del self._tokens[key]

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        scope = self._scope_for(request)
        sent = self._authorize(request, scope)
        response = yield request
        if response.status_code != 401:
            return
        if not _same_origin(response.request.url, request.url):
            return  # a challenge from a redirect's target (a CDN): credentials stay with the registry
        scheme, params = _parse_challenge(response.headers.get("www-authenticate", ""))
        if scheme == "basic" and self._basic is not None and not self._use_basic:
            self._use_basic = True
            self._authorize(request, scope)
            yield request
            return
        if scheme != "bearer" or "realm" not in params:
            return
        key = params.get("scope") or scope or ""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if sent is not None:
                log.info("%s refused the token for %s; fetching a new one", request.url.host, key)
                self._drop(sent)
            token = self._cached(key)  # another request may have fetched a new one meanwhile
            if token is None:
                token_request = self._token_request(params, request.url)
                if token_request is None:
                    return
                token_response = yield token_request
                await token_response.aread()
                token = self._store_token(key, token_response)
        if scope and scope != key:
            self._tokens[scope] = self._tokens[key]
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401 and _same_origin(response.request.url, request.url):
            self._drop(token)  # refused too: the next request asks the realm again

    def _token_request(self, params: dict[str, str], registry: httpx.URL) -> httpx.Request | None:
        try:
            realm = httpx.URL(params["realm"])
        except httpx.InvalidURL:
            return None
        if realm.scheme not in {"http", "https"}:
            return None
        if self._basic is not None and realm.scheme == "http" and registry.scheme == "https":
            log.warning("not sending the upstream credentials to %s: the registry is https, its token realm is not",
                        realm.host)
            return None
        query = {k: v for k, v in params.items() if k in {"service", "scope"}}
        request = httpx.Request("GET", realm.copy_merge_params(query),
                                headers={"Accept-Encoding": ACCEPT_ENCODING})  # a client's default is none
        if self._basic is not None:
            request.headers["Authorization"] = self._basic
        return request

    def _store_token(self, key: str, response: httpx.Response) -> str:
        """Keep the token of a token server's answer; raise the failure of its kind if it has none."""
        status, host = response.status_code, response.request.url.host
        if status in (401, 403) and self._basic is not None:
            rejected = UpstreamCredentialsRejected(
                f"the token server {host} rejected the configured upstream credentials "
                f"({status}); check upstream.username and upstream.password", status)
            if not self._rejection_logged:  # once: an operator's problem, not each request's
                self._rejection_logged = True
                log.error("%s", rejected)
            raise rejected
        if status != 200:
            message = f"the token server {host} answered {status} for {key or 'a token'}"
            kind: type[UpstreamError] = (
                UpstreamDenied if status in (401, 403) else  # it wants credentials the mirror has not got
                UpstreamRateLimited if status == 429 else
                UpstreamUnavailable if status >= 500 else UpstreamInvalid)
            raise kind(message, status, None, response.headers.get("retry-after"))
        try:
            doc = response.json()
            token = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            raise UpstreamInvalid(f"the token server {host} answered 200 with no token document: {exc}",
                                  status) from exc
        if not token or not isinstance(token, str):
            raise UpstreamInvalid(f"the token server {host} answered 200 with neither token nor access_token",
                                  status)
        self.tokens_fetched += 1
        self._rejection_logged = False
        self._tokens[key] = (token, time.monotonic() + max(expires_in - 10, 5))
        return str(token)


def content_codings(response: httpx.Response) -> list[str]:
    """The answer's content codings, in the order applied (RFC 9110 section 8.4); ``identity`` left out."""
    return [value.strip().lower() for value in response.headers.get_list("content-encoding", split_commas=True)
            if value.strip() and value.strip().lower() != "identity"]


def identity_length(response: httpx.Response) -> int | None:
    """The length of the identity bytes, if announced: a coded answer's ``Content-Length`` counts coded bytes."""
    length = response.headers.get("content-length")
    if content_codings(response) or not length or not length.isdigit():
        return None
    return int(length)


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
    return _media_type(response.headers.get("content-type")) not in HTML_TYPES


async def _unalias_codings(response: httpx.Response) -> None:
    """Name a coding by its registered name before httpx decodes (``x-gzip`` is ``gzip``, RFC 9110
    section 8.4.1.3): an httpx response hook, run for every answer, the token realm's and redirects' too."""
    codings = response.headers.get_list("content-encoding", split_commas=True)
    if any(c.strip().lower() in CODING_ALIASES for c in codings):
        response.headers["content-encoding"] = ", ".join(
            CODING_ALIASES.get(c.strip().lower(), c.strip()) for c in codings)


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _basic_header(username: str, password: str | None) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM_RE.finditer(rest)}
    return scheme.lower(), params


class Upstream:
    """One upstream registry."""

    def __init__(self, config: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None, *,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics(enabled=False)
        self.larger_reads = larger_reads()
        self.auth = RegistryAuth(config.username, config.password, httpx.URL(config.url).path)
        self.client = httpx.AsyncClient(
            base_url=config.url,
            auth=self.auth,
            follow_redirects=True,
            timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
            headers={"User-Agent": "mirror/0.1", "Accept-Encoding": ACCEPT_ENCODING},
            transport=transport,
            event_hooks={"response": [_unalias_codings]},
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def canonical_name(self, name: str) -> str:
        """Docker Hub's implicit ``library/`` namespace for one-component names."""
        if self.config.adds_library_namespace and "/" not in name:
            return f"library/{name}"
        return name

    # -- requests --

    async def _send(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                    params: dict[str, str] | None = None, stream: bool = False) -> httpx.Response:
        """Send with retries for failures before any byte; raise the mapped error for non-2xx."""
        attempt = 0
        while True:
            request = self.client.build_request(method, path, headers=headers, params=params)
            started = time.monotonic()
            try:
                response = await self.client.send(request, stream=stream)
            except httpx.DecodingError as exc:  # a coded body read whole (a token or a tags list) is corrupt
                raise self._failed(UpstreamInvalid(f"{method} {path}: undecodable content coding: {exc}")) from exc
            except UpstreamCredentialsRejected:
                raise  # logged once by RegistryAuth: an operator's problem
            except UpstreamError as exc:  # the token request failed (RegistryAuth)
                if isinstance(exc, UpstreamUnavailable) and attempt < self.config.retries:
                    attempt += 1
                    await asyncio.sleep(0.1 * 3 ** (attempt - 1))
                    continue
                raise self._failed(exc) from None
            except httpx.TransportError as exc:
                self.metrics.upstream_response(self.config.registry, method, None, time.monotonic() - started)
                if attempt < self.config.retries:
                    attempt += 1
                    await asyncio.sleep(0.1 * 3 ** (attempt - 1))
                    continue
                raise self._failed(UpstreamUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}")) from exc
            self.metrics.upstream_response(self.config.registry, method, response.status_code,
                                           time.monotonic() - started, response.headers)
            if response.status_code in RETRY_STATUSES and attempt < self.config.retries:
                await response.aclose()
                attempt += 1
                await asyncio.sleep(0.1 * 3 ** (attempt - 1))
                continue
            if 200 <= response.status_code < 300:
                unknown = [c for c in content_codings(response) if c not in SUPPORTED_CODINGS]
                if unknown:
                    await response.aclose()
                    raise self._failed(UpstreamInvalid(
                        f"{method} {path}: upstream answered in content coding {', '.join(unknown)}, "
                        f"which the mirror cannot decode (it asks for {ACCEPT_ENCODING})"))
                return response
            try:
                raise self._failed(await self._error(method, path, response))
            finally:
                await response.aclose()

    def _failed(self, error: UpstreamError) -> UpstreamError:
        """Count a request that failed for good (a 404 is an answer, not a failure)."""
        if not isinstance(error, UpstreamNotFound):
            reason = ("rate_limited" if isinstance(error, UpstreamRateLimited) else
                      "denied" if isinstance(error, UpstreamDenied) else
                      "invalid" if isinstance(error, UpstreamInvalid) else
                      "server_error" if error.status else "unreachable")
            self.metrics.upstream_error(self.config.registry, reason)
        return error

    async def _error(self, method: str, path: str, response: httpx.Response) -> UpstreamError:
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
            except (ValueError, KeyError, IndexError, TypeError):
                code = None
        message = f"{method} {path}: upstream answered {status}"
        kind: type[UpstreamError]
        if status == 429:
            kind = UpstreamRateLimited
        elif status == 404 and not registry_not_found(response):
            kind = UpstreamInvalid
            page = _media_type(response.headers.get("content-type"))
            message += f" with a web page ({page}), not a registry's answer"
        elif status == 404:
            kind = UpstreamNotFound
        elif status in (401, 403):
            kind = UpstreamDenied
        elif status >= 500:
            kind = UpstreamUnavailable
        else:
            kind = UpstreamInvalid
        return kind(message, status, code if isinstance(code, str) else None, response.headers.get("retry-after"))

    # -- the read API --

    async def head_manifest(self, name: str, reference: str) -> ManifestHead:
        response = await self._send("HEAD", f"/v2/{name}/manifests/{reference}",
                                    headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)})
        media_type = _media_type(response.headers.get("content-type"))
        if media_type not in MANIFEST_MEDIA_TYPES and media_type != PLAIN_JSON:
            # All a HEAD can show of a login page or a web UI answering in the registry's place.
            raise self._failed(UpstreamInvalid(
                f"HEAD manifest {name}:{reference}: Content-Type {media_type or '(none)'!r} is not a manifest "
                f"media type", response.status_code))
        return ManifestHead(
            digest=response.headers.get("docker-content-digest"),
            media_type=media_type,
            size=identity_length(response),
        )

    async def get_manifest(self, name: str, reference: str | Digest) -> Manifest:
        """Fetch a manifest, verified against the digest asked for or announced."""
        response = await self._send("GET", f"/v2/{name}/manifests/{reference}",
                                    headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}, stream=True)
        try:
            received = bytearray()
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) > MAX_MANIFEST_BYTES:
                    raise UpstreamInvalid(f"manifest {name}:{reference} is larger than {MAX_MANIFEST_BYTES} bytes")
        except httpx.DecodingError as exc:
            self.metrics.upstream_error(self.config.registry, "invalid")
            raise UpstreamInvalid(f"GET manifest {name}:{reference}: undecodable content coding: {exc}") from exc
        except httpx.TransportError as exc:
            self.metrics.upstream_error(self.config.registry, "interrupted")
            raise UpstreamUnavailable(f"GET manifest {name}:{reference}: {exc}") from exc
        finally:
            await response.aclose()
        body = bytes(received)
        self.metrics.received(self.config.registry, "manifest", len(body))
        announced = response.headers.get("docker-content-digest")
        try:
            media_type = checked_manifest(body, response.headers.get("content-type", ""))
            expected = [reference] if isinstance(reference, Digest) else []
            if announced:
                try:
                    expected.append(parse_digest(announced))
                except ParseError as exc:
                    raise InvalidManifest(f"malformed Docker-Content-Digest {announced!r}") from exc
            algorithm = expected[0].algorithm if expected else "sha256"
            actual = registry_digest(body, media_type, algorithm)
            for digest in expected:
                if registry_digest(body, media_type, digest.algorithm) != digest:
                    source = "asked for" if digest is reference else "announced"
                    raise InvalidManifest(f"the manifest's digest is {actual}, not the {digest} {source}")
        except InvalidManifest as exc:
            raise self._failed(UpstreamInvalid(f"GET manifest {name}:{reference}: {exc}",
                                               response.status_code)) from exc
        return Manifest(body, media_type, actual)

    @asynccontextmanager
    async def blob(self, name: str, digest: Digest) -> AsyncIterator[BlobDownload]:
        """Stream a blob: ``async with upstream.blob(...) as download: async for chunk in download.chunks()``."""
        response = await self._send("GET", f"/v2/{name}/blobs/{digest}", stream=True)
        try:
            # A coded answer is decoded up to its first bytes first, so that a coding corrupt from
            # the start is an error before the blob is served (a 502, not a 200 cut short).
            body = await _primed(response.aiter_bytes()) if content_codings(response) else None
            yield BlobDownload(response, lambda size: self.metrics.received(self.config.registry, "blob", size),
                               body)
        except httpx.DecodingError as exc:
            self.metrics.upstream_error(self.config.registry, "invalid")
            raise UpstreamInvalid(f"GET blob {digest}: undecodable content coding: {exc}") from exc
        except httpx.TransportError as exc:
            self.metrics.upstream_error(self.config.registry, "interrupted")
            raise UpstreamUnavailable(f"GET blob {digest}: body interrupted: {exc}") from exc
        finally:
            await response.aclose()

    @asynccontextmanager
    async def foreign_blob(self, urls: Sequence[str], digest: Digest) -> AsyncIterator[BlobDownload]:
        """Stream a non-distributable layer from the first of its *urls* that serves it.

        These are other hosts than the registry: no credentials are sent.  The caller verifies the
        digest.  :class:`UpstreamNotFound` when each URL answered 404 or 410 (or none is http(s)),
        else :class:`UpstreamUnavailable` when none served it.
        """
        response = await self._foreign("GET", urls, digest)
        try:
            yield BlobDownload(response, lambda size: self.metrics.received(self.config.registry, "blob", size))
        except httpx.TransportError as exc:
            self.metrics.upstream_error(self.config.registry, "interrupted")
            raise UpstreamUnavailable(f"GET foreign layer {digest}: body interrupted: {exc}") from exc
        finally:
            await response.aclose()

    async def head_foreign_blob(self, urls: Sequence[str], digest: Digest) -> int | None:
        """The size a non-distributable layer's first serving URL announces (as :meth:`foreign_blob`)."""
        response = await self._foreign("HEAD", urls, digest)
        await response.aclose()
        length = response.headers.get("content-length")
        return int(length) if length and length.isdigit() else None

    async def _foreign(self, method: str, urls: Sequence[str], digest: Digest) -> httpx.Response:
        failures: list[str] = []
        not_found = True
        for url in urls:
            if urlsplit(url).scheme not in ("http", "https"):
                continue
            started = time.monotonic()
            try:
                request = self.client.build_request(method, url, headers={"Accept-Encoding": "identity"})
                response = await self.client.send(request, stream=True, auth=None)
            except (httpx.TransportError, httpx.InvalidURL) as exc:
                self.metrics.upstream_response(self.config.registry, method, None, time.monotonic() - started)
                failures.append(f"{url}: {type(exc).__name__}")
                not_found = False
                continue
            self.metrics.upstream_response(self.config.registry, method, response.status_code,
                                           time.monotonic() - started)
            if 200 <= response.status_code < 300:
                return response
            await response.aclose()
            failures.append(f"{url}: {response.status_code}")
            not_found = not_found and response.status_code in (404, 410)
        message = f"{method} foreign layer {digest}: " + ("; ".join(failures) or "no http(s) url")
        raise self._failed(UpstreamNotFound(message, 404) if not_found else UpstreamUnavailable(message))

    async def head_blob(self, name: str, digest: Digest) -> int | None:
        response = await self._send("HEAD", f"/v2/{name}/blobs/{digest}")
        return identity_length(response)

    async def tags(self, name: str) -> list[str]:
        """Every tag of *name*, in the upstream's order, following the upstream's own paging.

        A page links to the next with ``Link: <url>; rel="next"`` (OCI distribution spec,
        "Listing Tags"; RFC 8288), whose query may be ``n``/``last`` or an opaque cursor, so the
        link is followed as given (:func:`_next_page`), never rebuilt, and only on the registry's
        origin: credentials never go to another host.  Raises :class:`UpstreamInvalid` for a link
        elsewhere, a link seen before, a page that is not a JSON object, or more than
        :data:`MAX_TAG_PAGES` pages.
        """
        first = self.client.build_request("GET", f"/v2/{name}/tags/list").url
        url: httpx.URL | None = first
        visited = {str(first)}
        found: dict[str, None] = {}
        for _ in range(MAX_TAG_PAGES):
            response = await self._send("GET", str(url))
            try:
                doc = response.json()
            except ValueError as exc:
                raise UpstreamInvalid(f"tags list of {name} is not JSON") from exc
            if not isinstance(doc, dict):
                raise UpstreamInvalid(f"tags list of {name} is not a JSON object")
            found.update((tag, None) for tag in doc.get("tags") or [] if isinstance(tag, str))
            url = _next_page(response, first, visited, f"tags list of {name}")
            if url is None:
                return list(found)
        raise UpstreamInvalid(f"tags list of {name} has more than {MAX_TAG_PAGES} pages")

    async def referrers(self, name: str, digest: Digest, artifact_type: str | None) -> Referrers:
        """Every referrer the upstream lists for a digest, following ``Link`` pages.

        Raises :class:`UpstreamNotFound` as a registry's 404 (a registry without the Referrers API;
        :func:`registry_not_found`), and :class:`UpstreamInvalid` for a 404 web page, an index that
        is not JSON or more than ``MAX_REFERRER_PAGES`` pages.
        """
        params = {"artifactType": artifact_type} if artifact_type is not None else None
        first = self.client.build_request("GET", f"/v2/{name}/referrers/{digest}", params=params).url
        url: httpx.URL | None = first
        visited = {str(first)}
        found: list[dict[str, Any]] = []
        filtered = True
        for _ in range(MAX_REFERRER_PAGES):
            response = await self._send("GET", str(url))
            try:
                doc = response.json()
            except ValueError as exc:
                if _media_type(response.headers.get("content-type")) != OCI_INDEX:
                    return Referrers(None, False)  # a page of some other kind: no API here
                raise UpstreamInvalid(f"referrers of {name}@{digest} is not JSON") from exc
            entries = doc.get("manifests") if isinstance(doc, dict) else None
            if not isinstance(entries, list):
                return Referrers(None, False)
            found += [e for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)]
            applied = response.headers.get("oci-filters-applied", "")
            filtered = filtered and "artifacttype" in applied.lower().replace(" ", "").split(",")
            url = _next_page(response, first, visited, f"referrers of {name}@{digest}")
            if url is None:
                return Referrers(found, filtered and artifact_type is not None)
        raise UpstreamInvalid(f"referrers of {name}@{digest} has more than {MAX_REFERRER_PAGES} pages")


def _next_page(response: httpx.Response, first: httpx.URL, visited: set[str], what: str) -> httpx.URL | None:
    """The page after *response* of a listing that began at *first*, or None after the last.

    Pages link on with ``Link: <url>; rel="next"`` (RFC 8288; OCI distribution spec, "Listing
    Tags" and "Listing Referrers"), whose query may be ``n``/``last`` or an opaque cursor, so the
    link is followed as given, never rebuilt.  It may be relative or absolute, but must stay on
    the registry's origin (scheme, host and port): credentials never go to another host.  Raises
    :class:`UpstreamInvalid` for a link elsewhere or to a page already read (*visited*, updated).
    """
    link = response.links.get("next", {}).get("url")
    if not link:
        return None
    try:
        url = response.url.join(link)
    except httpx.InvalidURL as exc:
        raise UpstreamInvalid(f"{what} links to an invalid URL {link!r}") from exc
    if not _same_origin(url, first):
        raise UpstreamInvalid(f"{what} continues on another host ({link!r}): not followed")
    if str(url) in visited:
        raise UpstreamInvalid(f"{what} links back to a page already read ({link!r})")
    visited.add(str(url))
    return url


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()
