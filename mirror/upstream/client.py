"""The upstream registry client: the /v2/ read API over httpx, with registry auth.

It raises the errors of ``upstream/errors.py`` (each carries the upstream's status and spec error
code when it sent one) and answers with the types of ``upstream/answers.py``; the token flow is
``upstream/auth.py``, content codings ``upstream/codings.py``.

This module knows nothing of the cache: it fetches, checks that a manifest answer is a manifest
(``manifest.checked_manifest``) and verifies it against its registry digest, and streams blobs
as identity bytes (``upstream/codings.py``).  Idempotent requests that fail before any byte arrived are
retried with backoff; a listing's next page is followed on the registry's origin only (``paging.py``);
non-distributable layers are fetched from their own URLs with no credentials.

Imports the ``upstream_*`` modules, ``codings``, ``httpcore_reads``, ``config``, ``manifest``,
``metrics`` and ``reference``; nothing of the cache or the HTTP routes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx

from ..config.sections import UpstreamConfig
from ..observe.metrics import Metrics
from ..spec.manifest import (
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    PLAIN_JSON,
    InvalidManifest,
    checked_manifest,
    registry_digest,
)
from ..spec.reference import Digest, ParseError, parse_digest
from .answers import BlobDownload, Manifest, ManifestHead, Referrers, media_type_of, refused_redirect, upstream_error
from .auth import RegistryAuth, trusted
from .codings import (
    ACCEPT_ENCODING,
    SUPPORTED_CODINGS,
    content_codings,
    content_range,
    identity_length,
    primed,
    unalias_codings,
)
from .errors import (
    UpstreamCredentialsRejected,
    UpstreamDenied,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from .foreign import bounded, first_serving, split_record
from .paging import next_page
from .reads import larger_reads

log = logging.getLogger("mirror.upstream.client")

RETRY_STATUSES = {502, 503, 504}
#: Pages of an upstream tag list followed for one listing (50 tags a page: 10,000 tags).
MAX_TAG_PAGES = 200
#: Seconds an idle connection to the upstream is kept for the next request: Go's default, which
#: distribution's proxy keeps too.  httpx's own (5 s) made a pull that came after a pause of a few
#: seconds open a new connection (with Docker Hub, a TLS handshake: a few round trips).  One the
#: upstream closed meanwhile is seen as closed when taken from the pool, and not used.
IDLE_CONNECTION_SECONDS = 90.0
#: Pages of a referrers list followed (``Link: <...>; rel="next"``) before the answer is refused.
MAX_REFERRER_PAGES = 16


class Upstream:
    """One upstream registry."""

    def __init__(self, config: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None, *,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics(enabled=False)
        self.larger_reads = larger_reads()
        self.auth = RegistryAuth(config.username, config.password, httpx.URL(config.url).path, config.registry)
        self.client = httpx.AsyncClient(
            base_url=config.url, auth=self.auth, verify=trusted(config.tls_ca),
            follow_redirects=True,
            timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32,
                                keepalive_expiry=IDLE_CONNECTION_SECONDS),
            headers={"User-Agent": "mirror/0.1", "Accept-Encoding": ACCEPT_ENCODING},
            transport=transport,
            event_hooks={"response": [unalias_codings]},
        )

    def prime(self) -> None:
        """Pay at start-up what the first request to the upstream pays once otherwise (~0.5 ms in
        all): the regular expressions httpx compiles the first time it takes a URL apart, and those
        of the standard library's ``urllib`` that httpx's cookie handling uses.  Sends nothing."""
        request = self.client.build_request("GET", "/v2/")
        urllib.request.Request(str(request.url)).get_full_url()

    async def aclose(self) -> None:
        await self.client.aclose()

    def canonical_name(self, name: str) -> str:
        """Docker Hub's implicit ``library/`` namespace for one-component names."""
        if self.config.adds_library_namespace and "/" not in name:
            return f"library/{name}"
        return name

    # -- requests --

    async def _send(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                    params: dict[str, str] | None = None, stream: bool = False,
                    retries: int | None = None) -> httpx.Response:
        """Send, retrying failures before any byte (*retries*: ``upstream.retries``); map non-2xx to errors."""
        attempt, limit = 0, self.config.retries if retries is None else retries
        shown = httpx.URL(path).raw_path.decode("ascii", "replace") if "://" in path else path  # no host in errors
        while True:
            request = self.client.build_request(method, path, headers=headers, params=params)
            started = time.monotonic()
            try:
                response = await self.client.send(request, stream=stream)
            except httpx.DecodingError as exc:  # a coded body read whole (a token or a tags list) is corrupt
                raise self._failed(UpstreamInvalid(f"{method} {shown}: undecodable content coding: {exc}")) from exc
            except UpstreamCredentialsRejected:
                raise  # logged once by RegistryAuth: an operator's problem
            except UpstreamError as exc:  # the token request failed (RegistryAuth)
                if isinstance(exc, UpstreamUnavailable) and attempt < limit:
                    attempt += 1
                    await asyncio.sleep(0.1 * 3 ** (attempt - 1))
                    continue
                raise self._failed(exc) from None
            except httpx.TransportError as exc:
                self.metrics.upstream_response(self.config.registry, method, None, time.monotonic() - started)
                if attempt < limit:
                    attempt += 1
                    await asyncio.sleep(0.1 * 3 ** (attempt - 1))
                    continue
                why = str(exc) or "no answer in time"  # (httpx's timeouts say nothing more)
                raise self._failed(UpstreamUnavailable(f"{method} {shown}: {type(exc).__name__}: {why}")) from exc
            self.metrics.upstream_response(self.config.registry, method, response.status_code,
                                           time.monotonic() - started, response.headers)
            if (response.status_code in RETRY_STATUSES or refused_redirect(response)) and attempt < limit:
                await response.aclose()
                attempt += 1
                await asyncio.sleep(0.1 * 3 ** (attempt - 1))
                continue
            if 200 <= response.status_code < 300:
                unknown = [c for c in content_codings(response) if c not in SUPPORTED_CODINGS]
                if unknown:
                    await response.aclose()
                    raise self._failed(UpstreamInvalid(
                        f"{method} {shown}: upstream answered in content coding {', '.join(unknown)}, "
                        f"which the mirror cannot decode (it asks for {ACCEPT_ENCODING})"))
                return response
            try:
                raise self._failed(await upstream_error(method, shown, response))
            finally:
                await response.aclose()

    def _invalid(self) -> None:
        self.metrics.upstream_error(self.config.registry, "invalid")

    def _failed(self, error: UpstreamError) -> UpstreamError:
        """Count a request that failed for good (a 404 is an answer, not a failure)."""
        if not isinstance(error, UpstreamNotFound):
            reason = ("rate_limited" if isinstance(error, UpstreamRateLimited) else
                      "denied" if isinstance(error, UpstreamDenied) else
                      "invalid" if isinstance(error, UpstreamInvalid) else
                      "server_error" if error.status else "unreachable")
            self.metrics.upstream_error(self.config.registry, reason)
        return error

    # -- the read API --

    async def head_manifest(self, name: str, reference: str) -> ManifestHead:
        response = await self._send("HEAD", f"/v2/{name}/manifests/{reference}",
                                    headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)})
        media_type = media_type_of(response.headers.get("content-type"))
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
    async def blob(self, name: str, digest: Digest, offset: int = 0, size: int | None = None
                   ) -> AsyncIterator[BlobDownload]:
        """Stream a blob: ``async with upstream.blob(...) as download: async for chunk in download.chunks()``.

        From byte *offset* on, ``Range: bytes=<offset>-`` (RFC 9110 section 14.2): a ``206`` with that
        rest's ``Content-Range`` (14.4), uncoded, has ``download.start`` *offset* and ``size`` the whole
        blob's; a ``200`` (ranges ignored) is the whole blob, ``start`` 0, unless the blob's *size* was
        given (a rest is required); any other answer, :class:`UpstreamUnavailable`."""
        shown = f"GET blob {digest}" + (f" from byte {offset}" if offset else "")
        response = await self._send("GET", f"/v2/{name}/blobs/{digest}", stream=True,
                                    headers={"Range": f"bytes={offset}-"} if offset else None)
        try:
            start, announced = 0, identity_length(response)
            if offset and (response.status_code == 206 or size is not None):
                span = content_range(response) if response.status_code == 206 else None
                if content_codings(response) or span is None or span[0] != offset or size not in (None, span[1]):
                    raise self._failed(UpstreamUnavailable(
                        f"{shown}: upstream answered {response.status_code} "
                        f"({response.headers.get('content-range') or 'no Content-Range'}), not the rest of the blob"))
                start, announced = span
            # A coded answer is decoded up to its first bytes first, so that a coding corrupt from
            # the start is an error before the blob is served (a 502, not a 200 cut short).
            body = await primed(response.aiter_bytes()) if content_codings(response) else None
            # An uncoded body of announced length broken off is resumed where it broke (_blob_rest).
            resume = (functools.partial(self._blob_rest, name, digest, announced)
                      if body is None and announced is not None and response.status_code == (206 if start else 200)
                      else None)
            download = BlobDownload(response, lambda n: self.metrics.received(self.config.registry, "blob", n),
                                    body, self._invalid, resume, self.config.retries)
            download.start, download.size = start, announced
            yield download
        except httpx.DecodingError as exc:
            self.metrics.upstream_error(self.config.registry, "invalid")
            raise UpstreamInvalid(f"{shown}: undecodable content coding: {exc}") from exc
        except httpx.TransportError as exc:
            self.metrics.upstream_error(self.config.registry, "interrupted")
            raise UpstreamUnavailable(f"{shown}: body interrupted: {exc}") from exc
        finally:
            await response.aclose()

    @asynccontextmanager
    async def _blob_rest(self, name: str, digest: Digest, size: int, offset: int) -> AsyncIterator[BlobDownload]:
        """The rest of a blob of *size* bytes whose body broke off at byte *offset* (:meth:`blob` from
        there, answered with that rest); counted in ``mirror_upstream_errors_total{reason="interrupted"}``."""
        self.metrics.upstream_error(self.config.registry, "interrupted")
        async with self.blob(name, digest, offset, size) as download:
            log.info("GET blob %s from byte %d: the body broke off; resumed", digest, offset)
            yield download

    @asynccontextmanager
    async def foreign_blob(self, urls: Sequence[str], digest: Digest) -> AsyncIterator[BlobDownload]:
        """Stream a non-distributable layer from the first of its *urls* that serves it.

        These are other hosts than the registry: no credentials are sent.  The caller verifies the
        digest.  :class:`UpstreamNotFound` when each URL answered 404 or 410 (or none is http(s)),
        else :class:`UpstreamUnavailable` when none served it.
        """
        urls, size = split_record(urls)
        response = await self._foreign("GET", urls, digest)
        try:
            announced = identity_length(response)
            limit = size if size is not None else announced
            shown = f"GET foreign layer {digest} from {response.request.url.host}"
            if limit is None:  # (a record written before sizes were, and an answer without a length)
                raise self._failed(UpstreamInvalid(f"{shown}: the layer's size is not known, nor announced"))
            if announced is not None and announced != limit:
                raise self._failed(UpstreamInvalid(f"{shown}: it announces {announced} bytes, the layer has {limit}"))
            download = BlobDownload(response, lambda n: self.metrics.received(self.config.registry, "blob", n),
                                    body=bounded(response.aiter_bytes(), limit, shown), invalid=self._invalid)
            download.size = limit
            yield download
        except httpx.TransportError as exc:
            self.metrics.upstream_error(self.config.registry, "interrupted")
            raise UpstreamUnavailable(f"GET foreign layer {digest}: body interrupted: {exc}") from exc
        finally:
            await response.aclose()

    async def head_foreign_blob(self, urls: Sequence[str], digest: Digest) -> int | None:
        """The layer's size (its descriptor's; a record without it: what its first serving URL announces),
        once one of its urls answered (as :meth:`foreign_blob`)."""
        urls, size = split_record(urls)
        response = await self._foreign("HEAD", urls, digest)
        await response.aclose()
        length = response.headers.get("content-length")
        return size if size is not None else int(length) if length and length.isdigit() else None

    async def _foreign(self, method: str, urls: Sequence[str], digest: Digest) -> httpx.Response:
        try:
            return await first_serving(self, method, urls, digest)
        except UpstreamError as exc:
            raise self._failed(exc) from None

    async def head_blob(self, name: str, digest: Digest) -> int | None:
        response = await self._send("HEAD", f"/v2/{name}/blobs/{digest}")
        return identity_length(response)

    async def tags(self, name: str, *, retries: int | None = None, limit: int | None = None) -> list[str]:
        """Every tag of *name*, in the upstream's order, following the upstream's own paging
        (each page tried ``upstream.retries`` more times unless *retries*); with *limit*, only the
        first page, of at most that many (``?n=``).

        A page links to the next with ``Link: <url>; rel="next"`` (OCI distribution spec,
        "Listing Tags"; RFC 8288), whose query may be ``n``/``last`` or an opaque cursor, so the
        link is followed as given (:func:`next_page`), never rebuilt, and only on the registry's
        origin: credentials never go to another host.  Raises :class:`UpstreamInvalid` for a link
        elsewhere, a link seen before, a page that is not a JSON object, or more than
        :data:`MAX_TAG_PAGES` pages.
        """
        first = self.client.build_request("GET", f"/v2/{name}/tags/list", params={"n": limit} if limit else None).url
        url: httpx.URL | None = first
        visited = {str(first)}
        found: dict[str, None] = {}
        for _ in range(MAX_TAG_PAGES):
            response = await self._send("GET", str(url), retries=retries)
            try:
                doc = response.json()
            except (ValueError, RecursionError) as exc:
                raise UpstreamInvalid(f"tags list of {name} is not JSON") from exc
            if not isinstance(doc, dict):
                raise UpstreamInvalid(f"tags list of {name} is not a JSON object")
            found.update((tag, None) for tag in doc.get("tags") or [] if isinstance(tag, str))
            url = None if limit else next_page(response, first, visited, f"tags list of {name}")
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
            except (ValueError, RecursionError) as exc:
                if media_type_of(response.headers.get("content-type")) != OCI_INDEX:
                    return Referrers(None, False)  # a page of some other kind: no API here
                raise UpstreamInvalid(f"referrers of {name}@{digest} is not JSON") from exc
            entries = doc.get("manifests") if isinstance(doc, dict) else None
            if not isinstance(entries, list):
                return Referrers(None, False)
            found += [e for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)]
            applied = response.headers.get("oci-filters-applied", "")
            filtered = filtered and "artifacttype" in applied.lower().replace(" ", "").split(",")
            url = next_page(response, first, visited, f"referrers of {name}@{digest}")
            if url is None:
                return Referrers(found, filtered and artifact_type is not None)
        raise UpstreamInvalid(f"referrers of {name}@{digest} has more than {MAX_REFERRER_PAGES} pages")
