"""Following an upstream's paged listings (tags, referrers) by their ``Link: <url>; rel="next"``.

Imports ``upstream_errors`` and ``upstream_auth`` (the origin rule) only.
"""

from __future__ import annotations

import httpx

from .auth import same_origin
from .errors import UpstreamInvalid


def next_page(response: httpx.Response, first: httpx.URL, visited: set[str], what: str) -> httpx.URL | None:
    """The page after *response* of a listing that began at *first*, or None after the last.

    Pages link on with ``Link: <url>; rel="next"`` (RFC 8288; OCI distribution spec, "Listing
    Tags" and "Listing Referrers"), whose query may be ``n``/``last`` or an opaque cursor, so the
    link is followed as given, never rebuilt.  It may be relative or absolute, but must stay on
    the registry's origin (scheme, host and port): credentials never go to another host.  Raises
    :class:`UpstreamInvalid` for a link elsewhere or to a page already read (*visited*, updated).
    """
    link = response.links.get("next", {}).get("url")
    if not link:
        return None
    try:
        url = response.url.join(link)
    except httpx.InvalidURL as exc:
        raise UpstreamInvalid(f"{what} links to an invalid URL {link!r}") from exc
    if not same_origin(url, first):
        raise UpstreamInvalid(f"{what} continues on another host ({link!r}): not followed")
    if str(url) in visited:
        raise UpstreamInvalid(f"{what} links back to a page already read ({link!r})")
    visited.add(str(url))
    return url
