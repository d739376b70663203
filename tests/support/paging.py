"""An upstream front that pages tag lists with an opaque cursor, as some registries do.

:class:`CursorPager` forwards every request to a real registry, except
``GET /v2/NAME/tags/list``: it reads the registry's full list and serves it
``page_size`` tags a page, in the order of :attr:`CursorPager.order`, with
``Link: </v2/NAME/tags/list?n=50&next_page=CURSOR>; rel="next"``.  The
cursor is opaque (a random token the server remembers); ``last`` is ignored,
and so is ``n`` above the page size, like those registries do.

Attributes that change the links, for what a mirror must refuse to follow:

``link_base``  None: relative links; else absolute ones on this base URL
               (the front's own, or another server's);
``endless``    every page links to a new cursor, for ever;
``loop``       every page links to the first page.

Every tags request is recorded (:meth:`CursorPager.tag_requests`) with its
query and whether it carried ``Authorization``.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .asgi import ThreadedServer, UpstreamClient, forward_headers, open_upstream
from .faults import error_body
from .service import Service

PAGE_SIZE = 50


@dataclass(frozen=True)
class TagRequest:
    """One tags-list request: the repository, its query string, and its ``Authorization`` header."""

    name: str
    query: str
    authorization: str | None


class CursorPager(Service):
    """A cursor-paging front for the registry at *upstream_url* (see the module docstring)."""

    def __init__(self, upstream_url: str, *, page_size: int = PAGE_SIZE,
                 order: Callable[[list[str]], list[str]] = sorted) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.page_size = page_size
        #: How the tags are ordered across pages (the registry's own order: by default lexical).
        self.order = order
        self.link_base: str | None = None
        self.endless = False
        self.loop = False
        self._lock = threading.Lock()
        self._cursors: dict[str, int] = {}
        self._log: list[TagRequest] = []
        client = UpstreamClient()
        self._client = client
        self._server = ThreadedServer(
            Starlette(routes=[
                Route("/v2/{name:path}/tags/list", self._tags, methods=["GET"]),
                Route("/{path:path}", self._forward, methods=["GET", "HEAD"]),
            ], lifespan=client.lifespan),
            name="cursor-pager", lifespan="on",
        )

    @property
    def url(self) -> str:
        """Base URL of the front: give this to the mirror as its upstream."""
        return self._server.url

    def start(self) -> CursorPager:
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop the server; safe to call twice."""
        self._server.stop()

    def tag_requests(self) -> list[TagRequest]:
        """Every tags-list request so far."""
        with self._lock:
            return list(self._log)

    async def _tags(self, request: Request) -> Response:
        name = request.path_params["name"]
        with self._lock:
            self._log.append(TagRequest(name, request.url.query, request.headers.get("authorization")))
        upstream = await self._client.http.get(f"{self.upstream_url}/v2/{name}/tags/list")
        if upstream.status_code != 200:
            return Response(upstream.content, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type"))
        tags = self.order(list(upstream.json().get("tags") or []))
        cursor = request.query_params.get("next_page")
        with self._lock:
            start = 0 if cursor is None else self._cursors.get(cursor, -1)
        if start < 0:
            return Response(error_body("PAGINATION_CURSOR_INVALID", "unknown cursor"), status_code=400,
                            media_type="application/json")
        asked = request.query_params.get("n", "")
        size = min(int(asked), self.page_size) if asked.isdigit() and int(asked) > 0 else self.page_size
        page = tags[start:start + size]
        headers = {"docker-distribution-api-version": "registry/2.0"}
        if self.endless or self.loop or start + size < len(tags):
            headers["link"] = f'<{self._next(name, start + size, size)}>; rel="next"'
        body = json.dumps({"name": name, "tags": page}).encode()
        return Response(body, media_type="application/json", headers=headers)

    def _next(self, name: str, offset: int, size: int) -> str:
        path = f"/v2/{name}/tags/list"
        if not self.loop:
            cursor = secrets.token_urlsafe(12)
            with self._lock:
                self._cursors[cursor] = offset
            path += "?" + urlencode({"n": size, "next_page": cursor})
        return (self.link_base or "") + path

    async def _forward(self, request: Request) -> Response:
        upstream = await open_upstream(self._client.http, request, self.upstream_url)
        headers = dict(forward_headers(upstream.headers.items()))
        if request.method == "HEAD":
            await upstream.aclose()
            return Response(status_code=upstream.status_code, headers=headers)
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=headers,
                                 background=BackgroundTask(upstream.aclose))
