"""Non-distributable (foreign) layers, fetched from their descriptors' ``urls`` (image-spec,
"Non-distributable layers") when ``upstream.foreign_layers: fetch``.

Those URLs are written by whoever published the image, not by the mirror's operator: fetching one
is a request the mirror makes on a stranger's word (server-side request forgery, OWASP's SSRF
prevention cheat sheet).  So:

* only ``http`` and ``https`` URLs are fetched, without the upstream's credentials;
* redirects are followed here, at most :data:`MAX_REDIRECTS`, each hop checked as the first;
* a host that resolves to an address that is not public (loopback, private, link-local, shared,
  reserved: :attr:`ipaddress.IPv4Address.is_global` false) is refused unless
  ``upstream.foreign_layers_private: true``.  The connection goes to the address checked (no second
  lookup that could answer otherwise), the name kept for ``Host`` and for TLS (SNI, certificate).
  Through a proxy from the environment (``HTTPS_PROXY``, ``NO_PROXY``: as httpx takes them), whose
  own lookup decides, only an address written in the URL is checked;
* the caller serves the layer only once all of it is stored and verified (``registry/pullthrough.py``),
  so nothing a URL answers reaches a client unless it is the layer its digest names.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from ..spec.reference import Digest
from .errors import UpstreamInvalid, UpstreamNotFound, UpstreamUnavailable

if TYPE_CHECKING:
    from .client import Upstream

log = logging.getLogger("mirror.upstream.foreign")

MAX_REDIRECTS = 5
#: A layer's record of urls (``Metadata.foreign_urls``) ends with its descriptor's size, so marked
#: (``registry/records.py``): no body longer than that is taken from a URL.
SIZE_MARK = "#size="


def with_size(urls: Sequence[str], size: int) -> tuple[str, ...]:
    """The record of a layer's *urls* and its descriptor's *size*."""
    return (*urls, f"{SIZE_MARK}{size}")


def split_record(record: Sequence[str]) -> tuple[tuple[str, ...], int | None]:
    """``(urls, size)`` of a record :func:`with_size` made (size None in one written before sizes were)."""
    urls = tuple(u for u in record if not u.startswith(SIZE_MARK))
    sizes = [u[len(SIZE_MARK):] for u in record if u.startswith(SIZE_MARK)]
    return urls, int(sizes[-1]) if sizes and sizes[-1].isdigit() else None


async def bounded(chunks: AsyncIterator[bytes], limit: int, what: str) -> AsyncIterator[bytes]:
    """*chunks*, failing with :class:`UpstreamInvalid` once more than *limit* bytes came (a URL that
    never stops sending would fill the store's disk)."""
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise UpstreamInvalid(f"{what}: more than the layer's {limit} bytes came")
        yield chunk


class ForeignRefused(Exception):
    """A foreign layer's URL the mirror does not fetch (its message says why)."""


async def first_serving(upstream: Upstream, method: str, urls: Sequence[str], digest: Digest) -> httpx.Response:
    """The streaming answer (2xx) of the first of *urls* that serves the layer.

    :class:`UpstreamInvalid` (logged: the publisher named a URL the mirror does not fetch) when one was
    refused, :class:`UpstreamNotFound` when each answered 404 or 410, else :class:`UpstreamUnavailable`;
    the message names each URL and what it did.
    """
    failures: list[str] = []
    not_found, refused = True, False
    for url in urls:
        if not url.lower().startswith(("http://", "https://")):
            continue  # another scheme's (as image-spec allows): not for the mirror to fetch; "not found" if all are
        started = time.monotonic()
        try:
            response = await fetch(upstream.client, method, url, private=upstream.config.foreign_layers_private)
        except ForeignRefused as exc:
            failures.append(f"{url}: refused: {exc}")
            refused = True
            continue
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            upstream.metrics.upstream_response(upstream.config.registry, method, None, time.monotonic() - started)
            failures.append(f"{url}: {type(exc).__name__}")
            not_found = False
            continue
        upstream.metrics.upstream_response(upstream.config.registry, method, response.status_code,
                                           time.monotonic() - started)
        if 200 <= response.status_code < 300:
            return response
        await response.aclose()
        failures.append(f"{url}: {response.status_code}")
        not_found = not_found and response.status_code in (404, 410)
    message = f"{method} foreign layer {digest}: " + ("; ".join(failures) or "no http(s) url")
    if refused:
        log.warning("%s", message)
        raise UpstreamInvalid(message)
    raise UpstreamNotFound(message, 404) if not_found else UpstreamUnavailable(message)


async def fetch(client: httpx.AsyncClient, method: str, url: str, *, private: bool) -> httpx.Response:
    """*url*'s answer, streaming, redirects followed (see the module's docstring).

    :class:`ForeignRefused` for a URL or hop that is not http(s), has credentials, or names a host that
    is not public (unless *private*), and after :data:`MAX_REDIRECTS` redirects; httpx's errors (a name
    that does not resolve is an :class:`httpx.ConnectError`) otherwise.
    """
    for _ in range(MAX_REDIRECTS + 1):
        target = httpx.URL(url)
        if target.scheme not in ("http", "https") or not target.host:
            raise ForeignRefused("not an http(s) URL")
        if target.userinfo:
            raise ForeignRefused("a URL with credentials")
        pinned, extensions = await _pinned(target, private)
        request = client.build_request(method, pinned, extensions=extensions,
                                       headers={"Accept-Encoding": "identity", "Host": target.netloc.decode()})
        response = await client.send(request, stream=True, auth=None, follow_redirects=False)
        if not response.has_redirect_location:
            return response
        await response.aclose()
        url = str(target.join(response.headers["location"]))
    raise ForeignRefused(f"more than {MAX_REDIRECTS} redirects")


async def _pinned(url: httpx.URL, private: bool) -> tuple[httpx.URL, dict[str, Any]]:
    """*url* with its host replaced by the address it resolves to, checked; the TLS name to keep.

    A name that does not resolve here is left to a proxy from the environment, if one is set (the
    mirror's host may not resolve public names); an address is checked in any spelling (``inet_aton``'s
    older ones too: ``2130706433``, ``0x7f.1``).  Whether a request goes through the proxy is httpx's
    call (``NO_PROXY`` as it reads it), so what resolves here is checked either way, and pinned when
    no proxy takes it."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await anyio.getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        if _proxied(url):
            return url, {}
        raise httpx.ConnectError(f"{url.host}: {exc}") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]
    if not private:
        for address in addresses:
            if not public(address):
                shown = url.host if str(address) == url.host else f"{url.host} is {address}, which"
                raise ForeignRefused(f"{shown} is not a public address "
                                     "(upstream.foreign_layers_private: true fetches from those too)")
    if not addresses or str(addresses[0]) == url.host or _proxied(url):
        return url, {}
    return url.copy_with(host=str(addresses[0])), ({"sni_hostname": url.host} if url.scheme == "https" else {})


def _proxied(url: httpx.URL) -> bool:
    """Whether the environment sends requests for *url* through a proxy."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(url.host)


def public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether *address* is on the public internet.  An IPv6 address that carries an IPv4 one is
    judged by it: mapped (``::ffff:a.b.c.d``), compatible (``::a.b.c.d``), 6to4 (``2002::/16``), NAT64
    (``64:ff9b::/96`` and ``64:ff9b:1::/48``, RFC 6052 and 8215: a DNS64 network reaches IPv4 through
    them); site-local ``fec0::/10`` (deprecated, RFC 3879) is not public."""
    if isinstance(address, ipaddress.IPv6Address):
        inside = any(address in n for n in _CARRYING_IPV4)
        carried = address.ipv4_mapped or address.sixtofour or (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
                                                                if inside else None)
        if carried is not None:
            return public(carried)
        if address in _SITE_LOCAL:
            return False
    return address.is_global and not address.is_multicast


#: IPv6 ranges whose last 32 bits are an IPv4 address (IPv4-compatible, RFC 4291; NAT64, RFC 6052, 8215;
#: and ``::ffff:0:0/96``, RFC 2765's translated form).
_CARRYING_IPV4 = tuple(ipaddress.IPv6Network(n) for n in ("::/96", "64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96"))
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")
