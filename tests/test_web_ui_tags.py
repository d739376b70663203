"""A cached repository's page over plain HTTP: the tags only its upstream lists, shown beside the
cached ones and marked, asked of the upstream once for several views; with the upstream down or
too slow, the cached tags and a line saying the upstream could not be asked.  The real mirror under uvicorn,
in front of a real upstream registry of the test's own (stopped in the test)."""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.client import pull_checked
from tests.support.faults import FaultProxy
from tests.support.images import Image
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.security import ALICE_PASSWORD, auth_env, basic


def rows(page: httpx.Response) -> dict[str, str]:
    """The tag table's rows: tag -> the row's text (tags stripped, spaces collapsed)."""
    assert page.status_code == 200, page.text
    found = {}
    for row in re.findall(r"<tr[ >].*?</tr>", page.text, flags=re.S):
        tag = re.search(r'<th scope="row" class="tag">([^<]*)</th>', row)
        if tag:
            found[html.unescape(tag.group(1))] = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", row)).split())
    return found


@pytest.fixture
def own_upstream(upstream_factory: Callable[[], UpstreamRegistry], tiny: Image) -> UpstreamRegistry:
    """An upstream with ``webui/tags`` tagged 1, 2 and 3, and ``webui/other`` tagged 1 (one image)."""
    registry = upstream_factory()
    for tag in ("1", "2", "3"):
        registry.push_image("webui/tags", tag, tiny)
    registry.push_image("webui/other", "1", tiny)
    return registry


def test_tags_only_the_upstream_lists_are_shown_and_marked(
        mirror_factory: Callable[..., MirrorServer], own_upstream: UpstreamRegistry, http: httpx.Client,
        tiny: Image) -> None:
    mirror = mirror_factory(upstream_url=own_upstream.url)
    pull_checked(http, mirror.url, "webui/tags", "1", tiny)
    own_upstream.clear_counts()

    page = http.get(f"{mirror.url}/ui/r/webui/tags")
    shown = rows(page)
    assert list(shown) == ["1", "2", "3"]
    assert tiny.digest.removeprefix("sha256:")[:12] in shown["1"] and "only upstream" not in shown["1"]
    for tag in ("2", "3"):
        assert "only upstream" in shown[tag] and "not cached yet" in shown[tag], shown[tag]
    assert "Tags (3, 2 only upstream)" in re.sub(r"<[^>]+>", "", page.text)
    assert 'id="upstream-problem"' not in page.text
    assert "/ui/actions/" not in page.text  # no users: the UI only reads

    # Asked once for several views; nothing else was asked of the upstream.
    assert rows(http.get(f"{mirror.url}/ui/r/webui/tags")) == shown
    assert own_upstream.count("GET", "/v2/webui/tags/tags/list") == 1
    assert [e for e in own_upstream.requests() if "/tags/list" not in e.path] == []


def test_with_the_upstream_down_the_cached_tags_are_shown_and_the_page_says_so(
        mirror_factory: Callable[..., MirrorServer], own_upstream: UpstreamRegistry, http: httpx.Client,
        tiny: Image) -> None:
    mirror = mirror_factory(upstream_url=own_upstream.url)
    pull_checked(http, mirror.url, "webui/tags", "2", tiny)
    own_upstream.stop()

    started = time.monotonic()
    page = http.get(f"{mirror.url}/ui/r/webui/tags")
    assert time.monotonic() - started < 5  # within the wait the upstream is given, retries included
    assert list(rows(page)) == ["2"]
    assert "only upstream" not in page.text
    problem = re.search(r'<p class="alert" role="status" id="upstream-problem">(.*?)</p>', page.text, flags=re.S)
    assert problem is not None, page.text
    assert html.unescape(problem.group(1)) == ("The upstream (docker.io) could not be asked for its tags: it could "
                                               "not be reached. Only the tags cached here are shown.")
    started = time.monotonic()
    assert list(rows(http.get(f"{mirror.url}/ui/r/webui/tags"))) == ["2"]
    assert time.monotonic() - started < 0.5  # the failure is remembered a while: not asked again


def test_a_user_who_may_write_gets_a_prefetch_button_on_each_tag_row(
        mirror_factory: Callable[..., MirrorServer], own_upstream: UpstreamRegistry, http: httpx.Client,
        htpasswd: Path, tiny: Image) -> None:
    mirror = mirror_factory(upstream_url=own_upstream.url, env=auth_env(htpasswd, anonymous_pull=True))
    pull_checked(http, mirror.url, "webui/tags", "1", tiny)
    alice = basic("alice", ALICE_PASSWORD)
    page = http.get(f"{mirror.url}/ui/r/webui/tags", headers=alice)
    for tag in ("1", "2", "3"):
        assert (f'href="/ui/actions/prefetch?name=webui%2Ftags&amp;reference={tag}" '
                f'aria-label="Prefetch the tag {tag}">Prefetch</a>') in page.text
    assert "Delete" not in page.text  # a cache's tags are not deleted here
    for headers in ({}, basic("carol", "carol-pw")):  # anonymous, and a user who may not write
        assert "/ui/actions/" not in http.get(f"{mirror.url}/ui/r/webui/tags", headers=headers).text


def test_an_upstream_slow_to_list_its_tags_does_not_hold_the_page(
        mirror_factory: Callable[..., MirrorServer], fault_proxy: FaultProxy, http: httpx.Client,
        images: StandardImages) -> None:
    mirror = mirror_factory(fault_proxy.url)
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    fault_proxy.add("slow", r"/tags/list", after_bytes=0, chunk_size=1, delay=5.0)

    started = time.monotonic()
    page = http.get(f"{mirror.url}/ui/r/library/small")
    assert 2.9 < time.monotonic() - started < 4.5  # the 3 s the upstream is given
    assert list(rows(page)) == ["1"]
    assert ("The upstream (docker.io) could not be asked for its tags: no answer within 3 s. Only the tags "
            "cached here are shown.") in html.unescape(page.text)


def test_a_failing_upstream_is_asked_once_for_a_page_not_retried(
        mirror_factory: Callable[..., MirrorServer], fault_proxy: FaultProxy, http: httpx.Client,
        images: StandardImages) -> None:
    """A page does not wait out the upstream client's retries: one try, remembered for the next views."""
    mirror = mirror_factory(fault_proxy.url)
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    fault_proxy.add("status", r"/tags/list$", status=503)
    fault_proxy.clear_counts()
    for _ in range(2):
        page = http.get(f"{mirror.url}/ui/r/library/small")
        assert page.status_code == 200 and list(rows(page)) == ["1"]
        assert "could not be asked for its tags: it answered 503" in html.unescape(page.text)
    assert fault_proxy.count("GET", "/tags/list") == 1


def test_names_an_upstream_lists_that_are_not_tags_are_left_out(
        mirror_factory: Callable[..., MirrorServer], fault_proxy: FaultProxy, http: httpx.Client,
        images: StandardImages) -> None:
    mirror = mirror_factory(fault_proxy.url)
    pull_checked(http, mirror.url, "library/small", "1", images.small)
    listed = {"name": "library/small", "tags": ["1", "<img src=x onerror=alert(1)>", "../../etc", "2", "x" * 129]}
    fault_proxy.add("status", r"/library/small/tags/list$", status=200, body=json.dumps(listed).encode(),
                    headers={"content-type": "application/json"})
    page = http.get(f"{mirror.url}/ui/r/library/small")
    assert list(rows(page)) == ["1", "2"] and "only upstream" in rows(page)["2"]
    assert "<img" not in page.text and "etc" not in page.text
