"""The web UI's actions over plain HTTP: a confirmation form, then a POST carrying its token.
A POST without the token, with a wrong or another user's token, or from a user without write
rights changes nothing; pins show in the index and on the pages.  The real mirror under uvicorn,
in front of the session's real upstream registry."""

from __future__ import annotations

import contextlib
import html
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from mirror.metadata.diskcache import DiskcacheMetadata
from mirror.storage.layout import Layout
from tests.support.catalog import StandardImages
from tests.support.client import pull_checked, push_image, put_manifest
from tests.support.images import Image
from tests.support.mirror import MirrorServer
from tests.support.security import ALICE_PASSWORD, auth_env, basic, push

ALICE = basic("alice", ALICE_PASSWORD)
BOB = basic("bob", "bob-pw")
CAROL = basic("carol", "carol-pw")


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=60) as client:
        yield client


@pytest.fixture
def guarded(mirror_factory: Callable[..., MirrorServer], htpasswd: Path) -> MirrorServer:
    """Users (alice writes anywhere, bob under ``team/``, carol nowhere); anonymous pulls allowed."""
    return mirror_factory(env=auth_env(htpasswd, anonymous_pull=True))


def form(page: httpx.Response) -> dict[str, str]:
    """The hidden fields of the confirmation form on *page*."""
    assert page.status_code == 200, page.text
    found = re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page.text)
    return {n: html.unescape(v) for n, v in found}


def manifest_status(http: httpx.Client, mirror: MirrorServer, name: str, reference: str) -> int:
    return http.get(f"{mirror.url}/v2/{name}/manifests/{reference}",
                    headers={"accept": "application/vnd.oci.image.manifest.v1+json"}).status_code


def test_deleting_a_tag_needs_the_forms_token_and_write_rights(guarded: MirrorServer, http: httpx.Client,
                                                               tiny: Image) -> None:
    push(guarded, "team/app", "1", tiny, ALICE)
    push(guarded, "team/app", "2", tiny, ALICE)
    actions = f"{guarded.url}/ui/actions/delete"

    # Who may not write sees no button, and the form is refused to them.
    for headers, told in (({}, "An anonymous visitor may not change anything here"),
                          (CAROL, "may not change team/app")):
        page = http.get(f"{guarded.url}/ui/r/team/app", headers=headers)
        assert page.status_code == 200 and "/ui/actions/" not in page.text
        refused = http.get(actions, params={"name": "team/app", "reference": "1"}, headers=headers)
        assert refused.status_code == 403 and told in refused.text
        assert ('<a href="/ui/login">Log in</a>' in refused.text) == (headers == {})  # what to do next
    page = http.get(f"{guarded.url}/ui/r/team/app", headers=BOB)
    assert 'href="/ui/actions/delete?name=team%2Fapp&amp;reference=1"' in page.text

    fields = form(http.get(actions, params={"name": "team/app", "reference": "1"}, headers=BOB))
    assert fields["name"] == "team/app" and fields["reference"] == "1" and fields["token"]
    carols = form(http.get(actions, params={"name": "team/app", "reference": "1"}, headers=ALICE))

    refusals = [
        ({"name": "team/app", "reference": "1"}, BOB),  # no token
        ({**fields, "token": fields["token"][:-1] + ("0" if fields["token"][-1] != "0" else "1")}, BOB),
        ({**fields, "token": "1.abc"}, BOB),
        ({**fields, "token": carols["token"]}, BOB),  # another user's
        (fields, CAROL),  # a user without the right, with a token that is not theirs
        (fields, {}),
    ]
    for data, headers in refusals:
        answer = http.post(actions, data=data, headers=headers)
        assert answer.status_code == 403, (data, headers, answer.text)
        assert "text/html" in answer.headers["content-type"]
        assert manifest_status(http, guarded, "team/app", "1") == 200
    expired = http.post(actions, data={"name": "team/app", "reference": "1"}, headers=BOB).text
    assert "nothing was changed" in expired
    assert '<a href="/ui/actions/delete?name=team%2Fapp&amp;reference=1">Ask again</a>' in expired
    assert '<a href="/ui/r/team/app">Back to team/app</a>' in expired

    done = http.post(actions, data=fields, headers=BOB)
    assert done.status_code == 200 and "Deleted tag 1 of team/app." in done.text
    assert "<title>Deleted tag 1 of team/app · mirror</title>" in done.text
    assert manifest_status(http, guarded, "team/app", "1") == 404
    assert manifest_status(http, guarded, "team/app", "2") == 200
    again = http.post(actions, data=fields, headers=BOB)
    assert again.status_code == 404 and "Not done" in again.text

    # bob may write under team/ only; alice anywhere.
    push(guarded, "other/app", "1", tiny, ALICE)
    assert http.get(actions, params={"name": "other/app", "reference": "1"}, headers=BOB).status_code == 403
    deleted = http.post(actions, data={**fields, "name": "other/app"}, headers=BOB)
    assert deleted.status_code == 403 and manifest_status(http, guarded, "other/app", "1") == 200


def test_an_anonymous_forms_body_is_not_read_and_a_refused_preloads_not_for_long(guarded: MirrorServer) -> None:
    """A client that announces a large body and trickles it: an anonymous form post is refused at once,
    before its body, and a refused preload's body is read (for a proxy's sake) for 5 s at most.  Before,
    each held its connection for as long as the client kept sending a byte now and then."""

    def answered_after(path: str, content_type: str) -> float:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=15) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: 1000000\r\n\r\n".encode())
            sock.setblocking(False)
            answer = b""
            while time.monotonic() - started < 15 and b"\r\n\r\n" not in answer:
                with contextlib.suppress(BlockingIOError):
                    sock.sendall(b"a")  # a byte every 0.5 s: never idle long enough to time out
                ready, _, _ = select.select([sock], [], [], 0.5)
                if ready:
                    answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
        return time.monotonic() - started

    assert answered_after("/ui/actions/delete", "application/x-www-form-urlencoded") < 2
    assert answered_after("/_mirror/preload", "application/x-tar") < 8


def test_deleting_a_manifest_by_digest_takes_its_tags(guarded: MirrorServer, http: httpx.Client,
                                                      tiny: Image) -> None:
    push(guarded, "team/app", "1", tiny, ALICE)
    push(guarded, "team/app", "also", tiny, ALICE)
    image = http.get(f"{guarded.url}/ui/r/team/app@{tiny.digest}", headers=ALICE)
    assert "Delete this manifest" in image.text and ">Pin<" not in image.text
    confirm = http.get(f"{guarded.url}/ui/actions/delete", params={"name": "team/app", "reference": tiny.digest},
                       headers=ALICE)
    assert "The manifest goes, and the 2 tags pointing to it: 1, also." in confirm.text  # named, counted
    fields = form(confirm)
    done = http.post(f"{guarded.url}/ui/actions/delete", data=fields, headers=ALICE)
    assert done.status_code == 200 and f"Deleted manifest {tiny.digest} of team/app." in done.text
    for reference in ("1", "also", tiny.digest):
        assert manifest_status(http, guarded, "team/app", reference) == 404


def test_a_manifest_with_many_tags_says_how_many_go_and_one_with_none_says_so(guarded: MirrorServer,
                                                                             http: httpx.Client, tiny: Image) -> None:
    push(guarded, "team/app", "t00", tiny, ALICE)
    with httpx.Client(trust_env=False, timeout=60, headers=ALICE) as alice:
        for n in range(1, 12):
            put_manifest(alice, guarded.url, "team/app", f"t{n:02d}", tiny.media_type, tiny.manifest)

    def goes() -> str:
        page = http.get(f"{guarded.url}/ui/actions/delete", params={"name": "team/app", "reference": tiny.digest},
                        headers=ALICE)
        assert page.status_code == 200, page.text
        found = re.search(r'<p id="goes">([^<]*)</p>', page.text)
        assert found, page.text
        return html.unescape(found.group(1))

    assert goes().startswith("The manifest goes, and the 12 tags pointing to it. Clients")  # too many to name
    for n in range(12):
        assert http.delete(f"{guarded.url}/v2/team/app/manifests/t{n:02d}", headers=ALICE).status_code == 202
    assert goes().startswith("The manifest goes; no tag points to it.")


def test_the_last_tag_deleted_the_page_offers_no_pull_of_it(guarded: MirrorServer, http: httpx.Client,
                                                            tiny: Image) -> None:
    """The pull commands name ``latest`` when there is one, else the first tag; with none left, no tag."""
    for tag in ("1", "latest"):
        push(guarded, "team/app", tag, tiny, ALICE)
    assert f"docker pull 127.0.0.1:{guarded.port}/team/app:latest" in http.get(f"{guarded.url}/ui/r/team/app").text
    for tag in ("latest", "1"):
        fields = form(http.get(f"{guarded.url}/ui/actions/delete", params={"name": "team/app", "reference": tag},
                               headers=ALICE))
        done = http.post(f"{guarded.url}/ui/actions/delete", data=fields, headers=ALICE)
        assert done.status_code == 200, done.text
        page = http.get(f"{guarded.url}/ui/r/team/app").text
        assert f"team/app:{tag}" not in page
    assert "No tag to pull: pull an image by its digest." in page and "docker pull" not in page
    assert "No tags." in page and "pulled by digest only" not in page  # a pushed repository's
    # The manifest the last tag named is listed nowhere now: the answer says so and leads to its page.
    assert f"Deleted tag 1 of team/app: its manifest {tiny.digest} is left without a tag." in done.text
    assert f'<a href="/ui/r/team/app@{tiny.digest}">' in done.text
    assert "Delete this manifest" in http.get(f"{guarded.url}/ui/r/team/app@{tiny.digest}", headers=ALICE).text


def test_with_deletes_disabled_writers_get_no_delete_button_nor_form(
        mirror_factory: Callable[..., MirrorServer], htpasswd: Path, http: httpx.Client, tiny: Image) -> None:
    mirror = mirror_factory(env={**auth_env(htpasswd, anonymous_pull=True), "MIRROR_DELETE_ENABLED": "false"})
    push(mirror, "team/app", "1", tiny, ALICE)
    for page in ("/ui/r/team/app", f"/ui/r/team/app@{tiny.digest}"):
        shown = http.get(f"{mirror.url}{page}", headers=ALICE)
        assert shown.status_code == 200 and "/ui/actions/delete" not in shown.text, page
    confirm = http.get(f"{mirror.url}/ui/actions/delete", params={"name": "team/app", "reference": "1"},
                       headers=ALICE)
    assert confirm.status_code == 403 and "Deletes are disabled on this registry" in confirm.text
    assert 'name="token"' not in confirm.text and manifest_status(http, mirror, "team/app", "1") == 200


def test_pin_and_unpin_a_cached_image(guarded: MirrorServer, http: httpx.Client, images: StandardImages) -> None:
    pull_checked(http, guarded.url, "library/small", "1", images.small)
    digest = images.small.digest
    image_page = f"{guarded.url}/ui/r/library/small@{digest}"
    assert "/ui/actions/" not in http.get(image_page).text  # anonymous
    page = http.get(image_page, headers=ALICE)
    assert f'href="/ui/actions/pin?name=library%2Fsmall&amp;reference={digest.replace(":", "%3A")}"' in page.text

    def pins() -> str:
        """The index's pins (read from its files, as another process would) and the list page."""
        metadata = DiskcacheMetadata(Layout(guarded.data_dir).index)
        try:
            pinned = metadata.pins()
        finally:
            metadata.close()
        listed = http.get(f"{guarded.url}/ui/", headers=ALICE).text
        assert (pinned == [("docker.io/library/small", digest)]) == ('<span class="badge pinned">' in listed)
        return f"{pinned} {listed}"

    assert "pinned" not in pins()
    fields = form(http.get(f"{guarded.url}/ui/actions/pin", params={"name": "library/small", "reference": digest},
                           headers=ALICE))
    assert http.post(f"{guarded.url}/ui/actions/pin", data={**fields, "token": ""}, headers=ALICE).status_code == 403
    assert "pinned" not in pins()
    done = http.post(f"{guarded.url}/ui/actions/pin", data=fields, headers=ALICE)
    assert done.status_code == 200 and f"Pinned library/small@{digest}." in done.text
    assert '<span class="badge pinned">pinned</span>' in pins()
    assert "Unpin" in http.get(image_page, headers=ALICE).text

    fields = form(http.get(f"{guarded.url}/ui/actions/unpin", params={"name": "library/small", "reference": digest},
                           headers=ALICE))
    done = http.post(f"{guarded.url}/ui/actions/unpin", data=fields, headers=ALICE)
    assert done.status_code == 200 and f"Unpinned library/small@{digest}." in done.text
    assert "pinned" not in pins()


def test_prefetch_pulls_every_platform_of_an_index_into_the_cache(guarded: MirrorServer, http: httpx.Client,
                                                                   images: StandardImages) -> None:
    index = images.multi
    home = http.get(f"{guarded.url}/ui/", headers=ALICE)
    assert 'action="/ui/actions/prefetch"' in home.text
    for headers in ({}, CAROL):
        assert 'action="/ui/actions/prefetch"' not in http.get(f"{guarded.url}/ui/", headers=headers).text
    actions = f"{guarded.url}/ui/actions/prefetch"
    # bob writes under team/ only
    assert http.get(actions, params={"name": "library/multi", "reference": "1"}, headers=BOB).status_code == 403
    fields = form(http.get(actions, params={"name": "library/multi", "reference": "1"}, headers=ALICE))
    assert http.post(actions, data={**fields, "token": "0.0"}, headers=ALICE).status_code == 403
    assert http.get(f"{guarded.url}/ui/r/library/multi").status_code == 404  # nothing fetched

    done = http.post(actions, data=fields, headers=ALICE)
    assert done.status_code == 200, done.text
    blobs = {d for child in index.children for d in [child.config_digest, *(x.digest for x in child.layers)]}
    assert (f"Fetched library/multi:1 into the cache: {index.digest}, 3 manifest(s), {len(blobs)} blob(s) "
            f"fetched, 0 already stored.") in html.unescape(done.text)
    # Served from the store from now on: every platform's manifest and blobs.
    for child in index.children:
        answer = http.get(f"{guarded.url}/v2/library/multi/manifests/{child.digest}",
                          headers={"accept": child.media_type})
        assert answer.status_code == 200 and answer.headers["x-mirror-cache"] == "HIT"
        for digest in [child.config_digest, *(layer.digest for layer in child.layers)]:
            blob = http.get(f"{guarded.url}/v2/library/multi/blobs/{digest}")
            assert blob.status_code == 200 and blob.headers["x-mirror-cache"] == "HIT", digest

    again = http.post(actions, data=fields, headers=ALICE)
    assert f"0 blob(s) fetched, {len(blobs)} already stored." in again.text
    unknown = http.post(actions, data={**fields, "reference": "nope"}, headers=ALICE)
    assert unknown.status_code == 404 and "Not done" in unknown.text
    assert '<a href="/ui/">All repositories</a>' in unknown.text


def test_without_users_the_ui_only_reads(mirror: MirrorServer, http: httpx.Client, tiny: Image) -> None:
    """Without ``auth.htpasswd.path`` anyone may push through ``/v2/``, but a browser's forms are
    not a client's deliberate request: no buttons, and the actions are refused."""
    push_image(mirror.url, "team/app", "1", tiny, client=http)
    assert "/ui/actions/" not in http.get(f"{mirror.url}/ui/r/team/app").text
    assert "/ui/actions/" not in http.get(f"{mirror.url}/ui/").text
    confirm = http.get(f"{mirror.url}/ui/actions/delete", params={"name": "team/app", "reference": "1"})
    assert confirm.status_code == 403
    done = http.post(f"{mirror.url}/ui/actions/delete", data={"name": "team/app", "reference": "1", "token": "1.a"})
    assert done.status_code == 403 and manifest_status(http, mirror, "team/app", "1") == 200


def test_a_pin_made_in_the_web_ui_outlives_a_delete_of_the_images_last_tag(
    mirror_factory: Callable[..., MirrorServer], htpasswd: Path, http: httpx.Client, images: StandardImages
) -> None:
    """Only a preload's pin under a tag goes with the tag; a user's pin is kept until it is unpinned."""
    server = mirror_factory(env={**auth_env(htpasswd, anonymous_pull=True), "MIRROR_DELETE_ENABLED": "true"})
    pull_checked(http, server.url, "library/small", "1", images.small)
    digest = images.small.digest
    fields = form(http.get(f"{server.url}/ui/actions/pin", params={"name": "library/small", "reference": digest},
                           headers=ALICE))
    assert http.post(f"{server.url}/ui/actions/pin", data=fields, headers=ALICE).status_code == 200
    assert http.delete(f"{server.url}/v2/library/small/manifests/1", headers=ALICE).status_code == 202
    metadata = DiskcacheMetadata(Layout(server.data_dir).index)
    try:
        assert metadata.pins() == [("docker.io/library/small", digest)]
    finally:
        metadata.close()
