"""Who may do what under ``/v2/``: htpasswd users, anonymous pulls, push and delete rights.

A pure ASGI middleware in front of the routes, active when ``auth.htpasswd.path`` is set.
Every ``/v2/`` request is classified (ping, pull, push, delete; with the repository name) and
checked against :class:`~mirror.config.sections.AuthConfig`:

- pull: any user; anonymous clients too when ``auth.anonymous_pull`` is true;
- push (uploads, manifest PUT) and delete: users only, per ``auth.push_users`` when it is set
  (a user limited to name prefixes only where the path names a valid repository under one);
- refused: ``401 UNAUTHORIZED`` with a challenge when the client is anonymous (so it logs in),
  ``403 DENIED`` when a user lacks the right.

Two challenges, because of how Docker clients work.  dockerd, containerd and skopeo ping
``GET /v2/`` once, anonymously, and set up their authentication from that answer only: a
``200`` means "no auth here" (credentials are then never sent, and a push fails on its first
``401``), a ``Basic`` challenge means "always send the password" (a client without one cannot
pull at all).  So:

- ``auth.anonymous_pull: false``: ``WWW-Authenticate: Basic realm="<realm>"``, as
  ``registry:2`` with htpasswd does; clients send the user's password with every request.
- ``auth.anonymous_pull: true``: the mirror is its own token server, as Docker Hub is:
  ``WWW-Authenticate: Bearer realm="<this server>/auth/token",service="<realm>"``.  Clients
  fetch a token there, anonymously or with a user's password (HTTP Basic; a wrong one is
  refused, so ``docker login`` checks it), and send it with each request.  A token names its
  user (or nobody) and expires after :data:`TOKEN_TTL`; the rights are decided per request, by
  the same policy.  Tokens are HMAC-signed with ``DATA/auth.key``, shared by worker processes; on a
  replica of a cluster with a key derived from ``cluster.secret_file``, so that every replica takes
  what any one issued (:func:`token_key`).

Basic credentials and tokens are accepted in both modes.  Paths outside ``/v2`` (health, metrics) are not
this module's business; under ``/_mirror/`` and the web UI's ``/ui/`` nothing is refused here: the user that
right credentials name is handed on as ``request.state.user`` (None otherwise), and the operator endpoints
(``api/admin.py``) or the UI's pages decide, the UI by :meth:`~mirror.config.sections.AuthConfig.may_pull`
as for ``/v2/`` (``request.state.throttled``: seconds to wait, after too many failed logins: a page says so).

Guessing passwords is slow: a client address whose passwords failed ``MAX_FAILED_LOGINS`` times
within ``FAILED_LOGIN_WINDOW`` seconds (``api/htpasswd.py``; more checks wait while those under way
could reach it) gets ``429 TOOMANYREQUESTS`` (with ``Retry-After``) for any password not already
known to be right, without a bcrypt round spent on it.  Users behind the same address whose password was
accepted before keep working.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl

import anyio.to_thread
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config.sections import AuthConfig, Config
from ..spec.endpoints import endpoint
from ..spec.errors import APIError, error_response
from ..spec.names import DOCKER_HUB, DOCKER_HUB_ALIASES, without_registry
from ..storage.layout import temp_file
from .htpasswd import FailedLogins, Htpasswd

TOKEN_PATH = "/auth/token"
OPERATOR_PREFIX, UI_PREFIX = "/_mirror/", "/ui/"
TOKEN_TTL = 300
KEY_BYTES = 32
_HOST_RE = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class AuthError(Exception):
    """The token key cannot be read or created."""


def load_or_create_key(path: Path, tmp_dir: Path) -> bytes:
    """The token signing key; the first process to need it creates it (atomically, mode 0600)."""
    for _ in range(5):
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            tmp = temp_file(tmp_dir, "auth-key")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_bytes(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # fails if another process was first: then its key is read
            except FileExistsError:
                pass
            except FileNotFoundError:  # swept by another process starting up: try again
                continue
            finally:
                tmp.unlink(missing_ok=True)
            continue
        except OSError as exc:
            raise AuthError(f"cannot read the token key {path}: {exc.strerror}") from None
        if len(key) < KEY_BYTES:
            raise AuthError(f"the token key {path} is too short; remove it and restart")
        return key
    raise AuthError(f"cannot create the token key {path}")


def token_key(config: Config, path: Path, tmp_dir: Path) -> bytes:
    """The key tokens (and the web UI's form tokens) are signed with, 32 bytes: on a replica of a
    cluster, derived from ``cluster.secret_file`` (HMAC-SHA256), the same on every replica, as a load
    balancer sends a client's requests to any of them; else :func:`load_or_create_key` of *path*."""
    secret = config.cluster.secret_file
    if config.cluster.enabled and secret is not None:
        return hmac.new(secret.value.encode(), b"mirror token signing key", hashlib.sha256).digest()
    return load_or_create_key(path, tmp_dir)


class TokenSigner:
    """Short-lived bearer tokens naming a user ("" for an anonymous client)."""

    def __init__(self, key: bytes, ttl: int = TOKEN_TTL) -> None:
        self._key = key
        self.ttl = ttl

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def issue(self, user: str) -> str:
        payload = json.dumps({"sub": user, "exp": int(time.time()) + self.ttl}, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def verify(self, token: str) -> str | None:
        """The token's user, or None when it is forged, malformed or expired."""
        encoded, _, signature = token.partition(".")
        try:
            payload = _unb64(encoded)
            valid = hmac.compare_digest(_unb64(signature), self._sign(payload))
            claims = json.loads(payload) if valid else None
        except (ValueError, binascii.Error):
            return None
        if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
            return None
        expires = claims.get("exp")
        if not isinstance(expires, int) or expires < time.time():
            return None
        return str(claims["sub"])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,4096}", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Identity:
    """Who sent a request: ``user`` None is anonymous; ``presented`` says credentials came with it."""

    user: str | None
    presented: bool


class Rejected(Exception):
    """Credentials were sent and are wrong."""


class Throttled(Exception):
    """Too many wrong passwords from this address lately; ``retry_after`` seconds to wait."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins; retry in {retry_after:.0f}s")
        self.retry_after = retry_after


class AuthMiddleware:
    def __init__(self, app: ASGIApp, config: AuthConfig, key: bytes, registry: str = "docker.io") -> None:
        """*key*: the tokens' (:func:`token_key`); *registry*: the default upstream's, whose own
        prefix a name may carry (rights are decided on the name without it, as it is routed)."""
        self.registry = registry
        assert config.htpasswd_path is not None
        self.app = app
        self.config = config
        self.users = Htpasswd(config.htpasswd_path)
        self.tokens = TokenSigner(key)
        self.failed_logins = FailedLogins()
        self._checked = asyncio.Condition()  # notified whenever a password check ends

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == TOKEN_PATH:
            await (await self._token(scope))(scope, receive, send)
            return
        if path.startswith((OPERATOR_PREFIX, UI_PREFIX)) or path == UI_PREFIX.rstrip("/"):
            try:
                who = await self._identify(scope)
            except Rejected:
                who = Identity(None, True)  # perhaps the operator token (admin.token_file): admin.py checks
            except Throttled as exc:  # the web UI answers with a page of its own (ui/pages.py)
                if path.startswith(OPERATOR_PREFIX):
                    await _throttled(exc, scope["method"] == "HEAD")(scope, receive, send)
                    return
                who = Identity(None, True)
                scope.setdefault("state", {})["throttled"] = exc.retry_after
            scope.setdefault("state", {})["user"] = who.user
            await self.app(scope, receive, send)
            return
        if path != "/v2" and not path.startswith("/v2/"):
            await self.app(scope, receive, send)
            return
        refusal = await self._check(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _check(self, scope: Scope) -> Response | None:
        """None when the request may go on, else the answer refusing it."""
        head = scope["method"] == "HEAD"
        found = endpoint(scope["path"], scope["method"])
        need, repository = found.action, found.repository
        if repository is not None:  # the rights of the repository the request reaches (registry/namespaces.py)
            repository = _reached(repository, _query(scope, "ns"), self.registry)
        try:
            who = await self._identify(scope)
        except Rejected as exc:
            return self._challenge(scope, repository, need, str(exc), error="invalid_token")
        except Throttled as exc:
            return _throttled(exc, head)
        if need == "ping":
            allowed = who.presented
        elif need == "pull":
            allowed = self.config.may_pull(who.user, repository)
        else:
            allowed = who.user is not None and self.config.may_write(who.user, repository)
        if allowed:
            return None
        if who.user is not None:
            name = found.name
            return error_response(APIError("DENIED", f"{who.user} may not {need} {name or 'here'}",
                                           detail={"name": name, "action": need}), head=head)
        return self._challenge(scope, repository, need, "authentication required",
                               error="insufficient_scope" if who.presented else None)

    async def _identify(self, scope: Scope) -> Identity:
        header = _header(scope, b"authorization")
        if header is None:
            return Identity(None, False)
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            credentials = _basic(value)
            if credentials is None or not await self._verify(scope, *credentials):
                raise Rejected("invalid username or password")
            return Identity(credentials[0], True)
        if scheme == "bearer":
            user = self.tokens.verify(value.strip())
            if user is None or (user and not self.users.has_user(user)):
                raise Rejected("invalid or expired token")
            return Identity(user or None, True)
        raise Rejected("unsupported authorization scheme")

    async def _verify(self, scope: Scope, user: str, password: str) -> bool:
        """Check a password; :class:`Throttled` instead when its address failed too often lately."""
        if self.users.remembered(user, password):
            return True
        client = scope.get("client")
        address = str(client[0]) if client else ""
        async with self._checked:
            while True:
                wait = self.failed_logins.wait(address)
                if wait > 0:
                    raise Throttled(wait)
                # Concurrent guesses from one address wait while those under way could reach the limit,
                # so they cannot all start before the first failure is counted (OWASP ASVS 2.2.1); a
                # right password that waited may meanwhile be known right (no bcrypt then).
                if not self.failed_logins.busy(address):
                    break
                await self._checked.wait()
                if self.users.remembered(user, password):
                    return True
            self.failed_logins.begin(address)
        ok: bool | None = None  # (None: the check did not end, e.g. its client went away)
        try:
            ok = await anyio.to_thread.run_sync(self.users.verify, user, password)
        finally:
            async with self._checked:
                self.failed_logins.end(address, failed=ok is False)
                self._checked.notify_all()
        return bool(ok)

    def _challenge(self, scope: Scope, name: str | None, need: str, message: str,
                   error: str | None = None) -> Response:
        """401 with the challenge for this mode; a token challenge names the scope of a valid *name*."""
        realm = self.config.htpasswd_realm
        if self.config.anonymous_pull:
            challenge = f'Bearer realm="{_origin(scope)}{TOKEN_PATH}",service="{realm}"'
            if name is not None:
                actions = "pull" if need in ("pull", "ping") else "pull,push" if need == "push" else "delete"
                challenge += f',scope="repository:{name}:{actions}"'
            if error:
                challenge += f',error="{error}"'
        else:
            challenge = f'Basic realm="{realm}"'
        return error_response(APIError("UNAUTHORIZED", message, headers={"WWW-Authenticate": challenge}),
                              head=scope["method"] == "HEAD")

    async def _token(self, scope: Scope) -> Response:
        """``GET /auth/token``: a token for the user of the Basic credentials, or for nobody."""
        if scope["method"] != "GET":
            return error_response(APIError("UNSUPPORTED", "only GET is supported here", headers={"Allow": "GET"}),
                                  head=scope["method"] == "HEAD")
        challenge = {"WWW-Authenticate": f'Basic realm="{self.config.htpasswd_realm}"'}
        header = _header(scope, b"authorization")
        user = ""
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            credentials = _basic(value) if scheme.lower() == "basic" else None
            try:
                verified = credentials is not None and await self._verify(scope, *credentials)
            except Throttled as exc:
                return _throttled(exc, False)
            if credentials is None or not verified:
                return error_response(APIError("UNAUTHORIZED", "invalid username or password", headers=challenge))
            user = credentials[0]
        elif not self.config.anonymous_pull:
            return error_response(APIError("UNAUTHORIZED", "log in to get a token", headers=challenge))
        token = self.tokens.issue(user)
        issued = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return JSONResponse({"token": token, "access_token": token, "expires_in": self.tokens.ttl,
                             "issued_at": issued}, headers={"Cache-Control": "no-store"})


def _reached(name: str, ns: str | None, registry: str) -> str:
    """The repository a request for *name* reaches, as rights name it: ``docker.io/team/x`` is ``team/x``
    of the default *registry*; ``team/x?ns=ghcr.io`` (containerd's) is ``ghcr.io/team/x``, as
    ``/v2/ghcr.io/team/x`` is."""
    if not ns or not _HOST_RE.fullmatch(ns):  # (no registry's name: refused where it is routed)
        return without_registry(name, registry)
    named = DOCKER_HUB if ns.lower() in DOCKER_HUB_ALIASES else ns.lower()
    name = without_registry(name, named)  # ghcr.io/team/x?ns=ghcr.io is team/x of ghcr.io too
    return name if named == registry else f"{named}/{name}"


def _query(scope: Scope, key: str) -> str | None:
    """The last value of *key* in the request's query (as ``request.query_params`` has it)."""
    found = [v for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
             if k == key]
    return found[-1] if found else None


def _throttled(exc: Throttled, head: bool) -> Response:
    retry = {"Retry-After": str(math.ceil(exc.retry_after))}
    return error_response(APIError("TOOMANYREQUESTS", str(exc), headers=retry), head=head)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


def _basic(value: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return user, password


def _origin(scope: Scope) -> str:
    """``scheme://host[:port]`` of this server as the client reached it (for the token realm)."""
    scheme = "https" if scope.get("scheme") == "https" else "http"
    return f"{scheme}://{client_host(scope)}"


def client_host(scope: Scope) -> str:
    """``host[:port]`` of this server as the client reached it: its ``Host`` header when well-formed,
    else the address it listens on."""
    host = _header(scope, b"host")
    if host is None or not _HOST_RE.fullmatch(host):
        server = scope.get("server") or ("localhost", None)
        host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
    return host
