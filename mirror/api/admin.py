"""Operator endpoints under ``/_mirror/``: answered only to an operator credential.

``POST /_mirror/preload`` takes an image archive as its body (any file ``mirror preload``
takes; ``mirror preload --url`` sends directories as a tar).  The body is streamed through a named
pipe (``DATA/tmp/preload-<id>.fifo``, beside its flock'ed ``.partial``) into the importer of
``archive/preload.py``, which reads it once, as it reads a compressed archive: the content of each
entry it will store is staged as it passes, hashed on the way, and a blob the store already has is
skipped.  So an upload needs the room of what it brings, not of the archive twice; and a client's
sending waits while the importer is behind.  An import stores blobs and records them in the index
all along: it runs on a thread of the preloads' own (:data:`PRELOAD_THREADS` at once), never on one
of those that send stored blobs, so a locked or slow database holds up the preloads alone.  Bad input
is answered 400 in the spec's error format, the message naming the archive entry at fault;
the store is then unchanged, as it is when the client goes before the end of its archive (after it,
its padding unsent, the import is a finished one, that nobody reads the answer of).

Loading content into the cache is as powerful as the upstream itself (every client pulls
what is loaded), so every request needs an operator credential, whoever the peer is: behind a
reverse proxy on the same host, or a ``kubectl port-forward``, every client is loopback, so an
address proves nothing.  An operator is

- a request with ``Authorization: Bearer <token>``, the token of ``admin.token_file``
  (what ``mirror preload --url`` sends), or
- a user of ``auth.admins``, with a right password (Basic) or a token of the mirror's own
  token server (Bearer): ``api/auth.py`` names the user, this module decides.

With neither configured the endpoints are off: ``404``.  Without a credential, or with a token that is
neither: ``401`` with a challenge, its message telling the two apart; a user who is no operator: ``403 DENIED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hmac
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
from anyio import CapacityLimiter
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..archive.members import ArchiveError, NoRoom
from ..archive.preload import Summary, preload_file
from ..config.sections import Config
from ..metadata.driver import Metadata
from ..registry.reads import loop_limiter
from ..spec.errors import APIError
from ..storage.driver import BlobStore
from ..storage.filesystem import write_all

log = logging.getLogger("mirror.api.admin")

WRITE_BATCH = 1 << 20
#: The named pipe beside a preload's lock file (``tmp/preload-<id>.fifo``).
FIFO = ".fifo"
OPEN_POLL_SECONDS = 0.02
#: Bytes of a refused request's body read before it is answered, and seconds spent reading them
#: (the rest: the connection closes), so that a refused client cannot hold a connection by trickling.
REFUSED_BODY_LIMIT = 64 << 20
REFUSED_BODY_SECONDS = 5.0
_SOURCE_RE = re.compile(r"[\w.+-]{1,200}")
#: Preloads imported at once per event loop; more wait their turn.  An import reads its upload as
#: it arrives, so a slow client holds one of them while it sends.
PRELOAD_THREADS = 16
#: The imports under way in this process.
_IMPORTING: set[asyncio.Future[Summary]] = set()


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
    bearer = scheme.lower() == "bearer" and value.strip() != ""
    if token is not None and bearer and hmac.compare_digest(value.strip().encode(), token.encode()):
        return "token"
    user: str | None = getattr(request.state, "user", None)
    if user is not None and user in admins:
        return user
    if user is not None:
        raise APIError("DENIED", f"{user} is not an operator (auth.admins)")
    challenge = f'Basic realm="{config.auth.htpasswd_realm}"' if admins else 'Bearer realm="mirror operators"'
    raise APIError("UNAUTHORIZED", _refusal(bearer, token is not None, bool(admins)),
                   headers={"WWW-Authenticate": challenge})


def _refusal(bearer: bool, token: bool, admins: bool) -> str:
    """Why a request is no operator's: *bearer* when it sent a Bearer token, with *token*
    (``admin.token_file``) and *admins* (``auth.admins``) configured or not.  A wrong token is told
    from none at all: a token read from the wrong file is a likely mistake, and not a missing one."""
    if bearer and not admins:
        return ("the token given is not the one of admin.token_file: send the token held in the file "
                "admin.token_file names (mirror preload --url --token-file FILE)")
    if bearer:
        accepted = "neither the one of admin.token_file nor" if token else "not"
        return (f"the token given is {accepted} a valid token of a user of auth.admins "
                "(they expire: get another from /auth/token)")
    return ("an operator credential is needed: the token of admin.token_file "
            "(mirror preload --url --token-file) or a user of auth.admins")


async def operator(request: Request) -> Response:
    """``GET /_mirror/``: 200 with ``{"operator": who}`` for an operator credential, else the refusal
    :func:`check_operator` gives (``mirror preload --url`` asks first, before sending an archive)."""
    return JSONResponse({"operator": check_operator(request)}, headers={"Cache-Control": "no-store"})


async def preload(request: Request) -> Response:
    try:
        check_operator(request)
    except APIError:
        await _drain(request.stream())
        raise
    store: BlobStore = request.state.store
    metadata: Metadata = request.state.metadata
    config: Config = request.state.config
    source = request.headers.get("x-mirror-source", "")
    source = source if _SOURCE_RE.fullmatch(source) else "upload"
    registries = {u.registry for u in config.upstreams}
    try:
        lock, pipe, lock_fd = await anyio.to_thread.run_sync(_make_pipe, store)
    except OSError as exc:
        raise APIError("UNAVAILABLE", f"cannot store the upload: {exc.strerror or exc}", status=507) from exc
    length = request.headers.get("content-length", "")
    size = int(length) if length.isdigit() else None  # bounds what a compressed body may decompress to
    importer = asyncio.ensure_future(anyio.to_thread.run_sync(
        lambda: preload_file(pipe, store, metadata, label=source, registries=registries,
                             default_registry=config.upstream.registry, size=size), limiter=preload_threads()))
    _IMPORTING.add(importer)
    importer.add_done_callback(_IMPORTING.discard)
    cancelled = gone = False
    try:
        try:
            await _feed(request.stream(), pipe, importer)
        except ClientDisconnect:
            # Gone before the end of its archive: the import fails, the request is a client's error.
            # After it, only padding unsent: the import commits all the same, and is a finished one
            # (logged and counted so), though nobody reads the answer.
            await asyncio.wait({importer})
            if importer.cancelled() or importer.exception() is not None:
                raise
            gone = True
        summary = await asyncio.shield(importer)  # a cancelled request leaves it to end by itself
    except ArchiveError as exc:
        request.state.metrics.preload_failed()
        raise APIError(exc.code, str(exc), detail={"entry": exc.entry, "reason": exc.reason},
                       status=403 if exc.code == "DENIED" else 507 if isinstance(exc, NoRoom) else 400) from exc
    except OSError as exc:
        raise APIError("UNAVAILABLE", f"cannot store the upload: {exc.strerror or exc}", status=507) from exc
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pipe)
        if not cancelled:  # cancelled (http.draintimeout over): not waited for here, but by the shutdown
            with contextlib.suppress(Exception):  # its end (and its failure, answered above, taken)
                await asyncio.shield(importer)
        _release_lock(importer, lock, lock_fd)
    if gone:
        log.info("%s %s: the import finished though its client went away before the end of its request body: %s",
                 request.method, request.url.path, summary.describe())
    request.state.metrics.preload_finished(summary.images, summary.new_bytes)
    return JSONResponse(summary.to_json())


def _make_pipe(store: BlobStore) -> tuple[Path, Path, int]:
    """``(lock, pipe, lock descriptor)``: ``tmp/preload-<id>.partial``, flock'ed (what keeps the
    start-up sweep off), and the named pipe ``tmp/preload-<id>.fifo`` beside it."""
    store.layout.tmp.mkdir(parents=True, exist_ok=True)
    lock = store.layout.temp("preload")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pipe = lock.with_suffix(FIFO)
        os.mkfifo(pipe, 0o600)
    except OSError:
        os.close(fd)
        os.unlink(lock)
        raise
    return lock, pipe, fd


async def _feed(body: AsyncIterator[bytes], pipe: Path, importer: asyncio.Future[Summary]) -> None:
    """Send the request's *body* through *pipe* to *importer*, and close the pipe's write end: the end
    of the archive, or of a truncated one (the body cut short, the request cancelled), of which the
    importer changes nothing, unless the end of the archive had reached it (only padding was missing)."""
    writer: int | None = None
    try:
        writer = await _open_writer(pipe, importer)
        if writer is None:  # the importer ended before it read a byte
            await _drain(body)
            return
        os.unlink(pipe)  # both ends are open: nothing is left behind if this process dies
        try:
            await _send(body, writer)
        except BrokenPipeError:  # the importer stopped reading: done (trailing padding) or failed
            await _drain(body)
    finally:
        if writer is not None:
            os.close(writer)
        elif not importer.done():
            _release_reader(pipe)


async def _open_writer(pipe: Path, importer: asyncio.Future[Summary]) -> int | None:
    """The pipe's write end, once the importer has opened its read end (it may wait its turn among
    :data:`PRELOAD_THREADS`); None if the importer ended first."""
    while not importer.done():
        try:
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            await asyncio.wait({importer}, timeout=OPEN_POLL_SECONDS)
            continue
        os.set_blocking(fd, True)
        with contextlib.suppress(OSError):  # fewer thread hops per MiB; the default 64 KiB still works
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, WRITE_BATCH)
        return fd
    return None


async def _send(body: AsyncIterator[bytes], fd: int) -> None:
    """Write the request's *body* to the pipe *fd*, :data:`WRITE_BATCH` bytes per write (in a thread:
    a write waits while the importer is behind, and the client's sending waits with it)."""
    pending: list[bytes] = []
    size = 0
    async for chunk in body:
        pending.append(chunk)
        size += len(chunk)
        if size >= WRITE_BATCH:
            await anyio.to_thread.run_sync(write_all, fd, b"".join(pending))
            pending, size = [], 0
    if pending:
        await anyio.to_thread.run_sync(write_all, fd, b"".join(pending))


async def _drain(body: AsyncIterator[bytes]) -> None:
    """Read (and drop) the rest of what the client is sending, up to a limit, before answering: a reverse
    proxy that sent the whole body first would see the connection reset and answer 502 instead."""
    received = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(REFUSED_BODY_SECONDS):
            async for chunk in body:
                received += len(chunk)
                if received > REFUSED_BODY_LIMIT:
                    break


def _release_lock(importer: asyncio.Future[Summary], lock: Path, fd: int) -> None:
    """Remove the upload's lock file once its importer has ended (now, or when it does)."""

    def release(done: asyncio.Future[Summary]) -> None:
        if not done.cancelled():
            done.exception()  # taken: answered, or moot once the request is gone
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)

    if importer.done():
        release(importer)
    else:
        importer.add_done_callback(release)


async def preloads_finished(timeout: float = 10.0) -> None:
    """Wait (at most *timeout* seconds) for the imports of requests cut off by the shutdown to end: the end
    of their pipe makes each one stop, remove what it staged, and give its lock up."""
    if _IMPORTING:
        await asyncio.wait(set(_IMPORTING), timeout=timeout)


def _release_reader(pipe: Path) -> None:
    """Let an importer that opened (or is opening) *pipe* see an empty archive, and no later one open it."""
    try:
        fd = os.open(pipe, os.O_RDWR | os.O_NONBLOCK)  # a writer for a moment: a waiting reader goes on
    except FileNotFoundError:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pipe)
    os.close(fd)
