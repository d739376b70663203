"""Tag lists of an upstream that pages them with an opaque cursor and ignores ``last``.

The upstream is the session's docker-registry behind a :class:`CursorPager`: 120 tags, 50 a
page, linked with ``?n=50&next_page=<cursor>`` and ordered by push (not lexically).  The mirror
must list every tag in lexical order, page its own answers by the spec (``n``, ``last``,
``Link``), and follow the upstream's links only on the upstream's own host, a bounded number
of times.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mirror.upstream.client import MAX_TAG_PAGES
from tests.support import client
from tests.support.faults import FaultProxy
from tests.support.images import MANIFEST_MEDIA_TYPES, Image, build_image, random_layer
from tests.support.mirror import MirrorServer
from tests.support.paging import CursorPager
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import assert_store_sound

ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}
ENV = {"MIRROR_UPSTREAM_RETRIES": "0", "MIRROR_UPSTREAM_READ_TIMEOUT": "10s"}
TAGS = [f"v{number}" for number in range(1, 121)]  # pushed in this order; "v10" < "v2" lexically
LINK = re.compile(r'^<(?P<url>[^>]+)>; rel="next"$')


def by_push(tags: list[str]) -> list[str]:
    return sorted(tags, key=lambda tag: int(tag[1:]))


@pytest.fixture(scope="module")
def tagged(upstream: UpstreamRegistry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Image]:
    """A repository with one small image under the 120 tags."""
    name = f"paging/cursor-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("paging")
    image = build_image(tmp, [random_layer(tmp, 3000, seed=uuid.uuid4().int % 10_000_000)])
    upstream.push_image(name, TAGS[0], image)
    with client.session() as http:
        for tag in TAGS[1:]:
            client.put_manifest(http, upstream.url, name, tag, image.media_type, image.manifest)
    return name, image


@pytest.fixture
def pager(upstream: UpstreamRegistry) -> Iterator[CursorPager]:
    with CursorPager(upstream.url, order=by_push) as front:
        yield front


def mirror_pages(http: httpx.Client, mirror: MirrorServer, name: str, n: int) -> list[list[str]]:
    """Page through the mirror's tag list *n* at a time by its own ``Link`` headers."""
    pages: list[list[str]] = []
    url: str | None = f"{mirror.url}/v2/{name}/tags/list?n={n}"
    while url is not None:
        answer = http.get(url)
        assert answer.status_code == 200, answer.text
        assert answer.json()["name"] == name
        pages.append(answer.json()["tags"])
        link = answer.headers.get("link")
        if link is None:
            url = None
            continue
        match = LINK.match(link)
        assert match is not None, link
        assert match["url"] == f"/v2/{name}/tags/list?n={n}&last={pages[-1][-1]}"
        url = mirror.url + match["url"]
        assert len(pages) <= len(TAGS), "the mirror's links do not end"
    return pages


def test_every_tag_in_order_from_an_upstream_paging_with_a_cursor(
    pager: CursorPager, mirror_factory: Callable[..., MirrorServer], tagged: tuple[str, Image],
    http: httpx.Client,
) -> None:
    name, image = tagged
    mirror = mirror_factory(pager.url, env=ENV)
    whole = http.get(f"{mirror.url}/v2/{name}/tags/list")
    assert whole.status_code == 200 and "link" not in whole.headers
    assert whole.json() == {"name": name, "tags": sorted(TAGS)}
    # The upstream's three pages, each asked for by the link it gave, nothing else.
    queries = [r.query for r in pager.tag_requests()]
    assert len(queries) == 3 and queries[0] == ""
    assert all(re.fullmatch(r"n=50&next_page=[\w-]+", q) for q in queries[1:]), queries

    pages = mirror_pages(http, mirror, name, 50)
    assert [len(page) for page in pages] == [50, 50, 20]
    assert [tag for page in pages for tag in page] == sorted(TAGS)
    assert [tag for page in mirror_pages(http, mirror, name, 7) for tag in page] == sorted(TAGS)
    small = http.get(f"{mirror.url}/v2/{name}/tags/list", params={"n": 3, "last": "v118"})
    assert small.json()["tags"] == ["v119", "v12", "v120"]

    pulled = http.get(f"{mirror.url}/v2/{name}/manifests/v77", headers=ACCEPT)
    assert (pulled.status_code, pulled.content) == (200, image.manifest)
    for digest in image.blobs:
        assert http.get(f"{mirror.url}/v2/{name}/blobs/{digest}").status_code == 200
    assert_store_sound(mirror.data_dir, image.blobs)


def test_absolute_links_on_the_upstream_host_are_followed(
    pager: CursorPager, mirror_factory: Callable[..., MirrorServer], tagged: tuple[str, Image],
    http: httpx.Client,
) -> None:
    name, _ = tagged
    pager.link_base = pager.url
    mirror = mirror_factory(pager.url, env=ENV)
    whole = http.get(f"{mirror.url}/v2/{name}/tags/list")
    assert whole.json() == {"name": name, "tags": sorted(TAGS)}
    assert len(pager.tag_requests()) == 3


def test_links_to_another_host_are_not_followed(
    pager: CursorPager, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
    tagged: tuple[str, Image], http: httpx.Client,
) -> None:
    name, image = tagged
    with CursorPager(upstream.url) as elsewhere:
        pager.link_base = elsewhere.url
        mirror = mirror_factory(pager.url, env={**ENV, "MIRROR_UPSTREAM_USERNAME": "alice",
                                                "MIRROR_UPSTREAM_PASSWORD": "s3cret-Pa55"})
        refused = http.get(f"{mirror.url}/v2/{name}/tags/list")
        assert refused.status_code == 502, refused.text
        error = refused.json()["errors"][0]
        assert error["code"] == "UNAVAILABLE" and "on another host" in error["detail"]
        assert elsewhere.tag_requests() == []
        assert len(pager.tag_requests()) == 1
        # With tags cached here, those are served instead (as when the upstream is down).
        assert http.get(f"{mirror.url}/v2/{name}/manifests/v5", headers=ACCEPT).content == image.manifest
        stale = http.get(f"{mirror.url}/v2/{name}/tags/list")
        assert stale.json() == {"name": name, "tags": ["v5"]}
        assert elsewhere.tag_requests() == []


@pytest.mark.parametrize("mode", ["endless", "loop"])
def test_cursors_that_never_end_are_not_followed_for_ever(
    mode: str, pager: CursorPager, mirror_factory: Callable[..., MirrorServer], tagged: tuple[str, Image],
    http: httpx.Client,
) -> None:
    name, _ = tagged
    setattr(pager, mode, True)
    mirror = mirror_factory(pager.url, env=ENV)
    answer = http.get(f"{mirror.url}/v2/{name}/tags/list")
    assert answer.status_code == 502 and answer.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert len(pager.tag_requests()) == (MAX_TAG_PAGES if mode == "endless" else 1)


def test_skopeo_lists_every_tag_through_the_mirror(
    pager: CursorPager, mirror_factory: Callable[..., MirrorServer], tagged: tuple[str, Image],
    skopeo: str, tmp_path: Path,
) -> None:
    name, image = tagged
    mirror = mirror_factory(pager.url, env=ENV)
    done = subprocess.run([skopeo, "list-tags", "--tls-verify=false", f"docker://{mirror.address}/{name}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["Tags"] == sorted(TAGS)
    layout = tmp_path / "copied"
    copied = subprocess.run([skopeo, "copy", "--src-tls-verify=false", "--preserve-digests",
                             f"docker://{mirror.address}/{name}:v120", f"oci:{layout}:copied"],
                            capture_output=True, text=True, timeout=180)
    assert copied.returncode == 0, copied.stderr
    assert_store_sound(mirror.data_dir, image.blobs)


def test_concurrent_tag_lists_of_one_repository_make_one_upstream_listing(
    fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer], tagged: tuple[str, Image],
) -> None:
    """Twenty clients list one repository's tags while the upstream takes a second to answer: one
    listing (before, one each: 300 nodes listing a large repository cost thousands of upstream calls)."""
    name, _ = tagged
    mirror = mirror_factory(fault_proxy.url, env=ENV)
    fault_proxy.add("late", f"/v2/{name}/tags/list", method="GET", delay=1.0)
    fault_proxy.clear_counts()

    def listed(_: int) -> list[str]:
        answer = httpx.get(f"{mirror.url}/v2/{name}/tags/list", timeout=30, trust_env=False)
        assert answer.status_code == 200, answer.text
        return list(answer.json()["tags"])

    with ThreadPoolExecutor(20) as pool:
        lists = list(pool.map(listed, range(20)))
    assert lists == [sorted(TAGS)] * 20
    assert fault_proxy.count("GET", f"/v2/{name}/tags/list") == 1
