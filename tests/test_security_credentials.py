"""Upstream credentials: read from a file, used for Docker Hub's token flow, and never leaked (logs,
/metrics, answers, workers' environments, a host the registry redirects to).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.support.asgi import ThreadedServer
from tests.support.catalog import StandardImages
from tests.support.hub import HubEmulator
from tests.support.images import Image
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.security import (
    basic,
    bcrypt_entry,
    request,
)
from tests.support.waiting import wait_for


def secret_strings(user: str, password: str) -> list[str]:
    """The forms a credential could leak in: itself, and in Basic headers."""
    pair = f"{user}:{password}".encode()
    return [password, base64.b64encode(pair).decode(), base64.urlsafe_b64encode(pair).decode()]


def process_environments(leader: int) -> list[bytes]:
    """The environment of *leader* and of every process of its group (workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            pgrp = int(stat.rpartition(")")[2].split()[2])
            if pgrp == leader or int(entry.name) == leader:
                found.append((entry / "environ").read_bytes())
        except (OSError, ValueError, IndexError):
            continue
    return found


def pull_through(mirror: MirrorServer, image: Image, name: str) -> None:
    manifest = request(mirror, "GET", f"/v2/{name}/manifests/1")
    assert manifest.status_code == 200, manifest.text
    assert manifest.headers["docker-content-digest"] == image.digest
    for digest in image.blobs:
        blob = request(mirror, "GET", f"/v2/{name}/blobs/{digest}")
        assert blob.status_code == 200 and blob.headers["docker-content-digest"] == digest


def test_upstream_credentials_from_a_file_are_used_and_never_leak(
    hub_factory: Callable[..., HubEmulator], mirror_factory: Callable[..., MirrorServer],
    images: StandardImages, tmp_path: Path,
) -> None:
    user, password = "mirror-bot", "dckr_pat_" + secrets.token_urlsafe(24)
    hub = hub_factory(username=user, password=password)
    secret = tmp_path / "hub-token"
    secret.write_text(password + "\n")
    mirror = mirror_factory(hub.url, workers=2, env={
        "MIRROR_UPSTREAM_USERNAME": user, "MIRROR_UPSTREAM_PASSWORD_FILE": str(secret), "MIRROR_LOG_LEVEL": "debug",
    })
    pull_through(mirror, images.small, "library/small")
    index = request(mirror, "GET", "/v2/library/multi/manifests/1")
    assert index.headers["docker-content-digest"] == images.multi.digest
    granted = hub.token_requests()
    assert granted and all(t.user == user and t.granted for t in granted), granted
    assert not hub.cdn_saw_authorization, "credentials went along a redirect to the CDN"

    # A mirror with a wrong token: pulls fail, the log says why, without the secret.
    wrong = tmp_path / "wrong-token"
    wrong.write_text("dckr_pat_wrong_" + secrets.token_urlsafe(8))
    refused = mirror_factory(hub.url, env={"MIRROR_UPSTREAM_USERNAME": user,
                                           "MIRROR_UPSTREAM_PASSWORD_FILE": str(wrong)})
    answer = request(refused, "GET", "/v2/library/dlist/manifests/1")
    assert answer.status_code >= 400 and answer.json()["errors"][0]["code"]
    wait_for(lambda: "rejected the configured upstream credentials" in refused.log_tail(200),
             what="the log line on the refused credentials")

    metrics = request(mirror, "GET", "/metrics").text
    logs = mirror.log_path.read_text() + refused.log_path.read_text()
    for leaked in secret_strings(user, password) + [wrong.read_text()]:
        assert leaked not in logs, "a credential was logged"
        assert leaked not in metrics, "a credential is in /metrics"
        assert leaked not in answer.text
    for environment in process_environments(mirror.pid or -1):
        assert password.encode() not in environment, "the secret file's content is in a worker's environment"


class CredentialTrap:
    """A registry that wants Basic credentials and redirects to another host, which challenges the
    client to fetch a token from it: a client that answers sends the credentials to the wrong host."""

    def __init__(self, upstream_url: str, user: str, password: str) -> None:
        self.expected = basic(user, password)["Authorization"]
        self.upstream_url = upstream_url
        self.seen_by_other_host: list[tuple[str, str | None]] = []
        self.registry = ThreadedServer(Starlette(routes=[Route("/{path:path}", self._registry)]), name="trap")
        self.other = ThreadedServer(Starlette(routes=[Route("/{path:path}", self._other)]), name="trap-other")

    async def _registry(self, request: Request) -> Response:
        if request.headers.get("authorization") != self.expected:
            return JSONResponse({"errors": [{"code": "UNAUTHORIZED", "message": "x"}]}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="trap"'})
        if request.url.path == "/v2/":
            return JSONResponse({})
        return RedirectResponse(f"{self.other.url}{request.url.path}", status_code=307)

    async def _other(self, request: Request) -> Response:
        self.seen_by_other_host.append((request.url.path, request.headers.get("authorization")))
        if request.url.path == "/token":
            return JSONResponse({"token": "t"})
        return JSONResponse({"errors": [{"code": "UNAUTHORIZED", "message": "x"}]}, status_code=401, headers={
            "WWW-Authenticate": f'Bearer realm="{self.other.url}/token",service="trap"'})


def test_upstream_credentials_are_not_sent_to_a_host_the_registry_redirects_to(
    mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    trap = CredentialTrap(upstream.url, "bot", "dckr_pat_trap")
    with trap.registry, trap.other:
        mirror = mirror_factory(trap.registry.url, env={"MIRROR_UPSTREAM_USERNAME": "bot",
                                                        "MIRROR_UPSTREAM_PASSWORD": "dckr_pat_trap"})
        answer = request(mirror, "GET", "/v2/library/small/manifests/1")
        assert answer.status_code >= 400 and answer.json()["errors"][0]["code"]
        assert trap.seen_by_other_host, "the mirror did not follow the redirect"
        assert all(path != "/token" for path, _ in trap.seen_by_other_host), trap.seen_by_other_host
        assert all(auth is None for _, auth in trap.seen_by_other_host), trap.seen_by_other_host


class BasicAuthRegistry(UpstreamRegistry):
    """Distribution's registry with ``auth: htpasswd`` (Basic auth) once :attr:`users` is set."""

    users: Path | None = None

    def config(self) -> dict[str, object]:
        config = super().config()
        if self.users is not None:
            config["auth"] = {"htpasswd": {"realm": "basic-upstream", "path": str(self.users)}}
        return config


def test_an_upstream_that_refuses_the_basic_credentials_is_said_so_in_the_log_once(
    mirror_factory: Callable[..., MirrorServer], images: StandardImages, tmp_path: Path,
) -> None:
    """A registry behind Basic auth (distribution's htpasswd) that refuses the configured password:
    the log says once that it rejected the configured credentials, and pulls fail with the spec's
    JSON error, never ``404 NAME_UNKNOWN`` (it said nothing, and clients heard that the repository
    did not exist); the right password pulls."""
    registry = BasicAuthRegistry(tmp_path / "basic")
    registry.start()
    try:
        registry.push_image("library/small", "1", images.small)
        registry.stop()
        registry.users = tmp_path / "users"
        registry.users.write_text(bcrypt_entry("puller", "right-pw") + "\n")
        registry.start()
        right = mirror_factory(registry.url, env={"MIRROR_UPSTREAM_USERNAME": "puller",
                                                  "MIRROR_UPSTREAM_PASSWORD": "right-pw"})
        assert request(right, "GET", "/v2/library/small/manifests/1").status_code == 200
        wrong = mirror_factory(registry.url, env={"MIRROR_UPSTREAM_USERNAME": "puller",
                                                  "MIRROR_UPSTREAM_PASSWORD": "wrong-pw"})
        for _ in range(3):
            answer = request(wrong, "GET", "/v2/library/small/manifests/1")
            assert answer.status_code >= 500 and answer.json()["errors"][0]["code"] == "UNAVAILABLE", answer.text
        said = (f"the registry 127.0.0.1:{registry.port} rejected the configured upstream credentials "
                "(401 to Basic auth)")
        wait_for(lambda: said in wrong.log_tail(200), what="the log line on the refused credentials")
        assert wrong.log_tail(400).count(said) == 1
        assert "check the credentials of the upstream docker.io (upstream.username" in wrong.log_tail(400)
        assert "wrong-pw" not in wrong.log_path.read_text() + answer.text
    finally:
        registry.stop()
