"""The web UI as a user sees it: headless Chromium (driven over the DevTools Protocol) against the
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

from mirror.config.values import human
from tests.support.browser import Browser
from tests.support.catalog import StandardImages
from tests.support.client import pull_checked, push_image, push_index
from tests.support.images import OCI_INDEX, Image, build_image, busybox_layer, random_layer
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.security import ALICE_PASSWORD, auth_env, basic, push

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


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A browser; what its page shows at the end of the test is saved as ``tmp_path/screenshot.png``."""
    with Browser(tmp_path / "chromium") as started:
        yield started
        started.screenshot(tmp_path / "screenshot.png")


def _pull(mirror: MirrorServer, name: str, tag: str, image: Image) -> None:
    with httpx.Client(trust_env=False, timeout=60) as http:
        pull_checked(http, mirror.url, name, tag, image)


def _rows(browser: Browser) -> list[str]:
    """The repository names in the list's table, as shown."""
    return list(browser.js("[...document.querySelectorAll('table.repos tbody tr td:first-child')]"
                           ".map(td => td.innerText)"))


def test_pulled_and_pushed_repositories_are_listed_and_the_filter_narrows_as_you_type(
        mirror: MirrorServer, browser: Browser, labelled: Image, images: StandardImages, tiny: Image,
        tmp_path: Path) -> None:
    assert browser.open(f"{mirror.url}/ui/") == 200
    assert _rows(browser) == []
    _pull(mirror, "webui/labelled", "1", labelled)
    _pull(mirror, "library/small", "1", images.small)
    push_image(mirror.url, "team/app", "v1", tiny)

    assert browser.open(f"{mirror.url}/ui/") == 200
    assert _rows(browser) == ["library/small", "team/app", "webui/labelled"]
    rows = browser.text("table.repos tbody")
    assert "pushed" in rows and "cached from docker.io" in rows
    assert "3 repositories" in browser.text("#count")
    browser.screenshot(tmp_path / "repositories.png")

    browser.js("window.notReloaded = true")
    browser.type("#q", "labe")
    browser.wait_for("document.querySelectorAll('table.repos tbody tr').length === 1")
    assert _rows(browser) == ["webui/labelled"]
    assert browser.js("window.notReloaded") is True  # narrowed by the script, not by submitting the form
    assert browser.js("location.search") == "?q=labe"
    browser.type("#q", "x")  # "labex": nothing
    browser.wait_for("document.getElementById('count').innerText.startsWith('0 ')")
    assert _rows(browser) == []

    # The row links to the repository's page.
    browser.open(f"{mirror.url}/ui/?q=small")
    assert _rows(browser) == ["library/small"]
    browser.click("table.repos tbody a")
    browser.wait_for("location.pathname === '/ui/r/library/small'")
    browser.wait_for("document.querySelector('h1')?.innerText === 'library/small'")


def test_repository_page_shows_tags_digests_and_copyable_pull_commands(
        mirror: MirrorServer, browser: Browser, images: StandardImages) -> None:
    _pull(mirror, "library/small", "1", images.small)
    assert browser.open(f"{mirror.url}/ui/r/library/small") == 200
    table = browser.text("table.tags")
    assert images.small.digest.removeprefix("sha256:")[:12] in table
    assert "application/vnd.oci.image.manifest.v1+json" in table
    assert "linux/amd64" in table
    assert browser.js("document.querySelector('table.tags td.tag').innerText") == "1"
    copies = browser.js("[...document.querySelectorAll('button[data-copy]')].map(b => b.dataset.copy)")
    host = f"127.0.0.1:{mirror.port}"
    assert f"docker pull {host}/library/small:1" in copies
    assert f"podman pull {host}/library/small:1" in copies
    assert images.small.digest in copies
    assert f"docker pull {host}/library/small:1" in browser.text("ul.commands")

    browser.send("Browser.grantPermissions", {"permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
                                              "origin": mirror.url})
    digest_button = f"button[data-copy={json.dumps(images.small.digest)}]"
    browser.click(digest_button)
    browser.wait_for(f"document.querySelector('{digest_button}').innerText === 'Copied'")
    assert browser.js("navigator.clipboard.readText()") == images.small.digest


def test_image_pages_show_platforms_layers_config_and_hostile_text_as_text(
        mirror: MirrorServer, browser: Browser, labelled: Image, images: StandardImages, tmp_path: Path) -> None:
    _pull(mirror, "webui/labelled", "1", labelled)
    browser.open(f"{mirror.url}/ui/r/webui/labelled")
    browser.click("table.tags tbody a")  # the tag's digest
    browser.wait_for(f"location.pathname === '/ui/r/webui/labelled@{labelled.digest}'")
    browser.wait_for("document.getElementById('layers') !== null")
    rows = browser.js("[...document.querySelectorAll('table.layers tbody tr')].map(tr => tr.innerText)")
    assert rows == [f"{n}\t{layer.digest.removeprefix('sha256:')[:12]}\t"
                    f"application/vnd.oci.image.layer.v1.tar+gzip\t{human(layer.size)}"
                    for n, layer in enumerate(labelled.layers, 1)]
    labels = browser.text("table.labels")
    assert "org.opencontainers.image.title" in labels and "labelled" in labels
    assert HOSTILE in labels  # shown as the text it is
    page = browser.text("main")
    assert '["/bin/sh", "-c"]' in page and "8080/tcp" in page and HOSTILE_STEP in page
    assert browser.js("document.querySelectorAll('main img, main script').length") == 0
    browser.pump(1.0)
    assert browser.dialogs == []
    browser.screenshot(tmp_path / "image.png")

    # An index: its platforms, each linked to its manifest once that is pulled too.
    index, arm64 = images.multi.digest, images.multi.child("arm64")
    with httpx.Client(trust_env=False, timeout=30) as http:
        answer = http.get(f"{mirror.url}/v2/library/multi/manifests/1", headers={"accept": OCI_INDEX})
        assert answer.headers["docker-content-digest"] == index
        assert browser.open(f"{mirror.url}/ui/r/library/multi@{index}") == 200
        platforms = browser.text("main table")
        assert "linux/amd64" in platforms and "linux/arm64/v8" in platforms and "not cached" in platforms
        assert browser.js("document.querySelectorAll('main table a').length") == 0
        assert http.get(f"{mirror.url}/v2/library/multi/manifests/{arm64.digest}",
                        headers={"accept": arm64.media_type}).status_code == 200
    assert browser.open(f"{mirror.url}/ui/r/library/multi@{index}") == 200
    hrefs = browser.js("[...document.querySelectorAll('main table a')].map(a => a.getAttribute('href'))")
    assert hrefs == [f"/ui/r/library/multi@{arm64.digest}"]


def test_a_user_without_pull_rights_does_not_see_the_private_repository(
        mirror_factory: Callable[..., MirrorServer], browser: Browser, htpasswd: Path, tiny: Image) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=False))
    push(mirror, "team/secret", "1", tiny, basic("alice", ALICE_PASSWORD))

    assert browser.open(f"{mirror.url}/ui/") == 401
    assert "team/secret" not in browser.text()
    assert "Log in" in browser.text("main")
    assert browser.open(f"{mirror.url}/ui/r/team/secret") == 401
    assert "team/secret" not in browser.text()
    assert browser.open(f"{mirror.url}/ui/?q=secret&partial=1") == 401
    assert "team/secret" not in browser.text()
    browser.headers(basic("carol", "wrong password"))
    assert browser.open(f"{mirror.url}/ui/") == 401
    assert "team/secret" not in browser.text()

    browser.headers(basic("alice", ALICE_PASSWORD))
    assert browser.open(f"{mirror.url}/ui/") == 200
    assert _rows(browser) == ["team/secret"]
    assert "Signed in as alice" in browser.text("header")
    assert browser.open(f"{mirror.url}/ui/r/team/secret") == 200
    assert "1" == browser.js("document.querySelector('table.tags td.tag').innerText")


def test_index_pushed_here_lists_its_platforms_on_the_repository_page(
        mirror: MirrorServer, browser: Browser, images: StandardImages) -> None:
    push_index(mirror.url, "team/multi", "2", images.multi)
    assert browser.open(f"{mirror.url}/ui/r/team/multi") == 200
    row = browser.text("table.tags tbody")
    assert "linux/amd64, linux/arm64/v8" in row
    assert "application/vnd.oci.image.index.v1+json" in row


def test_keyboard_only_and_a_phone_sized_screen(mirror: MirrorServer, browser: Browser,
                                                images: StandardImages, tiny: Image) -> None:
    _pull(mirror, "library/small", "1", images.small)
    push_image(mirror.url, "team/a-rather-long-repository-name/with/several/components-of-its-own", "v1", tiny)
    browser.viewport(390, 844, mobile=True)
    for path in ("/ui/", "/ui/r/library/small", f"/ui/r/library/small@{images.small.digest}", "/ui/cache"):
        assert browser.open(f"{mirror.url}{path}") == 200
        assert browser.js("document.querySelector('meta[name=viewport]').content") == \
            "width=device-width, initial-scale=1"
        # Nothing wider than the screen but tables, which scroll in their own box.
        assert browser.js("document.documentElement.scrollWidth") <= 390, path

    browser.open(f"{mirror.url}/ui/")
    browser.press("Tab")
    assert browser.js("document.activeElement.innerText") == "Skip to content"
    browser.press("/")  # focuses the filter
    assert browser.js("document.activeElement.id") == "q"
    for key in "small":
        browser.press(key)
    browser.wait_for("document.querySelectorAll('table.repos tbody tr').length === 1")
    assert _rows(browser) == ["library/small"]
    browser.press("Tab")  # the form's button
    browser.press("Tab")  # the one repository's link
    assert browser.js("document.activeElement.innerText") == "library/small"
    browser.press("Enter")
    browser.wait_for("location.pathname === '/ui/r/library/small'")


def test_a_page_view_asks_for_nothing_that_is_not_there(mirror: MirrorServer, browser: Browser, tiny: Image) -> None:
    """Every request a page makes is answered (the browser's icon included: no 404 in the access
    log, no error in the console, for each page a user opens), and only of this host."""
    push_image(mirror.url, "team/app", "v1", tiny)
    for path in ("/ui/", "/ui/r/team/app", f"/ui/r/team/app@{tiny.digest}", "/ui/cache"):
        start = len(browser.events)
        assert browser.open(f"{mirror.url}{path}") == 200
        browser.pump(1.0)
        answers = {p["response"]["url"]: p["response"]["status"] for m, p in browser.events[start:]
                   if m == "Network.responseReceived"}
        assert answers and all(url.startswith(f"{mirror.url}/ui/") for url in answers), answers
        assert all(status == 200 for status in answers.values()), answers
        failed = [p for m, p in browser.events[start:] if m == "Network.loadingFailed"]
        assert failed == [], failed


def test_a_user_with_push_rights_deletes_a_tag_and_anonymous_visitors_see_no_actions(
        mirror_factory: Callable[..., MirrorServer], browser: Browser, htpasswd: Path, tiny: Image, skopeo: str,
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
        assert browser.open(f"{mirror.url}{path}") == 200
        assert browser.js("document.querySelectorAll('.action, form.confirm, a[href*=\\'/actions/\\']').length") == 0
        assert "Delete" not in browser.text("main")

    browser.headers(alice)
    assert browser.open(f"{mirror.url}/ui/r/team/app") == 200
    assert browser.js("document.querySelectorAll('.action, form.confirm, a[href*=\\'/actions/\\']').length") == 2
    browser.screenshot(tmp_path / "repository.png")
    assert browser.follow("a[aria-label='Delete the tag 1']") == 200
    assert browser.text("h1") == "Delete tag 1 of team/app?"
    browser.screenshot(tmp_path / "confirm.png")
    assert browser.follow("form.confirm button[type=submit]") == 200
    assert browser.text("h1") == "Done" and "Deleted tag 1 of team/app." in browser.text("main")
    assert browser.follow("main p a") == 200
    assert browser.js("[...document.querySelectorAll('table.tags td.tag')].map(td => td.innerText)") == ["2"]

    with httpx.Client(trust_env=False, timeout=60) as http:
        gone = http.get(f"{mirror.url}/v2/team/app/manifests/1",
                        headers={"accept": "application/vnd.oci.image.manifest.v1+json"})
        assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    failed = inspect("1")
    assert failed.returncode != 0 and "manifest unknown" in failed.stderr.lower()
    assert inspect("2").returncode == 0
