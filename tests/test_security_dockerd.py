"""Real clients (slow): a dockerd that trusts a CA made here with openssl logs in, pushes and pulls
over TLS with htpasswd users, with and without anonymous pulls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import busybox_layer
from tests.support.mirror import MirrorServer
from tests.support.security import (
    ALICE_PASSWORD,
    Pki,
    auth_env,
    basic,
    request,
    tls_env,
)

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
