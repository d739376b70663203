"""uvicorn's httptools protocol with a deadline and a size cap for each request head, and zero-copy bodies.

It subclasses uvicorn's private ``HttpToolsProtocol``: ``hardening.missing_internals`` checks at
start-up that what it uses is there before it is chosen (``hardening.http_protocol``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import zerocopy

#: Request line plus headers; uvicorn's httptools protocol has no limit of its own.
MAX_HEAD_BYTES = 64 * 1024


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap for each request head.

    The deadline is uvicorn's ``timeout_keep_alive`` (set from ``http.idle_timeout``): it runs
    from the moment a connection opens, or a new request begins, until its headers are complete.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._tls = False

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ValueError("request head too large")  # httptools answers 400 and closes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._tls = transport.get_extra_info("sslcontext") is not None  # no sendfile(2) through TLS
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before and self.cycle is not None:
            zerocopy.offer(self.cycle, self.server_state, self.timeout_keep_alive, zero_copy=not self._tls)
