"""The web UI's pages: routes under ``/ui/``, rendered with Jinja2 (autoescaped) from the same
objects the ``/v2/`` routes use (the namespaces' index and store, the app's metrics).

=========================  ===========================================================
``/ui/``                    repositories, ``?q=`` filter (words, case ignored), ``?page=``
``/ui/r/<name>``            a repository's tags (a cached one's: and those only its upstream
                            lists, ``listed``), ``?page=``; pull commands
``/ui/r/<name>@<digest>``   an image or index: platforms, layers, config, referrers
``/ui/cache``               hits, bytes, upstreams, the disk budget, fills in progress, and a
                            chart of the last hours' disk usage and traffic (``history``, ``chart``)
``/ui/login``               asks the browser for a user's password (HTTP Basic)
``/ui/logout``              ``401`` to the user's password, so that the browser forgets it
``/ui/actions/<verb>``      delete, pin, unpin: confirm (GET), then do (POST); see ``actions``
``/ui/static/...``          the stylesheet and the script
=========================  ===========================================================

Who may see a repository is who may pull it (:meth:`AuthConfig.may_pull`): when anonymous pulls
are off, an anonymous visitor gets ``401`` with a ``Basic`` challenge, so the browser asks for a
password.  ``?partial=1`` on the list answers its results only (the script's filter as you
type); without JavaScript the filter is a plain GET form.  Pages carry a Content-Security-Policy
allowing this host's files only (no inline script).  While the index's database or the object
store is down, the pages that read them answer ``503`` with a page saying so; ``/ui/cache`` still
shows the rest, the problem named (the object count left out while the store is down).  An address
whose passwords failed too often lately gets ``429`` and a page saying when to try again.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio.to_thread
import jinja2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import Scope

from ..api.auth import client_host
from ..config.sections import Config
from ..config.values import human
from ..metadata.driver import LOCAL, MetadataUnavailable
from ..registry.namespaces import Namespaces
from ..registry.reads import in_index_thread, in_mixed_thread
from ..spec.reference import ParseError, parse_digest, parse_listed_name
from ..storage.driver import StoreUnavailable
from . import actions, chart, figures, history, images, listed, listing

HERE = Path(__file__).parent
PREFIX = "/ui"
#: Seconds a browser is asked to wait before retrying a page while the index is down.
RETRY_AFTER = 10
log = logging.getLogger("mirror.ui")
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _when(value: float | None) -> str:
    return "" if value is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(value))


def _size(value: object) -> str:
    return human(value) if isinstance(value, int) and value >= 0 else ""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, size=_size, argv=lambda v: json.dumps(v, ensure_ascii=False),
                       iso=lambda v: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v)),
                       short=lambda d: str(d).partition(":")[2][:12], path=lambda n: quote(str(n), safe="/:@"))
    return env


def routes(config: Config) -> list[BaseRoute]:
    """The UI's routes, to mount at ``/ui`` (the app adds them when ``ui.enabled``)."""
    templates = Jinja2Templates(env=_environment())
    last_pulls = listing.LastPulls()
    upstream_tags = listed.UpstreamTags()

    def viewer(request: Request) -> str | None:
        return request.scope.get("state", {}).get("user")  # type: ignore[no-any-return]

    def visible(request: Request) -> Callable[[str], bool]:
        user = viewer(request)
        return lambda name: config.auth.may_pull(user, name)

    def render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
        context = {"user": viewer(request), **context}  # the logout page shows nobody signed in
        context.update(auth=config.auth.enabled, prefix=PREFIX, deletes=config.delete.enabled,
                       anonymous=config.auth.anonymous_pull)
        response = templates.TemplateResponse(request, template, context, status_code=status, headers=HEADERS)
        return response

    def refused(request: Request) -> Response:
        """Anonymous, when only users may pull: ask for a password."""
        return challenged(render(request, "login.html", status=401))

    def challenged(response: Response) -> Response:
        response.headers["WWW-Authenticate"] = f'Basic realm="{config.auth.htpasswd_realm}", charset="UTF-8"'
        return response

    acting = actions.Actions(config, render, viewer)

    def not_found(request: Request, what: str) -> Response:
        return render(request, "missing.html", status=404, what=what)

    def throttled(request: Request, wait: float) -> Response:
        """Too many passwords from this address failed lately (``api/auth.py``): ``429`` and a page
        saying when to try again, rather than the API's JSON error."""
        response = render(request, "throttled.html", status=429, wait=math.ceil(wait))
        response.headers["Retry-After"] = str(math.ceil(wait))
        return response

    def guarded(page: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """*page*, or a page saying the index or the object store cannot be read now (its database or
        the bucket is down: ``503``, as the API answers) rather than the API's JSON error."""
        @functools.wraps(page)
        async def answer(request: Request) -> Response:
            if (wait := request.scope.get("state", {}).get("throttled")) is not None:
                return throttled(request, wait)
            try:
                return await page(request)
            except (MetadataUnavailable, StoreUnavailable) as exc:
                log.warning("%s %s: %s", request.method, request.url.path, exc)
                response = render(request, "unavailable.html", status=503,
                                  store=isinstance(exc, StoreUnavailable))
                response.headers["Retry-After"] = str(RETRY_AFTER)
                return response
        return answer

    async def index(request: Request) -> Response:
        if not config.auth.may_pull(viewer(request), None):
            return refused(request)
        namespaces: Namespaces = request.state.namespaces
        query = request.query_params.get("q", "").strip()[:200]
        page = await in_index_thread(
            listing.repository_page, namespaces.local.metadata, namespaces.local, last_pulls, query,
            _number(request), visible(request))
        template = "results.html" if request.query_params.get("partial") else "index.html"
        heading = "Repositories" + (f" matching “{query}”" if query else "") \
            + (f", page {page.number} of {page.pages}" if page.pages > 1 else "")
        return render(request, template, page=page, query=query, heading=heading,
                      prefetch=acting.writes_somewhere(viewer(request)))

    async def repository(request: Request) -> Response:
        path: str = request.path_params["path"]
        name, at, reference = path.partition("@")
        try:
            name = parse_listed_name(name)
            digest = str(parse_digest(reference)) if at else None
        except ParseError:
            return not_found(request, path)
        if not config.auth.may_pull(viewer(request), name):
            return refused(request)
        namespaces: Namespaces = request.state.namespaces
        local = namespaces.local
        key = await in_index_thread(local.repo_key, name)
        if not await in_index_thread(local.metadata.has_repository, key):
            return not_found(request, name)
        host = client_host(request.scope)
        crane = "--insecure " if request.url.scheme == "http" else ""  # crane speaks plain HTTP only then
        if digest is None:
            registry = key.partition("/")[0]
            upstream_list = None if registry == LOCAL else await upstream_tags.listed(namespaces, name, key)
            tags = await images.tag_page(local.store, local.metadata, last_pulls, key, _number(request),
                                         listed=upstream_list.tags if upstream_list and upstream_list.tags
                                         else frozenset())
            pinned = any(repo == key for repo, _ in await in_index_thread(local.metadata.pins))
            return render(request, "repository.html", name=name, tags=tags, host=host, pinned=pinned, crane=crane,
                          upstream=None if registry == LOCAL else registry, listed=upstream_list,
                          actions=acting.allowed(viewer(request), name))
        record = (await in_index_thread(images.linked_records, local.metadata, key, [digest])).get(digest)
        view = await anyio.to_thread.run_sync(images.read_manifest, local.store, digest, record) if record else None
        if view is None:
            return not_found(request, f"{name}@{digest}")
        found = await in_index_thread(images.referrers, local.metadata, key, digest)
        tagged = await in_index_thread(local.metadata.tags_pointing_to, key, digest)
        linked = [d.digest for d in view.children] + [str(r.get("digest", "")) for r in found] \
            + ([view.subject.digest] if view.subject else [])
        stored = await images.served(local.store, local.metadata, key, linked)
        is_pinned = await in_index_thread(local.metadata.is_pinned, key, digest)
        return render(request, "image.html", name=name, view=view, referrers=found, tags=tagged, host=host,
                      stored=stored, crane=crane, pushed=key.partition("/")[0] == LOCAL, pinned=is_pinned,
                      actions=acting.allowed(viewer(request), name))

    async def cache(request: Request) -> Response:
        if not config.auth.may_pull(viewer(request), None):
            return refused(request)
        state = request.state
        kept: history.History = state.history

        def read() -> tuple[figures.CacheFigures, chart.Chart]:
            found = figures.samples(state.exposition)
            now = history.read(found, time.time())
            return (figures.read(state.exposition, state.store, state.metadata, config, found),
                    chart.draw(kept.samples(), now))

        shown, drawn = await in_mixed_thread(read)
        return render(request, "cache.html", figures=shown, chart=drawn, pid=os.getpid(), workers=config.http.workers,
                      width=chart.WIDTH, height=chart.HEIGHT,
                      replica=config.cluster.advertise if config.cluster.enabled else None)

    async def login(request: Request) -> Response:
        if config.auth.enabled and viewer(request) is None:
            return refused(request)
        return RedirectResponse(f"{PREFIX}/", status_code=303)

    async def logout(request: Request) -> Response:
        """HTTP Basic has no logout: a browser forgets a password when it is refused (Chromium and
        Firefox drop the rejected credentials from their cache), so a user's password is answered
        ``401``; the page (shown once the prompt that may follow is cancelled) says so."""
        if not config.auth.enabled:
            return RedirectResponse(f"{PREFIX}/", status_code=303)
        if viewer(request) is None:
            return render(request, "logout.html")
        return challenged(render(request, "logout.html", status=401, user=None))

    async def missing(request: Request) -> Response:
        return not_found(request, request.url.path)

    async def not_allowed(request: Request) -> Response:
        """A method the pages do not take (RFC 9110 section 15.5.6: ``Allow`` names those they do)."""
        response = render(request, "action.html", status=405, title="Not allowed", wanted=None, token="", back=None,
                          message=f"{request.method} is not taken here: this page is read with GET.")
        response.headers["Allow"] = "GET, HEAD"
        return response

    class Static(StaticFiles):
        """The stylesheet and the script; a file that is not there, the pages' "Not found"."""

        async def get_response(self, path: str, scope: Scope) -> Response:
            try:
                return await super().get_response(path, scope)
            except HTTPException as exc:
                if exc.status_code != 404:
                    raise
                return not_found(Request(scope), f"{PREFIX}/static/{path}")

    return [
        Route("/", guarded(index), methods=["GET", "HEAD"]),
        Route("/r/{path:path}", guarded(repository), methods=["GET", "HEAD"]),
        Route("/cache", guarded(cache), methods=["GET", "HEAD"]),
        Route("/login", guarded(login), methods=["GET", "HEAD"]),
        Route("/logout", logout, methods=["GET", "HEAD"]),
        Route("/actions/{verb}", guarded(acting.page), methods=["GET", "HEAD", "POST"]),
        Mount("/static", Static(directory=HERE / "static")),
        Route("/{rest:path}", missing, methods=["GET", "HEAD"]),
        Route("/{rest:path}", not_allowed, methods=["POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    ]


def mount(config: Config) -> list[BaseRoute]:
    """``/ui`` (a redirect to ``/ui/``) and the pages under it."""
    async def home(request: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=308)

    return [Route(PREFIX, home, methods=["GET", "HEAD"]), Mount(PREFIX, routes=routes(config))]


#: Larger page numbers mean the last page (the listings clamp to it).
MAX_PAGE = 10**8


def _number(request: Request) -> int:
    """``?page=``: 1 when absent or not a number of ASCII digits; a longer one than fits, the last page."""
    raw = request.query_params.get("page", "1")
    if not (raw.isascii() and raw.isdigit()):
        return 1
    return MAX_PAGE if len(raw) > 8 else int(raw)
