"""Several upstreams in one mirror: routing by ``?ns=`` and by path prefix, content kept apart."""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import client
from tests.support.catalog import StandardImages
from tests.support.containerd import Containerd
from tests.support.faults import FaultProxy
from tests.support.images import MANIFEST_MEDIA_TYPES, build_image, random_layer
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import settle
from tests.support.tls import ServerCertificate, server_certificate
from tests.support.waiting import wait_for

ALL_TYPES = ", ".join(MANIFEST_MEDIA_TYPES)
SECOND = "registry.test"


def manifest(http: httpx.Client, url: str) -> httpx.Response:
    return http.get(url, headers={"accept": ALL_TYPES})


def every_page(http: httpx.Client, mirror: MirrorServer, path: str, key: str) -> list[str]:
    """The *key* lists of a paged answer from *path* on, following the mirror's ``Link`` headers."""
    listed: list[str] = []
    url = f"{mirror.url}{path}"
    while url:
        page = http.get(url)
        assert page.status_code == 200, page.text
        listed += page.json()[key]
        link = page.headers.get("link")
        url = f"{mirror.url}{link.split(';')[0].strip('<>')}" if link else ""
    return listed


def test_requests_are_routed_by_ns_and_by_path_prefix(
    tmp_path: Path, upstream: UpstreamRegistry, images: StandardImages,
    upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    second = upstream_factory()
    other = build_image(tmp_path / "other", [random_layer(tmp_path / "other", 4096, seed=77)])
    second.push_image("library/small", "1", other)   # the same name as on the default upstream
    second.push_image("org/app", "1", images.small)    # the same content as the default's small:1
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": [
        {"registry": "docker.io", "url": upstream.url, "library_namespace": "true"},
        {"registry": SECOND, "url": second.url, "tag_ttl": "0s"},
    ]}))
    mirror = mirror_factory(config=config)

    default = manifest(http, f"{mirror.url}/v2/small/manifests/1")
    assert default.content == images.small.manifest
    for url in (f"{mirror.url}/v2/library/small/manifests/1?ns={SECOND}",
                f"{mirror.url}/v2/{SECOND}/library/small/manifests/1"):
        routed = manifest(http, url)
        assert routed.status_code == 200, routed.text
        assert routed.content == other.manifest
    assert manifest(http, f"{mirror.url}/v2/library/small/manifests/1?ns=docker.io").content == images.small.manifest
    assert manifest(http, f"{mirror.url}/v2/docker.io/library/small/manifests/1").content == images.small.manifest

    unknown = manifest(http, f"{mirror.url}/v2/library/small/manifests/1?ns=quay.io")
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    # containerd asks with HEAD, never sees that text, and goes to quay.io itself: the log says so, once.
    assert http.head(f"{mirror.url}/v2/library/small/manifests/1?ns=Quay.io").status_code == 404
    wait_for(lambda: "no upstream is configured for it" in mirror.log_tail(300), timeout=10, what="the warning")
    assert mirror.log_tail(300).count("requests for registry quay.io are answered 404") == 1
    # A value that is no host name is not written to the log (it could be made to say anything).
    http.head(f"{mirror.url}/v2/library/small/manifests/1", params={"ns": "a\nINJECTED line"})
    assert "\nINJECTED" not in mirror.log_tail(300) and "registry a\n" not in mirror.log_tail(300)
    # By its prefix, a registry with no upstream is not asked of Docker Hub (whose names never begin with
    # a host): before, the default upstream was asked for "quay.io/org/app", and said only "manifest unknown".
    upstream.clear_counts()
    for path in ("manifests/1", f"blobs/{images.small.config_digest}", "tags/list"):
        prefixed = http.get(f"{mirror.url}/v2/quay.io/org/app/{path}")
        assert prefixed.status_code == 404, (path, prefixed.text)
        assert prefixed.json()["errors"][0]["code"] == "NAME_UNKNOWN", (path, prefixed.text)
        assert prefixed.json()["errors"][0]["message"] == "no upstream is configured for quay.io", prefixed.text
    assert upstream.count(None, "quay.io") == 0
    # Pushes to such a name go on as to any (push.prefixes decides who may), and are then served.
    client.push_image(mirror.url, "quay.io/team/own", "1", images.small, client=http)
    own = manifest(http, f"{mirror.url}/v2/quay.io/team/own/manifests/1")
    assert (own.content, own.headers["x-mirror-cache"]) == (images.small.manifest, "LOCAL")

    # The same blobs through the second upstream are stored once: its manifest vouches for them.
    for digest in (images.small.config_digest, *(layer.digest for layer in images.small.layers)):
        assert client.fetch_blob_digest(mirror.url, "small", digest, client=http)[0] == digest
    settle(mirror.data_dir)  # fills are synced and moved into blobs/ just after their last byte
    stored = sorted(p.name for p in (mirror.data_dir / "blobs").rglob("*") if p.is_file())
    second.clear_counts()
    assert manifest(http, f"{mirror.url}/v2/org/app/manifests/1?ns={SECOND}").content == images.small.manifest
    for digest in (images.small.config_digest, *(layer.digest for layer in images.small.layers)):
        answer = http.get(f"{mirror.url}/v2/{SECOND}/org/app/blobs/{digest}")
        assert answer.status_code == 200
    assert second.count(None, re.compile("/blobs/")) == 0
    assert second.count("GET", re.compile("^/v2/org/app/manifests/1$")) == 1
    assert sorted(p.name for p in (mirror.data_dir / "blobs").rglob("*") if p.is_file()) == stored

    # Each upstream keeps its own tag TTL: the second revalidates every time, the default does not.
    upstream.clear_counts()
    second.clear_counts()
    assert manifest(http, f"{mirror.url}/v2/small/manifests/1").headers["x-mirror-cache"] == "HIT"
    assert manifest(http, f"{mirror.url}/v2/{SECOND}/org/app/manifests/1").headers["x-mirror-cache"] == "HIT"
    assert upstream.count(None, re.compile("/manifests/")) == 0
    assert second.count("HEAD", re.compile("^/v2/org/app/manifests/1$")) == 1

    catalog = http.get(f"{mirror.url}/v2/_catalog").json()["repositories"]
    assert catalog == ["library/small", "quay.io/team/own", f"{SECOND}/library/small", f"{SECOND}/org/app"]
    tags = http.get(f"{mirror.url}/v2/{SECOND}/org/app/tags/list").json()
    assert tags == {"name": f"{SECOND}/org/app", "tags": ["1"]}

    # With the second upstream gone, its content is still served (stale), apart from the default's.
    second.stop()
    stale = manifest(http, f"{mirror.url}/v2/org/app/manifests/1?ns={SECOND}")
    assert stale.status_code == 200 and stale.headers["x-mirror-cache"] == "STALE"
    assert manifest(http, f"{mirror.url}/v2/small/manifests/1").headers["x-mirror-cache"] == "HIT"


def test_bad_upstreams_config_stops_start_up(tmp_path: Path, mirror_factory: Callable[..., MirrorServer]) -> None:
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": [{"registry": "ghcr.io", "url": "ftp://nope"}]}))
    server = mirror_factory(config=config, start=False)
    with pytest.raises(RuntimeError, match=r"bad value for upstreams\[0\]\.url"):
        server.start(timeout=10)


def test_a_delete_forgets_what_the_same_name_reads(
    tmp_path: Path, images: StandardImages, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """A DELETE of cached content names the repository as a GET does, ``?ns=`` and registry
    prefixes included, and forgets exactly what that GET is answered from."""
    hub, second = upstream_factory(), upstream_factory()  # both stopped below: not the shared upstream
    hub.push_image("library/small", "1", images.small)
    second.push_image("org/app", "1", images.small)
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": [
        {"registry": "docker.io", "url": hub.url, "library_namespace": "true"},
        {"registry": SECOND, "url": second.url},
    ]}))
    mirror = mirror_factory(hub.url, config=config)  # --upstream names the first upstream's URL
    reads = {  # one URL per way of naming a cached repository
        "ns": f"{mirror.url}/v2/org/app/manifests/1?ns={SECOND}",
        "prefix": f"{mirror.url}/v2/docker.io/library/small/manifests/1",
        "hub ns": f"{mirror.url}/v2/library/small/manifests/1?ns=docker.io",
    }
    for how, url in reads.items():
        assert manifest(http, url).status_code == 200, how
    digest = images.small.digest
    config_blob = images.small.config_digest
    blob = f"{mirror.url}/v2/{SECOND}/org/app/blobs/{config_blob}"
    assert http.get(blob).status_code == 200
    settle(mirror.data_dir)
    second.stop()  # from now on, only what the mirror keeps can answer
    hub.stop()

    deleted = http.delete(reads["ns"])
    assert deleted.status_code == 202, deleted.text
    assert manifest(http, reads["ns"]).status_code != 200  # the tag is forgotten, not served stale
    assert http.delete(f"{mirror.url}/v2/{SECOND}/org/app/blobs/{config_blob}").status_code == 202
    assert http.get(blob).status_code != 200

    by_digest = f"{mirror.url}/v2/docker.io/library/small/manifests/{digest}"
    assert manifest(http, by_digest).status_code == 200
    deleted = http.delete(by_digest)
    assert deleted.status_code == 202, deleted.text
    for how in ("prefix", "hub ns"):
        gone = manifest(http, reads[how])
        assert gone.status_code != 200, (how, gone.headers.get("x-mirror-cache"))


def test_a_name_of_another_upstream_is_never_a_pushed_repository_and_takes_no_pushes(
    tmp_path: Path, upstream: UpstreamRegistry, images: StandardImages,
    upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """A pushed repository shares the default registry's names only: the same name of another
    upstream (``?ns=`` or its prefix) is that registry's, and a push cannot stand in for it."""
    second = upstream_factory()
    other = build_image(tmp_path / "other", [random_layer(tmp_path / "other", 4096, seed=78)])
    second.push_image("team/plain", "1", other)
    for n in range(5):
        second.push_image("many/tags", f"g{n}", other)
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": [
        {"registry": "docker.io", "url": upstream.url, "library_namespace": "true"},
        {"registry": SECOND, "url": second.url},
    ]}))
    mirror = mirror_factory(config=config)
    client.push_image(mirror.url, "team/plain", "1", images.small, client=http)
    for url in (f"{mirror.url}/v2/team/plain/manifests/1", f"{mirror.url}/v2/team/plain/manifests/1?ns=docker.io"):
        mine = manifest(http, url)
        assert (mine.content, mine.headers["x-mirror-cache"]) == (images.small.manifest, "LOCAL"), url
    for url in (f"{mirror.url}/v2/team/plain/manifests/1?ns={SECOND}",
                f"{mirror.url}/v2/{SECOND}/team/plain/manifests/1"):
        theirs = manifest(http, url)
        assert theirs.status_code == 200 and theirs.content == other.manifest, (url, theirs.text)
        assert theirs.headers["x-mirror-cache"] in ("MISS", "HIT"), url

    # Pushes to a name of the second upstream's, by prefix or by ?ns=, are refused before anything is stored.
    config_blob = images.small.config
    for url, ns in ((f"{mirror.url}/v2/{SECOND}/org/shadow/blobs/uploads/", {}),
                    (f"{mirror.url}/v2/org/shadow/blobs/uploads/", {"ns": SECOND}),
                    (f"{mirror.url}/v2/{SECOND}/org/shadow/blobs/uploads/", {"ns": "docker.io"}),
                    (f"{mirror.url}/v2/{SECOND}/org/shadow/blobs/uploads/", {"ns": "Index.Docker.IO"})):
        refused = http.post(url, params={**ns, "digest": images.small.config_digest}, content=config_blob)
        assert refused.status_code == 403 and refused.json()["errors"][0]["code"] == "DENIED", (url, refused.text)
        assert f"is a repository of {SECOND}," in refused.json()["errors"][0]["message"], refused.text
    put = http.put(f"{mirror.url}/v2/{SECOND}/org/shadow/manifests/1", content=images.small.manifest,
                   headers={"content-type": images.small.media_type})
    assert put.status_code == 403 and put.json()["errors"][0]["code"] == "DENIED", put.text
    assert "org/shadow" not in " ".join(http.get(f"{mirror.url}/v2/_catalog").json()["repositories"])

    # A tag list's next page is of the same registry.
    assert every_page(http, mirror, f"/v2/many/tags/tags/list?ns={SECOND}&n=2", "tags") == [f"g{n}" for n in range(5)]


def test_a_registry_with_a_port_is_left_out_of_the_catalog_and_listed_and_shown_by_the_web_ui(
    tmp_path: Path, upstream: UpstreamRegistry, images: StandardImages,
    upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """``reg.local:5000`` is what containerd names a private registry on a port (``?ns=``): its
    repositories are reached with ``?ns=`` only (a colon is outside the spec's name grammar), so the
    catalog leaves them out (clients walking it would fail on such a name); the web UI lists them as
    ``reg.local:5000/org/app`` and shows them by that name."""
    second = upstream_factory()
    second.push_image("org/app", "1", images.small)
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": [
        {"registry": "docker.io", "url": upstream.url, "library_namespace": "true"},
        {"registry": "reg.local:5000", "url": second.url},
    ]}))
    mirror = mirror_factory(config=config)
    assert manifest(http, f"{mirror.url}/v2/org/app/manifests/1?ns=reg.local:5000").content == images.small.manifest
    assert manifest(http, f"{mirror.url}/v2/small/manifests/1").status_code == 200
    client.push_image(mirror.url, "team/x", "1", images.small, client=http)  # listed after it
    listed = every_page(http, mirror, "/v2/_catalog?n=1", "repositories")
    assert listed == ["library/small", "team/x"]
    assert every_page(http, mirror, "/v2/_catalog?last=reg.local:5000/org/app", "repositories") == ["team/x"]
    assert 'href="/ui/r/reg.local:5000/org/app"' in http.get(f"{mirror.url}/ui/").text
    shown = http.get(f"{mirror.url}/ui/r/reg.local:5000/org/app")
    assert shown.status_code == 200 and "reg.local:5000/org/app" in shown.text, shown.status_code
    # Its pull command is containerd's (only ?ns= reaches it), none with the port in a path prefix, and
    # a real containerd pulls with it as it is, the mirror a host of that registry's hosts.toml.
    assert f"{mirror.address}/reg.local:5000" not in shown.text
    commands = re.findall(r'data-copy="(ctr images pull [^"]+)"', shown.text)
    assert commands == ["ctr images pull --hosts-dir /etc/containerd/certs.d reg.local:5000/org/app:1"], commands
    hosts = tmp_path / "certs.d"
    (hosts / "reg.local:5000").mkdir(parents=True)
    (hosts / "reg.local:5000" / "hosts.toml").write_text(
        f'server = "http://reg.local:5000"\n\n[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n')
    with Containerd(tmp_path / "containerd") as daemon:
        daemon.ctr(*commands[0].replace("/etc/containerd/certs.d", str(hosts)).split()[1:])
        assert "reg.local:5000/org/app:1" in daemon.ctr("images", "ls", "--quiet").stdout.split()


def test_a_repository_pushed_before_its_prefix_became_an_upstream_is_reached_only_with_the_default_ns(
    tmp_path: Path, upstream: UpstreamRegistry, images: StandardImages,
    upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """``registry.test/old/pushed`` pushed while ``registry.test`` was no upstream, which is then added:
    that name is now the upstream's, for pulls, the web UI and its actions alike; the pushed repository
    is reached with ``?ns=docker.io`` only, to pull it or delete it."""
    second = upstream_factory()
    other = build_image(tmp_path / "other", [random_layer(tmp_path / "other", 4096, seed=79)])
    second.push_image("old/pushed", "1", other)
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": [
        {"registry": "docker.io", "url": upstream.url, "library_namespace": "true"}],
        "delete": {"enabled": True}}))
    mirror = mirror_factory(config=config)
    client.push_image(mirror.url, f"{SECOND}/old/pushed", "1", images.small, client=http)
    mirror.stop()
    config.write_text(yaml.safe_dump({"upstreams": [
        {"registry": "docker.io", "url": upstream.url, "library_namespace": "true"},
        {"registry": SECOND, "url": second.url}], "delete": {"enabled": True}}))
    mirror.start()

    theirs = manifest(http, f"{mirror.url}/v2/{SECOND}/old/pushed/manifests/1")
    assert (theirs.content, theirs.headers["x-mirror-cache"]) == (other.manifest, "MISS"), theirs.text
    page = http.get(f"{mirror.url}/ui/r/{SECOND}/old/pushed")
    assert page.status_code == 200 and f"cached</span> from {SECOND}" in page.text, page.text
    pushed = f"{mirror.url}/v2/{SECOND}/old/pushed/manifests/"
    mine = manifest(http, f"{pushed}1?ns=docker.io")
    assert (mine.content, mine.headers["x-mirror-cache"]) == (images.small.manifest, "LOCAL")
    gone = http.delete(f"{pushed}{images.small.digest}", params={"ns": "docker.io"})
    assert gone.status_code == 202, gone.text
    assert manifest(http, f"{pushed}1?ns=docker.io").status_code == 404
    assert manifest(http, f"{pushed}1").headers["x-mirror-cache"] == "HIT"  # the upstream's copy is untouched


def test_the_default_registrys_prefix_names_the_same_pushed_repository_as_the_bare_name(
    tmp_path: Path, images: StandardImages, mirror: MirrorServer, http: httpx.Client,
) -> None:
    """``docker.io/team/x`` is ``team/x``, as reads already took it: a push by the prefixed name lands
    in ``team/x`` (one repository, listed once), and either name reads what either pushed."""
    other = build_image(tmp_path / "other", [random_layer(tmp_path / "other", 4096, seed=81)])
    client.push_image(mirror.url, "docker.io/team/x", "1", images.small, client=http)
    client.push_image(mirror.url, "team/y", "1", other, client=http)
    for name, image in (("team/x", images.small), ("docker.io/team/x", images.small),
                        ("index.docker.io/team/x", images.small), ("docker.io/team/y", other)):
        got = manifest(http, f"{mirror.url}/v2/{name}/manifests/1")
        assert got.status_code == 200 and got.content == image.manifest, (name, got.status_code, got.text)
        assert got.headers.get("x-mirror-cache") != "MISS", name
    assert every_page(http, mirror, "/v2/_catalog", "repositories") == ["team/x", "team/y"]
    assert every_page(http, mirror, "/v2/docker.io/team/x/tags/list", "tags") == ["1"]
    layer = next(iter(images.small.blobs))
    mounted = http.post(f"{mirror.url}/v2/team/z/blobs/uploads/", params={"mount": layer, "from": "docker.io/team/x"})
    assert mounted.status_code == 201, mounted.text
    gone = http.delete(f"{mirror.url}/v2/docker.io/team/y/manifests/{other.digest}")
    assert gone.status_code == 202, gone.text
    assert manifest(http, f"{mirror.url}/v2/team/y/manifests/1").status_code == 404


class TlsUpstream(UpstreamRegistry):
    """A registry on TLS with a certificate of a private CA, serving *storage* (another registry's)."""

    def __init__(self, root: Path, storage: Path, certificate: ServerCertificate) -> None:
        super().__init__(root)
        root.mkdir(parents=True, exist_ok=True)
        self.data_dir, self.certificate = storage, certificate
        self.verify = ssl.create_default_context(cafile=certificate.ca)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["http"]["tls"] = {"certificate": str(self.certificate.certificate), "key": str(self.certificate.key)}
        return config


def test_an_upstream_whose_certificate_a_private_ca_signed_is_trusted_with_its_tls_ca_only(
    tmp_path: Path, upstream: UpstreamRegistry, images: StandardImages, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """``upstreams[n].tls.ca``: the CA is trusted for that upstream (and its token realm), besides the
    usual roots; without it the upstream's certificate is refused, and a file that is not a PEM CA
    stops start-up naming the key."""
    certificate = server_certificate(tmp_path / "ca")
    with TlsUpstream(tmp_path / "tls", upstream.data_dir, certificate) as private:
        entries = [{"registry": "docker.io", "url": upstream.url},
                   {"registry": SECOND, "url": private.url, "tls": {"ca": str(certificate.ca)}, "tag_ttl": "0s"},
                   {"registry": "other.test", "url": private.url}]
        config = tmp_path / "mirror.yml"
        config.write_text(yaml.safe_dump({"upstreams": entries}))
        mirror = mirror_factory(config=config, workers=2)  # the workers get it from the server too
        for _ in range(6):  # revalidated each time (tag_ttl 0s), by either worker
            trusted = manifest(http, f"{mirror.url}/v2/library/small/manifests/1?ns={SECOND}")
            assert (trusted.status_code, trusted.content) == (200, images.small.manifest), trusted.text
            assert trusted.headers["x-mirror-cache"] in ("MISS", "HIT"), trusted.headers
        for digest in (images.small.config_digest, *(layer.digest for layer in images.small.layers)):
            got = client.fetch_blob_digest(mirror.url, f"{SECOND}/library/small", digest, client=http)
            assert got[0] == digest
        refused = manifest(http, f"{mirror.url}/v2/library/small/manifests/1?ns=other.test")
        assert refused.status_code == 503 and "CERTIFICATE_VERIFY_FAILED" in refused.text, refused.text
        assert private.count("HEAD", re.compile("^/v2/library/small/manifests/1$")) >= 5

    (tmp_path / "not-a-ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    config.write_text(yaml.safe_dump({"upstreams": [{"registry": SECOND, "url": "https://x.test",
                                                     "tls": {"ca": str(tmp_path / "not-a-ca.pem")}}]}))
    server = mirror_factory(config=config, start=False)
    with pytest.raises(RuntimeError, match=r"bad value for upstreams\[0\]\.tls\.ca: .*not a PEM file of CA"):
        server.start(timeout=10)


def test_a_client_of_one_upstream_does_not_wait_for_another_upstreams_hung_fetch_of_the_same_blob(
    tmp_path: Path, images: StandardImages, fault_proxy: FaultProxy, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A blob's fetch is shared by digest, whichever upstream it is from.  Its readers asking the same
    upstream wait for it however long it takes (one fetch for all of them); one asking another upstream
    waits at most ``OTHER_UPSTREAM_WAIT`` (2 s) for its first answer, then streams its own upstream's
    bytes (``BYPASS``); the hung fetch still lands in the store for everyone."""
    second = upstream_factory()
    second.push_image("org/app", "1", images.small)  # the same content as the default's small:1
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": [
        {"registry": "docker.io", "url": fault_proxy.url, "library_namespace": "true", "read_timeout": "60s"},
        {"registry": SECOND, "url": second.url},
    ]}))
    mirror = mirror_factory(fault_proxy.url, config=config, workers=2)
    assert manifest(http, f"{mirror.url}/v2/small/manifests/1").content == images.small.manifest
    assert manifest(http, f"{mirror.url}/v2/{SECOND}/org/app/manifests/1").content == images.small.manifest
    layer = images.small.layers[0].digest
    pattern = re.compile(f"/blobs/{re.escape(layer)}$")
    late = fault_proxy.add("late", f"/blobs/{layer}$", method="GET", delay=8.0)
    got: list[tuple[str, int]] = []

    def hub_client() -> None:
        with httpx.Client(timeout=60.0, trust_env=False) as own:
            got.append(client.fetch_blob_digest(mirror.url, "small", layer, client=own))

    hub_clients = [threading.Thread(target=hub_client) for _ in range(2)]
    for each in hub_clients:
        each.start()
        wait_for(lambda: late.hits == 1, timeout=10, what="the default upstream asked for the blob")
    started = time.monotonic()
    answer = http.get(f"{mirror.url}/v2/{SECOND}/org/app/blobs/{layer}")
    waited = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == layer
    assert answer.headers["x-mirror-cache"] == "BYPASS"
    assert waited < late.delay, f"waited {waited:.1f} s for the other upstream's fetch"
    assert second.count("GET", pattern) == 1

    for each in hub_clients:
        each.join(timeout=60)
    assert got == [(layer, images.small.layers[0].size)] * 2
    assert fault_proxy.count("GET", pattern) == 1 and late.hits == 1  # its two clients shared one fetch
    settle(mirror.data_dir)
    again = http.get(f"{mirror.url}/v2/{SECOND}/org/app/blobs/{layer}")
    assert again.status_code == 200 and again.headers["x-mirror-cache"] == "HIT"
    assert second.count("GET", pattern) == 1


@pytest.mark.parametrize("several", [False, True], ids=["one-upstream", "several-upstreams"])
def test_a_fill_notes_which_upstream_it_waits_for_only_when_there_are_several(
    tmp_path: Path, images: StandardImages, fault_proxy: FaultProxy, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client, several: bool,
) -> None:
    """The note (``tmp/<digest>.meta``) lets a client of another upstream stop waiting for the fill;
    with one upstream there is no other, and a cold fill writes nothing before its upstream answers."""
    upstreams: list[dict[str, str]] = [{"registry": "docker.io", "url": fault_proxy.url, "library_namespace": "true"}]
    if several:
        upstreams.append({"registry": SECOND, "url": upstream_factory().url})
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": upstreams}))
    mirror = mirror_factory(fault_proxy.url, config=config)
    assert manifest(http, f"{mirror.url}/v2/small/manifests/1").content == images.small.manifest
    layer = images.small.layers[0].digest
    late = fault_proxy.add("late", f"/blobs/{layer}$", method="GET", delay=3.0)
    got: list[tuple[str, int]] = []
    puller = threading.Thread(target=lambda: got.append(client.fetch_blob_digest(mirror.url, "small", layer)))
    puller.start()
    try:
        wait_for(lambda: late.hits == 1, timeout=10, what="the upstream asked for the blob")
        note = mirror.data_dir / "tmp" / f"{layer.replace(':', '-')}.meta"
        time.sleep(0.5)  # the fill is waiting for the upstream's answer
        assert note.exists() is several
    finally:
        puller.join(timeout=30)
    assert got == [(layer, images.small.layers[0].size)]


def test_an_upstream_named_localhost_is_reached_by_its_prefix_as_by_ns(
    tmp_path: Path, upstream: UpstreamRegistry, images: StandardImages,
    upstream_factory: Callable[[], UpstreamRegistry], mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """``localhost`` is a registry's name as a dotted one is (as docker parses names); before, its
    prefix went to the default upstream as part of the repository's name, while the catalog listed it."""
    second = upstream_factory()
    second.push_image("org/app", "1", images.small)
    config = tmp_path / "mirror.yml"
    config.write_text(yaml.safe_dump({"upstreams": [
        {"registry": "docker.io", "url": upstream.url}, {"registry": "localhost", "url": second.url}]}))
    mirror = mirror_factory(config=config)
    for url in (f"{mirror.url}/v2/org/app/manifests/1?ns=localhost", f"{mirror.url}/v2/localhost/org/app/manifests/1"):
        answer = manifest(http, url)
        assert answer.status_code == 200 and answer.content == images.small.manifest, (url, answer.text)
    assert "localhost/org/app" in http.get(f"{mirror.url}/v2/_catalog").json()["repositories"]
    tags = http.get(f"{mirror.url}/v2/localhost/org/app/tags/list")
    assert tags.status_code == 200 and tags.json() == {"name": "localhost/org/app", "tags": ["1"]}, tags.text
    assert upstream.count(None, "localhost/") == 0, "the default upstream was never asked"
