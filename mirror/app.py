"""The ASGI application: shared objects are built in the lifespan and reached via ``request.state``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from .config import Config, load_config
from .errors import APIError, error_response
from .fill import Fills
from .local import LocalRegistry
from .metadata import Metadata
from .pullthrough import PullThrough
from .routes import routes
from .store import Store
from .upstream import Upstream

log = logging.getLogger("mirror")


def create_app(config: Config) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        store = Store(config.storage.path)
        await anyio.to_thread.run_sync(store.create)
        swept = await anyio.to_thread.run_sync(store.sweep_tmp)
        if swept:
            log.info("removed %d unfinished temp files from %s", swept, store.tmp)
        metadata = Metadata(store.index)
        fills = Fills(store)
        upstream = Upstream(config.upstream)
        pull = PullThrough(store, metadata, fills, upstream, config.cache.tag_ttl, config.upstream.registry)
        local = LocalRegistry(store, metadata, config, upstream.canonical_name)
        expired = await anyio.to_thread.run_sync(local.sweep_uploads)
        if expired:
            log.info("removed %d abandoned uploads", expired)
        try:
            yield {"pull": pull, "local": local, "config": config}
        finally:
            await fills.aclose()
            await upstream.aclose()
            metadata.close()

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc, head=request.method == "HEAD")

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError("UNAVAILABLE", "internal error", status=500), head=request.method == "HEAD")

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={APIError: on_api_error, Exception: on_crash},
    )


def create_app_from_environ() -> Starlette:
    """Factory for worker processes: the parent hands its configuration over in ``MIRROR_*``."""
    return create_app(load_config())
