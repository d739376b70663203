"""Content codings as compressing servers, CDNs and proxies apply them (RFC 9110 section 8.4).

:class:`Coder` is pure ASGI middleware: wrapped around an app, it content-codes
its answers with one coding (``gzip``, ``deflate``, ``br``, ``zstd``) when the
request's ``Accept-Encoding`` allows it (RFC 9110 section 12.5.3: no header at
all allows any coding), or with ``always`` regardless of it, as a misbehaving
CDN does.  A coded answer loses its ``Content-Length`` (the identity length),
gains ``Content-Encoding`` and ``Vary``, and its body is compressed as it
streams.  Answers that carry no representation (204, 206, 304, 1xx) are left
alone.  Every request is recorded with its ``Accept-Encoding``.

:class:`CodingProxy` is such a coder in front of a forwarding proxy to one
upstream, served on loopback from a thread of the test process.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import brotli
import zstandard
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .asgi import ThreadedServer, UpstreamClient, forward_headers, open_upstream
from .service import Service

CODINGS = ("gzip", "deflate", "br", "zstd")
_UNCODED_STATUSES = {204, 206, 304}


@dataclass(frozen=True)
class CodedRequest:
    """A request the coder saw: which server, what it allowed, whether the answer was coded."""

    server: str
    method: str
    path: str
    accept_encoding: str | None
    coded: bool


def accepts(header: str | None, coding: str) -> bool:
    """Whether ``Accept-Encoding: header`` allows *coding* (RFC 9110 section 12.5.3)."""
    if header is None:
        return True
    weights: dict[str, float] = {}
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        if not name.strip():
            continue
        weight = 1.0
        key, _, value = params.strip().partition("=")
        if key.strip().lower() == "q":
            try:
                weight = float(value)
            except ValueError:
                weight = 0.0
        weights[name.strip().lower()] = weight
    if coding in weights:
        return weights[coding] > 0
    return weights.get("*", 0.0) > 0


class Compressor:
    """A streaming compressor: ``feed(data)`` then ``finish()``, each returning coded bytes."""

    def __init__(self, coding: str) -> None:
        self.feed: Callable[[bytes], bytes]
        self.finish: Callable[[], bytes]
        if coding in ("gzip", "deflate"):  # gzip: RFC 1952; deflate: the zlib format, RFC 1950
            z = zlib.compressobj(6, zlib.DEFLATED, 31 if coding == "gzip" else 15)
            self.feed, self.finish = z.compress, z.flush
        elif coding == "br":
            b = brotli.Compressor()
            self.feed, self.finish = b.process, b.finish
        elif coding == "zstd":
            zs = zstandard.ZstdCompressor().compressobj()
            self.feed, self.finish = zs.compress, zs.flush
        else:
            raise ValueError(f"unknown content coding {coding!r}")


def encode(coding: str, data: bytes) -> bytes:
    """*data* in *coding*, in one piece."""
    compressor = Compressor(coding)
    return compressor.feed(data) + compressor.finish()


class Coder:
    """Content-code the answers of the apps it wraps with *coding*; see the module docstring.

    *label*, when given, is sent as the ``Content-Encoding`` instead of *coding* (a server that
    names a coding it did not apply, or one the client cannot know).
    """

    def __init__(self, coding: str, *, always: bool = False, label: str | None = None) -> None:
        Compressor(coding)  # fail early on an unknown coding
        self.coding = coding
        self.always = always
        self.label = label or coding
        self._lock = threading.Lock()
        self._seen: list[CodedRequest] = []

    def wrap(self, app: ASGIApp, server: str = "") -> ASGIApp:
        """*app* with its answers coded; requests are recorded under *server*."""

        async def coded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            await self._answer(app, server, scope, receive, send)

        return coded

    def requests(self, server: str | None = None) -> list[CodedRequest]:
        """Requests seen so far (by every server, or by one)."""
        with self._lock:
            return [r for r in self._seen if server is None or r.server == server]

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    async def _answer(self, app: ASGIApp, server: str, scope: Scope, receive: Receive, send: Send) -> None:
        header = None
        for name, value in scope["headers"]:
            if name.lower() == b"accept-encoding":
                header = value.decode("latin-1") if header is None else f"{header}, {value.decode('latin-1')}"
        allowed = self.always or accepts(header, self.coding)
        head = scope["method"] == "HEAD"
        compressor: Compressor | None = None

        async def coding_send(message: Message) -> None:
            nonlocal compressor
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])]
                already = any(k.lower() == b"content-encoding" for k, _ in headers)
                coded = allowed and not already and message["status"] not in _UNCODED_STATUSES \
                    and message["status"] >= 200
                with self._lock:
                    self._seen.append(CodedRequest(server, scope["method"], scope["path"], header, coded))
                if coded:
                    compressor = Compressor(self.coding)
                    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                    headers += [(b"content-encoding", self.label.encode()), (b"vary", b"Accept-Encoding")]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and compressor is not None and not head:
                body = compressor.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    body += compressor.finish()
                message = {**message, "body": body}
            await send(message)

        await app(scope, receive, coding_send)


class CodingProxy(Service):
    """A loopback server forwarding everything to *upstream_url*, its answers coded by *coder*."""

    def __init__(self, upstream_url: str, coder: Coder) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.coder = coder
        self._upstream = UpstreamClient()
        app = Starlette(routes=[Route("/{path:path}", self._forward,
                                      methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])],
                        lifespan=self._upstream.lifespan)
        self._server = ThreadedServer(coder.wrap(app, "proxy"), name="coding-proxy", lifespan="on")

    def start(self) -> CodingProxy:
        """Start serving (in a background thread)."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving; safe to call twice."""
        self._server.stop()

    @property
    def url(self) -> str:
        return self._server.url

    async def _forward(self, request: Request) -> Response:
        # docker-registry (and the mirror) never code their answers: coding them is this proxy's work.
        upstream = await open_upstream(self._upstream.http, request, self.upstream_url)
        headers: dict[str, Any] = dict(forward_headers(upstream.headers.items()))
        if request.method == "HEAD":
            await upstream.aclose()
            return Response(status_code=upstream.status_code, headers=headers)
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=headers,
                                 background=BackgroundTask(upstream.aclose))
