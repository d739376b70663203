"""Operator endpoints under ``/_mirror/``, answered only to clients on the mirror's own host.

``POST /_mirror/preload`` takes an image archive as its body (any file ``mirror preload``
takes; ``mirror preload --url`` sends directories as a tar).  The body is written to a
flock'ed temp file in ``DATA/tmp/`` (swept like any other if the server dies), imported by the
importer of ``preload.py`` in a worker thread, and answered with its JSON summary.  Bad input
is answered 400 in the spec's error format, the message naming the archive entry at fault;
the store is then unchanged.

Loading content into the cache is as powerful as the upstream itself (every client pulls
what is loaded), so requests from other hosts are refused: behind a reverse proxy that
passes ``X-Forwarded-For`` the real client counts, as uvicorn resolves it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import secrets
from pathlib import Path

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .archive import ArchiveError
from .errors import APIError
from .local import LocalRegistry
from .preload import preload_file

WRITE_BATCH = 1 << 20
_SOURCE_RE = re.compile(r"[\w.+-]{1,200}")


def _from_this_host(request: Request) -> bool:
    if request.client is None:
        return False
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


async def preload(request: Request) -> Response:
    if not _from_this_host(request):
        raise APIError("DENIED", "preload is only accepted from the mirror's own host; "
                                 "run mirror preload --url there, or mirror preload --data")
    local: LocalRegistry = request.state.local
    store, metadata = local.store, local.metadata
    source = request.headers.get("x-mirror-source", "")
    source = source if _SOURCE_RE.fullmatch(source) else "upload"

    def create() -> tuple[Path, int]:
        store.tmp.mkdir(parents=True, exist_ok=True)
        path = store.tmp / f"preload-{secrets.token_hex(12)}.partial"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return path, fd

    def write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    path, fd = await anyio.to_thread.run_sync(create)
    try:
        pending: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            pending.append(chunk)
            size += len(chunk)
            if size >= WRITE_BATCH:
                await anyio.to_thread.run_sync(write, fd, b"".join(pending))
                pending, size = [], 0
        if pending:
            await anyio.to_thread.run_sync(write, fd, b"".join(pending))
        summary = await anyio.to_thread.run_sync(
            lambda: preload_file(path, store, metadata, label=source))
    except ArchiveError as exc:
        request.state.metrics.preload_failed()
        raise APIError(exc.code, str(exc), detail={"entry": exc.entry, "reason": exc.reason}, status=400) from exc
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
