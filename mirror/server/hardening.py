"""Defences against hostile and slow clients that sit below the routes.

- :class:`Hardening` (pure ASGI, outermost): ``X-Content-Type-Options: nosniff`` on every
  response, and a deadline on each chunk of a request body: a client that stops sending in
  the middle of an upload or a manifest for ``http.idle_timeout`` gets ``408`` and is
  disconnected instead of holding a worker's file and connection open for ever.  A request still
  running when ``http.draintimeout`` is over after ``SIGTERM`` ends with one log line: a ``503`` if
  its answer had not begun (the client retries, elsewhere), else its connection cut.
- ``server/protocol.py``'s ``GuardedHttpToolsProtocol`` (uvicorn's ``http=``): the same deadline for the
  request head, which uvicorn does not have (a client may otherwise trickle header bytes for ever,
  the "slowloris" attack), and a cap on the size of the head.  It also offers requests zero-copy
  bodies on plain HTTP, and a clean abort (``server/zerocopy.py``).  Both build on uvicorn's private
  protocol classes: :func:`missing_internals` checks at start-up that what they use is there, and
  when it is not (another uvicorn release) the server runs uvicorn's own protocol with one warning,
  and blobs go out as ordinary body messages: slower, never broken.

- :func:`server_options`: those, TLS (and mutual TLS) for ``uvicorn.run``; :func:`startup_problem`
  loads the certificate, key, client CA and htpasswd file once before serving, so a bad one stops
  start-up with a message naming its key rather than a traceback from a worker.

Bodies themselves are bounded where they are read: manifests at 4 MiB, uploads streamed to disk.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import ssl
import tempfile
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config.sections import Config
from ..spec.endpoints import Kind, endpoint
from ..spec.errors import APIError, error_response
from ..storage.layout import foreign_data_directory

log = logging.getLogger(__name__)
#: What uvicorn cancels the requests still running with once ``timeout_graceful_shutdown``
#: (``http.draintimeout``) is over.
DRAIN_OVER = "Task cancelled, timeout graceful shutdown exceeded"

SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]
#: What ``server/protocol.py`` and ``server/zerocopy.py`` use of uvicorn's httptools protocol beyond its public
#: options: (module, class, method) -> the names that method's code must use (the attributes it sets
#: or calls).  The protocol's ``__init__`` sets what the guard reads; the request cycle's what the
#: zero-copy send reads; ``run_asgi`` must hand the app the cycle's ``send`` (which is replaced).
UVICORN_INTERNALS: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol", "__init__"):
        ("loop", "timeout_keep_alive", "server_state", "app_state", "transport", "cycle", "client"),
    ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol", "on_headers_complete"): ("cycle",),
    ("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle", "__init__"):
        ("scope", "transport", "flow", "disconnected", "response_started", "response_complete",
         "chunked_encoding", "expected_content_length"),
    ("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle", "run_asgi"): ("send",),
    ("uvicorn.protocols.http.flow_control", "FlowControl", "__init__"): ("write_paused",),
}
#: The methods ``GuardedHttpToolsProtocol`` extends.
UVICORN_HOOKS = ("connection_made", "connection_lost", "data_received", "send_400_response", "on_message_begin",
                 "on_url", "on_header", "on_headers_complete")


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
                raise _stalled(scope["path"], scope["method"], self.idle_timeout) from None
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
        except asyncio.CancelledError as exc:
            if exc.args != (DRAIN_OVER,):  # a cancellation like any other
                raise
            # The end of http.draintimeout: one line, not uvicorn's traceback; an answer not begun is a
            # 503 the client may retry elsewhere, one begun is cut (the client sees it unfinished).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            log.warning("%s %s: cut off, http.draintimeout over", scope["method"], scope["path"])
            try:
                if started:
                    await send({"type": "mirror.response.abort"})
                else:
                    await error_response(APIError("UNAVAILABLE", "the server is shutting down", status=503,
                                                  headers={"Retry-After": "5", "Connection": "close"}),
                                         head=scope["method"] == "HEAD")(scope, receive, send_with_headers)
            except Exception:  # noqa: BLE001 (the connection is gone, or the protocol has no abort)
                log.debug("%s %s: nothing more sent", scope["method"], scope["path"])


def _stalled(path: str, method: str, timeout: float) -> APIError:
    kind = endpoint(path, method).kind
    code = "BLOB_UPLOAD_INVALID" if kind is Kind.UPLOAD else "MANIFEST_INVALID" if kind is Kind.MANIFEST \
        else "SIZE_INVALID"
    return APIError(code, f"no request data received for {timeout:g}s; request abandoned", status=408,
                    headers={"Connection": "close"})


def missing_internals() -> list[str]:
    """What of :data:`UVICORN_INTERNALS` and :data:`UVICORN_HOOKS` this uvicorn lacks (``Class.name``);
    empty when the guarded, zero-copy protocol can run on it."""
    missing: list[str] = []
    for (module_name, class_name, method), names in UVICORN_INTERNALS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        code = getattr(getattr(getattr(module, class_name, None), method, None), "__code__", None)
        if code is None:
            missing.append(f"{class_name}.{method}")
            continue
        missing += [f"{class_name}.{name}" for name in names if name not in code.co_names]
    if not missing:
        protocol = importlib.import_module("uvicorn.protocols.http.httptools_impl").HttpToolsProtocol
        missing += [f"HttpToolsProtocol.{hook}" for hook in UVICORN_HOOKS
                    if not callable(getattr(protocol, hook, None))]
    return list(dict.fromkeys(missing))


def http_protocol() -> type | str:
    """uvicorn's ``http=``: the guarded, zero-copy protocol, or uvicorn's own (``"auto"``) with a
    warning when this uvicorn lacks what that protocol builds on."""
    missing = missing_internals()
    if missing:
        import uvicorn

        log.warning("uvicorn %s lacks internals the zero-copy protocol uses (%s): running uvicorn's own protocol; "
                    "blobs are read and written without sendfile(2), and request heads have no deadline or size "
                    "cap", uvicorn.__version__, ", ".join(missing))
        return "auto"
    from .protocol import GuardedHttpToolsProtocol

    return GuardedHttpToolsProtocol


#: TLS 1.2 cipher suites offered (TLS 1.3's are OpenSSL's own): forward-secret AEAD ones only, Mozilla's
#: "intermediate" list (RFC 9325 section 4.2).  As TLS 1.0 and 1.1 have none of them, they are refused
#: whatever the system's OpenSSL policy allows; uvicorn's own default, ``TLSv1``, took CBC suites too.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305"])


def server_options(config: Config) -> dict[str, Any]:
    """uvicorn settings for TLS, slow clients, the drain after SIGTERM and trusted reverse proxies."""
    http = config.http
    options: dict[str, Any] = {"http": http_protocol(), "timeout_keep_alive": http.idle_timeout,
                               "timeout_graceful_shutdown": http.draintimeout,
                               "proxy_headers": True, "forwarded_allow_ips": list(http.trusted_proxies)}
    if http.tls_certificate is not None and http.tls_key is not None:
        options.update(ssl_certfile=str(http.tls_certificate), ssl_keyfile=str(http.tls_key), ssl_ciphers=TLS12_CIPHERS)
        if http.tls_client_ca is not None:
            options.update(ssl_ca_certs=str(http.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def startup_problem(config: Config, auth_key: Path, tmp_dir: Path) -> str | None:
    """Why the server cannot start with this TLS, auth and data configuration, or None; logs a warning
    when users are configured but anonymous clients may still pull everything."""
    if (problem := foreign_data_directory(config.storage.path)) is not None:
        return problem
    http = config.http
    if http.tls_certificate is not None and http.tls_key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # A password-protected key fails here rather than prompting on a terminal.
            context.load_cert_chain(http.tls_certificate, http.tls_key, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            if (found := key_matches_later(http.tls_certificate, http.tls_key)) is not None:
                return (f"http.tls.certificate {http.tls_certificate}: its certificate {found} of the file, not its "
                        "first, is the one http.tls.key belongs to: list the server's own certificate first, then "
                        "the intermediates")
            return (f"http.tls.certificate {http.tls_certificate} / http.tls.key {http.tls_key}: cannot load them "
                    f"as a PEM certificate chain and its unencrypted private key ({exc})")
        if http.tls_client_ca is not None:
            try:
                context.load_verify_locations(cafile=http.tls_client_ca)
            except (ssl.SSLError, OSError) as exc:
                return f"http.tls.client_ca {http.tls_client_ca}: not a PEM CA certificate file ({exc})"
    if config.auth.htpasswd_path is not None:
        from ..api.auth import AuthError, token_key
        from ..api.htpasswd import Htpasswd, HtpasswdError

        try:
            Htpasswd(config.auth.htpasswd_path)
        except HtpasswdError as exc:
            return f"auth.htpasswd.path: {exc}"
        if config.auth.anonymous_pull:  # registry:2 with htpasswd asks every request for a password
            log.warning("auth.anonymous_pull is true: clients without a password may pull every repository, "
                        "pushed ones included (the users in auth.htpasswd.path are asked for pushes, deletes "
                        "and the web UI's actions); set auth.anonymous_pull: false to ask for a password for "
                        "every request, as registry:2 with htpasswd does")
        try:
            token_key(config, auth_key, tmp_dir)
        except (AuthError, OSError) as exc:
            return str(exc)
    return None


def key_matches_later(chain: Path, key: Path) -> int | None:
    """Which certificate of the PEM file *chain* (counted from 1), if not its first, the private key *key*
    belongs to: a chain in the wrong order (RFC 8446 section 4.4.2: the sender's certificate comes first)."""
    try:
        blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", chain.read_text(), re.S)
    except (OSError, UnicodeDecodeError):
        return None
    with tempfile.TemporaryDirectory() as scratch:
        for n, block in enumerate(blocks[1:], start=2):
            single = Path(scratch, f"{n}.pem")
            single.write_text(block + "\n")
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(single, key, password=lambda: b"")
            except (ssl.SSLError, OSError):
                continue
            return n
    return None
