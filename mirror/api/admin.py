"""Operator endpoints under ``/_mirror/``: answered only to an operator credential.

``POST /_mirror/preload`` takes an image archive as its body (any file ``mirror preload``
takes; ``mirror preload --url`` sends directories as a tar).  The body is written to a
flock'ed temp file in ``DATA/tmp/`` (swept like any other if the server dies), imported by the
importer of ``archive/preload.py`` in a worker thread, and answered with its JSON summary.  An
import stores blobs and records them in the index all along: it runs on a thread of the preloads'
own (:data:`PRELOAD_THREADS` at once), never on one of those that send stored blobs, so a locked or
slow database holds up the preloads alone.  Bad input
is answered 400 in the spec's error format, the message naming the archive entry at fault;
the store is then unchanged.

Loading content into the cache is as powerful as the upstream itself (every client pulls
what is loaded), so every request needs an operator credential, whoever the peer is: behind a
reverse proxy on the same host, or a ``kubectl port-forward``, every client is loopback, so an
address proves nothing.  An operator is

- a request with ``Authorization: Bearer <token>``, the token of ``admin.token_file``
  (what ``mirror preload --url`` sends), or
- a user of ``auth.admins``, with a right password (Basic) or a token of the mirror's own
  token server (Bearer): ``api/auth.py`` names the user, this module decides.

With neither configured the endpoints are off: ``404``.  Without a credential: ``401`` with a
challenge; a user who is no operator: ``403 DENIED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import os
import re
from pathlib import Path

import anyio.to_thread
from anyio import CapacityLimiter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..archive.members import ArchiveError
from ..archive.preload import preload_file
from ..config.sections import Config
from ..metadata.driver import Metadata
from ..registry.reads import loop_limiter
from ..spec.errors import APIError
from ..storage.driver import BlobStore
from ..storage.filesystem import write_all

WRITE_BATCH = 1 << 20
#: Bytes of a refused request's body read before it is answered, and seconds spent reading them
#: (the rest: the connection closes), so that a refused client cannot hold a connection by trickling.
REFUSED_BODY_LIMIT = 64 << 20
REFUSED_BODY_SECONDS = 5.0
_SOURCE_RE = re.compile(r"[\w.+-]{1,200}")
#: Preloads imported at once per event loop; more wait their turn.
PRELOAD_THREADS = 4


def preload_threads() -> CapacityLimiter:
    """This event loop's limiter of worker threads importing preloads (one per loop, made on first use)."""
    return loop_limiter("preload", PRELOAD_THREADS)


def check_operator(request: Request) -> str:
    """Who is operating (``"token"`` or an ``auth.admins`` user); :class:`APIError` otherwise."""
    config: Config = request.state.config
    token = config.admin.token_file.value if config.admin.token_file is not None else None
    admins = config.auth.admins
    if token is None and not admins:
        raise APIError("NAME_UNKNOWN", "operator endpoints are off: set admin.token_file or auth.admins "
                                       "(mirror preload --data works without them)", status=404)
    scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
    if token is not None and scheme.lower() == "bearer" \
            and hmac.compare_digest(value.strip().encode(), token.encode()):
        return "token"
    user: str | None = getattr(request.state, "user", None)
    if user is not None and user in admins:
        return user
    if user is not None:
        raise APIError("DENIED", f"{user} is not an operator (auth.admins)")
    challenge = f'Basic realm="{config.auth.htpasswd_realm}"' if admins else 'Bearer realm="mirror operators"'
    raise APIError("UNAUTHORIZED", "an operator credential is needed: the token of admin.token_file "
                                   "(mirror preload --url --token-file) or a user of auth.admins",
                   headers={"WWW-Authenticate": challenge})


async def operator(request: Request) -> Response:
    """``GET /_mirror/``: 200 with ``{"operator": who}`` for an operator credential, else the refusal
    :func:`check_operator` gives (``mirror preload --url`` asks first, before sending an archive)."""
    return JSONResponse({"operator": check_operator(request)}, headers={"Cache-Control": "no-store"})


async def preload(request: Request) -> Response:
    try:
        check_operator(request)
    except APIError:
        # Read (and drop) what the client is sending, up to a limit: a reverse proxy that sent the
        # whole body first would see the connection reset and answer 502 instead of the refusal.
        received = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REFUSED_BODY_SECONDS):
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > REFUSED_BODY_LIMIT:
                        break
        raise
    store: BlobStore = request.state.store
    metadata: Metadata = request.state.metadata
    source = request.headers.get("x-mirror-source", "")
    source = source if _SOURCE_RE.fullmatch(source) else "upload"

    def create() -> tuple[Path, int]:
        store.layout.tmp.mkdir(parents=True, exist_ok=True)
        path = store.layout.temp("preload")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return path, fd

    path, fd = await anyio.to_thread.run_sync(create)
    try:
        pending: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            pending.append(chunk)
            size += len(chunk)
            if size >= WRITE_BATCH:
                await anyio.to_thread.run_sync(write_all, fd, b"".join(pending))
                pending, size = [], 0
        if pending:
            await anyio.to_thread.run_sync(write_all, fd, b"".join(pending))
        config = request.state.config
        registries = {u.registry for u in config.upstreams}
        summary = await anyio.to_thread.run_sync(
            lambda: preload_file(path, store, metadata, label=source, registries=registries,
                                 default_registry=config.upstream.registry), limiter=preload_threads())
    except ArchiveError as exc:
        request.state.metrics.preload_failed()
        raise APIError(exc.code, str(exc), detail={"entry": exc.entry, "reason": exc.reason},
                       status=403 if exc.code == "DENIED" else 400) from exc
    except OSError as exc:
        raise APIError("UNAVAILABLE", f"cannot store the upload: {exc.strerror or exc}", status=507) from exc
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)
    request.state.metrics.preload_finished(summary.images, summary.new_bytes)
    return JSONResponse(summary.to_json())
