"""Defences against hostile and slow clients that sit below the routes.

- :class:`Hardening` (pure ASGI, outermost): ``X-Content-Type-Options: nosniff`` on every
  response, and a deadline on each chunk of a request body: a client that stops sending in
  the middle of an upload or a manifest for ``http.idle_timeout`` gets ``408`` and is
  disconnected instead of holding a worker's file and connection open for ever.
- :class:`GuardedHttpToolsProtocol` (uvicorn's ``http=``): the same deadline for the request
  head, which uvicorn does not have (a client may otherwise trickle header bytes for ever,
  the "slowloris" attack), and a cap on the size of the head (:data:`MAX_HEAD_BYTES`).  It also
  offers requests zero-copy bodies on plain HTTP, and a clean abort (``zerocopy.py``).

- :func:`server_options`: those, TLS (and mutual TLS) for ``uvicorn.run``; :func:`startup_problem`
  loads the certificate, key, client CA and htpasswd file once before serving, so a bad one stops
  start-up with a message naming its key rather than a traceback from a worker.

Bodies themselves are bounded where they are read: manifests at 4 MiB, uploads streamed to disk.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import zerocopy
from .config import Config
from .errors import APIError, error_response

SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]
#: Request line plus headers; uvicorn's httptools protocol has no limit of its own.
MAX_HEAD_BYTES = 64 * 1024


class Hardening:
    def __init__(self, app: ASGIApp, idle_timeout: float) -> None:
        self.app = app
        self.idle_timeout = idle_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout)
            except TimeoutError:
                body_done = True
                raise _stalled(scope["path"], self.idle_timeout) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, guarded_receive, send_with_headers)
        except APIError as exc:  # a stalled body read outside the routes' own error handling
            if started:
                raise
            await error_response(exc, head=scope["method"] == "HEAD")(scope, receive, send_with_headers)


def _stalled(path: str, timeout: float) -> APIError:
    code = "BLOB_UPLOAD_INVALID" if "/blobs/uploads/" in path else "MANIFEST_INVALID" if "/manifests/" in path \
        else "SIZE_INVALID"
    return APIError(code, f"no request data received for {timeout:g}s; request abandoned", status=408,
                    headers={"Connection": "close"})


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


def server_options(config: Config) -> dict[str, Any]:
    """uvicorn settings for TLS, slow clients and trusted reverse proxies."""
    http = config.http
    options: dict[str, Any] = {"http": GuardedHttpToolsProtocol, "timeout_keep_alive": http.idle_timeout,
                               "proxy_headers": True, "forwarded_allow_ips": list(http.trusted_proxies)}
    if http.tls_certificate is not None and http.tls_key is not None:
        options.update(ssl_certfile=str(http.tls_certificate), ssl_keyfile=str(http.tls_key))
        if http.tls_client_ca is not None:
            options.update(ssl_ca_certs=str(http.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def startup_problem(config: Config, auth_key: Path, tmp_dir: Path) -> str | None:
    """Why the server cannot start with this TLS and auth configuration, or None."""
    http = config.http
    if http.tls_certificate is not None and http.tls_key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # A password-protected key fails here rather than prompting on a terminal.
            context.load_cert_chain(http.tls_certificate, http.tls_key, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            return (f"http.tls.certificate {http.tls_certificate} / http.tls.key {http.tls_key}: cannot load them "
                    f"as a PEM certificate chain and its unencrypted private key ({exc})")
        if http.tls_client_ca is not None:
            try:
                context.load_verify_locations(cafile=http.tls_client_ca)
            except (ssl.SSLError, OSError) as exc:
                return f"http.tls.client_ca {http.tls_client_ca}: not a PEM CA certificate file ({exc})"
    if config.auth.htpasswd_path is not None:
        from .auth import AuthError, load_or_create_key
        from .htpasswd import Htpasswd, HtpasswdError

        try:
            Htpasswd(config.auth.htpasswd_path)
        except HtpasswdError as exc:
            return f"auth.htpasswd.path: {exc}"
        try:
            load_or_create_key(auth_key, tmp_dir)
        except (AuthError, OSError) as exc:
            return str(exc)
    return None
