"""Every common client, for real, against one mirror that caches two registries.

The mirror's ``upstreams:`` are the session registry as ``docker.io`` (the standard images,
``library/small:1``, ``library/multi:1``...) and a second registry of the test's own as
``ghcr.io``, holding ``org/app:1``.  Each client is configured with the snippets that
deploy/clients/ ships, their placeholder host replaced by the mirror's address: dockerd's
``registry-mirrors`` in a daemon.json, containerd's ``hosts.toml`` files (which send
``?ns=<registry>``), podman's ``registries.conf`` (``[[registry.mirror]]``, where a location with
a path reaches the second registry by the mirror's path prefix); skopeo talks to the mirror
directly.  The registries' own addresses (Docker Hub, ghcr.io) are unreachable here, so a client
that fell back to them would fail.  Every client runs with its own state directories and sockets under
the test's temporary directory.  Tests count what each upstream served, so a pull that went
anywhere but through the mirror (the configured fallbacks are unreachable) shows.
"""

from __future__ import annotations

import itertools
import json
import platform
import re
import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.catalog import StandardImages
from tests.support.containerd import Containerd
from tests.support.dockerd import Dockerd
from tests.support.images import Image, build_image, busybox_layer, file_digest, random_layer
from tests.support.mirror import MirrorServer
from tests.support.podman import Podman
from tests.support.procs import require_tool
from tests.support.registry import UpstreamRegistry
from tests.support.tls import server_certificate

pytestmark = pytest.mark.slow

SECOND = "ghcr.io"
CLIENTS = Path(__file__).resolve().parents[1] / "deploy" / "clients"
#: The mirror's address in the shipped snippets.
PLACEHOLDER = "mirror.example.internal:5000"
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
OTHER_ARCH = "arm64" if HOST_ARCH == "amd64" else "amd64"


# -- the two registries behind one mirror ----------------------------------------------


@dataclass(frozen=True)
class Setup:
    mirror: MirrorServer
    hub: UpstreamRegistry  # the session registry, filed as docker.io
    second: UpstreamRegistry  # filed as ghcr.io
    app: Image  # ghcr.io/org/app:1
    images: StandardImages


@pytest.fixture
def setup_factory(tmp_path: Path, upstream: UpstreamRegistry, images: StandardImages,
                  upstream_factory: Callable[[], UpstreamRegistry],
                  mirror_factory: Callable[..., MirrorServer]) -> Callable[..., Setup]:
    """Make the second registry and a mirror of both (keyword arguments go to mirror_factory)."""

    def make(**mirror_options: Any) -> Setup:
        second = upstream_factory()
        folder = tmp_path / "app-image"
        folder.mkdir()
        app = build_image(folder, [busybox_layer(folder, marker="app"), random_layer(folder, 256 * 1024, seed=901)])
        second.push_image("org/app", "1", app)
        config = tmp_path / "mirror.yml"
        config.write_text(yaml.safe_dump({"upstreams": [
            {"registry": "docker.io", "url": upstream.url, "library_namespace": "true"},
            {"registry": SECOND, "url": second.url},
        ]}))
        mirror = mirror_factory(config=config, **mirror_options)
        upstream.clear_counts()
        second.clear_counts()
        return Setup(mirror, upstream, second, app, images)

    return make


@pytest.fixture
def setup(setup_factory: Callable[..., Setup]) -> Setup:
    return setup_factory()


def snippet(relative: str, address: str, **replace: str) -> str:
    """A file of deploy/clients/ with the mirror's address in place of the placeholder (and
    each *replace* key's text by its value)."""
    text = (CLIENTS / relative).read_text()
    for old, new in {PLACEHOLDER: address, **replace}.items():
        assert old in text, (relative, old)
        text = text.replace(old, new)
    return text


def hosts_dir(kind: str, address: str, target: Path, **replace: str) -> Path:
    """deploy/clients/KIND/certs.d (containerd's hosts.toml files) for the mirror at *address*."""
    source = CLIENTS / kind / "certs.d"
    for path in source.rglob("hosts.toml"):
        relative = path.relative_to(source)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).write_text(snippet(f"{kind}/certs.d/{relative}", address, **replace))
    return target


def blob_gets(registry: UpstreamRegistry, name: str, digests: Iterable[str]) -> dict[str, int]:
    """How often *registry* was asked for each blob (GET, any status)."""
    return {d: registry.count("GET", re.compile(rf"^/v2/{re.escape(name)}/blobs/{re.escape(d)}$")) for d in digests}


def once(digests: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(digests, 1)


def never(digests: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(digests, 0)


def store_contents(data_dir: Path) -> set[str]:
    """Digests in the mirror's store, each checked against its content."""
    found = set()
    for path in (data_dir / "blobs" / "sha256").glob("*/*"):
        assert file_digest(path) == f"sha256:{path.name}", path
        found.add(f"sha256:{path.name}")
    return found


# -- dockerd ---------------------------------------------------------------------------


def test_dockerd_with_registry_mirrors_in_daemon_json(
    setup: Setup, tmp_path: Path, dockerd_factory: Callable[..., Dockerd]
) -> None:
    mirror, small = setup.mirror, setup.images.small
    daemon_json = tmp_path / "daemon.json"
    daemon_json.write_text(snippet("docker/daemon.json", mirror.address))
    daemon = dockerd_factory(extra_args=[f"--config-file={daemon_json}"])
    assert json.loads(daemon.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout) \
        == [mirror.url + "/"]

    # Docker Hub names go to the mirror (dockerd never sends ?ns=): the default upstream.
    out = daemon.docker("pull", "small:1").stdout
    assert "Downloaded newer image for small:1" in out, out
    assert daemon.docker("run", "--rm", "--network", "none", "small:1", "cat", "/etc/image-marker").stdout == "small"
    assert blob_gets(setup.hub, "library/small", small.blobs) == once(small.blobs)

    # The second registry by the mirror's path prefix (plain HTTP: daemon.json's insecure-registries).
    ref = f"{mirror.address}/{SECOND}/org/app:1"
    daemon.docker("pull", ref)
    assert daemon.docker("run", "--rm", "--network", "none", ref, "cat", "/etc/image-marker").stdout == "app"
    assert blob_gets(setup.second, "org/app", setup.app.blobs) == once(setup.app.blobs)
    assert daemon.docker("image", "inspect", "--format", "{{index .RepoDigests 0}}", ref).stdout.strip() \
        == f"{mirror.address}/{SECOND}/org/app@{setup.app.digest}"


# -- containerd ------------------------------------------------------------------------


@pytest.fixture
def containerd_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Containerd]]:
    """Make started :class:`Containerd` instances; all are stopped at teardown."""
    require_tool("containerd", "containerd")
    made: list[Containerd] = []

    def make() -> Containerd:
        daemon = Containerd(tmp_path / f"containerd-{len(made)}")
        made.append(daemon)
        return daemon.start()

    try:
        yield make
    finally:
        failed = any(getattr(getattr(request.node, f"report_{p}", None), "failed", False) for p in ("setup", "call"))
        for daemon in reversed(made):
            if failed:
                print(f"--- containerd {daemon.root_dir} log tail ---\n{daemon.log_tail(40)}")
            daemon.stop()


def content_digests(daemon: Containerd) -> set[str]:
    """Digests in containerd's content store (``ctr content ls``)."""
    lines = daemon.ctr("content", "ls", "--quiet").stdout.split()
    return set(lines)


def test_containerd_pulls_both_registries_through_hosts_toml(
    setup: Setup, tmp_path: Path, containerd_factory: Callable[[], Containerd]
) -> None:
    mirror, hub, second = setup.mirror, setup.hub, setup.second
    small, multi, dlist = setup.images.small, setup.images.multi, setup.images.dlist
    hosts = hosts_dir("containerd", mirror.address, tmp_path / "certs.d")
    daemon = containerd_factory()

    def pull(ref: str, *flags: str) -> None:
        daemon.ctr("images", "pull", "--hosts-dir", str(hosts), *flags, ref)

    names = itertools.count()

    def run(ref: str, *command: str) -> str:
        return daemon.ctr("run", "--rm", "--snapshotter", "native", ref, f"c{next(names)}", *command).stdout

    pull("docker.io/library/small:1")
    assert run("docker.io/library/small:1", "cat", "/etc/image-marker") == "small"
    assert blob_gets(hub, "library/small", small.blobs) == once(small.blobs)

    pull(f"{SECOND}/org/app:1")
    assert run(f"{SECOND}/org/app:1", "sh", "-c", "cat /etc/image-marker; echo $((6 * 7))") == "app42\n"
    assert blob_gets(second, "org/app", setup.app.blobs) == once(setup.app.blobs)
    # containerd named the registry in ?ns= on every request it sent the mirror.
    sent = [entry.uri for entry in mirror.access.requests() if entry.path != "/v2/"]
    assert sent and all("ns=docker.io" in uri or f"ns={SECOND}" in uri for uri in sent), sent
    assert any(f"ns={SECOND}" in uri and "/blobs/" in uri for uri in sent), sent

    # One platform of an index: the arm64 child's manifest and layers come through, amd64's do not.
    arm64, amd64 = multi.child("arm64"), multi.child("amd64")
    pull("docker.io/library/multi:1", "--platform", "linux/arm64")
    assert blob_gets(hub, "library/multi", arm64.blobs) == once(arm64.blobs)
    assert blob_gets(hub, "library/multi", amd64.blobs) == never(amd64.blobs)
    assert set(arm64.blobs) | {arm64.digest, multi.digest} <= content_digests(daemon)
    assert not set(amd64.blobs) & content_digests(daemon)

    # All platforms: the rest of multi, and a whole Docker manifest list; each blob fetched once.
    pull("docker.io/library/multi:1", "--all-platforms")
    pull("docker.io/library/dlist:1", "--all-platforms")
    assert blob_gets(hub, "library/multi", multi.blobs) == once(multi.blobs)
    assert blob_gets(hub, "library/dlist", dlist.blobs) == once(dlist.blobs)
    have = content_digests(daemon)
    for index in (multi, dlist):
        assert set(index.blobs) | set(index.manifests) <= have
    listed = daemon.ctr("images", "ls").stdout
    assert re.search(r"docker\.io/library/dlist:1 .*linux/amd64,linux/arm64/v8", listed), listed
    assert run("docker.io/library/multi:1", "cat", "/etc/image-marker") == f"multi-{HOST_ARCH}"
    assert store_contents(mirror.data_dir) >= set(multi.blobs) | set(dlist.blobs) | set(setup.app.blobs)

    # A second containerd with an empty content store: everything from the mirror's store.
    hub.clear_counts()
    second.clear_counts()
    fresh = containerd_factory()
    for ref in ("docker.io/library/small:1", f"{SECOND}/org/app:1"):
        fresh.ctr("images", "pull", "--hosts-dir", str(hosts), ref)
    assert fresh.ctr("run", "--rm", "--snapshotter", "native", f"{SECOND}/org/app:1", "again",
                     "cat", "/etc/image-marker").stdout == "app"
    assert hub.count(None, "/v2/library/") == 0 and second.count(None, "/v2/org/") == 0


# -- podman ----------------------------------------------------------------------------


def test_podman_pulls_through_registries_conf_mirrors(setup: Setup, tmp_path: Path) -> None:
    mirror, hub, second, multi = setup.mirror, setup.hub, setup.second, setup.images.multi
    podman = Podman(tmp_path / "podman", snippet("podman/registries.conf", mirror.address))
    try:
        # A short name resolves to docker.io (unqualified-search-registries), then to the mirror.
        podman("pull", "small:1")
        assert podman.run("docker.io/library/small:1", "cat", "/etc/image-marker") == "small"
        assert blob_gets(hub, "library/small", setup.images.small.blobs) == once(setup.images.small.blobs)

        podman("pull", f"{SECOND}/org/app:1")
        assert podman.run(f"{SECOND}/org/app:1", "cat", "/etc/image-marker") == "app"
        assert blob_gets(second, "org/app", setup.app.blobs) == once(setup.app.blobs)
        assert mirror.access.count("GET", f"/v2/{SECOND}/org/app/manifests/1") >= 1

        arm64, amd64 = multi.child(OTHER_ARCH), multi.child(HOST_ARCH)
        podman("pull", "--platform", f"linux/{OTHER_ARCH}", "docker.io/library/multi:1")
        inspected = podman("image", "inspect", "--format", "{{.Architecture}} {{.Digest}}",
                           "docker.io/library/multi:1").stdout.split()
        assert inspected == [OTHER_ARCH, multi.digest]
        assert blob_gets(hub, "library/multi", arm64.blobs) == once(arm64.blobs)
        assert blob_gets(hub, "library/multi", amd64.blobs) == never(amd64.blobs)
        assert set(arm64.blobs) <= store_contents(mirror.data_dir)
    finally:
        podman.cleanup()


# -- skopeo ----------------------------------------------------------------------------


def run_skopeo(skopeo_bin: str, *args: str) -> str:
    done = subprocess.run([skopeo_bin, *args], capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"skopeo {' '.join(args)}: {done.stderr}"
    return done.stdout


def test_skopeo_inspect_copy_all_and_list_tags(setup: Setup, skopeo: str, tmp_path: Path) -> None:
    mirror, hub, multi = setup.mirror, setup.hub, setup.images.multi
    at = f"docker://{mirror.address}"
    no_tls = "--tls-verify=false"

    inspected = json.loads(run_skopeo(skopeo, "inspect", no_tls, f"{at}/library/small:1"))
    assert (inspected["Digest"], inspected["Architecture"]) == (setup.images.small.digest, "amd64")
    arm64 = json.loads(run_skopeo(skopeo, "--override-arch", "arm64", "inspect", no_tls, f"{at}/library/multi:1"))
    assert (arm64["Architecture"], arm64["Digest"]) == ("arm64", multi.digest)
    app = json.loads(run_skopeo(skopeo, "inspect", no_tls, f"{at}/{SECOND}/org/app:1"))
    assert app["Digest"] == setup.app.digest and app["Layers"] == [layer.digest for layer in setup.app.layers]

    # copy --all: every platform into an OCI layout, then into the mirror's own registry.
    layout = tmp_path / "layout"
    run_skopeo(skopeo, "copy", "--all", "--preserve-digests", "--src-tls-verify=false",
           f"{at}/library/multi:1", f"oci:{layout}:multi")
    copied = {p.name for p in (layout / "blobs" / "sha256").iterdir()}
    assert copied == {d.removeprefix("sha256:") for d in set(multi.blobs) | set(multi.manifests)}
    assert blob_gets(hub, "library/multi", multi.blobs) == once(multi.blobs)
    run_skopeo(skopeo, "copy", "--all", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
           f"{at}/library/multi:1", f"{at}/team/multi:1")
    raw = run_skopeo(skopeo, "inspect", "--raw", no_tls, f"{at}/team/multi:1").encode()
    assert raw == multi.manifest
    assert blob_gets(hub, "library/multi", multi.blobs) == once(multi.blobs)
    # A pushed repository reaches the upstream only with the question, before its first push, whether
    # the upstream serves it (the Hub answers 401 for a repository that does not exist, then the token's).
    assert hub.count(None, "/v2/team/") == hub.count("GET", "/v2/team/multi/tags/list") >= 1

    # list-tags: a cached repository, the second registry by prefix, a pushed repository.
    for name, tags in (("library/small", ["1"]), (f"{SECOND}/org/app", ["1"]), ("team/multi", ["1"])):
        listed = json.loads(run_skopeo(skopeo, "list-tags", no_tls, f"{at}/{name}"))
        assert listed["Tags"] == tags, (name, listed)


# -- the same with TLS -----------------------------------------------------------------


def test_a_tls_mirror_with_the_tls_snippets(
    setup_factory: Callable[..., Setup], tmp_path: Path, containerd_factory: Callable[[], Containerd],
    skopeo: str,
) -> None:
    """containerd's ``containerd-tls`` hosts.toml files (``ca =``), podman's registries.tls.conf
    (the CA in a certs directory), skopeo verifying the certificate."""
    pki = server_certificate(tmp_path / "pki")
    setup = setup_factory(
        env={"MIRROR_HTTP_TLS_CERTIFICATE": str(pki.certificate), "MIRROR_HTTP_TLS_KEY": str(pki.key)},
        scheme="https", verify=ssl.create_default_context(cafile=pki.ca),
    )
    mirror, small = setup.mirror, setup.images.small
    certs = tmp_path / "certs"  # podman's and skopeo's --cert-dir: *.crt are CAs
    certs.mkdir()
    shutil.copy(pki.ca, certs / "ca.crt")

    hosts = hosts_dir("containerd-tls", mirror.address, tmp_path / "certs.d",
                      **{"/etc/containerd/certs.d/mirror-ca.crt": str(pki.ca)})
    daemon = containerd_factory()
    for ref in ("docker.io/library/small:1", f"{SECOND}/org/app:1"):
        daemon.ctr("images", "pull", "--hosts-dir", str(hosts), ref)
    assert daemon.ctr("run", "--rm", "--snapshotter", "native", f"{SECOND}/org/app:1", "tls",
                      "cat", "/etc/image-marker").stdout == "app"
    assert blob_gets(setup.hub, "library/small", small.blobs) == once(small.blobs)
    assert blob_gets(setup.second, "org/app", setup.app.blobs) == once(setup.app.blobs)

    podman = Podman(tmp_path / "podman", snippet("podman/registries.tls.conf", mirror.address))
    try:
        podman("pull", "--cert-dir", str(certs), "small:1")
        podman("pull", "--cert-dir", str(certs), f"{SECOND}/org/app:1")
        assert podman.run(f"{SECOND}/org/app:1", "cat", "/etc/image-marker") == "app"
    finally:
        podman.cleanup()
    inspected = json.loads(run_skopeo(skopeo, "inspect", "--cert-dir", str(certs),
                                      f"docker://{mirror.address}/{SECOND}/org/app:1"))
    assert inspected["Digest"] == setup.app.digest
    # Everything came from the mirror's store the second and third time.
    assert blob_gets(setup.hub, "library/small", small.blobs) == once(small.blobs)
    assert blob_gets(setup.second, "org/app", setup.app.blobs) == once(setup.app.blobs)
