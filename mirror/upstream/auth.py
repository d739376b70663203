"""Registry authentication for the upstream client: the Bearer token flow and Basic auth.

:class:`RegistryAuth` is an ``httpx.Auth`` flow: it answers a registry's ``WWW-Authenticate``
challenge (Docker registry token authentication, RFC 6750), caches tokens per scope, and renews a
token the registry refused before it expired.

A token request that fails is the registry request's failure, never its answer: the token
server's connection errors and 5xx are ``UpstreamUnavailable``, its 429 ``UpstreamRateLimited``,
its 401/403 ``UpstreamCredentialsRejected`` with configured credentials (else ``UpstreamDenied``; so is a 401
to the configured Basic credentials),
and any other status, or a 200 that is not a JSON object with a ``token`` or ``access_token``
(Docker registry token authentication), ``UpstreamInvalid``.

Credentials go only to the token realm (or, for Basic auth, to the registry itself); httpx drops
``Authorization`` when a redirect leaves the registry's origin (Docker Hub's CDN), and a challenge
from such a redirect's target is not answered (:func:`same_origin`); an https registry's
credentials never go to a plain-http realm.

Imports ``upstream_errors`` and ``codings`` only; ``upstream/client.py`` builds it into its client.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import httpx

from .codings import ACCEPT_ENCODING
from .errors import (
    UpstreamCredentialsRejected,
    UpstreamDenied,
    UpstreamError,
    UpstreamInvalid,
    UpstreamRateLimited,
    UpstreamUnavailable,
)

log = logging.getLogger("mirror.upstream.client")

_PATH_NAME_RE = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)=(?:"([^"]*)"|([^\s,]*))')


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

    def __init__(self, username: str | None, password: str | None, prefix: str = "", registry: str = "") -> None:
        self._prefix = prefix.rstrip("/")
        #: Where the refused credentials are configured, for the operator (several upstreams each have theirs).
        self._keys = (f"the credentials of the upstream {registry} (upstream.username and upstream.password, "
                      "or its upstreams entry's)" if registry else "upstream.username and upstream.password")
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
        if not same_origin(response.request.url, request.url):
            return  # a challenge from a redirect's target (a CDN): credentials stay with the registry
        scheme, params = _parse_challenge(response.headers.get("www-authenticate", ""))
        if scheme == "basic" and self._basic is not None:
            if request.headers.get("Authorization") != self._basic:
                self._use_basic = True
                self._authorize(request, scope)
                response = yield request
                if response.status_code != 401 or not same_origin(response.request.url, request.url):
                    self._rejection_logged = False
                    return
            raise self._rejected(f"the registry {request.url.netloc.decode()} rejected the configured upstream "
                                 f"credentials (401 to Basic auth); check {self._keys}", 401)
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
                token_request = self._token_request(params, request)
                if token_request is None:
                    return
                token_response = yield token_request
                await token_response.aread()
                token = self._store_token(key, token_response)
        if scope and scope != key:
            self._tokens[scope] = self._tokens[key]
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401 and same_origin(response.request.url, request.url):
            self._drop(token)  # refused too: the next request asks the realm again

    def _token_request(self, params: dict[str, str], original: httpx.Request) -> httpx.Request | None:
        """The realm's token request for the challenge *params* of *original*, with its timeouts
        (``upstream.connect_timeout`` / ``read_timeout``): a bare request would wait for ever."""
        registry = original.url
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
                                headers={"Accept-Encoding": ACCEPT_ENCODING},  # a client's default is none
                                extensions={"timeout": original.extensions.get("timeout", {})})
        if self._basic is not None:
            request.headers["Authorization"] = self._basic
        return request

    def _rejected(self, message: str, status: int) -> UpstreamCredentialsRejected:
        """The refusal of the configured credentials, logged once until they work again (an operator's
        problem, not each request's)."""
        rejected = UpstreamCredentialsRejected(message, status)
        if not self._rejection_logged:
            self._rejection_logged = True
            log.error("%s", rejected)
        return rejected

    def _store_token(self, key: str, response: httpx.Response) -> str:
        """Keep the token of a token server's answer; raise the failure of its kind if it has none."""
        status, host = response.status_code, response.request.url.netloc.decode()  # host[:port], no userinfo
        if status in (401, 403) and self._basic is not None:
            raise self._rejected(f"the token server {host} rejected the configured upstream credentials "
                                 f"({status}); check {self._keys}", status)
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
        except (ValueError, AttributeError, TypeError, RecursionError) as exc:
            raise UpstreamInvalid(f"the token server {host} answered 200 with no token document: {exc}",
                                  status) from exc
        if not token or not isinstance(token, str):
            raise UpstreamInvalid(f"the token server {host} answered 200 with neither token nor access_token",
                                  status)
        self.tokens_fetched += 1
        self._rejection_logged = False
        self._tokens[key] = (token, time.monotonic() + max(expires_in - 10, 5))
        return str(token)


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _basic_header(username: str, password: str | None) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM_RE.finditer(rest)}
    return scheme.lower(), params


def trusted(ca: Path | None) -> ssl.SSLContext | bool:
    """What an upstream's (and its token realm's) TLS certificates are verified against: httpx's
    roots (certifi's, or ``SSL_CERT_FILE``), and with *ca* (``upstream.tls.ca``, a PEM file) its CA
    certificates too: a private registry's CA, trusted for that upstream only."""
    if ca is None:
        return True
    context = httpx.create_ssl_context()
    context.load_verify_locations(cafile=ca)
    return context
