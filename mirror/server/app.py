"""The ASGI application: shared objects are built in the lifespan and reached via ``request.state``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio.to_thread
from diskcache import Timeout as IndexBusy
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..api import admin, cluster as peers, observability as observe
from ..api.auth import AuthMiddleware, token_key
from ..api.memo import ManifestMemo, MemoManifests
from ..api.routes import routes
from ..config.load import load_config
from ..config.sections import Config
from ..maintenance.figures import StoreCollector
from ..maintenance.gc import Collector
from ..maintenance.inuse import IndexMarks
from ..maintenance.upkeep import AccessTracker, Maintenance
from ..metadata.driver import MetadataUnavailable
from ..metadata.opening import open_metadata
from ..observe.cluster import ClusterMetrics
from ..observe.metrics import Metrics, exposition_registry
from ..observe.serverdir import server_directory
from ..registry.expiry import expire_uploads
from ..registry.local import LocalRegistry
from ..registry.manifests import PeerFlights
from ..registry.namespaces import Namespaces
from ..registry.pullthrough import PullThrough
from ..registry.reads import in_index_thread
from ..registry.replica import Cluster
from ..registry.roaming import RoamingUploads
from ..registry.shadowing import UpstreamQuestions
from ..registry.sharedfills import ClusterFills
from ..registry.sharedsecret import INSTANCE, keep_alone, keep_claim
from ..spec.errors import APIError, error_response
from ..storage.driver import StoreUnavailable
from ..storage.fill import Fills
from ..storage.layout import Layout
from ..storage.opening import open_blob_store, upload_tails
from ..ui import pages as ui
from ..ui.history import History
from ..upstream.client import Upstream
from . import certificates, clienthosts
from .front import Coalesced, MemoFront, MirrorApp
from .hardening import Hardening
from .starting import create_store, open_index

log = logging.getLogger("mirror")
#: Seconds a client is told to wait (``Retry-After``) when the index's database is down: about
#: how long the metadata pool takes to try a lost server again.
INDEX_RETRY_AFTER = 5


def create_app(config: Config) -> MirrorApp:
    metrics = Metrics(upstreams=[u.registry for u in config.upstreams])
    memo = ManifestMemo()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        store = open_blob_store(config.storage, replica=config.cluster.enabled)
        await create_store(store)  # the bucket not answering: logged, 503s until it does (starting.py)
        try:
            swept = await anyio.to_thread.run_sync(store.sweep_tmp)
        except StoreUnavailable as exc:  # what it leaves is swept at the next start; /readyz says the rest
            log.warning("start-up sweep not finished: %s", exc.strerror)
        else:
            if swept:
                log.info("removed %d unfinished temp files from %s", swept, store.layout.tmp)
        metadata = await open_index(functools.partial(open_metadata, config.metadata, store.layout.index,
                                                      config.storage))
        memo.attach(metadata.generation)
        if config.cluster.enabled and (sync := getattr(metadata, "sync_generation", None)) is not None:
            app.sync = Coalesced(functools.partial(_synced, sync))  # type: ignore[attr-defined]
        # A replica of a cluster: what this process reads from the bucket or fills is marked in the
        # index, so that the collectors of the other replicas spare it.  (This host's own collector
        # sees its reads and fills through the data directory: a mark would only keep a blob longer.)
        holder = f"{config.cluster.advertise or socket.gethostname()} pid {os.getpid()}"
        shared = config.cluster.enabled and metadata.shared_by_hosts and config.storage.driver == "s3"
        marks = IndexMarks(metadata, holder, config.cluster.lease_ttl) if shared else None
        # A replica of a cluster: each fetch under a lease shared by the replicas, or from its holder.
        certificate, key = config.http.tls_certificate, config.http.tls_key
        tls = (certificate, key) if certificate is not None and key is not None else None
        cluster = Cluster(config.cluster, metadata, store, marks, tls) if config.cluster.enabled else None
        figures = ClusterMetrics(metrics)  # exported at 0 on a single host too: one dashboard for both
        fills = ClusterFills(store, cluster, figures, metrics=metrics) if cluster else Fills(store, metrics=metrics)
        # One client and policy per upstream registry; they share the store, the index and the fills.
        upstreams = [Upstream(u, metrics=metrics) for u in config.upstreams]
        pulls = {
            u.config.registry: PullThrough(store, metadata, fills, u,
                                           u.config.tag_ttl if u.config.tag_ttl is not None else config.cache.tag_ttl,
                                           u.config.registry)
            for u in upstreams
        }
        if len(pulls) > 1:  # with one upstream, every fill is its clients' own: no note of whose it is
            for registry, each in pulls.items():
                each.origin = registry
        # One upstream request per manifest across the replicas, or the worker processes, too (each
        # manifest GET counts against Docker Hub's pull limit); one process shares its own (flight.py).
        if cluster is not None or config.http.workers > 1:
            for each in pulls.values():
                each.peers = PeerFlights(metadata, cluster.replica if cluster else socket.gethostname(),
                                         cluster.ttl if cluster else config.cluster.lease_ttl)
        upstream = upstreams[0]
        local = LocalRegistry(store, metadata, config, upstream.canonical_name, metrics=metrics,
                              upstream_serves=UpstreamQuestions(upstream))
        if cluster is not None:  # an upload goes on on any replica: its tail in the bucket between requests
            local.uploads = RoamingUploads(store, metadata, config.push.upload_ttl, metrics, upload_tails(store),
                                           cluster.replica, cluster.ttl)
        namespaces = Namespaces(local, pulls, config.upstream.registry)
        expired = await anyio.to_thread.run_sync(local.uploads.sweep)
        if expired:
            log.info("removed %d abandoned uploads", expired)
        tracker = AccessTracker(metadata)
        local.access = tracker
        for each in pulls.values():
            each.access = tracker
        collector = Collector(store, metadata, config.cache, config.gc)
        maintenance = Maintenance(collector, tracker, config.gc.interval, metrics=metrics)
        exposition = exposition_registry(metrics, [
            StoreCollector(store, metadata, config.cache, collector.budget, config.http.workers)])
        store.on_commit = maintenance.note_commit
        store.on_refused = maintenance.make_room
        if config.storage.driver == "s3":
            from ..storage.s3 import S3Store  # boto3 is imported only when S3 is used

            assert isinstance(store, S3Store)
            store.on_corrupt = metrics.corrupt_object
            store.in_use = marks
        # One-time costs the first pull after a start would otherwise wait for.
        metadata.open_thread()
        for client in upstreams:
            client.prime()
        upkeep = asyncio.create_task(maintenance.run())
        expiry = asyncio.create_task(expire_uploads(local.uploads))
        # The cache page's chart: this worker's samples of every worker's counters and the store's size.
        history = History(exposition_registry(metrics), metadata.usage)
        sampling = asyncio.create_task(history.run()) if config.ui.enabled else None
        claiming = asyncio.create_task(keep_claim(config, metadata)) if cluster is not None else \
            asyncio.create_task(keep_alone(config, metadata)) if metadata.shared_by_hosts \
            and config.storage.driver == "s3" and os.environ.get(INSTANCE) else None  # (mirror serve names it)
        # What the protocol sees of client hosts, shared by the workers (the way back of a client that
        # began a TLS handshake on this plain-HTTP port may reach another worker).
        directory = server_directory() if config.http.workers > 1 else None
        hosts = clienthosts.ClientHosts(directory / clienthosts.FILENAME if directory else None)
        if config.http.tls_certificate is not None and config.http.tls_key is not None:
            certificates.rotation = certificates.Rotation(config.http.tls_certificate, config.http.tls_key)
            # A renewed certificate at the next connection (uvicorn leaves SIGHUP to its default: exit).
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, certificates.rotation.soon)
        try:
            yield {"namespaces": namespaces, "config": config,
                   "metrics": metrics, "exposition": exposition, "store": store, "metadata": metadata,
                   "memo": memo, "fills": fills, "history": history, clienthosts.STATE: hosts}
        finally:
            memo.attach(None)
            app.sync = None  # type: ignore[attr-defined]
            for task in (upkeep, expiry, sampling, claiming):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await admin.preloads_finished()
            try:
                await anyio.to_thread.run_sync(maintenance.flush)
            except Exception as exc:  # noqa: BLE001 (a full disk, say: the rest must still be closed)
                log.warning("last access times or store size not saved: %s", exc)
            await fills.aclose()
            if cluster is not None:
                await cluster.aclose()
            for pull in pulls.values():
                await pull.settled()
            for each_upstream in upstreams:
                await each_upstream.aclose()
            if marks is not None:
                await anyio.to_thread.run_sync(marks.close)
            metadata.close()
            metrics.close()

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc, head=request.method == "HEAD")

    async def on_http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own 404 (no route) and 405 (method), in the spec's error format."""
        assert isinstance(exc, HTTPException)
        code = "NAME_UNKNOWN" if exc.status_code == 404 else "UNSUPPORTED"
        return error_response(APIError(code, exc.detail, status=exc.status_code, headers=dict(exc.headers or {})),
                              head=request.method == "HEAD")

    async def on_index_down(request: Request, exc: Exception) -> Response:
        """The index's database cannot be reached: a 503 the client may retry (``Retry-After``,
        RFC 9110 section 10.2.3), no traceback."""
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(APIError("UNAVAILABLE", "metadata database unavailable", status=503,
                                       headers={"Retry-After": str(INDEX_RETRY_AFTER)}),
                              head=request.method == "HEAD")

    async def on_index_busy(request: Request, exc: Exception) -> Response:
        """The diskcache index stayed locked by another process (a write transaction, or a tool holding
        it) past its timeout: a 503 the client may retry, one line in the log, no traceback."""
        log.warning("%s %s: the index under %s stayed locked by another process (diskcache %s)", request.method,
                    request.url.path, config.storage.path, type(exc).__name__)
        return error_response(APIError("UNAVAILABLE", "the index is locked by another process", status=503,
                                       headers={"Retry-After": str(INDEX_RETRY_AFTER)}),
                              head=request.method == "HEAD")

    async def on_store_down(request: Request, exc: Exception) -> Response:
        """The object store does not answer (or refuses): a 503 the client may retry, no traceback;
        the log has the details (the endpoint and key are not the client's business)."""
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(APIError("UNAVAILABLE", "object store unavailable", status=503,
                                       headers={"Retry-After": str(INDEX_RETRY_AFTER)}),
                              head=request.method == "HEAD")

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        """The client went away before the end of the body it was sending: a 400 nobody reads (for the
        access log; not the server's fault), no traceback."""
        log.info("%s %s: the client went away before the end of its request body", request.method, request.url.path)
        return error_response(APIError("SIZE_INVALID", "the request body ended early: the client went away"))

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError("UNAVAILABLE", "internal error", status=500), head=request.method == "HEAD")

    recorder = observe.Recorder(metrics, access=config.log.access)
    app = MirrorApp(
        routes=[*observe.routes(config), *routes, *peers.routes, *(ui.mount(config) if config.ui.enabled else [])],
        lifespan=lifespan,
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                            MetadataUnavailable: on_index_down, StoreUnavailable: on_store_down,
                            IndexBusy: on_index_busy, ClientDisconnect: on_client_gone, Exception: on_crash},
        middleware=[Middleware(Hardening, idle_timeout=config.http.idle_timeout),
                    Middleware(observe.Observe, recorder=recorder), *_auth(config, memo)],
    )
    if not config.auth.enabled:  # every client may read every manifest: hits need no middleware
        app.front = MemoFront(memo, recorder)
    return app


async def _synced(sync: Callable[[], None]) -> None:
    """*sync* (``sync_generation``) from an index thread; a database that does not answer is left to
    the routes, which answer ``503`` naming it where they need it."""
    with contextlib.suppress(MetadataUnavailable):
        await in_index_thread(sync)


def _auth(config: Config, memo: ManifestMemo) -> list[Middleware]:
    """Logins and access rights, when users are configured (``auth.htpasswd.path``), and after them
    the memo's answers (without users, ``MemoFront`` gives those before the middleware)."""
    if not config.auth.enabled:
        return []
    layout = Layout(config.storage.path)
    return [Middleware(AuthMiddleware, config=config.auth, key=token_key(config, layout.auth_key, layout.tmp),
                       registry=config.upstream.registry),
            Middleware(MemoManifests, memo=memo)]


def create_app_from_environ() -> Starlette:
    """Factory for worker processes: the parent hands its configuration over in ``MIRROR_*``."""
    return create_app(load_config())
