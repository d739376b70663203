"""Access rights with htpasswd logins: who may pull and push, with and without anonymous pulls, tokens,
password-guessing throttling, trusted proxies' forwarded addresses, and htpasswd changes applied live.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
import httpx
import pytest
import yaml

from mirror.api.htpasswd import Htpasswd
from tests.support.catalog import StandardImages
from tests.support.images import Image
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.security import (
    ALICE,
    ALICE_PASSWORD,
    assert_spec_error,
    auth_env,
    basic,
    bcrypt_entry,
    bearer,
    push,
    request,
)
from tests.support.waiting import wait_for


def test_without_anonymous_pull_every_request_needs_a_user(
    mirror_factory: Callable[..., MirrorServer], htpasswd: Path, images: StandardImages, tiny: Image,
) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=False))
    alice, carol = basic("alice", ALICE_PASSWORD), basic("carol", "carol-pw")
    assert "auth.anonymous_pull is true" not in mirror.log_tail(200)

    # Anonymous: a Basic challenge everywhere, the spec's error body.
    for method, path in [("GET", "/v2/"), ("GET", "/v2/library/small/manifests/1"), ("GET", "/v2/_catalog"),
                         ("POST", "/v2/mine/blobs/uploads/"), ("DELETE", "/v2/mine/manifests/1")]:
        answer = request(mirror, method, path)
        assert_spec_error(answer, 401, "UNAUTHORIZED")
        assert answer.headers["www-authenticate"] == 'Basic realm="Test Registry"'
        assert answer.headers["docker-distribution-api-version"] == "registry/2.0"
    head = request(mirror, "HEAD", "/v2/library/small/manifests/1")
    assert head.status_code == 401 and head.content == b"" and "basic" in head.headers["www-authenticate"].lower()

    # What docker login does: GET /v2/ with the password.
    assert request(mirror, "GET", "/v2/", headers=alice).status_code == 200
    assert request(mirror, "GET", "/v2/", headers=carol).status_code == 200
    for wrong in (basic("alice", "correct horsE"), basic("nobody", ALICE_PASSWORD), {"Authorization": "Basic !!"},
                  {"Authorization": "Bearer forged.token"}, {"Authorization": "Digest x"}):
        assert_spec_error(request(mirror, "GET", "/v2/", headers=wrong), 401, "UNAUTHORIZED")

    # Users pull; pushes need the right.
    pulled = request(mirror, "GET", "/v2/library/small/manifests/1", headers=carol)
    assert pulled.status_code == 200 and pulled.headers["docker-content-digest"] == images.small.digest
    # Now remembered, by tag and by digest: still only for users.
    again = request(mirror, "GET", f"/v2/library/small/manifests/{images.small.digest}", headers=carol)
    assert again.status_code == 200 and again.content == pulled.content
    for path in ("/v2/library/small/manifests/1", f"/v2/library/small/manifests/{images.small.digest}"):
        assert_spec_error(request(mirror, "GET", path), 401, "UNAUTHORIZED")
    assert_spec_error(request(mirror, "POST", "/v2/mine/blobs/uploads/", headers=carol), 403, "DENIED")
    assert_spec_error(request(mirror, "POST", "/v2/other/blobs/uploads/", headers=basic("bob", "bob-pw")),
                      403, "DENIED")
    push(mirror, "team/app", "1", tiny, basic("bob", "bob-pw"))
    push(mirror, "mine", "1", tiny, alice)
    assert request(mirror, "GET", "/v2/mine/manifests/1", headers=carol).headers["x-mirror-cache"] == "LOCAL"
    assert_spec_error(request(mirror, "DELETE", f"/v2/mine/manifests/{tiny.digest}", headers=carol), 403, "DENIED")
    assert request(mirror, "DELETE", f"/v2/mine/manifests/{tiny.digest}", headers=alice).status_code == 202

    # Health and metrics stay reachable for probes and Prometheus.
    assert request(mirror, "GET", "/healthz").status_code == 200
    assert request(mirror, "GET", "/metrics").status_code == 200


def test_with_anonymous_pull_clients_get_tokens_and_push_needs_a_user(
    mirror_factory: Callable[..., MirrorServer], htpasswd: Path, images: StandardImages, tiny: Image,
) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=True, realm="Mirror"))
    realm = f'Bearer realm="{mirror.url}/auth/token",service="Mirror"'
    # Said at start-up: registry:2 with htpasswd asks every request for a password, this does not.
    assert "auth.anonymous_pull is true: clients without a password may pull every repository" in mirror.log_tail(200)

    # The ping challenges every client without credentials, so Docker clients set up token auth.
    ping = request(mirror, "GET", "/v2/")
    assert_spec_error(ping, 401, "UNAUTHORIZED")
    assert ping.headers["www-authenticate"] == realm
    # Anonymous reads work, with or without a token.
    assert request(mirror, "GET", "/v2/library/small/manifests/1").status_code == 200
    anonymous = request(mirror, "GET", "/auth/token", params={"service": "Mirror",
                                                             "scope": "repository:library/small:pull"})
    assert anonymous.status_code == 200 and anonymous.headers["cache-control"] == "no-store"
    token = anonymous.json()["token"]
    assert anonymous.json()["access_token"] == token and anonymous.json()["expires_in"] >= 60
    assert request(mirror, "GET", "/v2/", headers=bearer(token)).status_code == 200
    assert request(mirror, "GET", "/v2/library/small/manifests/1", headers=bearer(token)).status_code == 200

    # An anonymous push is challenged for a token with push rights.
    for headers in ({}, bearer(token)):
        refused = request(mirror, "POST", "/v2/mine/blobs/uploads/", headers=headers)
        assert_spec_error(refused, 401, "UNAUTHORIZED")
        assert refused.headers["www-authenticate"].startswith(realm + ',scope="repository:mine:pull,push"')
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]

    # docker login: a token for the user's password, refused for a wrong one.
    assert_spec_error(request(mirror, "GET", "/auth/token", headers=basic("alice", "nope")), 401, "UNAUTHORIZED")
    user_token = request(mirror, "GET", "/auth/token", headers=basic("alice", ALICE_PASSWORD),
                         params={"account": "alice", "client_id": "docker", "offline_token": "true"}).json()["token"]
    push(mirror, "mine", "1", tiny, bearer(user_token))
    carol_token = request(mirror, "GET", "/auth/token", headers=basic("carol", "carol-pw")).json()["token"]
    assert_spec_error(request(mirror, "POST", "/v2/mine/blobs/uploads/", headers=bearer(carol_token)), 403, "DENIED")
    # Basic credentials are accepted directly too.
    push(mirror, "team/app", "1", tiny, basic("bob", "bob-pw"))

    # Tokens are signed and expire: anything else is refused.
    forged = user_token[:-2] + ("AA" if not user_token.endswith("AA") else "BB")
    for bad in (forged, "x", "-", user_token.split(".")[0], "a.b.c"):
        answer = request(mirror, "GET", "/v2/", headers=bearer(bad))
        assert_spec_error(answer, 401, "UNAUTHORIZED")
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    assert_spec_error(request(mirror, "POST", "/auth/token"), 405, "UNSUPPORTED")


@pytest.mark.parametrize("anonymous_pull", [False, True])
def test_a_user_limited_to_prefixes_may_not_write_where_no_valid_repository_is_named(
    mirror_factory: Callable[..., MirrorServer], htpasswd: Path, anonymous_pull: bool,
) -> None:
    """bob may push under ``team/`` only: a write naming no repository, or one that does not parse
    (even when it starts with ``team/``), is refused before the routes; alice, who may push
    anywhere, still gets the routes' own answers to the same requests."""
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=anonymous_pull))
    alice, bob = basic("alice", ALICE_PASSWORD), basic("bob", "bob-pw")
    for method, path, status, code in [
        ("POST", "/v2/", 404, "NAME_UNKNOWN"),  # no repository at all
        ("PUT", "/v2/team/app/nonsense", 404, "NAME_UNKNOWN"),  # no endpoint, so no repository
        ("DELETE", "/v2/team/app", 404, "NAME_UNKNOWN"),
        ("POST", "/v2/team/App/blobs/uploads/", 400, "NAME_INVALID"),  # names that do not parse
        ("PUT", "/v2/team//app/manifests/1", 400, "NAME_INVALID"),
        ("DELETE", "/v2/team/app-/blobs/sha256:" + "0" * 64, 400, "NAME_INVALID"),
    ]:
        assert_spec_error(request(mirror, method, path, headers=alice), status, code)
        refused = assert_spec_error(request(mirror, method, path, headers=bob), 403, "DENIED")
        assert refused["detail"]["action"] == ("delete" if method == "DELETE" and path != "/v2/" else "push")
    # Under the prefix, with a name that parses, bob reaches the routes.
    assert request(mirror, "POST", "/v2/team/app/blobs/uploads/", headers=bob).status_code == 202
    assert_spec_error(request(mirror, "POST", "/v2/other/blobs/uploads/", headers=bob), 403, "DENIED")


@pytest.mark.parametrize("anonymous_pull", [False, True])
def test_password_guessing_is_throttled_per_address(
    mirror_factory: Callable[..., MirrorServer], htpasswd: Path, anonymous_pull: bool,
) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=anonymous_pull))
    login = "/auth/token" if anonymous_pull else "/v2/"  # where docker login sends the password
    assert request(mirror, "GET", login, headers=basic("alice", ALICE_PASSWORD)).status_code == 200
    for attempt in range(10):
        assert_spec_error(request(mirror, "GET", login, headers=basic("carol", f"guess-{attempt}")),
                          401, "UNAUTHORIZED")
    # The eleventh guess, and even carol's right password, are not checked for a minute...
    for headers in (basic("carol", "guess-10"), basic("carol", "carol-pw")):
        refused = request(mirror, "GET", login, headers=headers)
        assert_spec_error(refused, 429, "TOOMANYREQUESTS")
        assert 50 <= int(refused.headers["retry-after"]) <= 60
    assert_spec_error(request(mirror, "GET", "/v2/library/small/manifests/1", headers=basic("bob", "guess")),
                      429, "TOOMANYREQUESTS")
    # The web UI says so on a page of its own (it was the API's JSON); the operator endpoints as the API.
    for path in ("/ui/", "/ui/login", "/ui/cache"):
        page = request(mirror, "GET", path, headers=basic("carol", "carol-pw"))
        assert page.status_code == 429 and page.headers["content-type"].startswith("text/html"), (path, page.text)
        assert "<h1>Too many failed logins</h1>" in page.text and 50 <= int(page.headers["retry-after"]) <= 60
        assert "www-authenticate" not in page.headers  # no prompt for another password meanwhile
    assert_spec_error(request(mirror, "GET", "/_mirror/", headers=basic("carol", "carol-pw")), 429, "TOOMANYREQUESTS")
    assert request(mirror, "GET", "/ui/", headers=basic("alice", ALICE_PASSWORD)).status_code == 200
    if anonymous_pull:  # the failed logins are told apart on dashboards by their route
        failed = value(scrape(f"{mirror.url}/metrics"), "mirror_http_requests_total", route="token", method="GET",
                       status="401")
        assert failed == 10, failed
    # ...while a password already accepted from this address keeps working,
    assert request(mirror, "GET", login, headers=basic("alice", ALICE_PASSWORD)).status_code == 200
    # also once the file was edited (a user added): what was accepted is bound to its user's entry.
    htpasswd.write_text(htpasswd.read_text().rstrip("\n") + f"\n{bcrypt_entry('dave', 'dave-pw')}\n")
    time.sleep(1.2)  # the file is looked at once a second at most, when a request comes
    assert request(mirror, "GET", login, headers=basic("alice", ALICE_PASSWORD)).status_code == 200
    wait_for(lambda: "users" in mirror.log_tail(400) and "reloaded" in mirror.log_tail(400), 5, "the reload's log line")


def test_concurrent_password_guesses_are_throttled_as_if_one_after_the_other(
    mirror_factory: Callable[..., MirrorServer], htpasswd: Path,
) -> None:
    """40 guesses at once from one address: only 10 are checked (more wait while those under way could
    reach the limit); before, every one passed the throttle before the first failure was counted.  And
    30 logins at once with the right password all succeed (one bcrypt round, and the others find it
    right), where a throttle counting checks under way as failed refused 20 of them."""
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=True))

    def at_once(server: MirrorServer, logins: list[dict[str, str]]) -> list[int]:
        async def send() -> list[int]:
            async with httpx.AsyncClient(trust_env=False, timeout=60, limits=httpx.Limits(max_connections=40)) as c:
                answers = await asyncio.gather(*(c.get(f"{server.url}/auth/token", headers=h) for h in logins))
            return [a.status_code for a in answers]

        return asyncio.run(send())

    statuses = at_once(mirror, [basic("carol", f"g{n}") for n in range(40)])
    assert sorted(statuses) == [401] * 10 + [429] * 30, statuses
    # dora's hash has cost 12 (a quarter of a second a check): the first checks are still under way
    # when the later ones come.
    entry = f"dora:{bcrypt.hashpw(b'dora-pw', bcrypt.gensalt(rounds=12)).decode()}"
    htpasswd.write_text(htpasswd.read_text().rstrip("\n") + f"\n{entry}\n")
    assert at_once(mirror_factory(env=auth_env(htpasswd, anonymous_pull=True)),
                   [basic("dora", "dora-pw")] * 30) == [200] * 30
    assert request(mirror, "GET", "/auth/token", headers=basic("alice", ALICE_PASSWORD)).status_code == 429
    # A right password (checked before the throttle, one at a time) is not counted as failed.
    other = mirror_factory(env=auth_env(htpasswd, anonymous_pull=True))
    for _ in range(12):
        assert request(other, "GET", "/auth/token", headers=basic("bob", "bob-pw")).status_code == 200
    for n in range(10):
        assert request(other, "GET", "/auth/token", headers=basic("carol", f"g{n}")).status_code == 401


def test_an_unknown_user_costs_what_a_known_one_does(tmp_path: Path) -> None:
    """The users' hashes are of cost 5 (``htpasswd -B``'s): an unknown user is checked against a hash
    of that cost too, not of cost 10, which told users apart by time (about 2 ms against 50 ms)."""
    path = tmp_path / "htpasswd"
    path.write_text("\n".join([bcrypt_entry("bob", "bob-pw"), bcrypt_entry("carol", "carol-pw"), ""]))
    users = Htpasswd(path)

    def took(user: str) -> float:
        started = time.perf_counter()
        for n in range(10):
            assert not users.verify(user, f"wrong-{n}")
        return time.perf_counter() - started

    took("bob"), took("nobody")  # warmed up
    known, unknown = min(took("bob") for _ in range(3)), min(took("nobody") for _ in range(3))
    assert unknown < 3 * known, (known, unknown)


@pytest.mark.parametrize("trusted", [True, False])
def test_forwarded_headers_count_only_from_trusted_proxies(
    mirror_factory: Callable[..., MirrorServer], htpasswd: Path, trusted: bool,
) -> None:
    proxies = "127.0.0.1,::1" if trusted else "10.0.0.0/8"
    mirror = mirror_factory(env={**auth_env(htpasswd, anonymous_pull=True, realm="Mirror"),
                                 "MIRROR_HTTP_TRUSTED_PROXIES": proxies})
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9", "X-Request-Id": "proxied-1"}
    ping = request(mirror, "GET", "/v2/", headers=forwarded)
    assert_spec_error(ping, 401, "UNAUTHORIZED")
    scheme, client = ("https", "203.0.113.9") if trusted else ("http", "127.0.0.1")
    assert ping.headers["www-authenticate"].startswith(f'Bearer realm="{scheme}://127.0.0.1:{mirror.port}/auth/token"')
    wait_for(lambda: any(e["request_id"] == "proxied-1" for e in mirror.access_entries()), 5, "the access log line")
    logged = [e for e in mirror.access_entries() if e["request_id"] == "proxied-1"]
    assert logged[0]["client"] == client


def test_htpasswd_changes_apply_without_a_restart(
    mirror_factory: Callable[..., MirrorServer], htpasswd: Path,
) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=False), workers=2)
    assert request(mirror, "GET", "/v2/", headers=basic("bob", "bob-pw")).status_code == 200
    token = request(mirror, "GET", "/auth/token", headers=basic("carol", "carol-pw")).json()["token"]
    assert request(mirror, "GET", "/v2/", headers=bearer(token)).status_code == 200
    # bob's password changes, carol is removed; a broken file is ignored (with a log line).
    htpasswd.write_text(f"{ALICE}\n{bcrypt_entry('bob', 'new-pw')}\n")
    wait_for(lambda: request(mirror, "GET", "/v2/", headers=basic("bob", "bob-pw")).status_code == 401, 10,
             "the htpasswd file to be reloaded", interval=0.2)
    time.sleep(1.2)  # each worker looks at the file at most once a second
    # Both workers must have read this version before the next replaces it: a worker only looks at
    # the file when a request comes, and the X-Request-Id prefix tells the workers apart.
    answered_by: set[str] = set()

    def read_by_both_workers() -> bool:
        answer = request(mirror, "GET", "/v2/", headers=basic("bob", "new-pw"))
        assert answer.status_code == 200
        assert request(mirror, "GET", "/v2/", headers=bearer(token)).status_code == 401
        answered_by.add(answer.headers["x-request-id"][:16])
        return len(answered_by) == 2

    wait_for(read_by_both_workers, 20, "both workers to answer with the new file", interval=0.05)
    htpasswd.write_text(f"{ALICE}\nbroken line\n")

    def refused_while_serving() -> bool:  # a worker looks at the file when a request comes
        assert request(mirror, "GET", "/v2/", headers=basic("bob", "new-pw")).status_code == 200
        return "keeping the 2 users read before" in mirror.log_tail(200)

    wait_for(refused_while_serving, 10, "the broken file to be refused", interval=0.2)
    for _ in range(4):
        assert request(mirror, "GET", "/v2/", headers=basic("bob", "new-pw")).status_code == 200


def test_rights_go_by_the_repository_a_ns_query_reaches(
    mirror_factory: Callable[..., MirrorServer], upstream_factory: Callable[[], UpstreamRegistry],
    htpasswd: Path, tiny: Image, tmp_path: Path,
) -> None:
    """``team/cached?ns=ghcr.io`` (containerd's spelling) is ghcr.io's ``team/cached``, as
    ``/v2/ghcr.io/team/cached`` is: bob, whose right is ``team``, may not delete it by either
    spelling, and carol, whose right is ``ghcr.io/team``, may by both.  Before, rights ignored
    ``?ns=``: bob deleted other registries' cached images under his prefix, and carol could not."""
    second = upstream_factory()
    second.push_image("team/cached", "1", tiny)
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": [{"registry": "docker.io", "url": "http://127.0.0.1:9"},
                                                    {"registry": "ghcr.io", "url": second.url}]}))
    env = {**auth_env(htpasswd, anonymous_pull=True), "MIRROR_AUTH_PUSH_USERS": "alice,bob:team,carol:ghcr.io/team"}
    mirror = mirror_factory(config=config, env=env)
    by_ns, by_prefix = "/v2/team/cached/manifests/{}?ns=ghcr.io", "/v2/ghcr.io/team/cached/manifests/{}"
    for path in (by_ns, by_prefix):
        assert request(mirror, "GET", path.format("1")).status_code == 200
        refused = request(mirror, "DELETE", path.format(tiny.digest), headers=basic("bob", "bob-pw"))
        assert_spec_error(refused, 403, "DENIED")
    assert request(mirror, "DELETE", by_ns.format(tiny.digest), headers=basic("carol", "carol-pw")).status_code == 202
    assert request(mirror, "GET", by_ns.format("1")).headers["x-mirror-cache"] == "MISS"  # it was deleted
    assert request(mirror, "DELETE", by_prefix.format(tiny.digest),
                   headers=basic("carol", "carol-pw")).status_code == 202
    # An anonymous request's challenge names the repository it reaches.
    challenge = request(mirror, "DELETE", by_ns.format(tiny.digest)).headers["www-authenticate"]
    assert 'scope="repository:ghcr.io/team/cached:delete"' in challenge, challenge


def test_rights_go_by_the_name_without_the_default_registrys_prefix(
    mirror_factory: Callable[..., MirrorServer], htpasswd: Path, tiny: Image,
) -> None:
    """``docker.io/team/app`` is ``team/app`` (one repository, ``registry/namespaces.py``), and so are its
    rights: bob (``team/``) pushes to it by either name; carol, given ``docker.io`` as her prefix, may
    not write ``team/app`` through that spelling, nor anything else of the default registry's."""
    env = {**auth_env(htpasswd, anonymous_pull=True), "MIRROR_AUTH_PUSH_USERS": "alice,bob:team,carol:docker.io"}
    mirror = mirror_factory(env=env)
    push(mirror, "docker.io/team/app", "1", tiny, basic("bob", "bob-pw"))
    got = request(mirror, "GET", "/v2/team/app/manifests/1", headers=basic("bob", "bob-pw"))
    assert got.status_code == 200 and got.headers["docker-content-digest"] == tiny.digest
    for path in ("/v2/docker.io/team/app/blobs/uploads/", "/v2/index.docker.io/team/app/blobs/uploads/",
                 "/v2/docker.io/carol/blobs/uploads/"):
        refused = assert_spec_error(request(mirror, "POST", path, headers=basic("carol", "carol-pw")), 403, "DENIED")
        assert refused["detail"]["action"] == "push"
    assert_spec_error(request(mirror, "POST", "/v2/docker.io/other/blobs/uploads/", headers=basic("bob", "bob-pw")),
                      403, "DENIED")
