"""A fault-injecting HTTP proxy to put between the mirror and its upstream.

:class:`FaultProxy` forwards every request to the upstream (streaming both
ways, status, headers and body as they are, redirects not followed) unless a
:class:`FaultRule` matches.  Rules match on method and a path regex, may be
limited to the first *times* matches, and inject one of:

``status``  answer at once with ``status`` and a registry error body
            (429 -> TOOMANYREQUESTS, 503 -> UNAVAILABLE ...), not forwarded;
``corrupt`` forward, but flip ``flip_bytes`` body bytes from offset
            ``after_bytes`` on, keeping the length;
``reset``   forward headers and ``after_bytes`` body bytes (never the whole
            body), then reset the connection (TCP RST);
``slow``    forward ``after_bytes`` bytes at once, then at most
            ``chunk_size`` bytes every ``delay`` seconds (``sent`` counts
            the body bytes passed on so far);
``refuse``  close the connection without any answer (FIN), not forwarded.
``late``    wait ``delay`` seconds, then forward as it is (an answer that starts late).

The server runs in a thread of the test process, so rules and counters are
plain attributes guarded by a lock and can be changed while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .asgi import (
    ThreadedServer,
    UpstreamClient,
    forward_headers,
    open_upstream,
    raw_headers,
    wait_disconnect,
)
from .matching import PathMatch, request_matches
from .service import Service

FaultKind = Literal["status", "corrupt", "reset", "slow", "refuse", "late"]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]

#: Registry error code and message used for a status fault's default body.
ERROR_CODES: dict[int, tuple[str, str]] = {
    401: ("UNAUTHORIZED", "authentication required"),
    403: ("DENIED", "requested access to the resource is denied"),
    404: ("NOT_FOUND", "not found"),
    429: ("TOOMANYREQUESTS", "You have reached your pull rate limit"),
    500: ("UNKNOWN", "internal server error"),
    502: ("UNKNOWN", "bad gateway"),
    503: ("UNAVAILABLE", "service unavailable"),
    504: ("UNKNOWN", "gateway timeout"),
}


def error_body(code: str, message: str) -> bytes:
    """A Registry API error document: ``{"errors":[{"code":..,"message":..}]}``."""
    return json.dumps({"errors": [{"code": code, "message": message}]}, separators=(",", ":")).encode()


def status_body(status: int) -> bytes:
    """The default error body for a status fault."""
    code, message = ERROR_CODES.get(status, ("UNKNOWN", f"injected status {status}"))
    return error_body(code, message)


@dataclass
class FaultRule:
    """One fault: what it matches, what it does, and how often it fired.

    ``path`` is a regex searched in the request path; ``method`` None
    matches any method; ``times`` None means every match.
    """

    kind: FaultKind
    path: str = ""
    method: str | None = None
    times: int | None = None
    status: int = 503
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    after_bytes: int = 0
    flip_bytes: int = 1
    chunk_size: int = 16 * 1024
    delay: float = 0.1
    #: ``corrupt``: seconds the body pauses before its first byte, and just before its first flipped byte.
    pause_first: float = 0.0
    pause: float = 0.0
    hits: int = 0
    sent: int = 0

    def matches(self, method: str, path: str) -> bool:
        """True if this rule applies to the request and has hits left."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return re.search(self.path, path) is not None


@dataclass(frozen=True)
class ProxiedRequest:
    """A request the proxy received; ``status`` is None if none was sent.  ``peer`` is the
    client's ``host:port``: requests with the same one came over the same connection."""

    method: str
    path: str
    status: int | None
    fault: FaultKind | None
    peer: str = ""


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


class FaultProxy(Service):
    """Forwarding proxy with runtime-configurable fault injection."""

    def __init__(self, upstream_url: str, *, keep_alive: int = 30) -> None:
        """*keep_alive*: seconds the proxy keeps an idle connection of the mirror's open."""
        self.upstream_url = upstream_url.rstrip("/")
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._log: list[ProxiedRequest] = []
        self._upstream = UpstreamClient()
        app = Starlette(
            routes=[Route("/{path:path}", self._endpoint, methods=METHODS)],
            lifespan=self._upstream.lifespan,
        )
        self._server = ThreadedServer(app, name="fault-proxy", lifespan="on", keep_alive=keep_alive)

    @property
    def url(self) -> str:
        """Base URL to give the mirror as its upstream."""
        return self._server.url

    def start(self) -> FaultProxy:
        """Start serving (in a background thread)."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving; safe to call twice."""
        self._server.stop()

    # Rules -----------------------------------------------------------------

    def add(self, kind: FaultKind, path: str = "", *, method: str | None = None,
            times: int | None = None, **params: Any) -> FaultRule:
        """Add a rule (see :class:`FaultRule` for *params*) and return it.

        Rules are tried in the order they were added; the first that
        matches and has hits left wins.
        """
        rule = FaultRule(kind, path=path, method=method, times=times, **params)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: FaultRule) -> None:
        """Remove one rule."""
        with self._lock:
            self._rules.remove(rule)

    def clear_rules(self) -> None:
        """Remove every rule: plain forwarding from now on."""
        with self._lock:
            self._rules.clear()

    @contextlib.contextmanager
    def fault(self, kind: FaultKind, path: str = "", **params: Any) -> Iterator[FaultRule]:
        """A rule active only inside a ``with`` block."""
        rule = self.add(kind, path, **params)
        try:
            yield rule
        finally:
            with self._lock:
                if rule in self._rules:
                    self._rules.remove(rule)

    # Counters --------------------------------------------------------------

    def requests(self) -> list[ProxiedRequest]:
        """Every request received since the last :meth:`clear_counts`."""
        with self._lock:
            return list(self._log)

    def count(self, method: str | None, path: PathMatch, status: int | None = None) -> int:
        """Requests by *method* (None: any), *path* (substring or regex), *status*."""
        return sum(
            request_matches(entry.method, entry.path, entry.status, method, path, status)
            for entry in self.requests()
        )

    def clear_counts(self) -> None:
        """Forget the requests received so far."""
        with self._lock:
            self._log.clear()

    # Server side -----------------------------------------------------------

    def _record(self, request: Request, status: int | None, rule: FaultRule | None) -> None:
        peer = f"{request.client.host}:{request.client.port}" if request.client else ""
        entry = ProxiedRequest(request.method, request.url.path, status, rule.kind if rule else None, peer)
        with self._lock:
            self._log.append(entry)

    def _take_rule(self, method: str, path: str) -> FaultRule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    return rule
        return None

    async def _endpoint(self, request: Request) -> Callable[[Scope, Receive, Send], Any]:
        rule = self._take_rule(request.method, request.url.path)
        if rule is not None and rule.kind == "status":
            return functools.partial(self._answer_status, request, rule)
        if rule is not None and rule.kind == "refuse":
            return functools.partial(self._refuse, request, rule)
        return functools.partial(self._forward, request, rule)

    async def _answer_status(self, request: Request, rule: FaultRule,
                             scope: Scope, receive: Receive, send: Send) -> None:
        body = rule.body if rule.body is not None else status_body(rule.status)
        headers = {"content-type": "application/json; charset=utf-8",
                   "docker-distribution-api-version": "registry/2.0", **rule.headers,
                   "content-length": str(len(body))}
        self._record(request, rule.status, rule)
        await send({"type": "http.response.start", "status": rule.status, "headers": raw_headers(headers.items())})
        await send({"type": "http.response.body", "body": b"" if request.method == "HEAD" else body})

    async def _refuse(self, request: Request, rule: FaultRule,
                      scope: Scope, receive: Receive, send: Send) -> None:
        self._record(request, None, rule)
        if self._server.abort(scope, reset=False):
            await wait_disconnect(receive)

    async def _forward(self, request: Request, rule: FaultRule | None,
                       scope: Scope, receive: Receive, send: Send) -> None:
        if rule is not None and rule.kind == "late":
            await asyncio.sleep(rule.delay)
        try:
            upstream = await open_upstream(self._upstream.http, request, self.upstream_url)
        except httpx.TransportError as exc:
            self._record(request, 502, rule)
            message = error_body("UNAVAILABLE", f"upstream unreachable: {exc!r}")
            await send({"type": "http.response.start", "status": 502,
                        "headers": raw_headers([("content-type", "application/json"),
                                                ("content-length", str(len(message)))])})
            await send({"type": "http.response.body", "body": message})
            return
        try:
            self._record(request, upstream.status_code, rule)
            await send({
                "type": "http.response.start",
                "status": upstream.status_code,
                "headers": raw_headers(forward_headers(upstream.headers.multi_items())),
            })
            if rule is not None and rule.kind == "reset":
                await self._send_then_reset(upstream, rule, scope, receive, send)
                return
            body = upstream.aiter_raw()
            if rule is not None and rule.kind == "slow":
                await self._send_slowly(body, rule, send)
            elif rule is not None and rule.kind == "corrupt":
                await self._send_corrupted(body, rule, _content_length(upstream), send)
            else:
                async for data in body:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await upstream.aclose()

    async def _send_then_reset(self, upstream: httpx.Response, rule: FaultRule,
                               scope: Scope, receive: Receive, send: Send) -> None:
        limit = rule.after_bytes
        length = _content_length(upstream)
        if length:  # never let the whole body through
            limit = min(limit, length - 1)
        sent = 0
        async for data in upstream.aiter_raw():
            if sent >= limit:
                break
            piece = data[: limit - sent]
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent += len(piece)
        await asyncio.sleep(0.05)  # let the partial body reach the client first
        if self._server.abort(scope, reset=True):
            await wait_disconnect(receive)

    async def _send_slowly(self, body: AsyncIterator[bytes], rule: FaultRule, send: Send) -> None:
        """Pass ``after_bytes`` on as they come, then pieces of at most
        ``chunk_size`` bytes, each after a ``delay`` (nothing is buffered)."""
        passed = 0
        size = max(1, rule.chunk_size)

        async def pass_on(piece: memoryview) -> None:
            await send({"type": "http.response.body", "body": bytes(piece), "more_body": True})
            with self._lock:
                rule.sent += len(piece)

        async for data in body:
            view = memoryview(data)
            if passed < rule.after_bytes:
                fast = view[: rule.after_bytes - passed]
                await pass_on(fast)
                passed += len(fast)
                view = view[len(fast):]
            for start in range(0, len(view), size):
                await asyncio.sleep(rule.delay)
                await pass_on(view[start:start + size])

    @staticmethod
    async def _send_corrupted(body: AsyncIterator[bytes], rule: FaultRule, length: int | None,
                              send: Send) -> None:
        start = rule.after_bytes if length is None else min(rule.after_bytes, max(length - 1, 0))
        stop = start + max(1, rule.flip_bytes)
        offset = 0
        if rule.pause_first:
            await asyncio.sleep(rule.pause_first)
        async for data in body:
            end = offset + len(data)
            if rule.pause and offset <= start < end:
                if start > offset:  # what comes before the damage goes at once
                    await send({"type": "http.response.body", "body": data[:start - offset], "more_body": True})
                    data, offset = data[start - offset:], start
                await asyncio.sleep(rule.pause)
            if offset < stop and end > start:
                buffer = bytearray(data)
                for index in range(max(start, offset), min(stop, end)):
                    buffer[index - offset] ^= 0xFF
                data = bytes(buffer)
            offset = end
            await send({"type": "http.response.body", "body": data, "more_body": True})

