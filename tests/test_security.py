"""Security: TLS, htpasswd logins and access rights, upstream credentials, hostile input.

Fast tests talk HTTP to real mirror processes (httpx, raw sockets); the ``slow`` ones drive a real
dockerd that trusts a CA made here with openssl (``docker login``, push, pull, logout).  The
property-based tests (hypothesis) send generated names, references, digests, ranges and query
strings to every route of one mirror, and check that it never answers 500, always answers errors
in the spec's format, and never creates, reads or deletes a file outside its data directory.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from mirror.config import ConfigError, load_config, to_environ
from tests.support.asgi import ThreadedServer
from tests.support.catalog import StandardImages
from tests.support.client import push_image
from tests.support.hub import HubEmulator
from tests.support.images import MANIFEST_MEDIA_TYPES, Image, build_image, busybox_layer, sha256_digest as sha256
from tests.support.mirror import PROJECT_ROOT, MirrorServer
from tests.support.procs import require_tool
from tests.support.registry import UpstreamRegistry

ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
NOSNIFF = ("x-content-type-options", "nosniff")
#: ``htpasswd -nbB alice 'correct horse'`` (apache2-utils): the $2y$ flavour real files hold.
ALICE = "alice:$2y$05$iv3q1bSDnUvkJaSfPzYGaeGOKILlDQ2XG14Qk.140R4SY84qHQkNK"
ALICE_PASSWORD = "correct horse"


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA and the certificates it signed, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    def context(self, *, client_cert: bool = False, ca: Path | None = None) -> ssl.SSLContext:
        """A client context trusting *ca* (default: the test CA), optionally with the client certificate."""
        context = ssl.create_default_context(cafile=str(ca or self.ca))
        if client_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"


def make_ca(dir: Path, name: str) -> tuple[Path, Path]:
    openssl("req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "3", "-subj", f"/CN={name}", cwd=dir)
    return dir / f"{name}.crt", dir / f"{name}.key"


def sign(dir: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    openssl("req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=dir)
    (dir / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=dir)
    return dir / f"{name}.crt", dir / f"{name}.key"


#: Where the mirror listens for dockerd (RFC 2544's benchmarking range, never routed): dockerd treats
#: 127.0.0.0/8 as an insecure registry (no certificate checks, falls back to plain HTTP), which would
#: prove nothing, so the tests add this address to the loopback interface for their duration.
LOCAL_ONLY = "198.18.0.1"


@pytest.fixture(scope="session")
def local_only_address() -> Iterator[str]:
    """:data:`LOCAL_ONLY` on ``lo`` (only this machine reaches it), removed again afterwards."""
    ip = require_tool("ip", "iproute2")
    present = LOCAL_ONLY in subprocess.run([ip, "-4", "addr", "show", "dev", "lo"], capture_output=True,
                                           text=True, check=True).stdout
    if not present:
        added = subprocess.run([ip, "addr", "add", f"{LOCAL_ONLY}/32", "dev", "lo"], capture_output=True, text=True)
        if added.returncode != 0:
            pytest.fail(f"cannot add {LOCAL_ONLY} to lo (needs root): {added.stderr.strip()}", pytrace=False)
    try:
        yield LOCAL_ONLY
    finally:
        if not present:
            subprocess.run([ip, "addr", "del", f"{LOCAL_ONLY}/32", "dev", "lo"], capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    dir = tmp_path_factory.mktemp("pki")
    ca = make_ca(dir, "mirror-test-ca")
    names = f"IP:127.0.0.1,DNS:localhost,IP:{LOCAL_ONLY}"
    server = sign(dir, "server", ca, f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")
    client = sign(dir, "client", ca, "extendedKeyUsage=clientAuth\n")
    other, _ = make_ca(dir, "other-ca")
    return Pki(ca[0], server[0], server[1], client[0], client[1], other)


def tls_env(pki: Pki, *, client_ca: bool = False) -> dict[str, str]:
    env = {"MIRROR_HTTP_TLS_CERTIFICATE": str(pki.server_cert), "MIRROR_HTTP_TLS_KEY": str(pki.server_key)}
    if client_ca:
        env["MIRROR_HTTP_TLS_CLIENT_CA"] = str(pki.ca)
    return env


# -- users ----------------------------------------------------------------------------------


def bcrypt_entry(user: str, password: str) -> str:
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}"


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    """alice (htpasswd -B, may push anywhere), bob (may push under team/), carol (may not push)."""
    path = tmp_path / "htpasswd"
    path.write_text("\n".join([ALICE, bcrypt_entry("bob", "bob-pw"), bcrypt_entry("carol", "carol-pw"), ""]))
    return path


def auth_env(htpasswd: Path, *, anonymous_pull: bool, realm: str = "Test Registry") -> dict[str, str]:
    return {
        "MIRROR_AUTH_HTPASSWD_PATH": str(htpasswd),
        "MIRROR_AUTH_HTPASSWD_REALM": realm,
        "MIRROR_AUTH_ANONYMOUS_PULL": str(anonymous_pull).lower(),
        "MIRROR_AUTH_PUSH_USERS": "alice,bob:team",
    }


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def request(mirror: MirrorServer, method: str, path: str, *, verify: Any = True, **kwargs: Any) -> httpx.Response:
    headers = {"Accept": ACCEPT, **kwargs.pop("headers", {})}
    return httpx.request(method, f"{mirror.url}{path}", headers=headers, verify=verify, trust_env=False,
                         timeout=30, **kwargs)


def assert_spec_error(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    entry: dict[str, Any] = answer.json()["errors"][0]
    assert entry["code"] == code, answer.text
    return entry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """A one-layer image of our own, to push."""
    dir = tmp_path_factory.mktemp("tiny")
    return build_image(dir, [busybox_layer(dir, marker="security")])


def push(mirror: MirrorServer, name: str, tag: str, image: Image, headers: dict[str, str],
         verify: Any = True) -> None:
    with httpx.Client(headers=headers, verify=verify, trust_env=False, timeout=60) as client:
        push_image(mirror.url, name, tag, image, client=client)


# -- configuration and start-up --------------------------------------------------------------


def test_nested_yaml_keys_env_names_and_worker_round_trip(tmp_path: Path, pki: Pki) -> None:
    secret = tmp_path / "hub-token"
    secret.write_text("dckr_pat_from_a_file\n")
    users = tmp_path / "htpasswd"
    users.write_text(ALICE + "\n")
    file = tmp_path / "mirror.yml"
    file.write_text(
        f"http:\n  tls:\n    certificate: {pki.server_cert}\n    key: {pki.server_key}\n    client_ca: {pki.ca}\n"
        f"auth:\n  htpasswd:\n    path: {users}\n    realm: Corp\n  anonymous_pull: false\n"
        f"  push_users: [alice, 'bob:team/']\n"
        f"upstream:\n  username: bot\n  password_file: {secret}\n")
    config = load_config(file, env={})
    assert config.http.tls_certificate == pki.server_cert and config.http.tls_client_ca == pki.ca
    assert (config.auth.htpasswd_path, config.auth.htpasswd_realm) == (users, "Corp")
    assert config.auth.push_users == ("alice", "bob:team")
    assert config.upstream.password == "dckr_pat_from_a_file"
    assert "dckr_pat" not in repr(config)
    environ = to_environ(config)
    assert environ["MIRROR_HTTP_TLS_CERTIFICATE"] == str(pki.server_cert)
    assert environ["MIRROR_AUTH_HTPASSWD_PATH"] == str(users)
    # The file's secret is not handed to worker processes: they read the file again.
    assert "MIRROR_UPSTREAM_PASSWORD" not in environ and environ["MIRROR_UPSTREAM_PASSWORD_FILE"] == str(secret)
    assert load_config(env=environ) == config
    assert load_config(env={"MIRROR_AUTH_HTPASSWD_PATH": str(users), "MIRROR_AUTH_PUSH_USERS": "alice,bob:team"},
                       ).auth.may_write("bob", "team/app")


@pytest.mark.parametrize("yaml_text,message", [
    ("http:\n  tls:\n    bogus: 1\n", "unknown configuration key http.tls.bogus"),
    ("http:\n  tls:\n    certificate: /nonexistent.pem\n", "bad value for http.tls.certificate: '/nonexistent.pem'"),
    ("auth:\n  htpasswd:\n    pth: x\n", "unknown configuration key auth.htpasswd.pth"),
    ("auth:\n  anonymous_pull: false\n", "auth.anonymous_pull: false needs users"),
    ("auth:\n  push_users: [alice]\n", "auth.push_users needs users"),
    ("auth:\n  htpasswd:\n    realm: 'a\"b'\n", "bad value for auth.htpasswd.realm"),
    ("upstream:\n  password_file: /nonexistent-secret\n", "bad value for upstream.password_file"),
    ("upstream:\n  url: https://bot:dckr_pat_in_url@registry.example\n", "credentials do not belong in the URL"),
])
def test_bad_security_settings_name_the_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    file = tmp_path / "mirror.yml"
    file.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(file, env={})
    assert "dckr_pat_in_url" not in str(caught.value)


def serve_fails(tmp_path: Path, env: dict[str, str]) -> str:
    """Run ``mirror serve`` that must refuse to start; return what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data"),
         "--upstream", "http://127.0.0.1:9"], env={**os.environ, **env}, cwd=PROJECT_ROOT,
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


@pytest.mark.parametrize("flag,kind", [("apr1", "MD5 ($apr1$)"), ("sha1", "SHA-1 ({SHA})"), ("plain", "plain-text")])
def test_weak_htpasswd_hashes_are_refused_at_start_up(tmp_path: Path, flag: str, kind: str) -> None:
    weak = {"apr1": "$apr1$wrhcOesX$X6n45KO1L6nQ7HHWV3vIc.", "sha1": "{SHA}GpHWL3ymc5liWkNopqtdSjuqYHM=",
            "plain": "hunter2"}[flag]
    users = tmp_path / "htpasswd"
    users.write_text(f"{ALICE}\ndave:{weak}\n")
    message = serve_fails(tmp_path, {"MIRROR_AUTH_HTPASSWD_PATH": str(users)})
    assert "auth.htpasswd.path" in message and "line 2" in message and "'dave'" in message, message
    assert kind in message and "htpasswd -B" in message, message


def test_unusable_certificate_stops_start_up(tmp_path: Path, pki: Pki) -> None:
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    message = serve_fails(tmp_path, {"MIRROR_HTTP_TLS_CERTIFICATE": str(pki.server_cert),
                                     "MIRROR_HTTP_TLS_KEY": str(not_a_key)})
    assert "http.tls.certificate" in message and "http.tls.key" in message, message
    message = serve_fails(tmp_path, {"MIRROR_HTTP_TLS_CERTIFICATE": str(pki.server_cert)})
    assert "http.tls.certificate and http.tls.key must be set together" in message, message


# -- access policy --------------------------------------------------------------------------


def test_without_anonymous_pull_every_request_needs_a_user(
    mirror_factory: Callable[..., MirrorServer], htpasswd: Path, images: StandardImages, tiny: Image,
) -> None:
    mirror = mirror_factory(env=auth_env(htpasswd, anonymous_pull=False))
    alice, carol = basic("alice", ALICE_PASSWORD), basic("carol", "carol-pw")

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
    # ...while a password already accepted from this address keeps working.
    assert request(mirror, "GET", login, headers=basic("alice", ALICE_PASSWORD)).status_code == 200


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
    deadline = time.monotonic() + 5
    while not (logged := [e for e in mirror.access_entries() if e["request_id"] == "proxied-1"]):
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.05)
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
    deadline = time.monotonic() + 10
    while request(mirror, "GET", "/v2/", headers=basic("bob", "bob-pw")).status_code != 401:
        assert time.monotonic() < deadline, "the htpasswd file was not reloaded"
        time.sleep(0.2)
    time.sleep(1.2)  # each worker looks at the file at most once a second
    for _ in range(4):  # whichever worker answers
        assert request(mirror, "GET", "/v2/", headers=basic("bob", "new-pw")).status_code == 200
        assert request(mirror, "GET", "/v2/", headers=bearer(token)).status_code == 401
    htpasswd.write_text(f"{ALICE}\nbroken line\n")
    time.sleep(1.5)
    for _ in range(4):
        assert request(mirror, "GET", "/v2/", headers=basic("bob", "new-pw")).status_code == 200
    assert "keeping the 2 users read before" in mirror.log_tail(200)


# -- TLS ------------------------------------------------------------------------------------


def test_tls_serves_https_with_the_configured_certificate(
    mirror_factory: Callable[..., MirrorServer], pki: Pki, images: StandardImages,
) -> None:
    trusted = pki.context()
    mirror = mirror_factory(env=tls_env(pki), scheme="https", verify=trusted)
    assert mirror.url.startswith("https://127.0.0.1:")
    answer = request(mirror, "GET", "/v2/library/small/manifests/1", verify=trusted)
    assert answer.status_code == 200 and answer.http_version == "HTTP/1.1"
    assert answer.headers["docker-content-digest"] == images.small.digest
    for layer in images.small.layers:  # no sendfile(2) through TLS: the bytes take the ordinary way
        blob = request(mirror, "GET", f"/v2/library/small/blobs/{layer.digest}", verify=trusted)
        assert blob.status_code == 200 and sha256(blob.content) == layer.digest
        assert request(mirror, "GET", f"/v2/library/small/blobs/{layer.digest}", verify=trusted).content \
            == blob.content  # and again from the store
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        request(mirror, "GET", "/v2/", verify=pki.context(ca=pki.other_ca))
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
        httpx.get(f"http://127.0.0.1:{mirror.port}/v2/", trust_env=False, timeout=5)


def test_a_blob_reader_that_stalls_over_tls_is_cut_off(
    mirror_factory: Callable[..., MirrorServer], pki: Pki, images: StandardImages,
) -> None:
    trusted = pki.context()
    mirror = mirror_factory(env={**tls_env(pki), "MIRROR_HTTP_IDLE_TIMEOUT": "2s"}, scheme="https", verify=trusted)
    layer = images.big.layers[2]  # 64 MiB: far more than the socket buffers hold
    path = f"/v2/library/big/blobs/{layer.digest}"
    assert request(mirror, "GET", "/v2/library/big/manifests/1", verify=trusted).status_code == 200
    assert request(mirror, "GET", path, verify=trusted).status_code == 200  # stored: read and written, no sendfile
    with trusted.wrap_socket(socket.create_connection(("127.0.0.1", mirror.port), timeout=30),
                             server_hostname="127.0.0.1") as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(6)  # reads nothing for three idle timeouts
        received = 0
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
    assert 0 < received < layer.size
    log = mirror.log_tail(400)
    assert "Traceback" not in log and "without completing response" not in log, log


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    mirror_factory: Callable[..., MirrorServer], pki: Pki,
) -> None:
    with_cert = pki.context(client_cert=True)
    mirror = mirror_factory(env=tls_env(pki, client_ca=True), scheme="https", verify=with_cert)
    assert request(mirror, "GET", "/v2/", verify=with_cert).status_code == 200
    with pytest.raises(httpx.TransportError):
        request(mirror, "GET", "/v2/", verify=pki.context())


# -- hardening ------------------------------------------------------------------------------


def test_every_answer_carries_nosniff_and_errors_are_json(
    mirror_factory: Callable[..., MirrorServer], images: StandardImages,
) -> None:
    mirror = mirror_factory()
    small = images.small
    for method, path, status in [
        ("GET", "/v2/", 200), ("GET", "/v2/library/small/manifests/1", 200),
        ("GET", f"/v2/library/small/blobs/{small.layers[0].digest}", 200),
        ("GET", "/v2/library/nope/manifests/1", 404), ("GET", "/v2/UPPER/manifests/1", 400),
        ("POST", "/v2", 405), ("GET", "/v2/a%0Ab/manifests/1", 404), ("GET", "/v2/_catalog?n=%C2%B2", 400),
        ("GET", "/v2/library/small/tags/list?last=..%2F..", 400), ("GET", "/healthz", 200),
    ]:
        answer = request(mirror, method, path)
        assert answer.status_code == status, (path, answer.text)
        assert (NOSNIFF[0], answer.headers.get(NOSNIFF[0])) == NOSNIFF, path
        if status >= 400:
            assert "Traceback" not in answer.text and answer.json()["errors"][0]["code"], answer.text
    big = request(mirror, "PUT", "/v2/mine/manifests/1", content=b"{" + b" " * (4 << 20) + b"}",
                  headers={"content-type": "application/vnd.oci.image.manifest.v1+json"})
    assert_spec_error(big, 413, "MANIFEST_INVALID")


def raw_connection(mirror: MirrorServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", mirror.port), timeout=15)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_and_oversized_clients_are_cut_off(mirror_factory: Callable[..., MirrorServer]) -> None:
    mirror = mirror_factory(env={"MIRROR_HTTP_IDLE_TIMEOUT": "2s"})
    # Slowloris: a request head that never ends is closed after the idle timeout.
    with raw_connection(mirror) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        for _ in range(20):
            time.sleep(0.25)
            try:
                sock.sendall(b"a")
            except OSError:
                break
        assert read_all(sock) == b"" and 1.5 < time.monotonic() - started < 8
    # A connection that never sends a byte is closed too.
    with raw_connection(mirror) as sock:
        started = time.monotonic()
        assert read_all(sock) == b"" and 1.5 < time.monotonic() - started < 8
    # A body that stops half-way: 408 in the spec's format, and the connection is closed.
    uuid = request(mirror, "POST", "/v2/slow/blobs/uploads/").headers["docker-upload-uuid"]
    with raw_connection(mirror) as sock:
        sock.sendall(f"PATCH /v2/slow/blobs/uploads/{uuid} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + b"x" * 1000)
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in head.lower() and b"x-content-type-options: nosniff" in head.lower()
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    # A request head above 64 KiB is refused.
    with raw_connection(mirror) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400")
    assert request(mirror, "GET", "/v2/").status_code == 200


def test_blob_readers_that_stall_or_vanish_are_cut_off_and_hold_no_one_up(
    mirror_factory: Callable[..., MirrorServer], images: StandardImages,
) -> None:
    mirror = mirror_factory(env={"MIRROR_HTTP_IDLE_TIMEOUT": "5s"})
    layer = images.big.layers[2]  # 64 MiB: far more than the socket buffers hold
    path = f"/v2/library/big/blobs/{layer.digest}"
    assert request(mirror, "GET", "/v2/library/big/manifests/1").status_code == 200
    assert request(mirror, "GET", path).status_code == 200  # now stored: sent with sendfile(2)
    get = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    # Clients that hang up early.
    for _ in range(5):
        with raw_connection(mirror) as sock:
            sock.sendall(get)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    # More clients that stop reading than there are sending threads: the others are still served.
    stalled = [raw_connection(mirror) for _ in range(70)]
    try:
        for sock in stalled:
            sock.sendall(get)
        time.sleep(1)
        started = time.monotonic()
        answer = request(mirror, "GET", path)
        assert answer.status_code == 200 and sha256(answer.content) == layer.digest
        assert time.monotonic() - started < 4, "a reader waited for a stalled one"
        # After the idle timeout each stalled connection is closed, short of the blob.
        time.sleep(9)  # past the idle timeout of every transfer (each starts at once, thread or not)
        for sock in stalled:
            sock.settimeout(30)
            assert 0 < len(read_all(sock)) < layer.size
    finally:
        for sock in stalled:
            sock.close()
    answer = request(mirror, "GET", path, headers={"range": "bytes=1000-1999999"})
    assert answer.status_code == 206 and answer.content == layer.path.read_bytes()[1000:2000000]
    # The access log counts what went out, not what was meant to.
    cut_short = [e for e in mirror.access_entries() if e["path"] == path and "user_agent" not in e]
    assert len(cut_short) == 75 and all(0 < int(e["bytes"]) < layer.size for e in cut_short), cut_short
    log = mirror.log_tail(2000)
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


# -- upstream credentials -------------------------------------------------------------------


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
    time.sleep(0.5)
    assert "rejected the configured upstream credentials" in refused.log_tail(200)

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


# -- hostile input: property-based tests on every route ---------------------------------------

FUZZ_EXAMPLES = 150
SENTINEL_HEX = "ab" + "0" * 62
#: Files beside the data directories, laid out as the store lays out its own: a path built from
#: unvalidated input (``../``, an absolute path) would reach one of them.
SENTINELS = [
    "secret.txt", f"blobs/sha256/ab/{SENTINEL_HEX}", f"uploads/{'0' * 32}", f"tmp/sha256-{SENTINEL_HEX}.partial",
    "index/cache.db", "data/../outside.txt", "nested/deeper/secret.txt",
]


class Fuzzed:
    """Two mirrors (open, and with logins) whose data directories sit among sentinel files."""

    def __init__(self, root: Path, open: MirrorServer, guarded: MirrorServer, client: httpx.Client) -> None:
        self.root = root
        self.open = open
        self.guarded = guarded
        self.client = client
        self.before = self.snapshot()

    def __repr__(self) -> str:
        return f"Fuzzed({self.root})"

    def snapshot(self) -> dict[str, tuple[Any, ...]]:
        """Every path under the root outside the data directories, with size, mtime and atime of files."""
        found: dict[str, tuple[Any, ...]] = {}
        skip = {self.open.data_dir, self.guarded.data_dir}
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if Path(folder, d) not in skip]
            for name in dirs:
                found[os.path.relpath(Path(folder, name), self.root)] = ("dir",)
            for name in files:
                st = os.stat(Path(folder, name))
                found[os.path.relpath(Path(folder, name), self.root)] = (st.st_size, st.st_mtime_ns, st.st_atime_ns)
        return found

    def assert_untouched(self) -> None:
        after = self.snapshot()
        changed = {path for path in self.before.keys() | after.keys() if self.before.get(path) != after.get(path)}
        assert not changed, f"files outside the data directory were created, read, changed or deleted: {changed}"
        for server in (self.open, self.guarded):
            assert server.running, server.log_tail()
            log = server.log_path.read_text(errors="replace")
            assert "Traceback" not in log and "Exception in ASGI" not in log, server.log_tail(80)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamRegistry,
           images: StandardImages) -> Iterator[Fuzzed]:
    root = tmp_path_factory.mktemp("fuzz-root")
    logs = tmp_path_factory.mktemp("fuzz-logs")
    for relative in SENTINELS:
        path = (root / relative).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"sentinel {relative}\n")
        # An atime older than the mtime: any read of the file updates it (even under relatime).
        st = path.stat()
        os.utime(path, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
    users = logs / "htpasswd"
    users.write_text(ALICE + "\n")
    open_ = MirrorServer(root / "data", upstream.url, log_dir=logs)
    guarded = MirrorServer(root / "data-auth", upstream.url, log_dir=logs,
                           env=auth_env(users, anonymous_pull=True))
    with contextlib_closing(open_), contextlib_closing(guarded):
        open_.start()
        guarded.start()
        # Something in the store to read, ranges to serve, uploads to continue.
        assert request(open_, "GET", "/v2/library/small/manifests/1").status_code == 200
        for layer in images.small.layers:
            assert request(open_, "GET", f"/v2/library/small/blobs/{layer.digest}").status_code == 200
        with httpx.Client(timeout=30, trust_env=False) as client:
            fuzz = Fuzzed(root, open_, guarded, client)
            assert len([v for v in fuzz.before.values() if v != ("dir",)]) == len(SENTINELS)
            yield fuzz


class contextlib_closing:
    """Stop a MirrorServer however the block ends."""

    def __init__(self, server: MirrorServer) -> None:
        self.server = server

    def __enter__(self) -> MirrorServer:
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def _hypothesis() -> Any:
    import hypothesis
    import hypothesis.strategies as st

    return hypothesis, st


hypothesis, st = _hypothesis()
FUZZ = hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False,
                           suppress_health_check=[hypothesis.HealthCheck.too_slow])


def traversals(root_hint: str = "/tmp") -> list[str]:
    return [
        "..", ".", "../secret.txt", "../../secret.txt", "../../../secret.txt", "../../../../secret.txt",
        "a/../../secret.txt", "library/../../../secret.txt", "..\\secret.txt", "%2e%2e/secret.txt",
        f"../blobs/sha256/ab/{SENTINEL_HEX}", f"../uploads/{'0' * 32}", f"../../uploads/{'0' * 32}",
        "sha256:../../secret.txt", f"sha256:../../../blobs/sha256/ab/{SENTINEL_HEX}", "sha256:..",
        f"sha256:{SENTINEL_HEX}/../../../../secret.txt", "/etc/passwd", "\x00", "a\x00b", "\n", "~", "//",
    ]


_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
valid_names = st.from_regex(rf"{_COMPONENT}(?:/{_COMPONENT}){{0,3}}", fullmatch=True)
known_names = st.sampled_from(["library/small", "small", "library/multi", "fuzz/mine", "library/nope"])
names = st.one_of(valid_names, known_names, st.sampled_from(traversals()), st.text(max_size=40),
                  st.text(alphabet="ab/.:-_%\\", max_size=30))
sha256_hex = st.binary(min_size=32, max_size=32).map(lambda b: b.hex())
digests = st.one_of(
    sha256_hex.map(lambda h: f"sha256:{h}"),
    st.from_regex(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+", fullmatch=True),
    st.binary(min_size=64, max_size=64).map(lambda b: f"sha512:{b.hex()}"),
    st.sampled_from(traversals()), st.text(max_size=80), st.text(max_size=70).map(lambda t: f"sha256:{t}"),
)
tags = st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}", fullmatch=True)
references = st.one_of(tags, digests, st.just("1"))
uuids = st.one_of(st.from_regex(r"[0-9a-f]{32}", fullmatch=True), st.sampled_from(traversals()),
                  st.text(max_size=40))
# Header values as a client can send them: no control characters, no surrounding whitespace.
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)
header_bytes = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F))
#: Strings that str.isdigit() or int() accept although the grammars do not (superscripts, other scripts...).
TRICKY_NUMBERS = ["\u00b2", "\u0661\u0662", "\uff11", " 1", "1 ", "+1", "-0", "0x10", "1e3", "1_000", "\u00b9\u2070"]
numbers = st.one_of(st.integers(min_value=-5, max_value=2**70).map(str), st.just(""), st.sampled_from(TRICKY_NUMBERS))
ranges = st.one_of(
    st.none(), st.builds(lambda a, b: f"bytes={a}-{b}", numbers, numbers),
    st.builds(lambda a, b: f"bytes={a}-{b},{b}-", numbers, numbers), header_text, header_bytes,
)
query_values = st.one_of(header_text, st.text(max_size=30), numbers, valid_names, digests, tags,
                         st.sampled_from(traversals()))
queries = st.dictionaries(st.sampled_from(["n", "last", "mount", "from", "digest", "artifactType", "ns", "x"]),
                          query_values, max_size=4)
bodies = st.one_of(st.binary(max_size=300), st.just(b""), st.just(b'{"schemaVersion": 2}'))


def seg(text: str, *, slashes: bool = True) -> str:
    """Percent-encode for the path (dots too, so that ``..`` reaches the server as such)."""
    from urllib.parse import quote

    return quote(text, safe="/" if slashes else "").replace(".", "%2E")


def check(answer: httpx.Response, method: str) -> None:
    from mirror.errors import CODES

    assert answer.status_code < 500, f"{method} {answer.request.url} -> {answer.status_code} {answer.text}"
    assert answer.headers.get("x-content-type-options") == "nosniff", answer.request.url
    assert "Traceback" not in answer.text
    if answer.status_code >= 400 and method != "HEAD":
        assert answer.headers["content-type"].startswith("application/json"), (answer.request.url, answer.text)
        errors = answer.json()["errors"]
        assert isinstance(errors, list) and errors, answer.text
        for entry in errors:
            assert entry["code"] in CODES and isinstance(entry["message"], str), answer.text


def send(fuzz: Fuzzed, method: str, path: str, *, server: MirrorServer | None = None,
         params: dict[str, str] | None = None, headers: dict[str, Any] | None = None,
         content: bytes | None = None) -> httpx.Response:
    server = server or fuzz.open
    # Non-ASCII header text goes out as UTF-8 bytes (HTTP's obs-text), as a hostile client could send it.
    # (Surrounding whitespace is not part of a header value: h11 refuses to send it.)
    raw = {k.encode(): (v.encode() if isinstance(v, str) else v).strip() for k, v in (headers or {}).items()}
    answer = fuzz.client.request(method, f"{server.url}{path}", params=params, headers=raw, content=content)
    check(answer, method)
    return answer


@hypothesis.given(method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE"]), name=names, reference=references,
                  params=queries, body=bodies,
                  content_type=st.sampled_from(["application/vnd.oci.image.manifest.v1+json", "text/plain", ""]))
@FUZZ
def test_fuzz_manifests(fuzzed: Fuzzed, method: str, name: str, reference: str, params: dict[str, str],
                        body: bytes, content_type: str) -> None:
    send(fuzzed, method, f"/v2/{seg(name)}/manifests/{seg(reference, slashes=False)}", params=params,
         headers={"Accept": ACCEPT, "Content-Type": content_type}, content=body if method == "PUT" else None)


def test_fuzz_manifests_touched_nothing_outside(fuzzed: Fuzzed) -> None:
    fuzzed.assert_untouched()


@hypothesis.given(method=st.sampled_from(["GET", "HEAD", "DELETE"]), name=names, digest=digests,
                  byte_range=ranges, params=queries)
@hypothesis.example(method="GET", name="library/small", digest=f"sha256:{SENTINEL_HEX}", byte_range="bytes=\u00b2-",
                    params={})
@hypothesis.example(method="GET", name="library/../../..", digest=f"sha256:../../../blobs/sha256/ab/{SENTINEL_HEX}",
                    byte_range=None, params={"ns": "../../secret.txt"})
@FUZZ
def test_fuzz_blobs_and_ranges(fuzzed: Fuzzed, method: str, name: str, digest: str, byte_range: Any,
                               params: dict[str, str]) -> None:
    headers = {} if byte_range is None else {"Range": byte_range}
    send(fuzzed, method, f"/v2/{seg(name)}/blobs/{seg(digest, slashes=False)}", params=params, headers=headers)


def test_fuzz_known_blob_ranges(fuzzed: Fuzzed, images: StandardImages) -> None:
    """Ranges on a blob that is in the store (the generated digests are almost never there)."""
    layer = images.small.layers[0]

    @hypothesis.given(byte_range=ranges, name=st.just("library/small"))
    @FUZZ
    def ranges_on_a_stored_blob(byte_range: Any, name: str) -> None:
        answer = send(fuzzed, "GET", f"/v2/{name}/blobs/{layer.digest}",
                      headers={} if byte_range is None else {"Range": byte_range})
        assert answer.status_code in (200, 206, 416), answer.text

    ranges_on_a_stored_blob()
    fuzzed.assert_untouched()


@hypothesis.given(method=st.sampled_from(["POST", "PATCH", "PUT", "GET", "HEAD", "DELETE"]), name=names,
                  uuid=uuids, params=queries, body=bodies, content_range=st.one_of(st.none(), header_text,
                  st.builds(lambda a, b: f"{a}-{b}", numbers, numbers)), fresh=st.booleans())
@hypothesis.example(method="PATCH", name="x", uuid="", params={}, body=b"x", content_range=b"\xb2-\xb3",
                    fresh=True)  # superscript digits, as the server decodes header bytes (latin-1)
@hypothesis.example(method="PUT", name="x", uuid="", params={"digest": "sha256:" + "0" * 64}, body=b"x",
                    content_range=None, fresh=True)
@hypothesis.example(method="PATCH", name="fuzz/mine", uuid="../" * 3 + "0" * 32, params={}, body=b"x",
                    content_range=None, fresh=False)
@FUZZ
def test_fuzz_uploads(fuzzed: Fuzzed, method: str, name: str, uuid: str, params: dict[str, str], body: bytes,
                      content_range: str | bytes | None, fresh: bool) -> None:
    if fresh:  # continue a real upload (of a valid name) with the generated parameters
        started = send(fuzzed, "POST", "/v2/fuzz/mine/blobs/uploads/")
        uuid, name = started.headers["docker-upload-uuid"], "fuzz/mine"
    headers: dict[str, str | bytes] = {"Content-Type": "application/octet-stream"}
    if content_range is not None:
        headers["Content-Range"] = content_range
    path = f"/v2/{seg(name)}/blobs/uploads/" + ("" if method == "POST" else seg(uuid, slashes=False))
    send(fuzzed, method, path, params=params, headers=headers,
         content=body if method in ("POST", "PATCH", "PUT") else None)


def test_fuzz_uploads_touched_nothing_outside(fuzzed: Fuzzed) -> None:
    fuzzed.assert_untouched()


@hypothesis.given(name=names, n=st.one_of(st.none(), numbers), last=st.one_of(st.none(), query_values),
                  params=queries, catalog=st.booleans(), method=st.sampled_from(["GET", "HEAD"]))
@hypothesis.example(name="library/small", n="\u00b2", last=None, params={}, catalog=False, method="GET")
@hypothesis.example(name="x", n="\u00b9\u2070", last="../..", params={}, catalog=True, method="GET")
@hypothesis.example(name="library/small", n="1", last="..%2F..\n", params={}, catalog=False, method="GET")
@FUZZ
def test_fuzz_tags_and_catalog_pagination(fuzzed: Fuzzed, name: str, n: str | None, last: str | None,
                                          params: dict[str, str], catalog: bool, method: str) -> None:
    params = {**params, **({"n": n} if n is not None else {}), **({"last": last} if last is not None else {})}
    path = "/v2/_catalog" if catalog else f"/v2/{seg(name)}/tags/list"
    answer = send(fuzzed, method, path, params=params)
    if answer.status_code == 200 and method == "GET":
        link = answer.headers.get("link")
        assert link is None or (link.startswith("</v2/") and "\n" not in link), link


@hypothesis.given(name=names, digest=digests, params=queries, method=st.sampled_from(["GET", "HEAD"]))
@FUZZ
def test_fuzz_referrers(fuzzed: Fuzzed, name: str, digest: str, params: dict[str, str], method: str) -> None:
    send(fuzzed, method, f"/v2/{seg(name)}/referrers/{seg(digest, slashes=False)}", params=params)


@hypothesis.given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
                  path=st.one_of(st.text(max_size=60), st.sampled_from(traversals()),
                                 st.lists(st.one_of(names, st.sampled_from(["manifests", "blobs", "uploads", "tags",
                                                                            "list", "referrers", "_catalog"])),
                                          max_size=6).map("/".join)),
                  params=queries)
@FUZZ
def test_fuzz_any_path_under_v2(fuzzed: Fuzzed, method: str, path: str, params: dict[str, str]) -> None:
    send(fuzzed, method, f"/v2/{seg(path)}", params=params)


authorizations = st.one_of(
    st.none(),
    st.builds(lambda u, p: basic(u, p)["Authorization"], st.text(max_size=12), st.text(max_size=12)),
    st.just(basic("alice", ALICE_PASSWORD)["Authorization"]),
    st.builds(lambda t: f"Bearer {t}".strip(), header_text), st.builds(lambda t: f"Basic {t}".strip(), header_text),
    header_text, header_bytes.map(lambda b: (b"Basic " + b).strip()),
)


@hypothesis.given(authorization=authorizations, method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]),
                  path=st.sampled_from(["/v2/", "/v2", "/auth/token", "/v2/library/small/manifests/1",
                                        "/v2/_catalog", "/v2/fuzz/mine/blobs/uploads/", "/v2/x/manifests/1",
                                        "/healthz"]),
                  params=queries)
@FUZZ
def test_fuzz_credentials(fuzzed: Fuzzed, authorization: Any, method: str, path: str,
                          params: dict[str, str]) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    answer = send(fuzzed, method, path, server=fuzzed.guarded, params=params, headers=headers)
    if answer.status_code == 401:
        challenge = answer.headers["www-authenticate"]
        assert challenge.startswith(("Bearer realm=", "Basic realm=")) and "\n" not in challenge


def test_fuzz_touched_nothing_outside_the_data_directories(fuzzed: Fuzzed) -> None:
    fuzzed.assert_untouched()
    # The watch itself works: a read of a sentinel is seen (then undone).
    sentinel = fuzzed.root / "secret.txt"
    before = sentinel.stat()
    sentinel.read_bytes()
    with pytest.raises(AssertionError, match="secret.txt"):
        fuzzed.assert_untouched()
    os.utime(sentinel, ns=(before.st_atime_ns, before.st_mtime_ns))
    fuzzed.assert_untouched()


# -- real clients: dockerd trusting the test's CA -------------------------------------------

CERTS_D = Path("/etc/docker/certs.d")


@pytest.fixture
def dockerd_trusts(pki: Pki) -> Iterator[Callable[[MirrorServer], None]]:
    """Put the test CA where dockerd looks for a registry's CA: ``/etc/docker/certs.d/HOST:PORT/ca.crt``.

    dockerd has no option for another directory (only rootless mode moves it), so the test writes
    there, for its mirror's unique port only, and removes what it wrote.
    """
    made: list[Path] = []
    created_root = not CERTS_D.exists()

    def trust(mirror: MirrorServer) -> None:
        folder = CERTS_D / mirror.address
        folder.mkdir(parents=True)
        made.append(folder)
        (folder / "ca.crt").write_bytes(pki.ca.read_bytes())

    try:
        yield trust
    finally:
        for folder in made:
            for file in folder.iterdir():
                file.unlink()
            folder.rmdir()
        if created_root and CERTS_D.exists() and not any(CERTS_D.iterdir()):
            CERTS_D.rmdir()


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root filesystem tarball for ``docker import``."""
    return busybox_layer(tmp_path_factory.mktemp("rootfs"), marker="security-docker").path


def docker_fails(daemon: Any, *args: str) -> str:
    done = daemon.docker(*args, check=False, timeout=120)
    assert done.returncode != 0, done.stdout
    return (done.stdout + done.stderr).lower()


def docker_pushes(daemon: Any, ref: str) -> str:
    out: str = daemon.docker("push", ref).stdout
    assert "digest: sha256:" in out, out
    return out.rsplit("digest: ", 1)[1].split()[0]


@pytest.mark.slow
def test_docker_login_push_pull_over_tls_with_htpasswd_users(
    dockerd_factory: Callable[..., Any], mirror_factory: Callable[..., MirrorServer], pki: Pki, htpasswd: Path,
    rootfs: Path, dockerd_trusts: Callable[[MirrorServer], None], local_only_address: str,
) -> None:
    """``auth.anonymous_pull: false``: the registry:2 set-up of Docker's guides (TLS + htpasswd)."""
    mirror = mirror_factory(env={**tls_env(pki), **auth_env(htpasswd, anonymous_pull=False)},
                            scheme="https", verify=pki.context(), host=local_only_address)
    daemon = dockerd_factory()
    # dockerd checks the certificate: before the CA is in its certs.d, nothing works.
    out = docker_fails(daemon, "login", "-u", "alice", "-p", ALICE_PASSWORD, mirror.address)
    assert "x509" in out and "unknown authority" in out, out
    dockerd_trusts(mirror)
    ref = f"{mirror.address}/team/app:1"
    daemon.docker("import", str(rootfs), ref)

    # Not logged in: the ping is challenged (Basic), docker has no password to send.
    out = docker_fails(daemon, "push", ref)
    assert "no basic auth credentials" in out, out
    assert mirror.access.count("GET", "/v2/", 401) >= 1
    assert not any(e.method in ("POST", "PUT", "PATCH") and e.status < 400 for e in mirror.access.requests())
    out = docker_fails(daemon, "login", "-u", "alice", "-p", "not-her-password", mirror.address)
    assert "401" in out or "unauthorized" in out, out

    assert "Login Succeeded" in daemon.docker("login", "-u", "alice", "-p", ALICE_PASSWORD, mirror.address).stdout
    pushed = docker_pushes(daemon, ref)
    stored = request(mirror, "GET", "/v2/team/app/manifests/1", headers=basic("alice", ALICE_PASSWORD),
                     verify=pki.context())
    assert stored.status_code == 200 and stored.headers["docker-content-digest"] == pushed
    daemon.docker("logout", mirror.address)

    # Anonymous pulls are refused; a user may pull.
    daemon.docker("rmi", ref)
    out = docker_fails(daemon, "pull", ref)
    assert "no basic auth credentials" in out, out
    daemon.docker("login", "-u", "carol", "-p", "carol-pw", mirror.address)
    assert "Downloaded newer image" in daemon.docker("pull", ref).stdout
    # carol may pull but not push.
    out = docker_fails(daemon, "push", ref)
    assert "denied" in out, out
    assert mirror.access.count("PUT", "/v2/team/app/manifests/1", 403) == 1
    daemon.docker("logout", mirror.address)


@pytest.mark.slow
def test_docker_pulls_anonymously_and_pushes_after_login_with_anonymous_pull(
    dockerd_factory: Callable[..., Any], mirror_factory: Callable[..., MirrorServer], pki: Pki, htpasswd: Path,
    rootfs: Path, dockerd_trusts: Callable[[MirrorServer], None], local_only_address: str,
) -> None:
    """``auth.anonymous_pull: true``: docker fetches tokens from the mirror, anonymously or as a user."""
    mirror = mirror_factory(env={**tls_env(pki), **auth_env(htpasswd, anonymous_pull=True)},
                            scheme="https", verify=pki.context(), host=local_only_address)
    dockerd_trusts(mirror)
    daemon = dockerd_factory()
    ref = f"{mirror.address}/mine/app:1"
    daemon.docker("import", str(rootfs), ref)

    # An anonymous push reaches the registry with an anonymous token, and is answered 401.
    out = docker_fails(daemon, "push", ref)
    assert "denied" in out or "unauthorized" in out, out
    assert mirror.access.count("POST", "/v2/mine/app/blobs/uploads/", 401) >= 1
    out = docker_fails(daemon, "login", "-u", "alice", "-p", "not-her-password", mirror.address)
    assert "401" in out or "unauthorized" in out, out

    assert "Login Succeeded" in daemon.docker("login", "-u", "alice", "-p", ALICE_PASSWORD, mirror.address).stdout
    pushed = docker_pushes(daemon, ref)
    daemon.docker("logout", mirror.address)

    # Logged out, the image is pulled anonymously.
    daemon.docker("rmi", ref)
    assert "Downloaded newer image" in daemon.docker("pull", ref).stdout
    digest = daemon.docker("image", "inspect", "--format", "{{index .RepoDigests 0}}", ref).stdout.strip()
    assert digest.endswith(pushed), digest
    # bob may push under team/ only.
    daemon.docker("login", "-u", "bob", "-p", "bob-pw", mirror.address)
    out = docker_fails(daemon, "push", ref)
    assert "denied" in out, out
    daemon.docker("tag", ref, f"{mirror.address}/team/app:1")
    docker_pushes(daemon, f"{mirror.address}/team/app:1")
    daemon.docker("logout", mirror.address)
