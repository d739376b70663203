"""A Docker Hub emulator in front of a real docker-registry.

Three loopback servers, like Docker Hub's three hosts:

* the registry front (:attr:`HubEmulator.url`): every ``/v2/`` request needs
  a bearer token, else 401 with ``WWW-Authenticate: Bearer realm=...,
  service="registry.docker.io",scope="repository:NAME:pull"`` (no scope on
  ``/v2/`` itself).  Manifest GETs are counted against
  :attr:`HubEmulator.manifest_limit` (429 TOOMANYREQUESTS past it) and carry
  ``ratelimit-limit`` / ``ratelimit-remaining``; manifest HEADs are not
  counted.  Blob GETs answer 307 to the CDN with a signed, expiring URL.
  A token that is unknown, expired or revoked (:meth:`HubEmulator.revoke_tokens`)
  is answered with ``error="invalid_token"`` in the challenge; a valid token
  without pull access to the repository with ``error="insufficient_scope"``.
* the token server (:attr:`HubEmulator.auth_url`): ``GET /token?service=
  &scope=`` returns ``{token, access_token, expires_in, issued_at}``,
  optionally only to HTTP Basic credentials.  Like Docker Hub, it grants a
  token for any repository but leaves out pull access to the names in
  :attr:`HubEmulator.hidden` (as if they did not exist).
* the CDN (:attr:`HubEmulator.cdn_url`): serves blob bytes for valid
  signatures without auth, and records whether any request carried an
  ``Authorization`` header (a correct client never sends one there).

Everything else (manifests, HEADs, tags) is forwarded to the upstream
registry, so ``Docker-Content-Digest`` and bodies are the upstream's own.
With a :class:`~tests.support.codings.Coder`, all three servers content-code
their answers as it says.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .asgi import ThreadedServer, UpstreamClient, forward_headers, open_upstream
from .codings import Coder
from .faults import error_body
from .matching import PathMatch, request_matches
from .service import Service

SERVICE = "registry.docker.io"
RATE_WINDOW = 21600  # Docker Hub's 6 h window, as in "100;w=21600"
_REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?P<kind>manifests|blobs|tags|referrers)/(?P<ref>[^/]+)$")
_CDN_DROP = ("docker-content-digest", "docker-distribution-api-version")


@dataclass(frozen=True)
class HubRequest:
    """A request to the registry front and how it was answered."""

    method: str
    path: str
    status: int
    authorized: bool


@dataclass(frozen=True)
class TokenRequest:
    """A request to the token server."""

    scopes: tuple[str, ...]
    user: str | None
    granted: bool


@dataclass(frozen=True)
class CdnRequest:
    """A request to the CDN; ``authorization`` is the header if one was sent."""

    method: str
    path: str
    status: int
    authorization: str | None


@dataclass(frozen=True)
class _Token:
    scopes: frozenset[str]
    expires_at: float


def _basic_user(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an ``Authorization: Basic`` header, else None."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


def _grants_pull(scopes: frozenset[str], name: str) -> bool:
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        scoped_name, _, actions = rest.rpartition(":")
        if kind == "repository" and scoped_name == name and "pull" in actions.split(","):
            return True
    return False


class HubEmulator(Service):
    """Docker Hub-like auth, CDN redirects and rate limits before *upstream_url*.

    *username*/*password*, if given, are required by the token server.
    *manifest_limit* (None: unlimited) and the other attributes may be
    changed while it runs.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        manifest_limit: int | None = None,
        token_ttl: int = 300,
        cdn_url_ttl: int = 1200,
        coder: Coder | None = None,
    ) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.username = username
        self.password = password
        self.manifest_limit = manifest_limit
        self.token_ttl = token_ttl
        self.cdn_url_ttl = cdn_url_ttl
        #: The next this many blob redirects name a CDN URL that has expired already (as one that
        #: expires between the redirect and its fetch): the CDN refuses it with 403.
        self.expired_redirects = 0
        #: Repositories the token server grants no access to (Docker Hub's answer for a missing one).
        self.hidden: set[str] = set()
        #: Base URL the challenges name as the realm's (None: :attr:`auth_url`), e.g. a fault proxy's.
        self.realm_url: str | None = None
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._tokens: dict[str, _Token] = {}
        self._manifest_gets = 0
        self._front_log: list[HubRequest] = []
        self._token_log: list[TokenRequest] = []
        self._cdn_log: list[CdnRequest] = []
        front_upstream, cdn_upstream = UpstreamClient(), UpstreamClient()
        self._front_upstream, self._cdn_upstream = front_upstream, cdn_upstream
        methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        wrap = coder.wrap if coder is not None else (lambda app, server: app)
        self._front = ThreadedServer(
            wrap(Starlette(routes=[Route("/{path:path}", self._registry, methods=methods)],
                           lifespan=front_upstream.lifespan), "front"),
            name="hub-registry", lifespan="on",
        )
        self._auth = ThreadedServer(
            wrap(Starlette(routes=[Route("/token", self._token, methods=["GET"])]), "auth"),
            name="hub-auth", lifespan="on",
        )
        self._cdn = ThreadedServer(
            wrap(Starlette(routes=[Route("/registry-v2/{name:path}/blobs/{digest}", self._cdn_blob)],
                           lifespan=cdn_upstream.lifespan), "cdn"),
            name="hub-cdn", lifespan="on",
        )

    # Lifecycle and addresses -------------------------------------------------

    @property
    def url(self) -> str:
        """The registry front: give this to the mirror as its upstream."""
        return self._front.url

    @property
    def auth_url(self) -> str:
        """Base URL of the token server (the realm is ``{auth_url}/token``)."""
        return self._auth.url

    @property
    def cdn_url(self) -> str:
        """Base URL of the CDN that blob GETs are redirected to."""
        return self._cdn.url

    def start(self) -> HubEmulator:
        """Start the three servers."""
        try:
            for server in (self._cdn, self._auth, self._front):
                server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop all servers; safe to call twice."""
        for server in (self._front, self._auth, self._cdn):
            server.stop()

    def challenge(self, name: str | None, error: str | None = None) -> str:
        """The ``WWW-Authenticate`` value for repository *name* (or ``/v2/``), with an RFC 6750 *error*."""
        value = f'Bearer realm="{self.realm_url or self.auth_url}/token",service="{SERVICE}"'
        value += f',scope="repository:{name}:pull"' if name else ""
        return value + (f',error="{error}"' if error else "")

    # Counters ------------------------------------------------------------------

    @property
    def tokens_issued(self) -> dict[str, int]:
        """Tokens granted per requested scope (``""`` for a scope-less token)."""
        counts: dict[str, int] = {}
        with self._lock:
            for entry in self._token_log:
                if entry.granted:
                    for scope in entry.scopes or ("",):
                        counts[scope] = counts.get(scope, 0) + 1
        return counts

    @property
    def manifest_gets(self) -> int:
        """Manifest GETs counted against the rate limit so far."""
        with self._lock:
            return self._manifest_gets

    def token_requests(self) -> list[TokenRequest]:
        """Every request to the token server."""
        with self._lock:
            return list(self._token_log)

    def requests(self) -> list[HubRequest]:
        """Every request to the registry front."""
        with self._lock:
            return list(self._front_log)

    def count(self, method: str | None, path: PathMatch, status: int | None = None) -> int:
        """Front requests by *method* (None: any), *path* (substring or regex), *status*."""
        return sum(
            request_matches(entry.method, entry.path, entry.status, method, path, status)
            for entry in self.requests()
        )

    def cdn_requests(self) -> list[CdnRequest]:
        """Every request to the CDN."""
        with self._lock:
            return list(self._cdn_log)

    @property
    def cdn_saw_authorization(self) -> bool:
        """True if any CDN request carried an ``Authorization`` header."""
        return any(entry.authorization is not None for entry in self.cdn_requests())

    def clear_counts(self) -> None:
        """Reset every counter, including the rate-limit budget."""
        with self._lock:
            self._manifest_gets = 0
            self._front_log.clear()
            self._token_log.clear()
            self._cdn_log.clear()

    def revoke_tokens(self) -> None:
        """Refuse every token issued so far (key rotation); the token server keeps issuing new ones."""
        with self._lock:
            self._tokens.clear()

    # Token server ------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        scopes = tuple(scope for value in request.query_params.getlist("scope") for scope in value.split(" ") if scope)
        credentials = _basic_user(request.headers.get("authorization"))
        user = credentials[0] if credentials else None
        if self.username is not None and credentials != (self.username, self.password):
            with self._lock:
                self._token_log.append(TokenRequest(scopes, user, granted=False))
            return Response(
                error_body("UNAUTHORIZED", "incorrect username or password"), status_code=401,
                media_type="application/json", headers={"www-authenticate": 'Basic realm="hub-emulator"'},
            )
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            granted = frozenset(scope for scope in scopes
                                if not any(_grants_pull(frozenset({scope}), name) for name in self.hidden))
            self._tokens[token] = _Token(granted, now + self.token_ttl)
            self._token_log.append(TokenRequest(scopes, user, granted=True))
        issued = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat().replace("+00:00", "Z")
        return JSONResponse(
            {"token": token, "access_token": token, "expires_in": self.token_ttl, "issued_at": issued}
        )

    def _refusal(self, request: Request, name: str | None) -> str | None:
        """None if the request may pass; else why not: ``""`` (no token), ``invalid_token``,
        ``insufficient_scope`` (RFC 6750 section 3.1)."""
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return ""
        with self._lock:
            token = self._tokens.get(header[7:].strip())
        if token is None or token.expires_at < time.time():
            return "invalid_token"
        return None if name is None or _grants_pull(token.scopes, name) else "insufficient_scope"

    # Registry front ------------------------------------------------------------

    def _log_front(self, request: Request, status: int, authorized: bool) -> None:
        with self._lock:
            self._front_log.append(HubRequest(request.method, request.url.path, status, authorized))

    async def _registry(self, request: Request) -> Response:
        path = request.url.path
        match = _REPO_PATH.match(path)
        name = match["name"] if match else None
        refusal = self._refusal(request, name)
        if refusal is not None:
            self._log_front(request, 401, False)
            body = error_body("UNAUTHORIZED", "authentication required")
            return Response(body, status_code=401, media_type="application/json",
                            headers={"www-authenticate": self.challenge(name, refusal or None),
                                     "docker-distribution-api-version": "registry/2.0"})
        if request.method not in ("GET", "HEAD"):
            self._log_front(request, 405, True)
            return Response(error_body("UNSUPPORTED", "the hub emulator is pull-only"), status_code=405,
                            media_type="application/json")
        extra: dict[str, str] = {}
        if match is not None and match["kind"] == "manifests":
            limited, extra = self._rate_limit(request.method == "GET")
            if limited:
                self._log_front(request, 429, True)
                return Response(error_body("TOOMANYREQUESTS", "You have reached your pull rate limit. "
                                           "You may increase the limit by authenticating and upgrading"),
                                status_code=429, media_type="application/json", headers=extra)
        if match is not None and match["kind"] == "blobs" and request.method == "GET":
            return await self._redirect_blob(request, match["name"], match["ref"])
        return await self._forward(request, extra)

    def _rate_limit(self, counted: bool) -> tuple[bool, dict[str, str]]:
        """Count a manifest request; (over the limit?, rate-limit headers)."""
        with self._lock:
            limit = self.manifest_limit
            if limit is None:
                if counted:
                    self._manifest_gets += 1
                return False, {}
            over = counted and self._manifest_gets >= limit
            if counted and not over:
                self._manifest_gets += 1
            remaining = max(limit - self._manifest_gets, 0)
        headers = {"ratelimit-limit": f"{limit};w={RATE_WINDOW}",
                   "ratelimit-remaining": f"{remaining};w={RATE_WINDOW}"}
        return over, headers

    async def _forward(self, request: Request, extra: dict[str, str]) -> Response:
        upstream = await open_upstream(self._front_upstream.http, request, self.upstream_url)
        self._log_front(request, upstream.status_code, True)
        headers = dict(forward_headers(upstream.headers.items()))
        headers.update(extra)
        if request.method == "HEAD":
            await upstream.aclose()
            return Response(status_code=upstream.status_code, headers=headers)
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=headers,
                                 background=BackgroundTask(upstream.aclose))

    def _sign(self, name: str, digest: str, expires: int) -> str:
        message = f"{name}|{digest}|{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    async def _redirect_blob(self, request: Request, name: str, digest: str) -> Response:
        probe = await self._front_upstream.http.head(f"{self.upstream_url}/v2/{name}/blobs/{digest}")
        if probe.status_code != 200:
            return await self._forward(request, {})
        expires = int(time.time()) + self.cdn_url_ttl
        with self._lock:
            if self.expired_redirects > 0:
                self.expired_redirects -= 1
                expires = int(time.time()) - 1
        location = (f"{self.cdn_url}/registry-v2/{name}/blobs/{digest}"
                    f"?expires={expires}&signature={self._sign(name, digest, expires)}")
        self._log_front(request, 307, True)
        return Response(status_code=307, headers={"location": location,
                                                  "docker-distribution-api-version": "registry/2.0"})

    # CDN -------------------------------------------------------------------------

    async def _cdn_blob(self, request: Request) -> Response:
        name, digest = request.path_params["name"], request.path_params["digest"]
        authorization = request.headers.get("authorization")
        expires = request.query_params.get("expires", "0")
        signature = request.query_params.get("signature", "")
        valid = expires.isdigit() and int(expires) >= time.time() and hmac.compare_digest(
            signature, self._sign(name, digest, int(expires)))
        if not valid:
            self._log_cdn(request, 403, authorization)
            return Response(b"<Error><Code>AccessDenied</Code></Error>", status_code=403,
                            media_type="application/xml")
        headers = {"range": request.headers["range"]} if "range" in request.headers else {}
        http = self._cdn_upstream.http
        upstream = await http.send(
            http.build_request("GET", f"{self.upstream_url}/v2/{name}/blobs/{digest}", headers=headers),
            stream=True,
        )
        self._log_cdn(request, upstream.status_code, authorization)
        kept = dict(forward_headers(upstream.headers.items(), drop=_CDN_DROP))
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=kept,
                                 background=BackgroundTask(upstream.aclose))

    def _log_cdn(self, request: Request, status: int, authorization: str | None) -> None:
        with self._lock:
            self._cdn_log.append(CdnRequest(request.method, request.url.path, status, authorization))

