"""Run ASGI apps on loopback in a background thread, and forward to upstreams.

:class:`ThreadedServer` runs uvicorn in its own thread and event loop, so a
test can change the app's state (fault rules, limits) directly and read its
counters without any control protocol.  :meth:`ThreadedServer.abort` lets an
app drop its client's TCP connection abruptly (RST), which ASGI itself
cannot express.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp, Scope

from tests.support.service import Service

#: Headers that describe one hop and must not be forwarded as they are.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade",
})
START_TIMEOUT = 10.0
STOP_GRACE = 2.0


class ThreadedServer(Service):
    """uvicorn serving *app* on ``127.0.0.1`` from a daemon thread.

    The listening socket is bound in :meth:`__init__` so :attr:`url` is known
    at once and no other process can take the port.
    """

    def __init__(self, app: ASGIApp, *, name: str = "asgi", lifespan: str = "auto", keep_alive: int = 30) -> None:
        """*keep_alive*: seconds an idle client connection is kept open."""
        self.name = name
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            http="h11",
            ws="none",
            lifespan=lifespan,  # type: ignore[arg-type]
            log_config=None,
            log_level=logging.WARNING,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=int(STOP_GRACE),
            timeout_keep_alive=keep_alive,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadedServer:
        """Serve in a new thread; return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name=self.name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"{self.name} server thread died while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} did not start within {START_TIMEOUT}s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Shut down (cancelling streams after a short grace); safe to call twice."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._server.should_exit = True
            thread.join(STOP_GRACE + 3.0)
            if thread.is_alive():
                self._server.force_exit = True
                thread.join(5.0)
        self._sock.close()

    def abort(self, scope: Scope, *, reset: bool = True) -> bool:
        """Drop the TCP connection that *scope* arrived on, without a response.

        With *reset* the peer gets an RST (unsent data is discarded), else a
        plain FIN after pending data.  Must be called from the server's own
        event loop, i.e. from the app.  Returns False if the connection was
        already gone.
        """
        for connection in list(self._server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if getattr(connection, "client", None) != scope.get("client") or transport is None:
                continue
            if not reset:
                transport.close()
                return True
            raw = transport.get_extra_info("socket")
            if raw is not None:
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
            return True
        return False


async def wait_disconnect(receive: Any) -> None:
    """Drain ASGI messages until ``http.disconnect`` (after an abort)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def forward_headers(headers: Iterable[tuple[str, str]], *, drop: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones and the extra names in *drop*."""
    dropped = HOP_BY_HOP | {name.lower() for name in drop}
    return [(name, value) for name, value in headers if name.lower() not in dropped]


def raw_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI wants them: a list of latin-1 byte pairs."""
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


async def _request_body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


async def open_upstream(
    http: httpx.AsyncClient, request: Request, upstream_url: str, *, path: str | None = None
) -> httpx.Response:
    """Send *request* on to *upstream_url* and return the streaming answer.

    Method, path, query, headers (including ``Host``, so ``Location``
    headers the upstream builds point back at the proxy) and body are passed
    through; redirects are not followed.  The caller must ``aclose()`` it.
    """
    raw_path = path.encode() if path is not None else request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string", b"")
    target = httpx.URL(upstream_url).copy_with(raw_path=raw_path + (b"?" + query if query else b""))
    headers = forward_headers(request.headers.items())
    has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
    outgoing = http.build_request(
        request.method, target, headers=headers, content=_request_body(request) if has_body else None
    )
    # Do not add httpx's default headers that the client did not send.
    sent = {name.lower() for name, _ in headers}
    for name in ("accept", "accept-encoding", "user-agent", "connection"):
        if name not in sent and name in outgoing.headers:
            del outgoing.headers[name]
    return await http.send(outgoing, stream=True, follow_redirects=False)


def upstream_client() -> httpx.AsyncClient:
    """An AsyncClient suited to forwarding: no env proxies, long read timeout."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(300.0, connect=10.0),
        trust_env=False,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
    )


class UpstreamClient:
    """An :func:`upstream_client` owned by one app's lifespan (one event loop).

    Pass :meth:`lifespan` to ``Starlette(lifespan=...)``; use :attr:`http`
    in request handlers.
    """

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """Create the client at startup and close it at shutdown."""
        self._client = upstream_client()
        try:
            yield
        finally:
            await self._client.aclose()
            self._client = None

    @property
    def http(self) -> httpx.AsyncClient:
        """The live client (only between startup and shutdown)."""
        if self._client is None:
            raise RuntimeError("upstream client used outside the app's lifespan")
        return self._client
