"""Repeated manifest GETs by digest, and by fresh tag, answered from memory before the router.

A manifest named by digest never changes, so once the routes have served one for a path they
:meth:`ManifestMemo.remember` the whole answer, and :class:`MemoManifests` (pure ASGI, innermost
middleware: after authentication, inside the metrics and the access log) answers the next
``GET``/``HEAD`` of that path itself, without the router, the request objects or the index.
When no login is required, ``server/front.py`` gives these answers before the whole middleware
stack instead (with the same metrics, access log line and headers).

An answer by tag is remembered under its path and ``Accept`` header (an index may be answered
with one of its manifests to a client that cannot read indexes), and only while it is fresh: a
pull-through tag until one ``cache.tag_ttl`` after the upstream last confirmed it, when the
routes ask the upstream again; a pushed tag until the index moves.  Moving a tag moves the
generation (:meth:`~mirror.metadata.driver.Metadata.set_tag`), so a push, a delete or another worker
seeing the upstream move the tag ends the answer in every process at once.

What a memo may not do is outlive the right to serve: the link between the repository and the
digest can be withdrawn (a ``DELETE``, eviction, garbage collection, ``fsck --repair``), or the
repository pushed to and made local, by any process.  Each of those changes the index's shared
:class:`~mirror.metadata.driver.Generation`; the memo compares it on every lookup and forgets
everything when it moved.  An answer is remembered only under the generation read *before* the
routes looked at the index, so a withdrawal that races with the lookup is never missed.

Requests with a query string (``?ns=``) or ``If-None-Match`` take the ordinary route.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from ..metadata.driver import Generation
from ..spec.endpoints import API_VERSION, API_VERSION_HEADER, CACHE_HEADER

#: Bytes of manifest bodies remembered per process (bodies are shared with the store's reads).
MEMO_BYTES = 16 << 20
_API_VERSION = (API_VERSION_HEADER.lower().encode(), API_VERSION.encode())
_CACHE_KEY = CACHE_HEADER.lower().encode()


@dataclass(frozen=True, slots=True)
class Answer:
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: Records the use for eviction's least-recently-used order (pull-through repositories).
    touch: Callable[[], None] | None
    #: The ``X-Mirror-Cache`` value in *headers* (for the metrics and the access log).
    outcome: str
    #: ``time.time()`` from which the answer is no longer given (a tag's freshness), or None.
    expires: float | None = None


def accept_key(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request's ``Accept`` headers as one value: what an answer by tag is remembered under."""
    return b", ".join(value for key, value in headers if key == b"accept")


class ManifestMemo:
    def __init__(self, max_bytes: int = MEMO_BYTES) -> None:
        self.max_bytes = max_bytes
        self._generation: Generation | None = None
        self._seen = b""
        #: By path (a digest), or by path and :func:`accept_key` (a tag).
        self._answers: dict[str | tuple[str, bytes], Answer] = {}
        self._size = 0

    def attach(self, generation: Generation | None) -> None:
        """Start (or, with None, stop) remembering, against the index's generation."""
        self._generation = generation
        self._answers.clear()
        self._size = 0

    def stamp(self) -> bytes | None:
        """The generation now: read it before looking at the index, pass it to :meth:`remember`."""
        return None if self._generation is None else self._generation.read()

    def _current(self) -> bytes | None:
        if self._generation is None:
            return None
        now = self._generation.read()
        if now != self._seen:
            self._answers.clear()
            self._size = 0
            self._seen = now
        return now

    def remember(self, path: str, stamp: bytes | None, *, body: bytes, media_type: str, digest: str,
                 outcome: str, touch: Callable[[], None] | None, accept: bytes | None = None,
                 expires: float | None = None) -> None:
        """Keep the answer for *path* (for a tag: and *accept*, until *expires*, a ``time.time()``),
        unless the index changed since *stamp* was read."""
        if stamp is None or self._current() != stamp or len(body) > self.max_bytes:
            return
        key: str | tuple[str, bytes] = path if accept is None else (path, accept)
        headers = [
            (b"content-type", media_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
            _API_VERSION,
            (b"docker-content-digest", digest.encode()),
            (b"etag", f'"{digest}"'.encode()),
            (_CACHE_KEY, outcome.encode()),
        ]
        old = self._answers.pop(key, None)
        if old is not None:
            self._size -= len(old.body)
        self._answers[key] = Answer(headers, body, touch, outcome, expires)
        self._size += len(body)
        while self._size > self.max_bytes:
            self._size -= len(self._answers.pop(next(iter(self._answers))).body)

    def lookup(self, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Answer | None:
        """The answer for *path* by digest, else by tag with the request's *headers*' ``Accept``."""
        if self._current() is None:
            return None
        answer = self._answers.get(path)
        if answer is None and headers is not None:
            key = (path, accept_key(headers))
            answer = self._answers.get(key)
            if answer is not None and answer.expires is not None and time.time() >= answer.expires:
                del self._answers[key]
                self._size -= len(answer.body)
                return None
        return answer

    def hit(self, scope: Scope) -> Answer | None:
        """The answer for an ASGI request, if it is a remembered ``GET``/``HEAD`` of a manifest without a
        query string or ``If-None-Match``; None otherwise (the routes answer it)."""
        if scope["type"] != "http" or scope["query_string"] or scope["method"] not in ("GET", "HEAD") \
                or "/manifests/" not in scope["path"]:
            return None
        answer = self.lookup(scope["path"], scope["headers"])
        if answer is None or any(key == b"if-none-match" for key, _ in scope["headers"]):
            return None
        if answer.touch is not None:
            answer.touch()
        return answer


class MemoManifests:
    """Answers remembered manifest GETs and HEADs; everything else goes on to *app*."""

    def __init__(self, app: ASGIApp, memo: ManifestMemo) -> None:
        self.app = app
        self.memo = memo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = self.memo.hit(scope)
        if answer is None:
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body if scope["method"] == "GET" else b""})
