"""Remembered manifest answers given at the very front of the app, before its middleware.

A manifest GET by digest that the memo holds (``api/memo.py``) costs little beyond its socket
write, and the middleware it went through cost as much again: starlette's error middleware,
:class:`~mirror.server.hardening.Hardening` and :class:`~mirror.api.observability.Observe` each
wrap ``send`` and copy the headers.  When no login is required (no ``AuthMiddleware`` has to see
the request first), :class:`MirrorApp` asks :class:`MemoFront` before that stack, and a hit is
answered with what the stack would have given it: the memo's headers, Hardening's security
headers and the request id, counted in the same metrics and written to the same access log (the
:class:`~mirror.api.observability.Recorder` the stack's ``Observe`` uses).  A request body is never
read: a hit is a GET or HEAD.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from ..api.memo import ManifestMemo
from ..api.observability import REQUEST_ID_HEADER, Recorder
from .hardening import SECURITY_HEADERS

__all__ = ["Coalesced", "MemoFront", "MirrorApp", "reads_a_tag"]

log = logging.getLogger("mirror")


class MemoFront:
    """Answers the memo's hits with the middleware's headers, metrics and access log."""

    def __init__(self, memo: ManifestMemo, recorder: Recorder) -> None:
        self.memo = memo
        self.recorder = recorder

    async def answered(self, scope: Scope, send: Send) -> bool:
        """Answer *scope* from the memo: True when it did (the request is done), else False."""
        answer = self.memo.hit(scope)
        if answer is None:
            return False
        started = time.perf_counter()
        recorder = self.recorder
        request_id = recorder.request_id(scope)
        body = b"" if scope["method"] == "HEAD" else answer.body
        recorder.started()
        status = 500
        sent = 0
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*answer.headers, *SECURITY_HEADERS, (REQUEST_ID_HEADER, request_id)]})
            status = 200
            await send({"type": "http.response.body", "body": body})
            sent = len(body)
        finally:
            recorder.done(scope, request_id, "manifest", status, answer.outcome, sent, 0,
                          time.perf_counter() - started)
        return True


class Coalesced:
    """*call* run for every caller, once per round for all who came before it started: a caller waits
    for the round after the one running when it came (whose *call* starts after it came), shared with
    every other caller of that moment.  So many requests at once cost one *call* per round trip, not
    one each.  What *call* raises is logged; a caller cancelled leaves its round running."""

    def __init__(self, call: Callable[[], Awaitable[None]]) -> None:
        self._call = call
        self._pending: asyncio.Future[None] | None = None  # the next round's, while callers wait for it
        self._running: asyncio.Task[None] | None = None

    async def __call__(self) -> None:
        waiter = self._pending
        if waiter is None:
            waiter = self._pending = asyncio.get_running_loop().create_future()
            if self._running is None:
                self._running = asyncio.create_task(self._rounds())
        await asyncio.shield(waiter)

    async def _rounds(self) -> None:
        try:
            while (waiter := self._pending) is not None:
                self._pending = None  # callers from now on wait for the next round
                try:
                    await self._call()
                except Exception:  # the callers go on as without it
                    log.exception("%s failed", self._call)
                finally:
                    waiter.set_result(None)
        finally:
            self._running = None
            if self._pending is not None:  # cancelled (shutdown): nobody is left waiting
                self._pending.set_result(None)
                self._pending = None


def reads_a_tag(scope: Scope) -> bool:
    """A ``GET``/``HEAD`` of a manifest by tag, of a tag list or of the catalog."""
    if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
        return False
    path: str = scope["path"]
    if "/manifests/" in path:
        return ":" not in path.rpartition("/")[2]  # not a digest
    return path.endswith("/tags/list") or path == "/v2/_catalog"


class MirrorApp(Starlette):
    """Starlette, asking :attr:`front` (when set) before its middleware stack; on a replica of a
    cluster, learning the index's generation first (:attr:`sync`) when the request reads a tag:
    what another replica changed before answering its client is then seen here, memos included."""

    front: MemoFront | None = None
    sync: Callable[[], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.sync is not None and reads_a_tag(scope):
            await self.sync()
        front = self.front
        if front is None or not await front.answered(scope, send):
            await super().__call__(scope, receive, send)
