"""The web UI as a user sees it: Debian's headless Chromium, driven by Playwright, against the
real mirror under uvicorn, in front of the session's real upstream registry.

What is asserted is what the page shows (rendered text, links, buttons) and what the browser
did (script-driven filtering without a reload, no dialog opened, no element injected).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page

from mirror.config.values import human
from tests.support.browser import Seen, chromium, follow, open_page, status, text
from tests.support.catalog import StandardImages
from tests.support.client import pull_checked, push_image, push_index
from tests.support.images import OCI_INDEX, Image, build_image, build_index, busybox_layer, random_layer
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.security import ALICE_PASSWORD, auth_env, basic, push
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_STEP = "RUN echo '<script>alert(2)</script>' > /x"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamRegistry) -> Image:
    """An image with labels (one of them hostile HTML), an entrypoint, ports and build steps, in
    the upstream as ``webui/labelled:1``."""
    dir = tmp_path_factory.mktemp("labelled")
    image = build_image(
        dir, [busybox_layer(dir, marker="webui"), random_layer(dir, 300_000, 901)],
        settings={"Entrypoint": ["/bin/sh", "-c"], "ExposedPorts": {"8080/tcp": {}},
                  "Labels": {"org.opencontainers.image.title": "labelled", "evil": HOSTILE}},
        history=["ADD busybox /bin", HOSTILE_STEP])
    push_image(upstream.url, "webui/labelled", "1", image)
    return image


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as started:
        yield started


@pytest.fixture
def opened(browser: Browser, tmp_path: Path) -> Iterator[tuple[Page, Seen]]:
    """A page of a fresh context; what it shows at the end of the test is saved as ``tmp_path/screenshot.png``."""
    with open_page(browser, tmp_path / "screenshot.png") as both:
        yield both


@pytest.fixture
def page(opened: tuple[Page, Seen]) -> Page:
    return opened[0]


@pytest.fixture
def seen(opened: tuple[Page, Seen]) -> Seen:
    return opened[1]


def _pull(mirror: MirrorServer, name: str, tag: str, image: Image) -> None:
    with httpx.Client(trust_env=False, timeout=60) as http:
        pull_checked(http, mirror.url, name, tag, image)


def _rows(page: Page) -> list[str]:
    """The repository names in the list's table, as shown."""
    return list(page.evaluate("[...document.querySelectorAll('table.repos tbody th')]"
                              ".map(td => td.innerText)"))


def test_pulled_and_pushed_repositories_are_listed_and_the_filter_narrows_as_you_type(
        mirror: MirrorServer, page: Page, labelled: Image, images: StandardImages, tiny: Image,
        tmp_path: Path) -> None:
    assert status(page, f"{mirror.url}/ui/") == 200
    assert _rows(page) == []
    _pull(mirror, "webui/labelled", "1", labelled)
    _pull(mirror, "library/small", "1", images.small)
    push_image(mirror.url, "team/app", "v1", tiny)

    assert status(page, f"{mirror.url}/ui/") == 200
    assert _rows(page) == ["library/small", "team/app", "webui/labelled"]
    rows = text(page, "table.repos tbody")
    assert "pushed" in rows and "cached from docker.io" in rows
    assert "3 repositories" in text(page, "#count")
    # Only the count is read out as the filter narrows the list, not the whole table.
    assert page.evaluate("document.getElementById('count').getAttribute('aria-live')") == "polite"
    assert page.evaluate("document.querySelector('[aria-live]:has(table), [role=status]:has(table)')") is None
    page.screenshot(path=tmp_path / "repositories.png", full_page=True)

    page.evaluate("window.notReloaded = true")
    page.locator("#q").press_sequentially("labe")
    page.wait_for_function("() => document.querySelectorAll('table.repos tbody tr').length === 1")
    assert _rows(page) == ["webui/labelled"]
    assert page.evaluate("window.notReloaded") is True  # narrowed by the script, not by submitting the form
    assert page.evaluate("location.search") == "?q=labe"
    assert page.title() == "Repositories matching “labe” · mirror"
    page.locator("#q").press_sequentially("x")  # "labex": nothing
    page.wait_for_function("() => document.getElementById('count').innerText.startsWith('0 ')")
    assert _rows(page) == []

    # The row links to the repository's page.
    status(page, f"{mirror.url}/ui/?q=small")
    assert _rows(page) == ["library/small"]
    page.click("table.repos tbody a")
    page.wait_for_function("() => location.pathname === '/ui/r/library/small'")
    page.wait_for_function("() => document.querySelector('h1')?.innerText === 'library/small'")


def test_repository_page_shows_tags_digests_and_copyable_pull_commands(
        mirror: MirrorServer, page: Page, images: StandardImages) -> None:
    _pull(mirror, "library/small", "1", images.small)
    assert status(page, f"{mirror.url}/ui/r/library/small") == 200
    table = text(page, "table.tags")
    assert images.small.digest.removeprefix("sha256:")[:12] in table
    assert "application/vnd.oci.image.manifest.v1+json" in table
    assert "linux/amd64" in table
    assert page.evaluate("document.querySelector('table.tags .tag').innerText") == "1"
    copies = page.evaluate("[...document.querySelectorAll('button[data-copy]')].map(b => b.dataset.copy)")
    host = f"127.0.0.1:{mirror.port}"
    assert f"docker pull {host}/library/small:1" in copies
    assert f"podman pull {host}/library/small:1" in copies
    assert images.small.digest in copies
    assert f"docker pull {host}/library/small:1" in text(page, "ul.commands")

    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=mirror.url)
    digest_button = f"button[data-copy={json.dumps(images.small.digest)}]"
    page.click(digest_button)
    page.wait_for_function(f"() => document.querySelector('{digest_button}').innerText === 'Copied'")
    assert page.evaluate("document.getElementById('said').getAttribute('aria-live')") == "polite"
    assert text(page, "#said") == "Copied"  # said to a screen reader too
    assert page.evaluate("navigator.clipboard.readText()") == images.small.digest


def test_image_pages_show_platforms_layers_config_and_hostile_text_as_text(
        mirror: MirrorServer, page: Page, seen: Seen, labelled: Image, images: StandardImages,
        tmp_path: Path) -> None:
    _pull(mirror, "webui/labelled", "1", labelled)
    status(page, f"{mirror.url}/ui/r/webui/labelled")
    page.click("table.tags tbody a")  # the tag's digest
    page.wait_for_function(f"() => location.pathname === '/ui/r/webui/labelled@{labelled.digest}'")
    page.wait_for_function("() => document.getElementById('layers') !== null")
    rows = page.evaluate("[...document.querySelectorAll('table.layers tbody tr')].map(tr => tr.innerText)")
    assert rows == [f"{n}\t{layer.digest.removeprefix('sha256:')[:12]}\t"
                    f"application/vnd.oci.image.layer.v1.tar+gzip\t{human(layer.size)}"
                    for n, layer in enumerate(labelled.layers, 1)]
    labels = text(page, "table.labels")
    assert "org.opencontainers.image.title" in labels and "labelled" in labels
    assert HOSTILE in labels  # shown as the text it is
    main = text(page, "main")
    assert '["/bin/sh", "-c"]' in main and "8080/tcp" in main and HOSTILE_STEP in main
    assert page.evaluate("document.querySelectorAll('main img, main script').length") == 0
    page.wait_for_timeout(1000)
    assert seen.dialogs == []
    page.screenshot(path=tmp_path / "image.png", full_page=True)

    # An index: its platforms, each linked to its manifest once that is pulled too.
    index, arm64 = images.multi.digest, images.multi.child("arm64")
    with httpx.Client(trust_env=False, timeout=30) as http:
        answer = http.get(f"{mirror.url}/v2/library/multi/manifests/1", headers={"accept": OCI_INDEX})
        assert answer.headers["docker-content-digest"] == index
        assert status(page, f"{mirror.url}/ui/r/library/multi@{index}") == 200
        platforms = text(page, "main table")
        assert "linux/amd64" in platforms and "linux/arm64/v8" in platforms and "not cached" in platforms
        assert page.evaluate("document.querySelectorAll('main table a').length") == 0
        assert http.get(f"{mirror.url}/v2/library/multi/manifests/{arm64.digest}",
                        headers={"accept": arm64.media_type}).status_code == 200
    assert status(page, f"{mirror.url}/ui/r/library/multi@{index}") == 200
    hrefs = page.evaluate("[...document.querySelectorAll('main table a')].map(a => a.getAttribute('href'))")
    assert hrefs == [f"/ui/r/library/multi@{arm64.digest}"]


def test_a_user_without_pull_rights_does_not_see_the_private_repository(
        mirror_factory: Callable[..., MirrorServer], page: Page, htpasswd: Path, tiny: Image) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=False))
    push(mirror, "team/secret", "1", tiny, basic("alice", ALICE_PASSWORD))

    assert status(page, f"{mirror.url}/ui/") == 401
    assert "team/secret" not in text(page)
    assert "Log in" in text(page, "main")
    assert status(page, f"{mirror.url}/ui/r/team/secret") == 401
    assert "team/secret" not in text(page)
    assert status(page, f"{mirror.url}/ui/?q=secret&partial=1") == 401
    assert "team/secret" not in text(page)
    page.context.set_extra_http_headers(basic("carol", "wrong password"))
    assert status(page, f"{mirror.url}/ui/") == 401
    assert "team/secret" not in text(page)

    page.context.set_extra_http_headers(basic("alice", ALICE_PASSWORD))
    assert status(page, f"{mirror.url}/ui/") == 200
    assert _rows(page) == ["team/secret"]
    assert "Signed in as alice" in text(page, "header")
    assert status(page, f"{mirror.url}/ui/r/team/secret") == 200
    assert "1" == page.evaluate("document.querySelector('table.tags .tag').innerText")


def test_index_pushed_here_lists_its_platforms_on_the_repository_page(
        mirror: MirrorServer, page: Page, images: StandardImages) -> None:
    push_index(mirror.url, "team/multi", "2", images.multi)
    assert status(page, f"{mirror.url}/ui/r/team/multi") == 200
    row = text(page, "table.tags tbody")
    assert "linux/amd64, linux/arm64/v8" in row
    assert "application/vnd.oci.image.index.v1+json" in row


def test_keyboard_only_and_a_phone_sized_screen(mirror: MirrorServer, browser: Browser, tmp_path: Path,
                                                images: StandardImages, tiny: Image) -> None:
    _pull(mirror, "library/small", "1", images.small)
    push_image(mirror.url, "team/a-rather-long-repository-name/with/several/components-of-its-own", "v1", tiny)
    phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True}
    with open_page(browser, tmp_path / "screenshot.png", **phone) as (page, _):
        for path in ("/ui/", "/ui/r/library/small", f"/ui/r/library/small@{images.small.digest}", "/ui/cache"):
            assert status(page, f"{mirror.url}{path}") == 200
            assert page.evaluate("document.querySelector('meta[name=viewport]').content") == \
                "width=device-width, initial-scale=1"
            # Nothing wider than the screen but tables, which scroll in their own box.
            assert page.evaluate("document.documentElement.scrollWidth") <= 390, path

        status(page, f"{mirror.url}/ui/")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.innerText") == "Skip to content"
        page.keyboard.press("/")  # focuses the filter
        assert page.evaluate("document.activeElement.id") == "q"
        for key in "small":
            page.keyboard.press(key)
        page.wait_for_function("() => document.querySelectorAll('table.repos tbody tr').length === 1")
        assert _rows(page) == ["library/small"]
        page.keyboard.press("Tab")  # the form's button
        page.keyboard.press("Tab")  # the shortcut's
        assert page.evaluate("document.activeElement.innerText") == "Turn the / shortcut off"
        page.keyboard.press("Tab")  # the one repository's link
        assert page.evaluate("document.activeElement.innerText") == "library/small"
        page.keyboard.press("Enter")
        page.wait_for_function("() => location.pathname === '/ui/r/library/small'")


def test_the_single_key_shortcut_can_be_turned_off_and_stays_off(mirror: MirrorServer, page: Page) -> None:
    """``/`` focuses the filter; the page says so beside it and offers to turn it off (WCAG 2.1
    success criterion 2.1.4: a speech-input user's words must not fire single-key shortcuts).  Off,
    ``/`` does nothing, on this page and the next ones; it can be turned on again.  ``/`` typed into
    a field is typed, never taken."""
    focused = "document.activeElement.id"
    assert status(page, f"{mirror.url}/ui/") == 200
    assert text(page, "#shortcut") == "Press / to filter. Turn the / shortcut off"
    page.keyboard.press("/")
    assert page.evaluate(focused) == "q"
    page.keyboard.type("team/")  # typed in the filter, not taken as the shortcut
    assert page.input_value("#q") == "team/"

    page.click("#shortcut button")
    assert text(page, "#shortcut") == "The / shortcut is off. Turn the / shortcut on"
    assert status(page, f"{mirror.url}/ui/") == 200  # another page of this browser
    assert text(page, "#shortcut") == "The / shortcut is off. Turn the / shortcut on"
    page.keyboard.press("/")
    assert page.evaluate(focused) != "q" and page.input_value("#q") == ""

    page.click("#shortcut button")
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("/")
    assert page.evaluate(focused) == "q"
    assert text(page, "#shortcut") == "Press / to filter. Turn the / shortcut off"


def test_a_page_view_asks_for_nothing_that_is_not_there(mirror: MirrorServer, page: Page, seen: Seen,
                                                        tiny: Image) -> None:
    """Every request a page makes is answered (the browser's icon included: no 404 in the access
    log, no error in the console, for each page a user opens), and only of this host."""
    push_image(mirror.url, "team/app", "v1", tiny)
    for path in ("/ui/", "/ui/r/team/app", f"/ui/r/team/app@{tiny.digest}", "/ui/cache"):
        start, failures, errors = len(seen.responses), len(seen.failed), len(seen.errors)
        assert status(page, f"{mirror.url}{path}") == 200
        page.wait_for_timeout(1000)
        answers = dict(seen.responses[start:])
        assert answers and all(url.startswith(f"{mirror.url}/ui/") for url in answers), answers
        assert all(code == 200 for code in answers.values()), answers
        assert seen.failed[failures:] == [], seen.failed[failures:]
        assert seen.errors[errors:] == [], seen.errors[errors:]


def test_a_user_with_push_rights_deletes_a_tag_and_anonymous_visitors_see_no_actions(
        mirror_factory: Callable[..., MirrorServer], page: Page, htpasswd: Path, tiny: Image, skopeo: str,
        tmp_path: Path) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=True))
    alice = basic("alice", ALICE_PASSWORD)
    push(mirror, "team/app", "1", tiny, alice)
    push(mirror, "team/app", "2", tiny, alice)

    def inspect(tag: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false",
                               f"docker://{mirror.address}/team/app:{tag}"],
                              capture_output=True, text=True, timeout=120, check=False)

    assert inspect("1").returncode == 0
    for path in ("/ui/r/team/app", f"/ui/r/team/app@{tiny.digest}"):
        assert status(page, f"{mirror.url}{path}") == 200
        assert page.evaluate("document.querySelectorAll('.action, form.confirm, a[href*=\\'/actions/\\']').length") == 0
        assert "Delete" not in text(page, "main")

    page.context.set_extra_http_headers(alice)
    assert status(page, f"{mirror.url}/ui/r/team/app") == 200
    assert page.evaluate("document.querySelectorAll('.action, form.confirm, a[href*=\\'/actions/\\']').length") == 2
    page.screenshot(path=tmp_path / "repository.png", full_page=True)
    assert follow(page, "a[aria-label='Delete the tag 1']") == 200
    assert text(page, "h1") == "Delete tag 1 of team/app?"
    page.screenshot(path=tmp_path / "confirm.png", full_page=True)
    assert follow(page, "form.confirm button[type=submit]") == 200
    assert text(page, "h1") == "Deleted tag 1 of team/app" and "Deleted tag 1 of team/app." in text(page, "main")
    assert page.title() == "Deleted tag 1 of team/app · mirror"
    assert follow(page, "main ul.next a") == 200
    assert page.evaluate("[...document.querySelectorAll('table.tags .tag')].map(td => td.innerText)") == ["2"]

    with httpx.Client(trust_env=False, timeout=60) as http:
        gone = http.get(f"{mirror.url}/v2/team/app/manifests/1",
                        headers={"accept": "application/vnd.oci.image.manifest.v1+json"})
        assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    failed = inspect("1")
    assert failed.returncode != 0 and "manifest unknown" in failed.stderr.lower()
    assert inspect("2").returncode == 0


def test_the_cache_page_charts_the_last_hours_and_agrees_with_metrics(
        mirror: MirrorServer, page: Page, browser: Browser, images: StandardImages, labelled: Image,
        tmp_path: Path) -> None:
    _pull(mirror, "library/small", "1", images.small)
    _pull(mirror, "library/small", "1", images.small)  # from the store, this time
    _pull(mirror, "webui/labelled", "1", labelled)
    small, other = (sum(layer.size for layer in image.layers) for image in (images.small, labelled))
    figures: list[float] = []

    def agree() -> bool:
        """The page's totals are the mirror's (the window began at its start), once the last blob
        fetched is in the store (moved there right after its last byte reached the client)."""
        assert status(page, f"{mirror.url}/ui/cache") == 200
        found = scrape(f"{mirror.url}/metrics")
        from_store = (value(found, "mirror_cache_served_bytes_total", outcome=o) for o in ("hit", "stale", "local"))
        figures[:] = [sum(from_store), value(found, "mirror_upstream_received_bytes_total"),
                      value(found, "mirror_store_size_bytes")]
        shown = page.evaluate("['window-store', 'window-upstream', 'window-stored']"
                              ".map(id => Number(document.getElementById(id).value))")
        return bool(shown == figures)

    assert eventually(agree, timeout=10, interval=0.2), figures
    sent, fetched, stored = figures
    assert sent >= small and fetched >= small + other and stored >= small + other

    for chart, title in (("traffic-chart", "Traffic per minute"), ("disk-chart", "Disk usage")):
        svg = page.locator(f"svg#{chart}")
        assert svg.get_attribute("role") == "img"
        assert svg.get_attribute("aria-labelledby") == f"{chart[:-6]}-title {chart[:-6]}-desc"
        assert svg.locator("title").text_content() == title
    desc = page.locator("#traffic-desc").text_content() or ""
    assert f"{human(int(sent))} sent from the store, {human(int(fetched))} fetched from upstreams" in desc
    assert f"{human(int(stored))} now" in (page.locator("#disk-desc").text_content() or "")
    # Drawn: lines that leave the bottom of the chart (y = 120) somewhere.
    for line in ("#traffic-chart polyline.store", "#traffic-chart polyline.upstream", "#disk-chart polyline.disk"):
        ys = [float(p.split(",")[1]) for p in (page.locator(line).get_attribute("points") or "").split()]
        assert ys and min(ys) < 120, (line, ys)
    assert page.locator("svg.chart").first.bounding_box()["width"] > 300  # type: ignore[index]

    # The table under the chart, for who does not see it: its minutes add up to the totals.
    page.click("details summary")
    cells = page.evaluate("[...document.querySelectorAll('table.minutes tbody tr')]"
                          ".map(tr => [...tr.querySelectorAll('data')].map(d => Number(d.value)))")
    assert cells and [sum(c[0] for c in cells), sum(c[1] for c in cells)] == [sent, fetched]
    page.screenshot(path=tmp_path / "cache.png", full_page=True)

    # Drawn on the server: the same without JavaScript.
    with open_page(browser, java_script_enabled=False) as (plain, _):
        assert status(plain, f"{mirror.url}/ui/cache") == 200
        assert plain.locator("svg.chart polyline").count() == 3


def test_prefetch_a_tag_only_the_upstream_lists_then_pull_it_with_the_upstream_down(
        mirror_factory: Callable[..., MirrorServer], upstream_factory: Callable[[], UpstreamRegistry], page: Page,
        htpasswd: Path, tiny: Image, labelled: Image, skopeo: str, tmp_path: Path) -> None:
    own = upstream_factory()
    own.push_image("webui/app", "1", tiny)
    own.push_image("webui/app", "2", labelled)
    mirror = mirror_factory(upstream_url=own.url, env=auth_env(htpasswd, anonymous_pull=True))
    _pull(mirror, "webui/app", "1", tiny)
    page.context.set_extra_http_headers(basic("alice", ALICE_PASSWORD))

    assert status(page, f"{mirror.url}/ui/r/webui/app") == 200
    assert page.evaluate("[...document.querySelectorAll('table.tags .tag')].map(td => td.innerText)") == ["1", "2"]
    assert "only upstream" in text(page, "table.tags tbody tr:nth-child(2)")
    page.screenshot(path=tmp_path / "repository.png", full_page=True)
    assert follow(page, "a[aria-label='Prefetch the tag 2']") == 200
    assert text(page, "h1") == "Fetch webui/app:2 into the cache?"
    assert follow(page, "form.confirm button[type=submit]") == 200
    assert text(page, "h1") == "Fetched webui/app:2 into the cache"
    assert f"Fetched webui/app:2 into the cache: {labelled.digest}" in text(page, "main")
    assert follow(page, "main ul.next a") == 200  # back to the repository: tag 2 is cached now
    row = text(page, "table.tags tbody tr:nth-child(2)")
    assert labelled.digest.removeprefix("sha256:")[:12] in row and "only upstream" not in row

    own.stop()
    copied = subprocess.run([skopeo, "copy", "--src-tls-verify=false",
                             f"docker://{mirror.address}/webui/app@{labelled.digest}", f"dir:{tmp_path / 'copy'}"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert copied.returncode == 0, copied.stderr
    for layer in labelled.layers:
        assert (tmp_path / "copy" / layer.digest.removeprefix("sha256:")).stat().st_size == layer.size

    def told() -> bool:  # once the upstream's last answer is no longer remembered (10 s)
        return status(page, f"{mirror.url}/ui/r/webui/app") == 200 and \
            "could not be asked for its tags" in text(page, "#upstream-problem")

    assert eventually(told, timeout=20, interval=1.0)
    assert page.evaluate("[...document.querySelectorAll('table.tags .tag')].map(td => td.innerText)") == ["1", "2"]


#: ``contrast(element)``: the lowest contrast ratio (WCAG 2) of *element*'s text colour against the
#: nearest background drawn behind it and the page's --bg and --tint (rows' hover); ``edge(element)``:
#: its border colour's against the background around it.
CONTRAST = """() => {
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map(v => v / 255)
    .map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4)
    .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
  const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
  const behind = (el) => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length === 3 || c[3] > 0) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const hex = (v) => {
    v = v.trim().replace(/^#(.)(.)(.)$/, "#$1$1$2$2$3$3");
    return [1, 3, 5].map(i => parseInt(v.slice(i, i + 2), 16));
  };
  const page = ["--bg", "--tint"].map(v => hex(getComputedStyle(document.documentElement).getPropertyValue(v)));
  window.contrast = (el) => Math.min(...[behind(el), ...page].map(bg => ratio(rgb(getComputedStyle(el).color), bg)));
  window.edge = (el) => ratio(rgb(getComputedStyle(el).borderTopColor), behind(el.parentElement));
}"""


def _lowest(page: Page, selector: str) -> float:
    """The lowest contrast of the elements *selector* finds (at least one)."""
    page.evaluate(CONTRAST)
    found = page.evaluate(f"[...document.querySelectorAll({json.dumps(selector)})].map(contrast)")
    assert found, selector
    return float(min(found))


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_colour_keeps_4_5_to_1_in_light_and_dark_mode(
        mirror_factory: Callable[..., MirrorServer], browser: Browser, htpasswd: Path, tiny: Image,
        images: StandardImages, scheme: str) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=True))
    alice = basic("alice", ALICE_PASSWORD)
    push(mirror, "team/app", "1", tiny, alice)
    _pull(mirror, "library/small", "1", images.small)
    with open_page(browser, color_scheme=scheme, extra_http_headers=alice) as (page, _):
        assert status(page, f"{mirror.url}/ui/cache") == 200
        assert _lowest(page, ".health-ok") >= 4.5
        # What only shows when something is wrong (a failing upstream), pinned or listed only upstream.
        page.evaluate("""document.querySelector('main').insertAdjacentHTML('beforeend',
            '<p class="alert">a</p><span class="badge health-failing">failing</span>'
            + '<span class="badge pinned">pinned</span><span class="badge upstream">only upstream</span>')""")
        for selector in (".alert", ".health-failing", ".pinned", ".upstream", ".meta", "a"):
            assert _lowest(page, selector) >= 4.5, selector

        assert status(page, f"{mirror.url}/ui/") == 200
        page.evaluate(CONTRAST)
        assert page.evaluate("edge(document.getElementById('q'))") >= 3  # WCAG 1.4.11: a control's boundary
        assert status(page, f"{mirror.url}/ui/r/team/app") == 200
        page.hover("a.action.danger")
        assert _lowest(page, "a.action.danger") >= 4.5
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=mirror.url)
        page.click("ul.commands button.copy")
        page.wait_for_function("() => document.querySelector('button.copied') !== null")
        assert _lowest(page, "button.copied") >= 4.5
        assert follow(page, "a.action.danger") == 200
        assert _lowest(page, "button.action.danger") >= 4.5


def _overflow(page: Page) -> tuple[int, list[str]]:
    """The page's width as scrolled, and the elements wider than the window (to say which)."""
    width = int(page.evaluate("document.scrollingElement.scrollWidth"))
    wide = page.evaluate("""[...document.querySelectorAll('body *')].filter(e => !e.parentElement.closest('.scroll')
        && (e.getBoundingClientRect().right > innerWidth || e.scrollWidth > e.clientWidth + 1))
        .map(e => e.tagName + '.' + e.className)""")
    return width, list(wide)


def test_long_names_wrap_and_no_page_scrolls_sideways(mirror: MirrorServer, browser: Browser, tmp_path: Path,
                                                     images: StandardImages) -> None:
    long_name = "team/" + "a" * 250  # the longest a repository's name may be: 255
    long_tag = "t" * 128
    layers = [random_layer(tmp_path, 64, seed) for seed in range(100)]
    deep = build_image(tmp_path / "deep", layers)
    platforms = build_index([build_image(tmp_path / str(n), layers[:1], arch=f"arch{n}", variant="v8")
                             for n in range(10)])
    push_image(mirror.url, long_name, long_tag, deep)
    push_index(mirror.url, "team/platforms", "1", platforms)
    pages = ["/ui/", f"/ui/r/{long_name}", f"/ui/r/{long_name}@{deep.digest}",
             f"/ui/r/team/platforms@{platforms.digest}"]
    for width in (1280, 320):
        with open_page(browser, tmp_path / f"{width}.png", viewport={"width": width, "height": 800}) as (page, _):
            for path in pages:
                assert status(page, f"{mirror.url}{path}") == 200
                shown, wide = _overflow(page)
                assert shown <= width, (width, path, shown, wide)
                if width == 1280:  # the tables fit too: the names wrap in their cells
                    assert page.evaluate("Math.max(...[...document.querySelectorAll('main table')]"
                                         ".map(t => t.getBoundingClientRect().width))") <= 1280, path


def test_log_out_makes_the_browser_forget_the_password(mirror_factory: Callable[..., MirrorServer], browser: Browser,
                                                      htpasswd: Path, tmp_path: Path) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=True))
    alice = {"username": "alice", "password": ALICE_PASSWORD}  # typed at the browser's prompt
    with open_page(browser, tmp_path / "screenshot.png", http_credentials=alice) as (page, _):
        status(page, f"{mirror.url}/ui/login")
        assert status(page, f"{mirror.url}/ui/") == 200  # not asked: the browser sends the password it keeps
        assert "Signed in as alice" in text(page, "header")
        assert follow(page, "a#logout") == 401
        assert text(page, "h1") == "Logged out" and "Signed in" not in text(page, "header")
        assert "Close every window of the browser" in text(page, "main")
        assert status(page, f"{mirror.url}/ui/") == 200
        assert "Signed in" not in text(page, "header") and "Log in" in text(page, "header")
        assert page.evaluate("document.querySelector('a#logout')") is None
