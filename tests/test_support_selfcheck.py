"""Self-check of tests/support against the real docker-registry.

These prove the helpers (image builder, registry accounting, fault proxy,
Hub emulator, process handling) before any mirror test relies on them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support import client
from tests.support.catalog import StandardImages
from tests.support.codings import CODINGS, Coder, CodingProxy, accepts
from tests.support.dockerd import Dockerd
from tests.support.faults import FaultProxy
from tests.support.hub import HubEmulator
from tests.support.images import (
    DOCKER_LIST,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    build_image,
    busybox_layer,
    random_layer,
    sha256_digest as sha256,
    write_oci_layout,
)
from tests.support.mirror import MirrorServer
from tests.support.procs import Proc, free_port, require_tool, wait_http
from tests.support.registry import ProxyRegistry, UpstreamRegistry

ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}


def live_members(pgid: int) -> list[int]:
    """Non-zombie processes in process group *pgid*."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


# Images ---------------------------------------------------------------------------


def test_layers_are_reproducible_and_hashed_while_streaming(tmp_path: Path) -> None:
    first = random_layer(tmp_path / "a", 3 * 1024 * 1024 + 7, seed=5)
    again = random_layer(tmp_path / "b", 3 * 1024 * 1024 + 7, seed=5)
    other = random_layer(tmp_path / "c", 3 * 1024 * 1024 + 7, seed=6)
    assert first.digest == again.digest != other.digest
    assert first.digest == sha256(first.path.read_bytes())
    assert first.size == first.path.stat().st_size
    with gzip.open(first.path) as tar:
        assert "sha256:" + hashlib.file_digest(tar, "sha256").hexdigest() == first.diff_id
    with tarfile.open(first.path) as tar:
        (member,) = tar.getmembers()
        payload = tar.extractfile(member).read()  # type: ignore[union-attr]
    assert len(payload) == 3 * 1024 * 1024 + 7
    assert len(gzip.compress(payload, 1)) > len(payload), "random payload must be incompressible"

    plain = random_layer(tmp_path, 1000, seed=1, compressed=False)
    assert plain.digest == plain.diff_id


def test_busybox_layer_is_runnable_shape(tmp_path: Path) -> None:
    layer = busybox_layer(tmp_path, marker="m")
    with tarfile.open(layer.path) as tar:
        members = {member.name: member for member in tar.getmembers()}
        assert members["bin/busybox"].mode == 0o755
        assert members["bin/busybox"].size == Path("/bin/busybox").stat().st_size
        for applet in ("sh", "echo", "cat", "ls"):
            assert members[f"bin/{applet}"].issym() and members[f"bin/{applet}"].linkname == "busybox"
        assert members["etc"].isdir() and members["tmp"].isdir()
        assert tar.extractfile("etc/image-marker").read() == b"m"  # type: ignore[union-attr]
    assert busybox_layer(tmp_path, marker="n").digest != layer.digest


def test_image_documents_are_consistent(images: StandardImages) -> None:
    small = images.small
    manifest = json.loads(small.manifest)
    config = json.loads(small.config)
    assert small.digest == sha256(small.manifest) and small.media_type == OCI_MANIFEST
    assert manifest["config"]["digest"] == small.config_digest == sha256(small.config)
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in small.layers]
    assert (config["architecture"], config["os"], config["config"]["Cmd"]) == ("amd64", "linux", ["sh"])
    for digest, path in small.blobs.items():
        assert sha256(path.read_bytes()) == digest
    assert [layer.size for layer in images.big.layers][2] > 64 * 1024 * 1024
    index = json.loads(images.dlist.manifest)
    assert images.dlist.media_type == DOCKER_LIST
    assert [entry["platform"]["architecture"] for entry in index["manifests"]] == ["amd64", "arm64"]
    assert images.multi.media_type == OCI_INDEX


# Upstream registry ------------------------------------------------------------------


def test_pushed_manifests_come_back_byte_identical(
    upstream: UpstreamRegistry, images: StandardImages, http: httpx.Client
) -> None:
    for name, tag, item in images.refs.values():
        expected = {tag: (item.media_type, item.manifest), **item.manifests}
        for reference, (media_type, document) in expected.items():
            answer = http.get(f"{upstream.url}/v2/{name}/manifests/{reference}", headers=ACCEPT)
            assert answer.status_code == 200, (name, reference, answer.text)
            assert answer.content == document
            assert answer.headers["content-type"] == media_type
            assert answer.headers["docker-content-digest"] == sha256(document)


def test_access_log_counts_one_blob_get_once(
    upstream: UpstreamRegistry, images: StandardImages
) -> None:
    layer = images.small.layers[1]
    upstream.clear_counts()
    assert client.fetch_blob_digest(upstream.url, "library/small", layer.digest) == (layer.digest, layer.size)
    assert upstream.count("GET", f"/blobs/{layer.digest}") == 1
    assert upstream.count("GET", re.compile(r"/v2/library/small/blobs/sha256:[0-9a-f]{64}$"), status=200) == 1
    assert upstream.count("HEAD", "/blobs/") == 0
    assert upstream.bytes_served(layer.digest) == layer.size
    entry = upstream.requests()[-1]
    assert (entry.method, entry.status, entry.written) == ("GET", 200, layer.size)

    missing = "sha256:" + "0" * 64
    httpx.head(f"{upstream.url}/v2/library/small/blobs/{missing}", trust_env=False)
    assert upstream.count("HEAD", missing, status=404) == 1
    assert upstream.bytes_served(missing) == 0


def test_registry_restart_keeps_port_and_data(
    upstream_factory: Callable[[], UpstreamRegistry], tmp_path: Path
) -> None:
    registry = upstream_factory()
    image = build_image(tmp_path, [random_layer(tmp_path, 4096, seed=99)])
    registry.push_image("team/app", "v1", image)
    url = registry.url
    registry.restart()
    assert registry.url == url
    assert registry.get_manifest("team/app", "v1").content == image.manifest
    assert registry.count("PUT", "/manifests/v1", status=201) == 1
    registry.stop()
    registry.stop()
    assert not registry.running


def test_proxy_registry_baseline_pulls_through(
    upstream: UpstreamRegistry, images: StandardImages, tmp_path: Path
) -> None:
    with ProxyRegistry(tmp_path / "proxy", upstream.url) as proxy:
        upstream.clear_counts()
        answer = client.get_manifest(proxy.url, "library/small", "1")
        assert answer.content == images.small.manifest
        layer = images.small.layers[0]
        assert client.fetch_blob_digest(proxy.url, "library/small", layer.digest)[0] == layer.digest
        assert proxy.count("GET", "/manifests/1", status=200) == 1
        # distribution 2.8's proxy fetches a missing blob twice from its
        # remote (one stream for the client, one to store it), and pings
        # GET /v2/ before each remote operation.
        assert upstream.count("GET", f"/blobs/{layer.digest}") == 2
        assert upstream.count("GET", re.compile(r"^/v2/$")) >= 2
        assert client.fetch_blob_digest(proxy.url, "library/small", layer.digest)[0] == layer.digest
        assert upstream.count("GET", f"/blobs/{layer.digest}") == 2
        assert proxy.count("GET", f"/blobs/{layer.digest}", status=200) == 2


# Fault proxy --------------------------------------------------------------------------


def test_fault_proxy_forwards_transparently(
    fault_proxy: FaultProxy, images: StandardImages, tmp_path: Path
) -> None:
    answer = client.get_manifest(fault_proxy.url, "library/multi", "1")
    assert answer.content == images.multi.manifest
    assert answer.headers["docker-content-digest"] == images.multi.digest
    layer = images.small.layers[1]
    assert client.fetch_blob_digest(fault_proxy.url, "library/small", layer.digest) == (layer.digest, layer.size)
    pushed = build_image(tmp_path, [random_layer(tmp_path, 2 * 1024 * 1024, seed=77)])
    assert client.push_image(fault_proxy.url, "selfcheck/through-proxy", "1", pushed) == pushed.digest
    assert fault_proxy.count("PUT", "/blobs/uploads/", status=201) == 2
    assert fault_proxy.count("GET", "/manifests/1", status=200) == 1


@pytest.mark.parametrize(("status", "code"), [(429, "TOOMANYREQUESTS"), (503, "UNAVAILABLE")])
def test_fault_status(fault_proxy: FaultProxy, images: StandardImages, http: httpx.Client,
                      status: int, code: str) -> None:
    rule = fault_proxy.add("status", "/manifests/", status=status, times=2)
    url = f"{fault_proxy.url}/v2/library/small/manifests/1"
    for _ in range(2):
        answer = http.get(url, headers=ACCEPT)
        assert answer.status_code == status
        assert answer.json()["errors"][0]["code"] == code
    if status == 429:
        assert answer.content == (
            b'{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit"}]}'
        )
    assert http.get(url, headers=ACCEPT).content == images.small.manifest
    assert rule.hits == 2
    assert fault_proxy.count("GET", "/manifests/1", status=status) == 2


def test_fault_corrupt_keeps_length(fault_proxy: FaultProxy, images: StandardImages, http: httpx.Client) -> None:
    layer = images.small.layers[1]
    fault_proxy.add("corrupt", "/blobs/", method="GET", times=1, after_bytes=1000, flip_bytes=3)
    answer = http.get(f"{fault_proxy.url}/v2/library/small/blobs/{layer.digest}")
    assert answer.status_code == 200 and len(answer.content) == layer.size
    assert int(answer.headers["content-length"]) == layer.size
    original = layer.path.read_bytes()
    differing = [i for i, (a, b) in enumerate(zip(answer.content, original, strict=True)) if a != b]
    assert differing == [1000, 1001, 1002]
    assert sha256(answer.content) != layer.digest
    assert answer.headers["docker-content-digest"] == layer.digest


def test_fault_reset_aborts_mid_body(fault_proxy: FaultProxy, images: StandardImages, http: httpx.Client) -> None:
    layer = images.small.layers[1]
    fault_proxy.add("reset", "/blobs/", times=1, after_bytes=10_000)
    received = 0
    url = f"{fault_proxy.url}/v2/library/small/blobs/{layer.digest}"
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)), http.stream("GET", url) as answer:
        assert answer.status_code == 200
        assert int(answer.headers["content-length"]) == layer.size
        for data in answer.iter_raw():
            received += len(data)
    assert 0 < received <= 10_000
    assert client.fetch_blob_digest(fault_proxy.url, "library/small", layer.digest)[0] == layer.digest


def test_fault_reset_never_sends_a_whole_small_body(fault_proxy: FaultProxy, http: httpx.Client) -> None:
    fault_proxy.add("reset", "/manifests/", times=1, after_bytes=10_000_000)
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        http.get(f"{fault_proxy.url}/v2/library/small/manifests/1", headers=ACCEPT)


def test_fault_slow_delays_the_tail(fault_proxy: FaultProxy, images: StandardImages, http: httpx.Client) -> None:
    layer = images.small.layers[1]
    rule = fault_proxy.add("slow", "/blobs/", times=1, after_bytes=layer.size - 40_000, chunk_size=10_000, delay=0.1)
    started = time.monotonic()
    answer = http.get(f"{fault_proxy.url}/v2/library/small/blobs/{layer.digest}")
    elapsed = time.monotonic() - started
    assert sha256(answer.content) == layer.digest
    assert 0.35 <= elapsed < 3.0
    assert rule.sent == layer.size


@pytest.mark.parametrize("coding", CODINGS)
def test_coding_proxy_codes_as_asked(coding: str, upstream: UpstreamRegistry, images: StandardImages) -> None:
    layer, image = images.small.layers[1], images.small
    blob, manifest = f"/v2/library/small/blobs/{layer.digest}", f"/v2/library/small/manifests/{image.digest}"
    assert accepts(None, coding) and accepts("*", coding) and accepts(f"identity, {coding};q=0.5", coding)
    assert not accepts("identity", coding) and not accepts(f"*, {coding};q=0", coding)
    for always in (False, True):
        coder = Coder(coding, always=always)
        with CodingProxy(upstream.url, coder) as proxy, \
                httpx.Client(base_url=proxy.url, trust_env=False, timeout=30.0) as http:
            plain = http.get(blob, headers={"accept-encoding": "identity"})
            assert plain.headers.get("content-encoding") == (coding if always else None)
            coded = http.get(blob, headers={"accept-encoding": coding})
            assert coded.headers["content-encoding"] == coding and "content-length" not in coded.headers
            assert coded.content != b"" and sha256(coded.content) == sha256(plain.content) == layer.digest
            with http.stream("GET", manifest, headers={"accept": OCI_MANIFEST, "accept-encoding": coding}) as raw:
                wire = b"".join(raw.iter_raw())
            assert wire != image.manifest and len(wire) < len(image.manifest)  # really coded, and smaller
            assert coder.requests()[-1].coded
            assert [r.accept_encoding for r in coder.requests()] == ["identity", coding, coding]


def test_fault_refuse_closes_without_answer(fault_proxy: FaultProxy, http: httpx.Client) -> None:
    fault_proxy.add("refuse", "^/v2/$", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        http.get(f"{fault_proxy.url}/v2/")
    assert http.get(f"{fault_proxy.url}/v2/").status_code == 200
    assert [(r.status, r.fault) for r in fault_proxy.requests()] == [(None, "refuse"), (200, None)]


def test_fault_rules_match_method_and_can_be_cleared(fault_proxy: FaultProxy, http: httpx.Client) -> None:
    url = f"{fault_proxy.url}/v2/library/small/manifests/1"
    fault_proxy.add("status", "/manifests/", method="GET", status=503)
    assert http.head(url, headers=ACCEPT).status_code == 200
    assert http.get(url, headers=ACCEPT).status_code == 503
    with fault_proxy.fault("status", "/manifests/", method="HEAD", status=429):
        assert http.head(url, headers=ACCEPT).status_code == 429
    fault_proxy.clear_rules()
    assert http.get(url, headers=ACCEPT).status_code == 200
    fault_proxy.clear_counts()
    assert fault_proxy.requests() == []


# Hub emulator -------------------------------------------------------------------------


def test_hub_flow_challenge_token_redirect_cdn(
    hub_factory: Callable[..., HubEmulator], images: StandardImages, http: httpx.Client
) -> None:
    hub = hub_factory(manifest_limit=2, username="alice", password="s3cret")
    name, layer = "library/small", images.small.layers[1]

    ping = http.get(f"{hub.url}/v2/")
    assert ping.status_code == 401
    assert ping.headers["www-authenticate"] == f'Bearer realm="{hub.auth_url}/token",service="registry.docker.io"'
    challenge = http.get(f"{hub.url}/v2/{name}/manifests/1", headers=ACCEPT)
    assert challenge.status_code == 401
    assert challenge.headers["www-authenticate"] == (
        f'Bearer realm="{hub.auth_url}/token",service="registry.docker.io",scope="repository:{name}:pull"'
    )

    params = {"service": "registry.docker.io", "scope": f"repository:{name}:pull"}
    assert http.get(f"{hub.auth_url}/token", params=params).status_code == 401
    assert http.get(f"{hub.auth_url}/token", params=params, auth=("alice", "wrong")).status_code == 401
    grant = http.get(f"{hub.auth_url}/token", params=params, auth=("alice", "s3cret")).json()
    assert grant["token"] == grant["access_token"] and grant["expires_in"] == 300 and grant["issued_at"]
    assert hub.tokens_issued == {f"repository:{name}:pull": 1}
    bearer = {**ACCEPT, "authorization": f"Bearer {grant['token']}"}

    assert http.get(f"{hub.url}/v2/library/other/manifests/1", headers=bearer).status_code == 401
    head = http.head(f"{hub.url}/v2/{name}/manifests/1", headers=bearer)
    assert head.status_code == 200 and head.headers["ratelimit-remaining"] == "2;w=21600"
    assert head.headers["docker-content-digest"] == images.small.digest
    for remaining in (1, 0):
        got = http.get(f"{hub.url}/v2/{name}/manifests/1", headers=bearer)
        assert got.content == images.small.manifest
        assert got.headers["docker-content-digest"] == images.small.digest
        assert got.headers["ratelimit-limit"] == "2;w=21600"
        assert got.headers["ratelimit-remaining"] == f"{remaining};w=21600"
    limited = http.get(f"{hub.url}/v2/{name}/manifests/1", headers=bearer)
    assert limited.status_code == 429 and limited.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert http.head(f"{hub.url}/v2/{name}/manifests/1", headers=bearer).status_code == 200
    assert hub.manifest_gets == 2

    redirect = http.get(f"{hub.url}/v2/{name}/blobs/{layer.digest}", headers=bearer)
    assert redirect.status_code == 307
    location = httpx.URL(redirect.headers["location"])
    assert str(location).startswith(hub.cdn_url) and "signature" in location.params
    blob = http.get(location)
    assert blob.status_code == 200 and sha256(blob.content) == layer.digest
    tampered = location.copy_merge_params({"signature": "0" * 64})
    assert http.get(tampered).status_code == 403
    assert not hub.cdn_saw_authorization
    # httpx drops Authorization on a cross-origin redirect, as clients must.
    followed = http.get(f"{hub.url}/v2/{name}/blobs/{layer.digest}", headers=bearer, follow_redirects=True)
    assert sha256(followed.content) == layer.digest
    assert not hub.cdn_saw_authorization
    http.get(location, headers={"authorization": "Bearer leaked"})
    assert hub.cdn_saw_authorization


def test_hub_anonymous_tokens_and_revocation(hub: HubEmulator, http: httpx.Client) -> None:
    scope = "repository:library/small:pull"
    token = http.get(f"{hub.auth_url}/token", params={"service": "registry.docker.io", "scope": scope}).json()
    bearer = {**ACCEPT, "authorization": f"Bearer {token['token']}"}
    answer = http.get(f"{hub.url}/v2/library/small/manifests/1", headers=bearer)
    assert answer.status_code == 200 and "ratelimit-limit" not in answer.headers
    hub.revoke_tokens()
    refused = http.get(f"{hub.url}/v2/library/small/manifests/1", headers=bearer)
    assert refused.status_code == 401 and refused.headers["www-authenticate"].endswith(',error="invalid_token"')
    assert hub.count("GET", "/manifests/1", status=401) == 1
    hub.hidden.add("library/small")  # as Docker Hub: a token, but no access to a missing repository
    token = http.get(f"{hub.auth_url}/token", params={"service": "registry.docker.io", "scope": scope}).json()
    bearer = {**ACCEPT, "authorization": f"Bearer {token['token']}"}
    hidden = http.get(f"{hub.url}/v2/library/small/manifests/1", headers=bearer)
    assert hidden.status_code == 401
    assert hidden.headers["www-authenticate"].endswith(',error="insufficient_scope"')


# Processes ------------------------------------------------------------------------------


def test_proc_stop_kills_the_whole_group_and_is_idempotent(tmp_path: Path) -> None:
    proc = Proc(["/bin/sh", "-c", "sleep 300 & echo started; wait"], tmp_path / "sh.log").start()
    deadline = time.monotonic() + 5
    while "started" not in proc.log_tail() and time.monotonic() < deadline:
        time.sleep(0.02)
    group = proc.pid
    assert proc.running and group is not None and live_members(group)
    proc.stop(grace=2)
    proc.stop()
    assert not proc.running
    deadline = time.monotonic() + 5
    while live_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_members(group) == []


def test_wait_http_and_require_tool(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=0.3)
    dead = Proc([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "dead.log").start()
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=10, alive=dead)
    dead.stop()
    with pytest.raises(pytest.fail.Exception, match="not installed: apt-get install -y no-such-pkg"):
        require_tool("no-such-tool-xyz", "no-such-pkg")


def test_mirror_launcher_command_line(tmp_path: Path) -> None:
    server = MirrorServer(tmp_path / "data", "http://127.0.0.1:1", workers=3, env={"MIRROR_CACHE_TAG_TTL": "1s"},
                          config=tmp_path / "mirror.yml", log_dir=tmp_path)
    assert server.args[:4] == [sys.executable, "-m", "mirror", "serve"]
    assert server.args[4:] == [
        "--listen", f"127.0.0.1:{server.port}", "--data", str(tmp_path / "data"),
        "--upstream", "http://127.0.0.1:1", "--workers", "3", "--config", str(tmp_path / "mirror.yml"),
    ]
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.stop() is None  # never started: nothing to do


# Real clients -----------------------------------------------------------------------------


@pytest.mark.slow
def test_skopeo_copies_an_oci_layout_digest_preserving(
    skopeo: str, upstream: UpstreamRegistry, images: StandardImages, tmp_path: Path
) -> None:
    source = write_oci_layout(tmp_path / "layout", images.multi, "1")
    target = f"docker://{upstream.url.removeprefix('http://')}/selfcheck/skopeo:1"
    subprocess.run([skopeo, "copy", "--all", "--preserve-digests", "--dest-tls-verify=false", source, target],
                   check=True, capture_output=True, timeout=120)
    assert upstream.get_manifest("selfcheck/skopeo", "1").content == images.multi.manifest


@pytest.mark.slow
def test_dockerd_pulls_and_runs_through_a_registry_mirror(
    dockerd_factory: Callable[..., Dockerd], upstream: UpstreamRegistry, images: StandardImages
) -> None:
    upstream.push_image("library/busybox-test", "1", images.small)
    daemon = dockerd_factory(registry_mirror=upstream.url)
    upstream.clear_counts()
    daemon.docker("pull", "busybox-test:1")
    assert daemon.docker("run", "--rm", "--network", "none", "busybox-test:1", "cat", "/etc/image-marker").stdout \
        == "small"
    # dockerd 20.10 resolves the tag with HEAD, then GETs the manifest by digest.
    assert upstream.count("HEAD", "/v2/library/busybox-test/manifests/1", status=200) == 1
    assert upstream.count("GET", f"/v2/library/busybox-test/manifests/{images.small.digest}", status=200) == 1
    for digest in images.small.blobs:
        assert upstream.count("GET", f"/v2/library/busybox-test/blobs/{digest}", status=200) == 1
