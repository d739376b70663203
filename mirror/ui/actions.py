"""What a user allowed to write may do from the web UI: delete a tag or a manifest of a pushed
repository, pin or unpin a cached image, prefetch an image from an upstream.

=====================================  =====================================================
``GET /ui/actions/<verb>?name=&reference=``   a page asking to confirm, with a form
``POST /ui/actions/<verb>``                   does it (form fields ``name``, ``reference``,
                                              ``token``) and answers with a page saying what happened
=====================================  =====================================================

*verb* is ``delete`` (a tag or a ``sha256:`` digest, through the same repository objects the
``/v2/`` DELETE routes use, so ``delete.enabled`` and the index's updates are the same), ``pin`` or
``unpin`` (a digest, in the index's pins, as ``mirror preload`` pins), or ``prefetch`` (a tag or a
digest of a cached repository, pulled into the cache as a client's pull would: ``prefetch``).
Only a logged-in user whom :meth:`~mirror.config.sections.AuthConfig.may_write` lets write the
repository may: without users (no ``auth.htpasswd.path``) the UI only reads.  Anyone else gets
``403`` and a page saying so.

Cross-site requests: the browser sends a user's Basic credentials with any request to this host,
so every POST carries a token in a hidden field, HMAC-SHA-256 over the user and the time it was
issued with a key derived from the token key (``api/auth.py``: shared by the worker processes and
the replicas), valid for :data:`TOKEN_TTL` seconds; a POST without a valid one does nothing and
gets ``403``.  No cookies.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response

from ..api.auth import token_key
from ..config.sections import Config
from ..registry.namespaces import Namespaces
from ..registry.pushes import LocalRepository
from ..registry.reads import in_index_thread
from ..spec.errors import APIError
from ..spec.reference import ParseError, parse_digest, parse_name, parse_reference
from ..storage.layout import Layout
from .prefetch import prefetch

#: Seconds a confirmation form stays valid.
TOKEN_TTL = 12 * 3600
#: The largest form body read (the fields are a name, a reference and a token).
MAX_FORM_BYTES = 8192
VERBS = ("delete", "pin", "unpin", "prefetch")

Render = Callable[..., Response]


class Tokens:
    """Anti-forgery tokens for one user's forms: ``<issued>.<hex HMAC>``."""

    def __init__(self, key: bytes) -> None:
        self._key = hmac.new(key, b"mirror web UI forms", hashlib.sha256).digest()

    def _mac(self, user: str, issued: int) -> str:
        return hmac.new(self._key, f"{user}\0{issued}".encode(), hashlib.sha256).hexdigest()

    def issue(self, user: str, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        return f"{issued}.{self._mac(user, issued)}"

    def valid(self, user: str, token: str, now: float | None = None) -> bool:
        issued, _, mac = token.partition(".")
        if not (issued.isascii() and issued.isdigit() and len(issued) <= 12):
            return False
        age = (time.time() if now is None else now) - int(issued)
        return 0 <= age <= TOKEN_TTL and hmac.compare_digest(mac, self._mac(user, int(issued)))


@dataclass(frozen=True)
class Wanted:
    verb: str
    name: str
    reference: str

    @property
    def is_tag(self) -> bool:
        return ":" not in self.reference

    def text(self, done: bool = False) -> str:
        what = f"tag {self.reference}" if self.is_tag else f"manifest {self.reference}"
        if self.verb == "delete":
            return f"{'Deleted' if done else 'Delete'} {what} of {self.name}"
        if self.verb == "prefetch":
            at = ":" if self.is_tag else "@"
            return f"{'Fetched' if done else 'Fetch'} {self.name}{at}{self.reference} into the cache"
        verb = {"pin": "Pinned" if done else "Pin", "unpin": "Unpinned" if done else "Unpin"}[self.verb]
        return f"{verb} {self.name}@{self.reference}"


class Actions:
    """The confirmation pages and the POSTs behind them; *render* draws a template as the pages do."""

    def __init__(self, config: Config, render: Render, viewer: Callable[[Request], str | None]) -> None:
        self.config = config
        self.render = render
        self.viewer = viewer
        self._tokens: Tokens | None = None

    def tokens(self) -> Tokens:
        if self._tokens is None:
            layout = Layout(self.config.storage.path)
            self._tokens = Tokens(token_key(self.config, layout.auth_key, layout.tmp))
        return self._tokens

    def allowed(self, user: str | None, name: str) -> bool:
        """May *user* act on repository *name* from the UI (a logged-in user with write rights)?"""
        return self.config.auth.enabled and user is not None and self.config.auth.may_write(user, name)

    def writes_somewhere(self, user: str | None) -> bool:
        """May *user* write some repository (and so prefetch into it)?"""
        auth = self.config.auth
        return auth.enabled and user is not None and (
            not auth.push_users or any(e.partition(":")[0] == user for e in auth.push_users))

    def refuse(self, request: Request, message: str, back: str | None = None, **more: Any) -> Response:
        """``403`` saying *message*, with links to what may be done next (*more*: ``login=True``, a
        ``retry`` page)."""
        return self.render(request, "action.html", status=403, title="Refused", message=message, wanted=None,
                           token="", back=back, **more)

    async def page(self, request: Request) -> Response:
        verb = request.path_params["verb"]
        if verb not in VERBS:
            return self.render(request, "missing.html", status=404, what=request.url.path)
        if verb == "delete" and not self.config.delete.enabled:
            return self.refuse(request, "Deletes are disabled on this registry (delete.enabled: false).")
        if not self.config.auth.enabled or self.viewer(request) is None:  # refused before its form is read
            return self.refuse(request, "An anonymous visitor may not change anything here.",
                               login=self.config.auth.enabled)
        fields = dict(request.query_params) if request.method in ("GET", "HEAD") else await _form(request)
        if fields is None:
            return self.render(request, "action.html", status=400, title="Bad request",
                               message="The form could not be read.", wanted=None, token="", back=None)
        try:
            wanted = Wanted(verb, parse_name(fields.get("name", "")), _reference(verb, fields.get("reference", "")))
        except ParseError as exc:
            return self.render(request, "action.html", status=400, title="Bad request", message=str(exc),
                               wanted=None, token="", back=None)
        user = self.viewer(request)
        if not self.allowed(user, wanted.name):
            who = user or "An anonymous visitor"
            return self.refuse(request, f"{who} may not change {wanted.name}.")
        assert user is not None
        back = "/" if verb == "prefetch" else \
            f"/r/{wanted.name}" + ("" if wanted.is_tag or verb == "delete" else f"@{wanted.reference}")
        if request.method in ("GET", "HEAD"):
            tagged = [] if wanted.is_tag or verb != "delete" else await self._tagged(request, wanted)
            return self.render(request, "action.html", title=wanted.text() + "?", message="", wanted=wanted,
                               token=self.tokens().issue(user), back=back, tagged=tagged)
        if not self.tokens().valid(user, fields.get("token", "")):
            retry = f"/actions/{verb}?" + urlencode({"name": wanted.name, "reference": wanted.reference})
            return self.refuse(request, "This form has expired or did not come from this page: nothing was "
                                        "changed. Ask again and confirm on the new form.", back=back, retry=retry)
        try:
            told, back = await self._do(request, wanted)
        except APIError as exc:
            return self.render(request, "action.html", status=exc.status, title=f"Not done: {wanted.text()}",
                               message=f"{wanted.text()}: {exc.message}.", wanted=None, token="", back=back)
        return self.render(request, "action.html", title=wanted.text(done=True),
                           message=wanted.text(done=True) + told + ".", wanted=None, token="", back=back)

    async def _tagged(self, request: Request, wanted: Wanted) -> list[str]:
        """The tags pointing to the manifest *wanted* names, sorted (none when it is not there)."""
        local = request.state.namespaces.local
        key = await local.read_repo_key(wanted.name)
        return sorted(await in_index_thread(local.metadata.tags_pointing_to, key, wanted.reference))

    async def _do(self, request: Request, wanted: Wanted) -> tuple[str, str]:
        """Do *wanted*; more to say of it (``""``, or ``": ..."``) and the page to go back to;
        :class:`APIError` if not done."""
        back = f"/r/{wanted.name}"
        namespaces: Namespaces = request.state.namespaces
        local = namespaces.local
        key = await local.read_repo_key(wanted.name)
        if wanted.verb in ("delete", "prefetch"):
            repository = await namespaces.repository(wanted.name)
            pushed = isinstance(repository, LocalRepository)  # as the API routes the name
            reference = parse_reference(wanted.reference)
            if wanted.verb == "prefetch":
                if pushed:
                    raise APIError("UNSUPPORTED", "it is a repository pushed here, not a cache", status=400)
                done = await prefetch(repository, reference)
                return (f": {done.digest}, {done.manifests} manifest(s), {done.fetched} blob(s) fetched, "
                        f"{done.present} already stored"), back
            if not pushed:
                raise APIError("UNSUPPORTED", "only a pushed repository's tags and manifests are deleted here",
                               status=400)
            record = await in_index_thread(local.metadata.get_tag, key, wanted.reference) if wanted.is_tag else None
            await repository.delete_manifest(reference)
            if record is None:
                return "", back
            if await in_index_thread(local.metadata.tags_pointing_to, key, record.digest) != []:
                return "", back
            # Still pulled by digest, and listed nowhere now: its own page has the button that deletes it.
            return f": its manifest {record.digest} is left without a tag", f"{back}@{record.digest}"
        metadata = local.metadata

        def change() -> None:
            if metadata.get_manifest(wanted.reference) is None or not metadata.is_linked(key, wanted.reference):
                raise APIError("MANIFEST_UNKNOWN", "no such manifest in this repository",
                               detail={"digest": wanted.reference})
            if wanted.verb == "pin":
                metadata.pin(key, wanted.reference)
            elif not metadata.unpin(key, wanted.reference):
                raise APIError("MANIFEST_UNKNOWN", "it was not pinned", detail={"digest": wanted.reference})

        await in_index_thread(change)
        return "", back


def _reference(verb: str, raw: str) -> str:
    """A tag or a digest for a delete, a digest for a pin; :class:`ParseError` otherwise."""
    if verb in ("delete", "prefetch"):
        return str(parse_reference(raw))
    return str(parse_digest(raw))


async def _form(request: Request) -> dict[str, Any] | None:
    """An ``application/x-www-form-urlencoded`` body's fields (the last of each name); None when
    it is not one or longer than :data:`MAX_FORM_BYTES`."""
    if request.headers.get("content-type", "").partition(";")[0].strip() != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        return dict(parse_qsl(body.decode(), keep_blank_values=True))
    except UnicodeDecodeError:
        return None

