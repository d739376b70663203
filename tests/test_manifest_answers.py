"""Manifest answers from upstreams: what is not a manifest is refused, signed schema 1 is passed through.

The upstream is a :class:`FaultProxy` in front of the session's docker-registry.  It answers
manifest requests itself where a real registry cannot show the case: a login page (``200
text/html``), bodies that claim a manifest media type but are not one, and a libtrust-signed
schema 1 manifest whose ``Docker-Content-Digest`` is the digest of its payload.  Every test checks
what the client got, how often the upstream was asked, and that nothing wrong reached ``DATA/``
(a walk of ``blobs/`` and ``mirror fsck --verify-content``).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror.spec import schema1
from tests.support.catalog import StandardImages
from tests.support.faults import FaultProxy
from tests.support.images import MANIFEST_MEDIA_TYPES, build_image, random_layer, sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.schema1 import SCHEMA1_SIGNED, Schema1, b64url, signed_schema1
from tests.support.storecheck import fsck_clean, mirror_cli, stored_objects
from tests.support.waiting import wait_for

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}
ENV = {
    "MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true",
    "MIRROR_UPSTREAM_RETRIES": "1",
    "MIRROR_UPSTREAM_CONNECT_TIMEOUT": "2s",
}
TTL = 0.5
SHORT_TTL = {**ENV, "MIRROR_CACHE_TAG_TTL": f"{int(TTL * 1000)}ms"}
LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form>...</form></body></html>\n"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


# Helpers --------------------------------------------------------------------------------------------


def request(mirror: MirrorServer, name: str, reference: str, method: str = "GET") -> httpx.Response:
    return httpx.request(method, f"{mirror.url}/v2/{name}/manifests/{reference}", headers=ACCEPT,
                         timeout=30.0, trust_env=False)


def invalid_answer(answer: httpx.Response) -> str:
    """The detail of a ``502 UNAVAILABLE`` "upstream sent an invalid answer" (checked to be one)."""
    assert answer.status_code == 502, (answer.status_code, answer.text)
    assert "x-mirror-cache" not in answer.headers
    if not answer.content:  # a HEAD
        return ""
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    [error] = answer.json()["errors"]
    assert (error["code"], error["message"]) == ("UNAVAILABLE", "upstream sent an invalid answer"), error
    return str(error["detail"])


def stored(mirror: MirrorServer) -> dict[str, bytes]:
    """Every object under DATA/blobs by its name, and what it holds."""
    return {digest: path.read_bytes() for digest, path in stored_objects(mirror.data_dir).items()}


def counter(mirror: MirrorServer, name: str, **labels: str) -> float:
    answer = httpx.get(f"{mirror.url}/metrics", timeout=30.0, trust_env=False)
    return sum(s.value for family in text_string_to_metric_families(answer.text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def stale_answers(mirror: MirrorServer) -> float:
    return counter(mirror, "mirror_cache_requests_total", kind="manifest", outcome="stale")


def past_ttl(since: float) -> None:
    time.sleep(max(0.0, since + TTL + 0.1 - time.monotonic()))


@pytest.fixture
def proxied(fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
            upstream: UpstreamRegistry) -> Callable[..., MirrorServer]:
    """Make a mirror whose upstream is the fault proxy; counters start at zero."""

    def make(env: Mapping[str, str] = ENV) -> MirrorServer:
        mirror = mirror_factory(fault_proxy.url, env=env)
        fault_proxy.clear_counts()
        upstream.clear_counts()
        return mirror

    return make


def login_page(fault_proxy: FaultProxy, path: str = "/manifests/", method: str | None = None) -> None:
    """Every manifest request matching *path* (and *method*) answered by a web login page."""
    fault_proxy.add("status", path, method=method, status=200, body=LOGIN_PAGE,
                    headers={"content-type": "text/html; charset=utf-8"})


# Answers that are not manifests ---------------------------------------------------------------------


def test_a_login_page_is_refused_and_never_stored(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages
) -> None:
    mirror = proxied()
    login_page(fault_proxy)
    for reference in ("1", images.small.digest):
        detail = invalid_answer(request(mirror, "small", reference))
        assert "text/html" in detail and "not a manifest media type" in detail, detail
        assert invalid_answer(request(mirror, "small", reference, "HEAD")) == ""  # a miss: a GET upstream
        # Not remembered as bad either: the next request asks again.
        invalid_answer(request(mirror, "small", reference))
        assert fault_proxy.count("GET", f"/manifests/{reference}") == 3
    assert stored(mirror) == {}

    fault_proxy.clear_rules()  # the upstream recovers
    for reference in ("1", images.small.digest):
        good = request(mirror, "small", reference)
        assert (good.status_code, good.content) == (200, images.small.manifest)
        assert good.headers["docker-content-digest"] == images.small.digest
    assert stored(mirror) == {images.small.digest: images.small.manifest}
    fsck_clean(mirror.data_dir)


def test_a_login_page_after_the_tag_ttl_serves_the_cached_copy(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, upstream: UpstreamRegistry, tmp_path: Path,
) -> None:
    before, after = (build_image(tmp_path, [random_layer(tmp_path, 4096, seed)]) for seed in (61, 62))
    upstream.push_image("library/turns", "1", before)
    mirror = proxied(SHORT_TTL)
    first = request(mirror, "turns", "1")
    fetched = time.monotonic()
    assert (first.status_code, first.headers["x-mirror-cache"]) == (200, "MISS")
    past_ttl(fetched)
    fault_proxy.clear_counts()

    login_page(fault_proxy)
    for method in ("GET", "HEAD", "GET"):
        stale = request(mirror, "turns", "1", method)
        assert (stale.status_code, stale.headers["x-mirror-cache"]) == (200, "STALE"), stale.text
        assert stale.headers["docker-content-digest"] == before.digest
        assert stale.content == (before.manifest if method == "GET" else b"")
    assert fault_proxy.count("HEAD", "/manifests/1") == 3  # every request asked again
    assert stale_answers(mirror) == 3
    assert counter(mirror, "mirror_upstream_errors_total", reason="invalid") == 3

    # The tag moves upstream and only its GET is a login page (the HEAD shows the new digest).
    fault_proxy.clear_rules()
    upstream.push_image("library/turns", "1", after)
    login_page(fault_proxy, method="GET")
    stale = request(mirror, "turns", "1")
    assert (stale.status_code, stale.headers["x-mirror-cache"], stale.content) == (200, "STALE", before.manifest)
    assert fault_proxy.count("GET", "/manifests/1") == 1

    fault_proxy.clear_rules()  # recovered: the new manifest is fetched, the HTML never was stored
    fresh = request(mirror, "turns", "1")
    assert (fresh.status_code, fresh.headers["x-mirror-cache"], fresh.content) == (200, "MISS", after.manifest)
    assert stored(mirror) == {before.digest: before.manifest, after.digest: after.manifest}
    fsck_clean(mirror.data_dir)


def _schema1_without_signatures() -> bytes:
    return json.dumps({"schemaVersion": 1, "name": "library/small", "tag": "1",
                       "fsLayers": [{"blobSum": sha256(b"x")}], "history": []}).encode()


@pytest.mark.parametrize(("content_type", "body", "what"), [
    (OCI_MANIFEST, LOGIN_PAGE, "is not JSON"),
    (OCI_MANIFEST, b'["schemaVersion", 2]', "is not a JSON object"),
    (OCI_MANIFEST, json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode(),
     f"its mediaType is '{OCI_INDEX}'"),
    (DOCKER_MANIFEST, json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "needs schemaVersion 2"),
    (OCI_INDEX, json.dumps({"schemaVersion": 2, "manifests": {"digest": "sha256:00"}}).encode(),
     "manifests is not a list"),
    (OCI_MANIFEST, json.dumps({"schemaVersion": 2, "config": {"size": 2}, "layers": []}).encode(),
     "an entry of config has no valid digest"),
    ("application/json", b'{"status": "ok", "login": "/sso"}', "is not a manifest"),
    (SCHEMA1_SIGNED, _schema1_without_signatures(), "no signatures"),
    ("", json.dumps({"schemaVersion": 2, "manifests": []}).encode(), "'(none)' is not a manifest media type"),
], ids=["html-as-oci", "array", "other-mediatype", "wrong-schema-version", "manifests-not-list",
        "bad-config-digest", "json-not-manifest", "schema1-unsigned-as-signed", "no-content-type"])
def test_a_body_that_is_not_the_manifest_it_claims_is_refused(
    content_type: str, body: bytes, what: str, proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy,
    images: StandardImages,
) -> None:
    mirror = proxied()
    # Announced with the digest of the bytes sent, so that only the check of the body can refuse it.
    headers = {"docker-content-digest": sha256(body), "content-type": content_type}
    fault_proxy.add("status", "/manifests/", method="GET", status=200, body=body, headers=headers)
    for _ in range(2):
        detail = invalid_answer(request(mirror, "small", "1"))
        assert what in detail, detail
    assert fault_proxy.count("GET", "/manifests/1") == 2
    assert stored(mirror) == {}
    fault_proxy.clear_rules()
    assert request(mirror, "small", "1").content == images.small.manifest
    fsck_clean(mirror.data_dir)


def test_a_manifest_answer_that_does_not_match_the_digest_announced_is_refused(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages
) -> None:
    mirror = proxied()
    headers = {"docker-content-digest": images.small.digest, "content-type": images.small.media_type}
    other = images.big.manifest  # a well-formed manifest, but not the one announced
    fault_proxy.add("status", "/manifests/", method="GET", status=200, body=other, headers=headers)
    detail = invalid_answer(request(mirror, "small", "1"))
    assert f"not the {images.small.digest} announced" in detail, detail
    detail = invalid_answer(request(mirror, "small", images.small.digest))
    assert f"not the {images.small.digest} asked for" in detail, detail
    assert stored(mirror) == {}


# Signed schema 1 ------------------------------------------------------------------------------------


@pytest.fixture
def old_image(upstream: UpstreamRegistry, fault_proxy: FaultProxy, tmp_path: Path) -> Schema1:
    """A signed schema 1 image ``library/old:1``: its layers in the registry, its manifest (by tag and by
    its registry digest) served by the fault proxy with that digest, as Docker Hub serves them."""
    layers = [random_layer(tmp_path, 3000, 51), random_layer(tmp_path, 5000, 52)]
    upstream.push_image("library/old", "v2", build_image(tmp_path, layers))  # the layers, in the real registry
    old = signed_schema1("library/old", "1", layers)
    assert old.digest != old.bytes_digest
    headers = {"content-type": SCHEMA1_SIGNED, "docker-content-digest": old.digest}
    fault_proxy.add("status", f"/library/old/manifests/(1|{old.digest})$", status=200, body=old.body, headers=headers)
    return old


def test_signed_schema1_is_served_by_tag_and_by_its_payload_digest(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, old_image: Schema1, http: httpx.Client,
) -> None:
    old = old_image
    for first, then in (("1", old.digest), (old.digest, "1")):  # each way round, in a new mirror
        mirror = proxied()
        for reference, cache in ((first, "MISS"), (then, "HIT" if then == old.digest else "MISS"), (first, "HIT")):
            for method in ("GET", "HEAD"):
                answer = request(mirror, "old", reference, method)
                assert answer.status_code == 200, answer.text
                assert answer.headers["docker-content-digest"] == old.digest
                assert answer.headers["content-type"] == SCHEMA1_SIGNED
                assert answer.headers["content-length"] == str(len(old.body))
                assert answer.content == (old.body if method == "GET" else b"")
                if method == "GET":
                    assert answer.headers["x-mirror-cache"] == cache, (reference, answer.headers)
        for layer in old.layers:
            blob = http.get(f"{mirror.url}/v2/old/blobs/{layer.digest}")
            assert (blob.status_code, sha256(blob.content)) == (200, layer.digest)
        # Stored byte for byte under the name registries give it.
        assert stored(mirror)[old.digest] == old.body
        assert old.bytes_digest not in stored(mirror)
        fsck_clean(mirror.data_dir)
    assert fault_proxy.count("GET", f"/library/old/manifests/{old.digest}") == 1


def _signed_with(old: Schema1, *changes: dict[str, object]) -> bytes:
    """*old* with one signature per item of *changes*, each with its protected header changed that way."""
    doc = json.loads(old.body)
    signature = doc["signatures"][0]
    header = json.loads(base64.urlsafe_b64decode(signature["protected"] + "=="))
    blocks = [{**signature, "protected": b64url(json.dumps({**header, **change}).encode())} for change in changes]
    signatures = json.dumps(blocks, indent=3).replace("\n", "\n   ")
    cut = old.body.index(b',\n   "signatures"')
    return old.body[:cut] + f',\n   "signatures": {signatures}\n}}'.encode()


def test_schema1_payload_is_cut_as_libtrust_does_or_refused(tmp_path: Path) -> None:
    old = signed_schema1("library/old", "4", [random_layer(tmp_path, 1000, 56)])
    assert schema1.payload(old.body) == old.payload
    assert schema1.payload(_signed_with(old, {}, {})) == old.payload  # two signatures that agree
    short = len(old.payload) - 3
    refused = {
        "signatures disagree": _signed_with(old, {}, {"formatLength": short}),
        "no valid formatLength": _signed_with(old, {"formatLength": 10**6}),
        "formatTail is not a string": _signed_with(old, {"formatTail": None}),
        "is not JSON": _signed_with(old, {"formatTail": b64url(b"\n")}),
        "not the unsigned manifest": _signed_with(old, {"formatTail": b64url(b',"signatures":[]}')}),
        "no signatures": _signed_with(old),
    }
    for what, body in refused.items():
        with pytest.raises(schema1.Schema1Error, match=what):
            schema1.payload(body)


def test_signed_schema1_announced_with_the_hash_of_its_bytes_is_refused(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, tmp_path: Path,
) -> None:
    old = signed_schema1("library/old", "2", [random_layer(tmp_path, 1000, 53)])
    headers = {"content-type": SCHEMA1_SIGNED, "docker-content-digest": old.bytes_digest}
    fault_proxy.add("status", "/manifests/", status=200, body=old.body, headers=headers)
    mirror = proxied()
    detail = invalid_answer(request(mirror, "old", "2"))
    assert f"digest is {old.digest}, not the {old.bytes_digest} announced" in detail, detail
    detail = invalid_answer(request(mirror, "old", old.bytes_digest))
    assert "asked for" in detail, detail
    assert stored(mirror) == {}


def test_signed_schema1_from_an_old_registry_as_application_json_is_served_as_what_it_is(
    proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, tmp_path: Path,
) -> None:
    old = signed_schema1("library/old", "3", [random_layer(tmp_path, 1000, 55)])
    headers = {"content-type": "application/json; charset=utf-8", "docker-content-digest": old.digest}
    fault_proxy.add("status", "/manifests/", status=200, body=old.body, headers=headers)
    mirror = proxied()
    for reference in ("3", old.digest):
        answer = request(mirror, "old", reference)
        assert (answer.status_code, answer.content) == (200, old.body), answer.text
        assert answer.headers["content-type"] == SCHEMA1_SIGNED
        assert answer.headers["docker-content-digest"] == old.digest
    assert stored(mirror) == {old.digest: old.body}


def test_export_refuses_a_schema1_image(fault_proxy: FaultProxy, old_image: Schema1, tmp_path: Path) -> None:
    bundle = tmp_path / "old.tar"
    done = mirror_cli("export", "--data", tmp_path / "data", "--upstream", fault_proxy.url, "old:1", "-o", bundle)
    assert done.returncode == 1 and "schema 1 manifests cannot be exported" in done.stderr, done.stdout + done.stderr
    assert not bundle.exists()


def test_collection_keeps_a_schema1_image_and_its_layers(
    proxied: Callable[..., MirrorServer], old_image: Schema1, http: httpx.Client,
) -> None:
    mirror = proxied({**ENV, "MIRROR_GC_GRACE": "0s"})
    assert request(mirror, "old", "1").status_code == 200
    for layer in old_image.layers:
        assert http.get(f"{mirror.url}/v2/old/blobs/{layer.digest}").status_code == 200
    # A fill is synced and moved into blobs/ just after its client's last byte.
    wait_for(lambda: not any((mirror.data_dir / "tmp").iterdir()), what="the fills to be stored")
    before = stored(mirror)
    done = mirror_cli("gc", "--data", mirror.data_dir, env={"MIRROR_GC_GRACE": "0s"})
    assert done.returncode == 0 and done.stdout.startswith("freed 0 objects"), done.stdout + done.stderr
    assert stored(mirror) == before and set(before) == {old_image.digest, *(layer.digest for layer in old_image.layers)}
    fsck_clean(mirror.data_dir)


def test_schema1_push_is_refused_with_a_clear_error(
    mirror_factory: Callable[..., MirrorServer], tmp_path: Path, http: httpx.Client,
) -> None:
    mirror = mirror_factory(env=ENV)
    old = signed_schema1("team/old", "1", [random_layer(tmp_path, 1000, 54)])
    for content_type in (SCHEMA1_SIGNED, "application/vnd.docker.distribution.manifest.v1+json"):
        answer = http.put(f"{mirror.url}/v2/team/old/manifests/1", content=old.body,
                          headers={"content-type": content_type})
        assert answer.status_code == 400, answer.text
        [error] = answer.json()["errors"]
        assert error["code"] == "MANIFEST_INVALID" and "schema 1 manifests cannot be pushed" in error["detail"], error
    assert http.get(f"{mirror.url}/v2/team/old/manifests/1").status_code == 404


def skopeo_run(skopeo: str, *args: str) -> bytes:
    done = subprocess.run([skopeo, *args], capture_output=True, timeout=180, check=False)
    assert done.returncode == 0, f"skopeo {' '.join(args)}: {done.stderr.decode()}"
    return done.stdout


@pytest.mark.slow
def test_skopeo_inspects_and_copies_a_signed_schema1_image_through_the_mirror(
    skopeo: str, proxied: Callable[..., MirrorServer], fault_proxy: FaultProxy, old_image: Schema1, tmp_path: Path,
) -> None:
    old = old_image
    mirror = proxied()
    layers = [layer.digest for layer in old.layers]  # base first, as skopeo lists them
    for n, ref in enumerate(("library/old:1", f"library/old@{old.digest}")):
        source = f"docker://{mirror.address}/{ref}"
        assert skopeo_run(skopeo, "inspect", "--raw", "--tls-verify=false", source) == old.body
        info = json.loads(skopeo_run(skopeo, "inspect", "--no-tags", "--tls-verify=false", source))
        assert (info["Digest"], info["Layers"], info["Architecture"]) == (old.digest, layers, "amd64"), info
        # skopeo checks the manifest against the digest it asked for (the payload's) and every layer.
        target = tmp_path / f"copy-{n}"
        skopeo_run(skopeo, "copy", "--src-tls-verify=false", source, f"dir:{target}")
        assert (target / "manifest.json").read_bytes() == old.body
        for layer in old.layers:
            assert sha256((target / layer.digest.removeprefix("sha256:")).read_bytes()) == layer.digest
    assert fault_proxy.count("GET", "/library/old/manifests/") == 1  # the tag's; the digest was stored with it
    assert stored(mirror)[old.digest] == old.body
    fsck_clean(mirror.data_dir)
