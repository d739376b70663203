"""Observability at the HTTP edge: request metrics, JSON access logs, ``/metrics``, ``/healthz``, ``/readyz``.

:class:`Observe` is a pure ASGI middleware around the whole app (its :class:`Recorder` also records
the manifests answered before it, ``server/front.py``).  For every request it

* takes the request id from ``X-Request-Id`` (when it is a sane token) or makes one, and
  echoes it in the response;
* counts the request by *route template* (``manifest``, ``blob``, ``upload``, ``tags``,
  ``catalog``, ``referrers``, ``base``, ``metrics``, ``health``, ``admin``, ``ui``, ``unknown``), method
  and status, times it to its last body byte, and counts the body bytes -- and, for manifests
  and blobs, the cache outcome the routes put in ``X-Mirror-Cache``;
* writes one JSON line to the ``mirror.access`` logger::

    {"ts": "2024-05-01T12:00:00.123Z", "request_id": "...", "method": "GET", "route": "blob",
     "path": "/v2/library/alpine/blobs/sha256:...", "status": 200, "cache": "HIT",
     "bytes": 3402431, "duration_ms": 12.5, "client": "10.0.0.7", ...}

The route is derived from the path with the spec's patterns (``spec/endpoints.py``), never the raw
path, so the metrics' label sets stay bounded whatever clients send.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config.sections import Config, ConfigError, LogConfig
from ..metadata.driver import Metadata, MetadataUnavailable
from ..metadata.opening import open_metadata
from ..observe.metrics import CONTENT_TYPE_LATEST, Metrics, render
from ..registry.peers import MAX_SKEW
from ..registry.reads import in_index_thread, in_mixed_thread
from ..spec.endpoints import CACHE_HEADER, endpoint
from ..storage.driver import BlobStore
from ..storage.opening import open_blob_store
from . import extensions

access_log = logging.getLogger("mirror.access")
log = logging.getLogger("mirror.api.observability")

_CACHE_KEY = CACHE_HEADER.lower().encode()  # as ASGI gives header names
REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


def route_of(path: str, method: str) -> str:
    """The route template of a request (a bounded set of names): the ``/v2/`` endpoint, or the operator's."""
    if path == "/v2" or path.startswith("/v2/"):
        return endpoint(path, method).kind.value
    if path == "/metrics":
        return "metrics"
    if path in ("/healthz", "/readyz", "/"):
        return "health"
    if path.startswith("/_mirror/"):
        return "admin"
    if path == "/ui" or path.startswith("/ui/"):
        return "ui"
    if path == "/auth/token":  # logins: failed ones apart from the rest (401, 429)
        return "token"
    return "unknown"


class Recorder:
    """What each request leaves behind: its request id, its metrics and its access line.

    Each request only appends to memory; once per event-loop turn (``call_soon``), the turn's
    access lines go to the logger as one record and the metrics to their samples, a moment
    after the responses left and long before anyone could scrape or read the log.  Shared by
    :class:`Observe` and the answers given before the middleware (``server/front.py``'s ``MemoFront``).
    """

    def __init__(self, metrics: Metrics, access: bool = True) -> None:
        self.metrics = metrics
        self.access = access
        self._lines: list[str] = []
        self._flush_scheduled = False
        # Request ids: random per process, then counted (as unique as a uuid4, at a fraction of the cost).
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count()

    def request_id(self, scope: Scope) -> bytes:
        """The client's ``X-Request-Id`` when it is a sane token (1-128 characters), else a new one."""
        for key, value in scope["headers"]:
            if key == REQUEST_ID_HEADER and _REQUEST_ID_RE.fullmatch(value):
                return bytes(value)
        return f"{self._id_prefix}{next(self._ids):016x}".encode()

    def started(self) -> None:
        """A request began (the in-flight gauge)."""
        self.metrics.request_started()
        self._schedule_flush()

    def done(self, scope: Scope, request_id: bytes, route: str, status: int, cache: str | None, sent: int,
             sendfile: int, seconds: float) -> None:
        """A request :meth:`started` was answered: *status*, *sent* body bytes (*sendfile* of them by
        ``sendfile(2)``) in *seconds* to the last byte, and the ``X-Mirror-Cache`` outcome or None."""
        self.metrics.request_done(route, scope["method"], status, seconds, sent, cache, sendfile)
        if self.access:
            self._lines.append(access_line(scope, request_id, route, status, cache, sent, seconds))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what the requests since the last call recorded."""
        self._flush_scheduled = False
        self.metrics.flush_requests()
        if self._lines:
            lines, self._lines = self._lines, []
            if access_log.isEnabledFor(logging.INFO):
                # A record made here, not by access_log.info(): the caller's file and line (a frame
                # walk and path splitting per record) are of no use in an access log.
                access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, "", 0, "\n".join(lines), (),
                                                        None))


class Observe:
    """Request id, request metrics and the JSON access log (a :class:`Recorder`), around any ASGI app."""

    def __init__(self, app: ASGIApp, recorder: Recorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self.recorder.request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id.decode("latin-1")
        status = 0
        cache: str | None = None
        sent = sendfile = 0

        async def observed_send(message: Message) -> None:
            nonlocal status, cache, sent, sendfile
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                for key, value in headers:
                    if key.lower() == _CACHE_KEY:
                        cache = value.decode("latin-1")
                headers.append((REQUEST_ID_HEADER, request_id))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)
            if message["type"] == extensions.EXTENSION:
                sent += message.get("sent", 0)
                sendfile += message.get("sendfile", 0)

        self.recorder.started()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            status = status or 500  # nothing was sent: the server answers 500
            self.recorder.done(scope, request_id, route_of(scope["path"], scope["method"]), status, cache, sent,
                               sendfile, time.perf_counter() - started)


_json_str = json.encoder.encode_basestring_ascii
#: This process's id, for the access log: ``os.getpid()`` is a system call each time (glibc no longer
#: caches it), measured at a tenth of a memoized manifest answer's time on this project's VM.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def access_line(scope: Scope, request_id: bytes, route: str, status: int, cache: str | None, sent: int,
                seconds: float) -> str:
    """One access log entry as a JSON object on one line (the fields in the module's docstring)."""
    now = time.time()
    client = scope.get("client")
    line = (f'{{"ts":"{_iso_second(int(now))}.{int(now % 1 * 1000):03d}Z",'
            f'"request_id":{_json_str(request_id.decode("latin-1"))},'
            f'"method":{_json_str(scope["method"])},"route":"{route}","path":{_json_str(scope["path"])},'
            f'"status":{status},"cache":{"null" if cache is None else _json_str(cache)},"bytes":{sent},'
            f'"duration_ms":{round(seconds * 1000, 3)!r},"client":{_json_str(client[0]) if client else "null"}')
    if scope.get("query_string"):
        line += f',"query":{_json_str(scope["query_string"].decode("latin-1"))}'
    for key, value in scope["headers"]:
        if key == b"user-agent":
            line += f',"user_agent":{_json_str(value.decode("latin-1")[:200])}'
            break
    return f'{line},"pid":{_pid}}}'


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


# -- endpoints --


async def healthz(request: Request) -> Response:
    """The process is alive and its event loop answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready to serve: the store takes writes and the index answers."""
    # The store's probe from a default thread, the index's from one of its own (registry/reads.py).
    store = await anyio.to_thread.run_sync(request.state.store.write_problem)
    index = await in_index_thread(index_problem, request.state.metadata)
    problems = {key: problem for key, problem in (("store", store), ("index", index)) if problem is not None}
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    if request.state.config.cluster.enabled and (clock := await in_index_thread(clock_problem,
                                                                               request.state.metadata)):
        return JSONResponse({"status": "ready", "warnings": {"clock": clock}})
    return JSONResponse({"status": "ready"})


def readiness_problems(store: BlobStore, metadata: Metadata) -> dict[str, str]:
    """What keeps this process from serving: ``{"store": reason, "index": reason}`` (blocking).

    ``store``: the store cannot take writes (:meth:`BlobStore.write_problem`: e.g. ``"no space left on
    device"`` after a fill found no room, until there is room again); ``index``: it cannot be read.
    """
    problems: dict[str, str] = {}
    if (problem := store.write_problem()) is not None:
        problems["store"] = problem
    if (problem := index_problem(metadata)) is not None:
        problems["index"] = problem
    return problems


def clock_problem(metadata: Metadata) -> str | None:
    """What is wrong with this replica's clock in a cluster, or None (blocking: one read).

    Replicas refuse each other's signed requests more than ``MAX_SKEW`` (30) seconds off their own
    clock (``registry/peers.py``), and the clients of one so refused wait for the blob to be stored
    rather than follow its fill: a replica more than half that off the database's clock, which every
    one can read, says so in ``/readyz`` (a warning: still ready, since the database's clock may be
    the one that is off, and every replica would then be) and in its log, once every
    :data:`CLOCK_WARNING_INTERVAL` seconds.  Measured against the middle of the round trip to the database.
    """
    clock = getattr(metadata, "clock", None)
    if clock is None:
        return None
    try:
        before = time.time()
        database = clock()
        offset = (before + time.time()) / 2 - database
    except Exception:  # noqa: BLE001 (the index's own check says what is wrong with it)
        return None
    if abs(offset) <= MAX_SKEW / 2:
        return None
    problem = (f"this host's clock is {offset:+.0f}s off the database's (at most {MAX_SKEW / 2:.0f}s): replicas "
               f"more than {MAX_SKEW}s apart refuse each other's requests; keep the hosts' clocks synchronized (NTP)")
    global _clock_warned
    if time.monotonic() - _clock_warned > CLOCK_WARNING_INTERVAL:
        _clock_warned = time.monotonic()
        log.warning("%s", problem)
    return problem


#: Seconds between two warnings of a clock off the database's in the log.
CLOCK_WARNING_INTERVAL = 600.0
_clock_warned = -CLOCK_WARNING_INTERVAL


def index_problem(metadata: Metadata) -> str | None:
    """Why the index cannot be read now, or None (blocking: one read)."""
    try:
        metadata.usage()
    except MetadataUnavailable as exc:  # its database is down or unreachable: the message names it
        return str(exc)
    except Exception as exc:  # noqa: BLE001 (diskcache raises sqlite3 errors of many kinds)
        return f"not readable: {exc}"
    return None


async def metrics_endpoint(request: Request) -> Response:
    body = await in_mixed_thread(render, request.state.exposition)  # the index's figures and the store's
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def root(request: Request) -> Response:
    """``/``: what registry:2 answers there (200, no body, ``Cache-Control: no-cache``), for the probes
    and checks that ask it; with the web UI, a redirect to it (which probes take as a success too)."""
    if request.state.config.ui.enabled:
        return RedirectResponse("/ui/", status_code=302, headers={"Cache-Control": "no-cache"})
    return Response(b"", headers={"Cache-Control": "no-cache"})


def routes(config: Config) -> list[Route]:
    """``/healthz``, ``/readyz``, ``/`` (with the web UI, a redirect to it), and ``/metrics`` unless it
    has a listener of its own."""
    found = [Route("/healthz", healthz, methods=["GET", "HEAD"]), Route("/readyz", readyz, methods=["GET", "HEAD"])]
    found.append(Route("/", root, methods=["GET", "HEAD"]))
    if not config.metrics.listen:
        found.append(Route("/metrics", metrics_endpoint, methods=["GET", "HEAD"]))
    return found


# -- process set-up (mirror serve) --


def logging_config(config: LogConfig, base: dict[str, Any]) -> dict[str, Any]:
    """uvicorn's logging configuration *base*, plus ours: the ``mirror`` loggers on stderr, and the
    access log as bare JSON lines on stdout.  uvicorn applies it in every worker process."""
    out = copy.deepcopy(base)
    out["formatters"]["mirror"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    out["formatters"]["json_lines"] = {"format": "%(message)s"}
    out["handlers"]["mirror"] = {"class": "logging.StreamHandler", "formatter": "mirror",
                                 "stream": "ext://sys.stderr"}
    out["handlers"]["mirror_access"] = {"class": "logging.StreamHandler", "formatter": "json_lines",
                                        "stream": "ext://sys.stdout"}
    out["root"] = {"handlers": ["mirror"], "level": config.level.upper()}
    out["loggers"]["httpx"] = {"level": "WARNING"}
    out["loggers"]["httpcore"] = {"level": "WARNING"}
    # Its "error connecting" at every attempt while the database is down: the mirror says it once.
    out["loggers"]["psycopg.pool"] = {"level": "ERROR"}
    out["loggers"]["mirror.access"] = {"handlers": ["mirror_access"], "level": "INFO", "propagate": False}
    return out


@contextlib.contextmanager
def metrics_listener(config: Config) -> Iterator[None]:
    """Serve ``/metrics`` on ``metrics.listen`` from this (the parent) process, for every worker."""
    if not config.metrics.listen:
        yield
        return
    from prometheus_client import start_http_server

    from ..maintenance.figures import StoreCollector
    from ..maintenance.gc import Collector
    from ..observe.metrics import exposition_registry

    store = open_blob_store(config.storage)
    metadata = open_metadata(config.metadata, store.layout.index, config.storage)
    collector = Collector(store, metadata, config.cache, config.gc)
    registry = exposition_registry(Metrics(enabled=False), [
        StoreCollector(store, metadata, config.cache, collector.budget, config.http.workers)])
    host, _, port = config.metrics.listen.rpartition(":")
    try:
        server, thread = start_http_server(int(port), host, registry)
    except OSError as exc:
        metadata.close()
        raise ConfigError(f"cannot listen on metrics.listen {config.metrics.listen}: {exc.strerror or exc}") from exc
    log.info("serving /metrics on http://%s", config.metrics.listen)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        metadata.close()

