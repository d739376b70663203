"""Non-distributable layers' ``urls`` are a publisher's word: with ``upstream.foreign_layers: fetch``
the mirror must not be a way to read what only it can reach (server-side request forgery).

The layers' host here is a real web server on loopback, the kind of address the mirror refuses by
default; the upstream is Debian's docker-registry, which takes manifests whose layers have urls.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.asgi import ThreadedServer
from tests.support.images import OCI_MANIFEST, sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.procs import free_port
from tests.support.registry import UpstreamRegistry
from tests.test_pull_api import ALL_TYPES, push_with_foreign_layer, urls_upstream  # noqa: F401 (a fixture)

SECRET = b"INTERNAL-ONLY-ADMIN-PAGE token=abc123\n"


def internal_host(seen: list[str]) -> ThreadedServer:
    """A web server only the mirror's host reaches: a secret page, a redirect to it, a redirect loop."""

    async def serve(request: Request) -> Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.url.path == "/secret.txt":
            return Response(SECRET if request.method == "GET" else None, media_type="text/plain",
                            headers={"Content-Length": str(len(SECRET))})
        if request.url.path == "/hop":
            return RedirectResponse("/secret.txt", status_code=302)
        if request.url.path == "/endless":  # no Content-Length, and (all but) no end: 64 MiB at most
            async def endless() -> AsyncIterator[bytes]:
                for _ in range(1024):
                    yield b"\0" * 65536
            return StreamingResponse(endless(), media_type="application/octet-stream")
        return RedirectResponse(request.url.path, status_code=302)  # any other path: a loop

    return ThreadedServer(Starlette(routes=[Route("/{path:path}", serve, methods=["GET", "HEAD"])]),
                          name="internal-host")


def test_a_layer_url_on_a_loopback_address_is_not_fetched_by_default(
    urls_upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,  # noqa: F811
    tmp_path: Path,
) -> None:
    seen: list[str] = []
    with internal_host(seen) as host:
        for n, base in enumerate((host.url, f"http://localhost:{host.port}")):  # by address, and by name
            body, _, foreign = push_with_foreign_layer(urls_upstream.url, "team/win", f"{n}", OCI_MANIFEST,
                                                       lambda _, base=base: f"{base}/secret.txt", tmp_path)
            mirror = mirror_factory(urls_upstream.url, env={"MIRROR_UPSTREAM_FOREIGN_LAYERS": "fetch"})
            got = http.get(f"{mirror.url}/v2/team/win/manifests/{n}", headers={"accept": ALL_TYPES})
            assert got.status_code == 200 and got.content == body
            url = f"{mirror.url}/v2/team/win/blobs/{sha256(foreign)}"
            head, got = http.head(url), http.get(url)
            assert (head.status_code, got.status_code) == (502, 502), "neither its size nor its bytes"
            assert SECRET[:8] not in got.content
            message = str(got.json()["errors"][0]["detail"])
            assert "refused" in message and "not a public address" in message, message
            assert "upstream.foreign_layers_private" in message, message
            assert seen == [], "the internal host was never asked"
            mirror.stop()


def test_a_layer_url_answering_other_bytes_sends_none_of_them(
    urls_upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Allowed to reach the host (``foreign_layers_private: true``), the mirror still answers nothing
    that does not match the layer's digest: it streamed all but the last byte before."""
    seen: list[str] = []
    with internal_host(seen) as host:
        mirror = mirror_factory(urls_upstream.url, env={"MIRROR_UPSTREAM_FOREIGN_LAYERS": "fetch",
                                                        "MIRROR_UPSTREAM_FOREIGN_LAYERS_PRIVATE": "true"})
        for n, path in enumerate(("/secret.txt", "/hop")):  # directly, and through a redirect
            body, _, foreign = push_with_foreign_layer(urls_upstream.url, "team/win", f"{n}", OCI_MANIFEST,
                                                       lambda _, path=path: f"{host.url}{path}", tmp_path)
            assert http.get(f"{mirror.url}/v2/team/win/manifests/{n}", headers={"accept": ALL_TYPES}).content == body
            seen.clear()
            got = http.get(f"{mirror.url}/v2/team/win/blobs/{sha256(foreign)}")
            assert got.status_code == 502 and got.content.startswith(b'{"errors"'), got.content[:80]
            assert SECRET[:8] not in got.content
            assert seen[-1] == "GET /secret.txt", seen
        # A redirect loop ends after 5 redirects.
        body, _, foreign = push_with_foreign_layer(urls_upstream.url, "team/win", "loop", OCI_MANIFEST,
                                                   lambda _: f"{host.url}/loop", tmp_path)
        assert http.get(f"{mirror.url}/v2/team/win/manifests/loop", headers={"accept": ALL_TYPES}).content == body
        seen.clear()
        got = http.get(f"{mirror.url}/v2/team/win/blobs/{sha256(foreign)}")
        assert got.status_code == 502 and "more than 5 redirects" in str(got.json()["errors"][0]["detail"])
        assert seen == ["GET /loop"] * 6


def test_which_addresses_are_public() -> None:
    from mirror.upstream.foreign import public

    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
                    # IPv6 that carries IPv4: compatible, NAT64 (a DNS64 network's), 6to4, translated; site-local
                    "::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1", "2002:7f00:1::", "2002:a9fe:a9fe::",
                    "::ffff:0:7f00:1", "fec0::1"):
        assert not public(ipaddress.ip_address(address)), address
    for address in ("13.107.42.14", "2603:1061:13f1:4c06::1", "::ffff:13.107.42.14", "64:ff9b::d6b:2a0e",
                    "2002:d6b:2a0e::1"):
        assert public(ipaddress.ip_address(address)), address


def test_through_a_proxy_a_layer_urls_name_is_left_to_the_proxy_and_an_address_is_still_checked(
    urls_upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,  # noqa: F811
    tmp_path: Path,
) -> None:
    """With ``HTTP_PROXY`` set, the mirror's host may not resolve the layer's host (the proxy does): a
    name that does not resolve here is left to the proxy; one that does (``localhost``: whether httpx
    sends it to the proxy is its ``NO_PROXY`` call), and an address in any spelling, are still checked."""
    seen: list[str] = []
    with internal_host(seen) as host:
        dead_proxy = f"http://127.0.0.1:{free_port()}"
        mirror = mirror_factory(urls_upstream.url, env={"MIRROR_UPSTREAM_FOREIGN_LAYERS": "fetch",
                                                        "HTTP_PROXY": dead_proxy, "NO_PROXY": "127.0.0.1"})
        for n, base, status in ((0, f"http://layers.invalid:{host.port}", 503),  # RFC 6761: never resolves
                                (1, f"http://10.0.0.1:{host.port}", 502), (2, f"http://localhost:{host.port}", 502),
                                (3, f"http://2130706433:{host.port}", 502)):  # 127.0.0.1 as inet_aton spells it
            body, _, foreign = push_with_foreign_layer(urls_upstream.url, "team/win", f"p{n}", OCI_MANIFEST,
                                                       lambda _, base=base: f"{base}/secret.txt", tmp_path)
            assert http.get(f"{mirror.url}/v2/team/win/manifests/p{n}", headers={"accept": ALL_TYPES}).content == body
            got = http.get(f"{mirror.url}/v2/team/win/blobs/{sha256(foreign)}")
            assert got.status_code == status, (base, got.text)
            assert ("not a public address" in got.text) == (status == 502), got.text
        assert seen == []


def test_a_layer_url_that_never_stops_sending_is_cut_off_at_the_layers_size(
    urls_upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A URL answering without end (no Content-Length) was written to disk until the disk filled, after
    the client had gone: no more than the descriptor's size is taken, and a HEAD gives that size, not
    the URL's."""
    seen: list[str] = []
    with internal_host(seen) as host:
        mirror = mirror_factory(urls_upstream.url, env={"MIRROR_UPSTREAM_FOREIGN_LAYERS": "fetch",
                                                        "MIRROR_UPSTREAM_FOREIGN_LAYERS_PRIVATE": "true"})
        body, _, foreign = push_with_foreign_layer(urls_upstream.url, "team/win", "endless", OCI_MANIFEST,
                                                   lambda _: f"{host.url}/endless", tmp_path)
        assert http.get(f"{mirror.url}/v2/team/win/manifests/endless", headers={"accept": ALL_TYPES}).content == body
        url = f"{mirror.url}/v2/team/win/blobs/{sha256(foreign)}"
        head = http.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(foreign))
        got = http.get(url)
        assert got.status_code == 502, got.text
        assert f"more than the layer's {len(foreign)} bytes" in mirror.log_tail(300)
        hexdigest = sha256(foreign).removeprefix("sha256:")
        assert not (mirror.data_dir / "blobs" / "sha256" / hexdigest[:2] / hexdigest).exists(), "nothing stored"
        largest = max((f.stat().st_size for f in mirror.data_dir.rglob("*") if f.is_file()), default=0)
        assert largest <= len(foreign), largest
