"""uvicorn's httptools protocol with a deadline and a size cap for each request head, zero-copy
bodies, and a clear log line for a client that speaks TLS to a plain-HTTP port (what the server's
workers saw of each client host: ``server/clienthosts.py``).

It subclasses uvicorn's private ``HttpToolsProtocol``: ``hardening.missing_internals`` checks at
start-up that what it uses is there before it is chosen (``hardening.http_protocol``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import certificates, zerocopy
from .clienthosts import STATE, ClientHosts

#: Request line plus headers; uvicorn's httptools protocol has no limit of its own.
MAX_HEAD_BYTES = 64 * 1024
#: The first bytes of a TLS handshake record (content type 22, major version 3: RFC 8446 section 5.1).
TLS_HANDSHAKE = b"\x16\x03"
#: Seconds between two warnings of TLS handshakes from one client host (the rest are logged at DEBUG):
#: docker, containerd and skopeo try HTTPS first on every pull from an "insecure" registry.
TLS_WARN_INTERVAL = 600.0
#: Seconds a client host that began a TLS handshake has to come back in plain HTTP (what dockerd,
#: skopeo and podman do for a registry they were told is insecure: HTTPS first, then http://) before
#: the handshake is taken for a client that expects HTTPS and warned of.
FALLBACK_GRACE = 2.0
log = logging.getLogger("mirror.server")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap for each request head.

    The deadline is uvicorn's ``timeout_keep_alive`` (set from ``http.idle_timeout``): it runs
    from the moment a connection opens, or a new request begins, until its headers are complete.
    What it sees of client hosts goes to the :class:`~.clienthosts.ClientHosts` in the app's lifespan
    state (key :data:`~.clienthosts.STATE`); for an app that puts none there, to this process's own,
    put there by the server's first connection.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._tls = False
        self._first = True
        hosts = self.app_state.get(STATE)
        if not isinstance(hosts, ClientHosts):
            hosts = self.app_state.setdefault(STATE, ClientHosts())
        self._hosts: ClientHosts = hosts

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
        context = transport.get_extra_info("sslcontext")
        self._tls = context is not None  # no sendfile(2) through TLS
        if context is not None and certificates.rotation is not None:
            certificates.rotation.check(context)
        self._arm()

    def data_received(self, data: bytes) -> None:
        first, self._first = self._first, False
        if first and not self._tls and data.startswith(TLS_HANDSHAKE):
            self.loop.call_later(FALLBACK_GRACE, _tls_on_plain_port, self._hosts, self.client, time.monotonic())
            # Answered in plain HTTP, as for any request that does not parse: a Go client (dockerd,
            # containerd, skopeo, podman) then reports "server gave HTTP response to HTTPS client" and,
            # for a registry it was told is insecure, falls back to http://.
            self.send_400_response("This port serves plain HTTP, not TLS.")
            return
        super().data_received(data)

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
        if self.client and not self._tls:
            self._hosts.saw_plain(self.client[0], time.monotonic())
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before and self.cycle is not None:
            zerocopy.offer(self.cycle, self.server_state, self.timeout_keep_alive, zero_copy=not self._tls)


def _tls_on_plain_port(hosts: ClientHosts, client: tuple[str, int] | None, since: float) -> None:
    """Log that *client* began a TLS handshake here (at *since*, :data:`FALLBACK_GRACE` seconds ago):
    at WARNING once per :data:`TLS_WARN_INTERVAL` per host, unless the host came back in plain HTTP
    since (then at DEBUG: it was told the registry is plain HTTP, and tries HTTPS first all the same).
    *hosts* holds what every worker of this server saw: the way back may have reached another."""
    host = client[0] if client else "a client"
    peer = f"{client[0]}:{client[1]}" if client else "a client"
    if hosts.plain_since(host, since):
        log.debug("%s began a TLS handshake on this plain-HTTP port, then came back in plain HTTP", peer)
        return
    level = logging.WARNING if hosts.warn(host, time.monotonic(), TLS_WARN_INTERVAL) else logging.DEBUG
    log.log(level, "%s began a TLS handshake on this plain-HTTP port: it expects HTTPS. Either tell it "
                   "the registry is plain HTTP (dockerd: insecure-registries; containerd: hosts.toml "
                   "server = \"http://...\"; podman, skopeo: --tls-verify=false or insecure = true in "
                   "registries.conf), or serve HTTPS (http.tls.certificate, http.tls.key)", peer)
