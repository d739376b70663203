"""What the security tests share: a test PKI made with openssl, htpasswd users, requests to a mirror.

Fixtures (import them into a test module to use them): ``pki`` (a CA, server and client
certificates), ``htpasswd`` (alice, bob, carol), ``tiny`` (an image to push), ``local_only_address``.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest

from tests.support.client import push_image
from tests.support.images import MANIFEST_MEDIA_TYPES, Image, build_image, busybox_layer
from tests.support.mirror import MirrorServer
from tests.support.procs import require_tool

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



def raw_connection(mirror: MirrorServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", mirror.port), timeout=15)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data
