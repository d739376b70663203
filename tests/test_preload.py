"""Air-gapped sites: ``mirror preload`` and ``mirror export``.

Archives are built on disk (OCI layouts, docker save layouts, crafted bad tars), loaded with the
real CLI, and served by a real mirror whose upstream is unreachable: what it serves came from the
preload.  The slow tests add real clients: dockerd pulls and runs preloaded images, skopeo writes
and reads OCI archives.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import diskcache
import httpx
import pytest
import zstandard

from mirror import cli
from tests.support import client
from tests.support.archives import (
    compress,
    docker_save,
    docker_save_oci,
    file_entry,
    info,
    layout_entries,
    pack,
    write_tar,
)
from tests.support.catalog import StandardImages
from tests.support.dockerd import Dockerd
from tests.support.images import (
    MANIFEST_MEDIA_TYPES,
    OCI_MANIFEST,
    Image,
    Index,
    build_image,
    build_index,
    busybox_layer,
    dump_json,
    random_layer,
    sha256_digest as sha256,
    write_oci_layout,
)
from tests.support.metrics import scrape, value
from tests.support.mirror import PROJECT_ROOT, MirrorServer
from tests.support.nginx import NginxProxy
from tests.support.registry import UpstreamRegistry
from tests.support.smallfs import MIB, tmpfs, use_inodes
from tests.support.storecheck import mirror_cli, stored_objects
from tests.support.waiting import wait_for

UNREACHABLE = "http://127.0.0.1:1"
ALL_TYPES = ", ".join(MANIFEST_MEDIA_TYPES)
KIB = 1024


def preload(data: Path, *files: Path | str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return mirror_cli("preload", "--data", data, *files, env=env)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def snapshot(data: Path) -> tuple[list[str], list[str], dict[str, Any]]:
    """Everything a preload could change: store objects, temp files, every index key and value."""
    objects = sorted(os.fspath(p.relative_to(data)) for p in (data / "blobs").rglob("*") if p.is_file())
    temps = sorted(os.listdir(data / "tmp")) if (data / "tmp").exists() else []
    with diskcache.Cache(os.fspath(data / "index")) as cache:
        keys = {key: cache.get(key) for key in cache.iterkeys()}
    return objects, temps, keys


def pins(data: Path) -> set[str]:
    with diskcache.Cache(os.fspath(data / "index")) as cache:
        return {key for key in cache.iterkeys() if isinstance(key, str) and key.startswith("pin/")}


def manifest(http: httpx.Client, base: str, name: str, reference: str) -> httpx.Response:
    return http.get(f"{base}/v2/{name}/manifests/{reference}", headers={"accept": ALL_TYPES})


def blob_digest(http: httpx.Client, base: str, name: str, digest: str) -> str:
    answer = http.get(f"{base}/v2/{name}/blobs/{digest}")
    assert answer.status_code == 200, (digest, answer.status_code, answer.text[:300])
    return sha256(answer.content)


def assert_serves(http: httpx.Client, base: str, name: str, tag: str, item: Image | Index) -> None:
    """The mirror at *base* serves *item* under name:tag: manifests byte for byte, every blob verified."""
    answer = manifest(http, base, name, tag)
    assert answer.status_code == 200, answer.text
    assert answer.content == item.manifest
    assert answer.headers["docker-content-digest"] == item.digest
    assert answer.headers["content-type"] == item.media_type
    children = item.children if isinstance(item, Index) else (item,)
    for child in children:
        by_digest = manifest(http, base, name, child.digest)
        assert by_digest.status_code == 200 and by_digest.content == child.manifest
        for digest in child.blobs:
            assert blob_digest(http, base, name, digest) == digest


def pull_all(http: httpx.Client, base: str, name: str, tag: str, only: str | None = None) -> None:
    """Pull an image through a mirror as a client would: index, child manifests, every blob."""
    root = manifest(http, base, name, tag)
    assert root.status_code == 200, root.text
    doc = json.loads(root.content)
    children = [d for d in doc.get("manifests", []) if only is None or d["platform"]["architecture"] == only]
    for child in children or [{"digest": root.headers["docker-content-digest"]}]:
        body = json.loads(manifest(http, base, name, child["digest"]).content)
        for descriptor in [body["config"], *body["layers"]]:
            blob_digest(http, base, name, descriptor["digest"])


# -- images and archives of this module --------------------------------------------------------


@dataclass(frozen=True)
class Built:
    amd64: Image
    arm64: Image
    multi: Index           # amd64 + arm64/v8
    victim: Image          # only ever in bad archives: never in a seeded store
    plain: Image           # uncompressed layers, Docker media types: what docker save holds
    plain2: Image          # shares plain's base layer
    plain3: Image          # saved untagged
    layout: Path           # OCI layout: docker.io/library/pre-multi:1 and ghcr.io/acme/tool:2
    victim_layout: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("preload-images")
    blobs = root / "blobs"
    amd64 = build_image(blobs, [busybox_layer(blobs, marker="pre-amd64"), random_layer(blobs, 256 * KIB, 501)])
    arm64 = build_image(blobs, [busybox_layer(blobs, marker="pre-arm64"), random_layer(blobs, 256 * KIB, 502)],
                        arch="arm64", variant="v8")
    multi = build_index([amd64, arm64])
    victim = build_image(blobs, [random_layer(blobs, 64 * KIB, 503), random_layer(blobs, 96 * KIB, 504)])
    base = busybox_layer(blobs, marker="saved", compressed=False)
    plain = build_image(blobs, [base, random_layer(blobs, 128 * KIB, 505, compressed=False)], media="docker")
    plain2 = build_image(blobs, [base, random_layer(blobs, 64 * KIB, 506, compressed=False)], media="docker",
                         cmd=("echo", "two"))
    plain3 = build_image(blobs, [base], media="docker", cmd=("echo", "three"))
    layout = root / "layout"
    write_oci_layout(layout, multi, "docker.io/library/pre-multi:1")
    write_oci_layout(layout, amd64, "ghcr.io/acme/tool:2")
    victim_layout = root / "victim"
    write_oci_layout(victim_layout, victim, "docker.io/library/victim:1")
    return Built(amd64, arm64, multi, victim, plain, plain2, plain3, layout, victim_layout)


@pytest.fixture
def offline_mirror(mirror_factory: Callable[..., MirrorServer]) -> Callable[..., MirrorServer]:
    """A mirror (not started) whose upstream is unreachable: all it serves comes from its store."""

    def make(**kwargs: Any) -> MirrorServer:
        server = mirror_factory(UNREACHABLE, start=False, **kwargs)
        server.data_dir.mkdir(parents=True, exist_ok=True)
        return server

    return make


# -- OCI layouts and archives ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["directory", "tar", "gzip", "zstd"])
def test_oci_layout_is_preloaded_with_digests_preserved(
    form: str, built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    source = built.layout if form == "directory" else \
        pack(built.layout, tmp_path / "layout.tar", None if form == "tar" else form)
    server = offline_mirror()
    out = ok(preload(server.data_dir, source))
    assert f"{source}: 2 images, 2 tags (2 new or moved)" in out
    assert "already present" in out

    assert pins(server.data_dir) == {f"pin/docker.io/library/pre-multi@{built.multi.digest}",
                                     f"pin/ghcr.io/acme/tool@{built.amd64.digest}"}
    assert not list((server.data_dir / "tmp").iterdir()), "staging left behind"
    server.start()
    assert_serves(http, server.url, "library/pre-multi", "1", built.multi)
    assert manifest(http, server.url, "library/pre-multi", "1").headers["x-mirror-cache"] == "HIT"
    # ghcr.io content is not this mirror's upstream's: not served here (see the registry test below).
    assert manifest(http, server.url, "acme/tool", "2").status_code != 200


def test_an_artifact_preloaded_with_its_subject_is_listed_as_a_referrer_offline(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    """An air-gapped site's signature or SBOM: the Referrers API of its subject lists it with the
    upstream unreachable (it answered 503, "not known", and signature checks failed).  A referrer the
    layout lists without a name (as ``oras copy -r`` writes them) is loaded by digest into its subject's
    repository (it was skipped as an image without a name); one whose subject is not in it still is."""
    subject = built.amd64
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"{}")

    def artifact(kind: str, of: Image | None) -> Image:
        target = {"mediaType": of.media_type, "digest": of.digest, "size": of.size} if of is not None else \
            {"mediaType": OCI_MANIFEST, "digest": sha256(b"elsewhere"), "size": 9}
        body = dump_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": kind,
                          "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"),
                                     "size": 2},
                          "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"),
                                      "size": 2}], "subject": target})
        return Image(manifest=body, media_type=OCI_MANIFEST, digest=sha256(body), config=b"{}",
                     config_digest=sha256(b"{}"), layers=(), blobs={sha256(b"{}"): empty}, architecture="", os="")

    sbom = artifact("application/vnd.example.sbom", subject)
    signature = artifact("application/vnd.example.sig", subject)
    stray = artifact("application/vnd.example.sig", None)
    layout = tmp_path / "signed"
    write_oci_layout(layout, subject, "docker.io/library/signed:1")
    write_oci_layout(layout, sbom, "docker.io/library/signed:sbom")
    for unnamed in (signature, stray):
        write_oci_layout(layout, unnamed, "unnamed")
        index = json.loads((layout / "index.json").read_bytes())
        index["manifests"][-1].pop("annotations")
        (layout / "index.json").write_bytes(dump_json(index))
    server = offline_mirror()
    loaded = preload(server.data_dir, layout)
    ok(loaded)
    assert f"image {stray.digest} has no name: skipped" in loaded.stdout + loaded.stderr
    assert f"image {signature.digest} has no name" not in loaded.stdout + loaded.stderr
    ok(preload(server.data_dir, layout))  # again: listed once
    server.start()
    listed = http.get(f"{server.url}/v2/library/signed/referrers/{subject.digest}")
    assert listed.status_code == 200, listed.text
    assert sorted((d["digest"], d.get("artifactType")) for d in listed.json()["manifests"]) == \
        sorted([(sbom.digest, "application/vnd.example.sbom"), (signature.digest, "application/vnd.example.sig")])
    got = http.get(f"{server.url}/v2/library/signed/manifests/{signature.digest}", headers={"accept": OCI_MANIFEST})
    assert (got.status_code, got.content) == (200, signature.manifest), got.text


def test_second_run_stores_nothing_new_and_says_so(built: Built, tmp_path: Path) -> None:
    data = tmp_path / "data"
    archive = pack(built.layout, tmp_path / "layout.tar", "zstd")
    first = ok(preload(data, archive))
    assert "nothing new" not in first
    before = snapshot(data)
    again = ok(preload(data, archive))
    assert f"{archive}: nothing new: 2 images, 2 tags" in again
    assert snapshot(data) == before
    # The same images from another form of input are recognised too.
    assert "nothing new" in ok(preload(data, built.layout))
    assert snapshot(data) == before
    fsck = mirror_cli("fsck", "--data", data)
    assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr


def test_names_are_normalised_and_other_registries_kept(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, built.amd64, "unused")
    entries = [
        {"org.opencontainers.image.ref.name": "ubuntu:18.04"},
        {"io.containerd.image.name": "ghcr.io/acme/tool:2", "org.opencontainers.image.ref.name": "2"},
        {"org.opencontainers.image.ref.name": "index.docker.io/team/app"},
        {"org.opencontainers.image.ref.name": "localhost:5000/x/y:3"},
    ]
    index = {"schemaVersion": 2, "manifests": [{**built.amd64.descriptor(), "annotations": a} for a in entries]}
    (layout / "index.json").write_bytes(dump_json(index))
    server = offline_mirror(env={"MIRROR_UPSTREAM_REGISTRY": "ghcr.io"})
    done = preload(server.data_dir, layout)
    assert "1 image, 4 tags" in ok(done)
    # Stored all the same, but no pull reaches a registry that is not an upstream: the preload says so.
    warned = [line for line in done.stderr.splitlines() if "is not an upstream of this mirror" in line]
    assert [line.split(": ")[4] for line in warned] == ["ghcr.io/acme/tool:2", "localhost:5000/x/y:3"], done.stderr
    again = preload(server.data_dir, layout, env={"MIRROR_UPSTREAM_REGISTRY": "ghcr.io",
                                                  "MIRROR_UPSTREAMS": '[{"registry": "localhost:5000"}]'})
    assert ok(again) and "docker.io/library/ubuntu:18.04" in again.stderr and "ghcr.io" not in again.stderr
    with diskcache.Cache(os.fspath(server.data_dir / "index")) as cache:
        assert set(cache.get("catalog")) == {"docker.io/library/ubuntu", "ghcr.io/acme/tool", "docker.io/team/app",
                                             "localhost:5000/x/y"}
        assert cache.get("tag/docker.io/library/ubuntu:18.04")[0] == built.amd64.digest
        assert cache.get("tag/docker.io/team/app:latest")[0] == built.amd64.digest
    server.start()  # its upstream is "ghcr.io": ghcr.io/acme/tool is served as acme/tool
    assert_serves(http, server.url, "acme/tool", "2", built.amd64)
    # What no request reaches (docker.io's and localhost:5000's, no upstreams here) is not listed:
    # the catalog and the web UI name nothing a client cannot pull.
    assert http.get(f"{server.url}/v2/_catalog").json()["repositories"] == ["acme/tool"]
    listed = http.get(f"{server.url}/ui/")
    assert listed.status_code == 200 and "acme/tool" in listed.text, listed.status_code
    assert "ubuntu" not in listed.text and "x/y" not in listed.text and "team/app" not in listed.text

    # A ref.name that is only a tag names no repository.
    index["manifests"] = [{**built.amd64.descriptor(), "annotations": {"org.opencontainers.image.ref.name": "3"}}]
    (layout / "index.json").write_bytes(dump_json(index))
    bad = preload(tmp_path / "other", layout)
    assert bad.returncode == 1
    assert "index.json manifests[0]: image is named only by the tag '3'" in bad.stderr


def test_partial_index_preloads_the_platforms_it_holds(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, built.multi, "pre-multi:1")
    for digest in (built.arm64.digest, *built.arm64.blobs):  # as `mirror export --platform linux/amd64` writes
        (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).unlink()
    server = offline_mirror()
    ok(preload(server.data_dir, layout))
    server.start()
    answer = manifest(http, server.url, "library/pre-multi", "1")
    assert answer.status_code == 200 and answer.content == built.multi.manifest
    assert manifest(http, server.url, "library/pre-multi", built.amd64.digest).status_code == 200
    assert manifest(http, server.url, "library/pre-multi", built.arm64.digest).status_code != 200


# -- docker save ----------------------------------------------------------------------------------


def test_classic_docker_save_gets_a_valid_built_manifest(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    archive = docker_save(tmp_path / "save.tar", [(built.plain, ["saved:1", "saved:latest"]),
                                                  (built.plain2, ["ghcr.io/acme/saved2:7"]),
                                                  (built.plain3, None)])
    with tarfile.open(archive) as tar:  # the shared base layer is a symlink, as docker writes it
        assert any(m.issym() for m in tar.getmembers())
    server = offline_mirror()
    result = preload(server.data_dir, compress(archive, "gzip"))
    out = ok(result)
    assert "2 images, 3 tags" in out
    assert "manifest.json[2]: image" in result.stderr and "has no RepoTags: skipped" in result.stderr
    server.start()
    answer = manifest(http, server.url, "library/saved", "1")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == OCI_MANIFEST
    assert answer.headers["docker-content-digest"] == sha256(answer.content)
    doc = json.loads(answer.content)
    assert doc["config"]["digest"] == built.plain.config_digest
    assert doc["config"]["size"] == len(built.plain.config)
    # Layers are stored as docker save holds them, uncompressed: their digests are the diff_ids.
    assert [layer["digest"] for layer in doc["layers"]] == [layer.diff_id for layer in built.plain.layers]
    assert {layer["mediaType"] for layer in doc["layers"]} == {"application/vnd.oci.image.layer.v1.tar"}
    for descriptor in [doc["config"], *doc["layers"]]:
        assert blob_digest(http, server.url, "library/saved", descriptor["digest"]) == descriptor["digest"]
    assert manifest(http, server.url, "library/saved", "latest").content == answer.content
    # The built manifest is deterministic: preloading again changes nothing.
    server.stop()
    assert "nothing new" in ok(preload(server.data_dir, archive))


def test_docker_save_in_oci_form_keeps_its_manifests(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    archive = docker_save_oci(tmp_path / "save.tar", built.amd64, ["docker.io/library/pre-oci:5",
                                                                   "docker.io/library/pre-oci:latest"])
    server = offline_mirror(env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"})  # "pre-oci" is library/pre-oci
    assert "1 image, 2 tags" in ok(preload(server.data_dir, archive))
    server.start()
    assert_serves(http, server.url, "library/pre-oci", "5", built.amd64)
    assert_serves(http, server.url, "pre-oci", "latest", built.amd64)


# -- into a running mirror --------------------------------------------------------------------------


def operator_token(tmp_path: Path) -> Path:
    """A file holding a fresh operator token (``admin.token_file``)."""
    path = tmp_path / "operator-token"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def bearer(token_file: Path) -> dict[str, str]:
    return {"authorization": f"Bearer {token_file.read_text().strip()}"}


def open_uploads(server: MirrorServer) -> list[str]:
    """The files of ``tmp/`` (uploads' pipes and lock files, staging) the workers that answered a
    preload still hold open."""
    tmp = str(server.data_dir / "tmp")
    held = []
    for pid in {e["pid"] for e in server.access_entries() if e.get("path") == "/_mirror/preload"}:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                held.append(os.readlink(fd))
    return [path for path in held if path.startswith(tmp)]


def test_url_loads_into_a_running_mirror_without_a_restart(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    token = operator_token(tmp_path)
    server = offline_mirror(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)}).start()
    assert manifest(http, server.url, "library/pre-multi", "1").status_code != 200
    result = mirror_cli("preload", "--url", server.url, "--token-file", token, built.layout)  # a directory: a tar
    assert "2 images, 2 tags (2 new or moved)" in ok(result)
    assert_serves(http, server.url, "library/pre-multi", "1", built.multi)
    again = mirror_cli("preload", "--url", server.url, pack(built.layout, tmp_path / "l.tar"),
                       env={"MIRROR_ADMIN_TOKEN_FILE": str(token)})  # the token file from the environment
    assert "nothing new" in ok(again)

    before = snapshot(server.data_dir)
    broken = tmp_path / "broken.tar"
    entries = [e for e in layout_entries(built.victim_layout)
               if e[0].name != f"blobs/sha256/{built.victim.layers[1].digest.removeprefix('sha256:')}"]
    write_tar(broken, entries)
    bad = mirror_cli("preload", "--url", server.url, "--token-file", token, broken)
    assert bad.returncode == 1
    assert re.search(rf"mirror: preload: {re.escape(str(broken))}: blobs/sha256/\w+: manifest sha256:\w+ names "
                     rf"layer {built.victim.layers[1].digest}, which is not in the archive", bad.stderr), bad.stderr
    answer = http.post(f"{server.url}/_mirror/preload", content=broken.read_bytes(), headers=bearer(token))
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
    assert snapshot(server.data_dir) == before
    assert not open_uploads(server)  # each upload's pipe and lock file closed, loaded or refused


def test_operator_endpoints_are_off_when_no_operator_credential_is_configured(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    server = offline_mirror().start()
    before = snapshot(server.data_dir)
    archive = pack(built.layout, tmp_path / "layout.tar")
    answer = http.post(f"{server.url}/_mirror/preload", content=archive.read_bytes())
    assert answer.status_code == 404, answer.text
    assert answer.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert "admin.token_file" in answer.json()["errors"][0]["message"]
    refused = mirror_cli("preload", "--url", server.url, archive)
    assert refused.returncode == 1 and "operator endpoints are off" in refused.stderr, refused.stderr
    assert snapshot(server.data_dir) == before
    short = tmp_path / "short-token"
    short.write_text("abc\n")
    unusable = mirror_cli("preload", "--url", server.url, "--token-file", short, archive)
    assert unusable.returncode == 2 and "at least 32 characters" in unusable.stderr, unusable.stderr
    server.stop()
    assert "2 images" in ok(preload(server.data_dir, archive))  # the offline path needs no credential


def test_a_wrong_operator_token_is_told_from_none_at_all(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    """A token sent from the wrong file is answered as such (both ``401``, in the registry's error format),
    by the server and by ``mirror preload --url``; neither repeats the token sent."""
    token = operator_token(tmp_path)
    server = offline_mirror(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)}).start()
    archive = pack(built.layout, tmp_path / "layout.tar")
    wrong = tmp_path / "other-token"
    wrong.write_text(secrets.token_hex(32) + "\n")
    sent = wrong.read_text().strip()
    for path in ("/_mirror/", "/_mirror/preload"):
        none = http.request("GET" if path == "/_mirror/" else "POST", f"{server.url}{path}", content=b"")
        bad = http.request("GET" if path == "/_mirror/" else "POST", f"{server.url}{path}", content=b"",
                           headers=bearer(wrong))
        for answer in (none, bad):
            assert answer.status_code == 401, answer.text
            assert answer.json()["errors"][0]["code"] == "UNAUTHORIZED"
            assert sent not in answer.text
        assert "operator credential is needed" in none.json()["errors"][0]["message"]
        assert bad.json()["errors"][0]["message"].startswith("the token given is not the one of admin.token_file")
    missing = mirror_cli("preload", "--url", server.url, archive)
    assert missing.returncode == 1 and "operator credential is needed" in missing.stderr, missing.stderr
    refused = mirror_cli("preload", "--url", server.url, "--token-file", wrong, archive)
    assert refused.returncode == 1, refused.stderr
    assert f"{server.url}: the token given is not the one of admin.token_file" in refused.stderr, refused.stderr
    assert sent not in refused.stderr + refused.stdout
    assert manifest(http, server.url, "library/pre-multi", "1").status_code != 200  # not loaded


def test_operator_endpoints_need_an_operator_credential_behind_a_local_reverse_proxy(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    """Behind nginx on the same host without X-Forwarded-For, every client is 127.0.0.1: the
    address is no credential.  Operators are the token of admin.token_file, or users of
    auth.admins (Basic, or a token of the mirror's token server)."""
    token = operator_token(tmp_path)
    users = tmp_path / "htpasswd"
    users.write_text("".join(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
                             for user, pw in (("ops", "ops-pw"), ("dev", "dev-pw"))))
    server = offline_mirror(env={"MIRROR_AUTH_HTPASSWD_PATH": str(users), "MIRROR_AUTH_ADMINS": "ops",
                                 "MIRROR_ADMIN_TOKEN_FILE": str(token)}).start()
    archive = pack(built.layout, tmp_path / "layout.tar")
    body = archive.read_bytes()
    with NginxProxy(tmp_path / "nginx", server.url) as proxy:
        def token_of(user: str, password: str) -> dict[str, str]:
            answer = http.get(f"{proxy.url}/auth/token", auth=(user, password))
            assert answer.status_code == 200, answer.text
            return {"authorization": f"Bearer {answer.json()['token']}"}

        before = snapshot(server.data_dir)
        refusals = [
            ({}, 401, "UNAUTHORIZED"),
            ({"authorization": f"Bearer {secrets.token_hex(32)}"}, 401, "UNAUTHORIZED"),
            ({"authorization": "Basic " + base64.b64encode(b"ops:wrong").decode()}, 401, "UNAUTHORIZED"),
            ({"authorization": "Basic " + base64.b64encode(b"dev:dev-pw").decode()}, 403, "DENIED"),
            (token_of("dev", "dev-pw"), 403, "DENIED"),
        ]
        for base in (proxy.url, server.url):  # through the proxy, and straight from loopback
            for headers, status, code in refusals:
                answer = http.post(f"{base}/_mirror/preload", content=body, headers=headers)
                assert answer.status_code == status, (base, headers, answer.text)
                assert answer.json()["errors"][0]["code"] == code
            assert http.post(f"{base}/_mirror/preload", content=body).headers["www-authenticate"] \
                == 'Basic realm="mirror"'
        refused = mirror_cli("preload", "--url", proxy.url, archive)
        assert refused.returncode == 1 and "operator credential is needed" in refused.stderr, refused.stderr
        wrong = http.get(f"{proxy.url}/_mirror/", headers={"authorization": f"Bearer {secrets.token_hex(32)}"})
        assert wrong.json()["errors"][0]["message"].startswith(
            "the token given is neither the one of admin.token_file nor a valid token of a user of auth.admins")
        assert snapshot(server.data_dir) == before
        assert manifest(http, proxy.url, "library/pre-multi", "1").status_code != 200  # not loaded

        assert "2 images, 2 tags (2 new or moved)" in ok(
            mirror_cli("preload", "--url", proxy.url, "--token-file", token, archive))
        for headers, who in ((bearer(token), "token"), (token_of("ops", "ops-pw"), "ops"),
                             ({"authorization": "Basic " + base64.b64encode(b"ops:ops-pw").decode()}, "ops")):
            answer = http.post(f"{proxy.url}/_mirror/preload", content=body, headers=headers)
            assert answer.status_code == 200 and answer.json()["images"] == 2, answer.text
            assert http.get(f"{proxy.url}/_mirror/", headers=headers).json() == {"operator": who}
        for headers, status in (({}, 401), (token_of("dev", "dev-pw"), 403)):
            assert http.get(f"{proxy.url}/_mirror/", headers=headers).status_code == status
        assert_serves(http, proxy.url, "library/pre-multi", "1", built.multi)
    # nginx added no X-Forwarded-For: the mirror saw every request come from loopback.
    clients = {e["client"] for e in server.access_entries() if e.get("path") == "/_mirror/preload"}
    assert clients == {"127.0.0.1"}


def test_preloaded_tags_are_served_as_loaded_by_an_online_mirror(
    built: Built, mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry, http: httpx.Client,
) -> None:
    # The upstream is reachable but has no such image; every tag would be revalidated at once.
    server = mirror_factory(upstream.url, start=False, env={"MIRROR_CACHE_TAG_TTL": "0s"})
    server.data_dir.mkdir(parents=True, exist_ok=True)
    ok(preload(server.data_dir, built.layout))
    server.start()
    upstream.clear_counts()
    for _ in range(2):
        answer = manifest(http, server.url, "library/pre-multi", "1")
        assert answer.status_code == 200 and answer.content == built.multi.manifest
        assert answer.headers["x-mirror-cache"] == "HIT"
    assert upstream.count(None, "pre-multi") == 0


def test_a_delete_unpins_a_preloaded_image_so_the_collector_may_free_it(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client
) -> None:
    server = offline_mirror(env={"MIRROR_DELETE_ENABLED": "true"})
    ok(preload(server.data_dir, built.layout))
    pin = f"pin/docker.io/library/pre-multi@{built.multi.digest}"
    assert pin in pins(server.data_dir)
    server.start()
    # By its last tag: the image is no longer kept (it stays cached, for eviction to decide).
    assert http.delete(f"{server.url}/v2/library/pre-multi/manifests/1").status_code == 202
    assert pin not in pins(server.data_dir)
    ok(preload(server.data_dir, built.layout))
    assert pin in pins(server.data_dir)
    # By digest: forgotten with its tags, and no longer kept either.
    assert http.delete(f"{server.url}/v2/library/pre-multi/manifests/{built.multi.digest}").status_code == 202
    assert pin not in pins(server.data_dir)
    assert manifest(http, server.url, "library/pre-multi", "1").status_code != 200
    server.stop()
    before = stored_objects(server.data_dir)
    out = ok(mirror_cli("gc", "--data", server.data_dir, env={"MIRROR_GC_GRACE": "0s"}))
    assert built.multi.digest not in stored_objects(server.data_dir), (out, sorted(before))
    assert built.amd64.digest in stored_objects(server.data_dir)  # still pinned as ghcr.io/acme/tool:2


def test_a_tag_a_later_preload_moves_unpins_the_image_it_named(built: Built, tmp_path: Path) -> None:
    """A site that preloads a new bundle each week under the same tags keeps only the latest images."""
    data = tmp_path / "data"
    for week, image in enumerate([built.amd64, built.victim, built.victim]):
        layout = tmp_path / f"week{week}"
        write_oci_layout(layout, image, "docker.io/library/app:latest")
        ok(preload(data, layout))
    assert {p for p in pins(data) if "/library/app@" in p} == {f"pin/docker.io/library/app@{built.victim.digest}"}
    # Another tag still naming the image keeps it.
    both = tmp_path / "both"
    write_oci_layout(both, built.amd64, "docker.io/library/app:latest")
    write_oci_layout(both, built.amd64, "docker.io/library/app:stable")
    ok(preload(data, both))
    moved = tmp_path / "moved"
    write_oci_layout(moved, built.victim, "docker.io/library/app:latest")
    ok(preload(data, moved))
    assert f"pin/docker.io/library/app@{built.amd64.digest}" in pins(data)
    # An image preloaded by digest is kept for good (manifests may name it so), whatever its tags do.
    by_digest = tmp_path / "by-digest"
    write_oci_layout(by_digest, built.arm64, f"docker.io/library/app@{built.arm64.digest}")
    tagged = tmp_path / "tagged"
    write_oci_layout(tagged, built.arm64, "docker.io/library/app:arm")
    retagged = tmp_path / "retagged"
    write_oci_layout(retagged, built.victim, "docker.io/library/app:arm")
    for layout in (by_digest, tagged, retagged):
        ok(preload(data, layout))
    assert f"pin/docker.io/library/app@{built.arm64.digest}" in pins(data)


def test_an_image_named_for_a_pushed_repository_is_refused(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    """The pushed repository answers the name: a preloaded copy could never be read, and stayed pinned."""
    token = operator_token(tmp_path)
    server = offline_mirror(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)}).start()
    client.push_image(server.url, "team/own", "1", built.amd64)
    client.push_image(server.url, "solo", "1", built.amd64)
    before = snapshot(server.data_dir)
    for name in ["team/own:1", "docker.io/team/own:2", "solo:1", "library/solo:2"]:
        layout = tmp_path / name.replace("/", "_").replace(":", "_")
        write_oci_layout(layout, built.victim, name)
        refused = preload(server.data_dir, layout)
        assert refused.returncode == 1, refused
        pushed = "solo" if "solo" in name else "team/own"
        assert f"{pushed} is a repository pushed to this registry" in refused.stderr, refused.stderr
    answer = http.post(f"{server.url}/_mirror/preload", content=pack(layout, tmp_path / "l.tar").read_bytes(),
                       headers=bearer(token))
    assert answer.status_code == 403 and answer.json()["errors"][0]["code"] == "DENIED", answer.text
    assert snapshot(server.data_dir) == before
    assert manifest(http, server.url, "team/own", "1").content == built.amd64.manifest


def test_a_preload_upload_cut_short_by_its_client_is_a_client_error_not_a_crash(
    built: Built, offline_mirror: Callable[..., MirrorServer], tmp_path: Path
) -> None:
    token = operator_token(tmp_path)
    server = offline_mirror(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)}).start()
    head = (f"POST /_mirror/preload HTTP/1.1\r\nHost: {server.address}\r\nContent-Length: 1000000\r\n"
            f"Authorization: {bearer(token)['authorization']}\r\n\r\n").encode()
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + b"x" * 100_000)
    deadline = time.monotonic() + 10
    while not (entries := [e for e in server.access_entries() if e.get("path") == "/_mirror/preload"]):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)
    assert entries[0]["status"] == 400, entries
    assert "unhandled error" not in server.log_tail(200) and "Traceback" not in server.log_tail(200)
    assert not list((server.data_dir / "tmp").glob("*preload*"))
    assert not open_uploads(server)


def test_a_client_gone_after_the_end_of_its_archive_leaves_an_import_logged_and_counted_as_finished(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    """The end of the archive reached the import, only padding was still to come: the import commits, and
    the request is logged and counted as a finished preload, though nobody reads its answer (before:
    ``400`` "the client went away", and not counted)."""
    token = operator_token(tmp_path)
    server = offline_mirror(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)}).start()
    body = pack(built.layout, tmp_path / "l.tar").read_bytes()
    head = (f"POST /_mirror/preload HTTP/1.1\r\nHost: {server.address}\r\nContent-Length: {len(body) + 4 * MIB}\r\n"
            f"Authorization: {bearer(token)['authorization']}\r\n\r\n").encode()
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body + bytes(2 * MIB))  # 2 MiB of the 4 MiB of padding unsent
        wait_for(lambda: manifest(http, server.url, "library/pre-multi", "1").status_code == 200,
                 what="the import to commit")
    wait_for(lambda: any(e.get("path") == "/_mirror/preload" for e in server.access_entries()),
             what="the upload's access log entry")
    entries = [e for e in server.access_entries() if e.get("path") == "/_mirror/preload"]
    assert [e["status"] for e in entries] == [200], entries
    assert "the import finished though its client went away" in server.log_tail(200), server.log_tail(200)
    metrics = scrape(f"{server.url}/metrics")
    assert value(metrics, "mirror_preloads_total") == 1 and value(metrics, "mirror_preload_images_total") == 2
    assert value(metrics, "mirror_preload_failures_total") == 0
    assert_serves(http, server.url, "library/pre-multi", "1", built.multi)
    assert not open_uploads(server)


def test_an_uploaded_archive_needs_the_room_of_what_it_brings_not_of_the_archive_twice(
    offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    """The body is read as it arrives: a 20 MiB archive goes into a 36 MiB data directory (spooled
    first, then staged, it needed 40).  A client gone half-way leaves nothing behind."""
    blobs = tmp_path / "blobs"
    image = build_image(blobs, [random_layer(blobs, 20 * MIB, 521, compressed=False)])
    layout = tmp_path / "big"
    write_oci_layout(layout, image, "docker.io/library/big:1")
    archive = pack(layout, tmp_path / "big.tar")
    token = operator_token(tmp_path)
    server = offline_mirror(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)})
    with tmpfs(server.data_dir, 36):
        try:
            server.start()
            body = archive.read_bytes()
            head = (f"POST /_mirror/preload HTTP/1.1\r\nHost: {server.address}\r\nContent-Length: {len(body)}\r\n"
                    f"Authorization: {bearer(token)['authorization']}\r\n\r\n").encode()
            host, port = server.address.rsplit(":", 1)
            before = snapshot(server.data_dir)
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(head + body[:len(body) // 2])
            deadline = time.monotonic() + 20
            while not [e for e in server.access_entries() if e.get("path") == "/_mirror/preload"]:
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.1)
            wait_for(lambda: not list((server.data_dir / "tmp").glob("stage-*")), timeout=10)
            assert snapshot(server.data_dir) == before

            result = mirror_cli("preload", "--url", server.url, "--token-file", token, archive)
            assert "1 image, 1 tag (1 new or moved)" in ok(result)
            assert_serves(http, server.url, "library/big", "1", image)
            assert not [p.name for p in (server.data_dir / "tmp").iterdir()
                        if p.name.startswith(("preload-", "stage-"))]

            other = build_image(blobs, [random_layer(blobs, 20 * MIB, 522, compressed=False)])
            write_oci_layout(tmp_path / "other", other, "docker.io/library/other:1")
            before = snapshot(server.data_dir)
            full = http.post(f"{server.url}/_mirror/preload", headers=bearer(token),
                             content=pack(tmp_path / "other", tmp_path / "other.tar").read_bytes())
            assert full.status_code == 507 and full.json()["errors"][0]["code"] == "UNAVAILABLE", full.text
            assert "more than is free in the data directory" in full.text, full.text  # not the input's fault
            assert snapshot(server.data_dir) == before
        finally:
            server.stop()


def test_a_staging_directory_that_cannot_be_made_leaves_neither_its_lock_file_nor_its_descriptor(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    """The data directory's last inode goes to the staging's lock file, so its directory cannot be made:
    ``507``, and the lock file is removed and closed at once (before, both stayed until the server ended)."""
    token = operator_token(tmp_path)
    server = offline_mirror(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)})
    body = pack(built.layout, tmp_path / "layout.tar").read_bytes()
    with tmpfs(server.data_dir, 16, inodes=4096):
        try:
            server.start()
            ballast = server.data_dir / "ballast"
            use_inodes(ballast, leave=3)  # the upload's lock file and pipe, the staging's lock file
            full = http.post(f"{server.url}/_mirror/preload", content=body, headers=bearer(token))
            assert full.status_code == 507 and full.json()["errors"][0]["code"] == "UNAVAILABLE", full.text
            assert "No space left on device" in full.text, full.text
            tmp = server.data_dir / "tmp"
            assert not [p.name for p in tmp.iterdir() if p.name.startswith(("preload-", "stage-"))]
            assert not open_uploads(server)
            shutil.rmtree(ballast)
            answer = http.post(f"{server.url}/_mirror/preload", content=body, headers=bearer(token))
            assert answer.status_code == 200 and answer.json()["images"] == 2, answer.text
        finally:
            server.stop()


def test_a_staging_directory_that_cannot_be_made_is_a_clear_error_of_the_command_too(
    built: Built, tmp_path: Path
) -> None:
    """``mirror preload --data`` on a data directory whose last inode goes to its staging's lock file: one
    line saying the disk is full, exit 1, nothing left in ``tmp/``; before, a traceback."""
    data = tmp_path / "data"
    with tmpfs(data, 16, inodes=4096):
        assert preload(data, built.layout).returncode == 0  # the store's directories made
        ballast = data / "ballast"
        use_inodes(ballast, leave=3)  # the index's -wal and -shm files, then the staging's lock file
        done = preload(data, built.layout)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr
        assert "No space left on device" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not [p.name for p in (data / "tmp").iterdir() if p.name.startswith("stage-")]
        shutil.rmtree(ballast)
        assert preload(data, built.layout).returncode == 0


def test_an_upload_cut_off_by_the_shutdown_is_answered_503_and_leaves_nothing(
    built: Built, offline_mirror: Callable[..., MirrorServer], tmp_path: Path
) -> None:
    """SIGTERM while a client is sending its archive, and nothing more by the end of ``http.draintimeout``:
    ``503`` to retry, and the data directory as it was (before: no answer, the upload's lock and staging
    left behind, ``mirror fsck`` unclean until the next start)."""
    token = operator_token(tmp_path)
    server = offline_mirror(env={"MIRROR_ADMIN_TOKEN_FILE": str(token), "MIRROR_HTTP_DRAINTIMEOUT": "1s"}).start()
    body = pack(built.layout, tmp_path / "l.tar").read_bytes()
    head = (f"POST /_mirror/preload HTTP/1.1\r\nHost: {server.address}\r\nContent-Length: {len(body)}\r\n"
            f"Authorization: {bearer(token)['authorization']}\r\n\r\n").encode()
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body[:len(body) // 2])
        wait_for(lambda: bool(list((server.data_dir / "tmp").glob("stage-*.d"))), what="the import under way")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGTERM)
        sock.settimeout(15)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
    wait_for(lambda: not server.running, timeout=15, what="the server to end")
    assert not [p.name for p in (server.data_dir / "tmp").iterdir()], server.log_tail()
    assert "Traceback" not in server.log_path.read_text()
    assert ok(mirror_cli("fsck", "--data", server.data_dir)).rstrip().endswith("clean")


def _zstd_bomb(path: Path, size: int) -> Path:
    """A zstd-compressed tar of one entry of *size* zero bytes (a few KiB per hundreds of MiB)."""
    with open(path, "wb") as out, zstandard.ZstdCompressor().stream_writer(out) as writer:
        writer.write(info("junk", size=size).tobuf(tarfile.PAX_FORMAT))
        for _ in range(size // MIB):
            writer.write(bytes(MIB))
        writer.write(bytes(1024))
    return path


def test_a_compressed_bomb_sent_to_the_server_is_refused_before_it_is_decompressed(
    offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    """The upload's ``Content-Length`` bounds what it may decompress to, as a file's size does; a body sent
    without one (chunked) is bounded as it comes, to 1000 times what came through.  Before, an upload of
    any size decompressed all it held (10 GiB from 329 KiB: 70 s of an import)."""
    token = operator_token(tmp_path)
    server = offline_mirror(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)}).start()
    bomb = _zstd_bomb(tmp_path / "bomb.tar.zst", 4 << 30).read_bytes()
    assert len(bomb) < MIB
    before = snapshot(server.data_dir)
    sized = http.post(f"{server.url}/_mirror/preload", content=bomb, headers=bearer(token))
    assert sized.status_code == 400 and "refusing a tar bomb" in sized.json()["errors"][0]["message"], sized.text
    chunked = http.post(f"{server.url}/_mirror/preload", content=iter([bomb[:4096], bomb[4096:]]),
                        headers=bearer(token))
    assert chunked.status_code == 400, chunked.text
    assert "refusing a decompression bomb" in chunked.json()["errors"][0]["message"], chunked.text
    assert snapshot(server.data_dir) == before


def test_data_directory_is_written_safely_while_the_server_runs(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    server = offline_mirror().start()
    assert manifest(http, server.url, "library/pre-multi", "1").status_code != 200
    ok(preload(server.data_dir, pack(built.layout, tmp_path / "layout.tar", "gzip")))
    assert_serves(http, server.url, "library/pre-multi", "1", built.multi)


# -- export ---------------------------------------------------------------------------------------------


def test_export_then_preload_restores_every_image_with_the_same_digests(
    images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
    offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    a = mirror_factory()
    for name in ("library/multi", "library/dlist"):
        pull_all(http, a.url, name, "1")
    upstream.clear_counts()
    bundle = tmp_path / "bundle.tar"
    wanted = tmp_path / "images.txt"
    # One image named three ways is written once.
    wanted.write_text("# what the site needs\n\ndlist:1   # the Docker manifest list\n"
                      "docker.io/library/multi:1\nlibrary/dlist:1\n")
    out = ok(mirror_cli("export", "--data", a.data_dir, "--upstream", upstream.url, "multi:1",
                        "--from-list", wanted, "-o", bundle))
    assert "2 images" in out and "docker.io/library/multi:1" in out
    assert upstream.count(None, "/v2/") == 0, "everything was cached: the upstream is not asked"

    with tarfile.open(bundle) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        names = {m.name for m in tar.getmembers()}
    assert [(e["digest"], e["annotations"]["org.opencontainers.image.ref.name"]) for e in index["manifests"]] == \
        [(images.multi.digest, "docker.io/library/multi:1"), (images.dlist.digest, "docker.io/library/dlist:1")]
    assert "oci-layout" in names

    b = offline_mirror()
    ok(preload(b.data_dir, bundle))
    b.start()
    for name, item in (("library/multi", images.multi), ("library/dlist", images.dlist)):
        assert_serves(http, b.url, name, "1", item)
        assert manifest(http, b.url, name, "1").content == manifest(http, a.url, name, "1").content


def test_export_pulls_through_the_upstream_what_is_not_cached(
    images: StandardImages, upstream: UpstreamRegistry, offline_mirror: Callable[..., MirrorServer],
    http: httpx.Client, tmp_path: Path
) -> None:
    bundle = tmp_path / "small.tar.zst"
    upstream.clear_counts()
    out = ok(mirror_cli("export", "--data", tmp_path / "fresh", "--upstream", upstream.url, "small:1",
                        "-o", bundle))
    assert "pulled through the upstream first" in out
    assert upstream.count("GET", "/v2/library/small/manifests/1") == 1
    b = offline_mirror()
    ok(preload(b.data_dir, bundle))
    b.start()
    assert_serves(http, b.url, "library/small", "1", images.small)


def test_export_selects_platforms_and_keeps_the_index_digest(
    images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
    offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    a = mirror_factory()
    pull_all(http, a.url, "library/multi", "1", only="amd64")
    amd64, arm64 = images.multi.child("amd64"), images.multi.child("arm64")

    def exported(label: str, *flags: str) -> set[str]:
        bundle = tmp_path / f"multi-{label}.tar"
        ok(mirror_cli("export", "--data", a.data_dir, "--upstream", upstream.url, "multi:1", *flags, "-o", bundle))
        with tarfile.open(bundle) as tar:
            return {"sha256:" + m.name.rpartition("/")[2] for m in tar.getmembers()
                    if m.name.startswith("blobs/sha256/")}

    default = exported("default")  # what the store has: only amd64 was pulled
    assert {images.multi.digest, amd64.digest, *amd64.blobs} == default
    arm_only = exported("arm", "--platform", "linux/arm64")  # pulled through the upstream
    assert {images.multi.digest, arm64.digest, *arm64.blobs} == arm_only
    assert exported("all", "--all-platforms") == default | arm_only

    c = offline_mirror()
    ok(preload(c.data_dir, tmp_path / "multi-arm.tar"))
    c.start()
    index = manifest(http, c.url, "library/multi", "1")
    assert index.status_code == 200 and index.headers["docker-content-digest"] == images.multi.digest
    assert manifest(http, c.url, "library/multi", arm64.digest).content == arm64.manifest
    assert manifest(http, c.url, "library/multi", amd64.digest).status_code != 200

    bad = mirror_cli("export", "--data", a.data_dir, "--upstream", upstream.url, "multi:1", "--platform",
                     "linux/s390x", "-o", tmp_path / "none.tar")
    assert bad.returncode == 1
    assert "multi:1: no manifest for linux/s390x (it has linux/amd64, linux/arm64/v8)" in bad.stderr
    assert not (tmp_path / "none.tar").exists()


def test_export_includes_pushed_repositories(
    built: Built, offline_mirror: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path
) -> None:
    registry = offline_mirror().start()
    client.push_image(registry.url, "team/app", "1", built.amd64)
    bundle = tmp_path / "team.tar.gz"
    out = ok(mirror_cli("export", "--data", registry.data_dir, "--upstream", UNREACHABLE, "team/app:1",
                        "-o", bundle))
    assert "docker.io/team/app:1" in out
    # Named as the bundle names it, with the default registry's prefix: the same pushed repository (as the API
    # routes docker.io/team/app), not a cached one of the upstream.
    prefixed = tmp_path / "prefixed.tar.gz"
    ok(mirror_cli("export", "--data", registry.data_dir, "--upstream", UNREACHABLE, "docker.io/team/app:1",
                  "-o", prefixed))
    assert tarfile.open(prefixed).getnames() == tarfile.open(bundle).getnames()
    restored = offline_mirror()
    ok(preload(restored.data_dir, bundle))
    restored.start()  # restored as cached content of docker.io
    assert_serves(http, restored.url, "team/app", "1", built.amd64)


def test_leftovers_of_a_crashed_preload_are_removed(built: Built, tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok(preload(data, built.layout))
    crashed = data / "tmp" / "stage-0123456789abcdef.d"  # its lock file is gone: its writer died
    crashed.mkdir()
    (crashed / "1").write_bytes(b"half a layer")
    ok(preload(data, built.layout))
    assert not crashed.exists()


def test_fsck_reports_and_repairs_the_staging_directory_of_a_crashed_preload(built: Built, tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok(preload(data, built.layout))
    crashed = data / "tmp" / "stage-0123456789abcdef.d"
    crashed.mkdir()
    (crashed / "1").write_bytes(b"half a layer")
    (data / "tmp" / "stage-0123456789abcdef.partial").touch()  # its lock, no longer held: its writer died
    found = mirror_cli("fsck", "--data", data)
    assert found.returncode == 1 and f"abandoned temp file: {crashed}" in found.stdout, found.stdout
    repaired = mirror_cli("fsck", "--repair", "--data", data)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert not crashed.exists() and not list((data / "tmp").iterdir())
    assert ok(mirror_cli("fsck", "--data", data)).rstrip().endswith("clean")


def test_fsck_reports_a_preloaded_image_that_lost_an_object_until_it_is_preloaded_again(
    built: Built, tmp_path: Path
) -> None:
    """An air-gapped mirror cannot fetch it again: before, fsck said clean and the pull failed with 503."""
    data = tmp_path / "data"
    ok(preload(data, built.layout))
    lost = built.arm64.layers[1].digest  # a layer of a child of the preloaded index
    path = stored_objects(data)[lost]
    path.chmod(0o644)
    path.unlink()
    for args in (["fsck"], ["fsck", "--repair"]):
        found = mirror_cli(*args, "--data", data)
        assert found.returncode == 1, found.stdout + found.stderr
        assert (f"preloaded image refers to a missing object (preload it again): docker.io/library/pre-multi@"
                f"{built.arm64.digest} -> {lost}") in found.stdout, found.stdout
    ok(preload(data, built.layout))
    assert ok(mirror_cli("fsck", "--data", data)).rstrip().endswith("clean")


def test_export_to_standard_output_piped_into_a_preload_from_standard_input(built: Built, tmp_path: Path) -> None:
    """``mirror export ... -o - | ssh airgapped mirror preload -`` and ``docker save IMAGE | mirror preload -``."""
    source, target = tmp_path / "source", tmp_path / "target"
    ok(preload(source, built.layout))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    exported = subprocess.run([sys.executable, "-m", "mirror", "export", "--data", str(source), "--upstream",
                               UNREACHABLE, "pre-multi:1", "--all-platforms", "-o", "-"],
                              capture_output=True, env=env, timeout=120, check=False, stdin=subprocess.DEVNULL,
                              cwd=PROJECT_ROOT)
    assert exported.returncode == 0, exported.stderr
    assert b"docker.io/library/pre-multi:1" in exported.stderr  # the summary: stdout is the archive
    loaded = subprocess.run([sys.executable, "-m", "mirror", "preload", "--data", str(target), "-"],
                            input=exported.stdout, capture_output=True, env=env, timeout=120, check=False,
                            cwd=PROJECT_ROOT)
    assert loaded.returncode == 0, loaded.stderr
    assert b"1 image, 1 tag (1 new or moved)" in loaded.stdout, loaded.stdout
    assert f"pin/docker.io/library/pre-multi@{built.multi.digest}" in pins(target)
    assert set(stored_objects(target)) <= set(stored_objects(source))
    assert ok(mirror_cli("fsck", "--verify-content", "--data", target)).rstrip().endswith("clean")
    # Compressed in the pipe too (``zcat``-less: ``ssh host cat bundle.tar.zst | mirror preload -``).
    for kind, packed in (("gzip", gzip.compress(exported.stdout)),
                         ("zstd", zstandard.ZstdCompressor().compress(exported.stdout))):
        piped = subprocess.run([sys.executable, "-m", "mirror", "preload", "--data", str(tmp_path / kind), "-"],
                               input=packed, capture_output=True, env=env, timeout=120, check=False, cwd=PROJECT_ROOT)
        assert piped.returncode == 0 and b"1 image, 1 tag (1 new or moved)" in piped.stdout, (kind, piped.stderr)


def test_a_compressed_export_names_its_file_not_the_temporary_one_in_the_gzip_header(
    built: Built, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    ok(preload(data, built.layout))
    ok(mirror_cli("export", "--data", data, "--upstream", UNREACHABLE, "pre-multi:1", "-o", tmp_path / "b.tar.gz"))
    header = (tmp_path / "b.tar.gz").read_bytes()[:64]
    assert header[3] & 0x08, header  # FNAME (RFC 1952 2.3.1)
    assert header[10:header.index(b"\0", 10)] == b"b.tar"


def test_a_store_preloaded_from_an_export_of_some_platforms_passes_fsck(built: Built, tmp_path: Path) -> None:
    """The export keeps the whole index, which names manifests the archive does not hold: not missing."""
    source, target = tmp_path / "source", tmp_path / "target"
    ok(preload(source, built.layout))
    bundle = tmp_path / "amd64.tar"
    ok(mirror_cli("export", "--data", source, "--upstream", UNREACHABLE, "pre-multi:1", "--platform", "linux/amd64",
                  "-o", bundle))
    ok(preload(target, bundle))
    assert built.arm64.digest not in stored_objects(target)
    assert ok(mirror_cli("fsck", "--data", target)).rstrip().endswith("clean")


def test_export_fails_clearly(tmp_path: Path) -> None:
    missing = mirror_cli("export", "--data", tmp_path / "data", "--upstream", UNREACHABLE, "nothere:1",
                         "-o", tmp_path / "x.tar")
    assert missing.returncode == 1
    assert missing.stderr.startswith("mirror: export: nothere:1: the image is not in the store and the upstream "
                                     f"({UNREACHABLE}) could not provide it")
    other = mirror_cli("export", "--data", tmp_path / "data", "quay.io/x/y:1", "-o", tmp_path / "x.tar")
    assert other.returncode == 1 and "quay.io is not one of this mirror's upstreams (docker.io)" in other.stderr
    usage = mirror_cli("export", "--data", tmp_path / "data", "a:1", "--platform", "linux", "-o", tmp_path / "x")
    assert usage.returncode == 2 and "expected OS/ARCH[/VARIANT]" in usage.stderr
    assert mirror_cli("export", "-o", tmp_path / "x").returncode == 2
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*partial"))


# -- bad input -----------------------------------------------------------------------------------------


def _bad(built: Built, tmp: Path, case: str) -> tuple[Path, str]:
    """A bad archive (from the victim image's layout) and the message it must produce."""
    good = layout_entries(built.victim_layout)
    layer = built.victim.layers[1]
    layer_name = f"blobs/sha256/{layer.digest.removeprefix('sha256:')}"
    path = tmp / f"{case}.tar"
    if case == "dotdot":
        return write_tar(path, [*good, file_entry("blobs/../../escape", b"x")]), \
            r"blobs/\.\./\.\./escape: path with '\.\.' in archive"
    if case == "absolute":
        return write_tar(path, [file_entry("/etc/escape", b"x"), *good]), r"/etc/escape: absolute path in archive"
    if case == "symlink_absolute":
        return write_tar(path, [*good, (info("blobs/evil", tarfile.SYMTYPE, linkname="/etc/passwd"), None)]), \
            r"blobs/evil: symlink points outside the archive \(to /etc/passwd\)"
    if case == "symlink_relative":
        return write_tar(path, [*good, (info("blobs/sha256/evil", tarfile.SYMTYPE,
                                             linkname="../../../etc/passwd"), None)]), \
            r"blobs/sha256/evil: symlink points outside the archive"
    if case == "hardlink_outside":
        return write_tar(path, [*good, (info("evil", tarfile.LNKTYPE, linkname="../outside"), None)]), \
            r"evil: hard link points outside the archive \(to \.\./outside\)"
    if case == "hardlink_missing":
        return write_tar(path, [(info("evil", tarfile.LNKTYPE, linkname="index.json"), None), *good]), \
            r"evil: hard link to index.json, which is not an earlier entry"
    if case == "device":
        return write_tar(path, [*good, (info("dev/null", tarfile.CHRTYPE), None)]), r"dev/null: device file"
    if case == "fifo":
        return write_tar(path, [*good, (info("pipe", tarfile.FIFOTYPE), None)]), r"pipe: FIFO in archive"
    if case == "duplicate":
        return write_tar(path, [*good, file_entry("index.json", dump_json({"manifests": []}))]), \
            r"index.json: duplicate entry"
    if case == "missing_layer":
        return write_tar(path, [e for e in good if e[0].name != layer_name]), \
            rf"manifest {built.victim.digest} names layer {layer.digest}, which is not in the archive"
    if case == "layer_mismatch":
        data = bytearray(layer.path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        return write_tar(path, [(e[0], bytes(data)) if e[0].name == layer_name else e for e in good]), \
            rf"{layer_name}: content does not match {layer.digest} \(got sha256:\w+\)"
    if case == "layer_mismatch_zstd":
        data = bytearray(layer.path.read_bytes())
        data[-1] ^= 0xFF
        plain = write_tar(path, [(e[0], bytes(data)) if e[0].name == layer_name else e for e in good])
        return compress(plain, "zstd"), rf"{layer_name}: content does not match its digest"
    if case == "truncated":
        whole = write_tar(tmp / "whole.tar", good).read_bytes()
        path.write_bytes(whole[: int(len(whole) * 0.7)])
        return path, r"archive is truncated"
    if case == "truncated_at_header":
        whole = write_tar(tmp / "whole.tar", good)
        with tarfile.open(whole) as tar:
            last = tar.getmembers()[-1]
        end = last.offset_data + (last.size + 511) // 512 * 512
        path.write_bytes(whole.read_bytes()[:end])
        return path, r"archive is truncated: it ends after index.json without the end-of-archive marker"
    if case == "truncated_gzip":
        whole = compress(write_tar(tmp / "whole.tar", good), "gzip").read_bytes()
        path = tmp / f"{case}.tar.gz"
        path.write_bytes(whole[: int(len(whole) * 0.7)])
        return path, r"archive is truncated"
    if case == "truncated_zstd":
        whole = compress(write_tar(tmp / "whole.tar", good), "zstd").read_bytes()
        path = tmp / f"{case}.tar.zst"
        path.write_bytes(whole[: int(len(whole) * 0.6)])
        return path, r"archive is truncated"
    if case == "tar_bomb":
        header = info(layer_name, size=1 << 40).tobuf(tarfile.PAX_FORMAT)
        path.write_bytes(header + b"\0" * 8192)
        return path, rf"{layer_name}: declares 1\.0 TiB, far more than the whole archive .*refusing a tar bomb"
    if case == "tar_bomb_zstd":
        raw = tmp / "bomb.tar"
        raw.write_bytes(info(layer_name, size=1 << 40).tobuf(tarfile.PAX_FORMAT) + b"\0" * (1 << 20))
        return compress(raw, "zstd"), rf"{layer_name}: declares 1\.0 TiB, more than the archive can decompress"
    if case == "not_tar":
        path.write_bytes(os.urandom(4096))
        return path, r"not a tar archive"
    if case == "text":
        path.write_text("this is not an image\n" * 100)
        return path, r"not a tar archive"
    if case == "empty":
        path.write_bytes(b"")
        return path, r"empty file"
    if case == "gzip_not_tar":
        path = tmp / "text.gz"
        path.write_bytes(gzip.compress(b"hello " * 1000))
        return path, r"not a tar archive after gzip decompression"
    if case == "no_images":
        return write_tar(path, [file_entry("hello.txt", b"hi")]), r"not an image archive"
    raise AssertionError(case)


BAD_CASES = ["dotdot", "absolute", "symlink_absolute", "symlink_relative", "hardlink_outside", "hardlink_missing",
             "device", "fifo", "duplicate", "missing_layer", "layer_mismatch", "layer_mismatch_zstd", "truncated",
             "truncated_at_header", "truncated_gzip", "truncated_zstd", "tar_bomb", "tar_bomb_zstd", "not_tar",
             "text", "empty",
             "gzip_not_tar", "no_images"]


@pytest.fixture(scope="module")
def seeded(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding a preloaded image, so "unchanged" means something."""
    data = tmp_path_factory.mktemp("seeded") / "data"
    ok(preload(data, built.layout))
    return data


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_refused_and_the_store_is_unchanged(
    case: str, built: Built, seeded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, message = _bad(built, tmp_path, case)
    before = snapshot(seeded)
    for name in [k for k in os.environ if k.startswith("MIRROR_")]:
        monkeypatch.delenv(name)
    capsys.readouterr()
    code = cli.main(["preload", "--data", str(seeded), str(archive)])  # in-process: the same CLI, faster
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert err.startswith(f"mirror: preload: {archive}: "), err
    assert re.search(message, err), err
    assert out == ""
    assert snapshot(seeded) == before


def test_store_is_clean_after_refused_input(built: Built, seeded: Path, tmp_path: Path) -> None:
    for case in ("layer_mismatch", "truncated_gzip", "duplicate"):
        archive, _ = _bad(built, tmp_path, case)
        assert preload(seeded, archive).returncode == 1
    fsck = mirror_cli("fsck", "--data", seeded)
    assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr


def test_one_bad_file_does_not_stop_the_others(built: Built, tmp_path: Path) -> None:
    bad, _ = _bad(built, tmp_path, "text")
    result = preload(tmp_path / "data", bad, built.layout)
    assert result.returncode == 1
    assert f"mirror: preload: {bad}: not a tar archive" in result.stderr
    assert f"{built.layout}: 2 images" in result.stdout
    assert "total: 1 of 2 files, 2 images" in result.stdout


def test_help_describes_the_commands() -> None:
    for command, words in (("preload", ["--data DIR", "--url URL", "digest differs"]),
                           ("export", ["--platform", "--all-platforms", "--from-list", "-o FILE"])):
        result = mirror_cli(command, "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        for word in words:
            assert word in text, (command, word)


# -- real clients ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_round_trip_dockerd_pulls_and_runs_from_a_preloaded_offline_mirror(
    images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
    offline_mirror: Callable[..., MirrorServer], dockerd_factory: Callable[..., Dockerd], skopeo: str,
    http: httpx.Client, tmp_path: Path
) -> None:
    a = mirror_factory()
    for name in ("library/multi", "library/dlist"):
        pull_all(http, a.url, name, "1")
    bundle = tmp_path / "bundle.tar"
    ok(mirror_cli("export", "--data", a.data_dir, "--upstream", upstream.url, "multi:1", "dlist:1",
                  "--all-platforms", "-o", bundle))
    # skopeo reads the bundle by name.
    raw = subprocess.run([skopeo, "inspect", "--raw", f"oci-archive:{bundle}:docker.io/library/multi:1"],
                         capture_output=True, check=True, timeout=120).stdout
    assert sha256(raw) == images.multi.digest

    b = offline_mirror()
    ok(preload(b.data_dir, bundle))
    b.start()
    daemon = dockerd_factory(registry_mirror=b.url)
    amd64 = images.multi.child("amd64")
    daemon.docker("pull", "multi:1")
    assert daemon.docker("run", "--rm", "--network", "none", "multi:1", "cat", "/etc/image-marker").stdout \
        == "multi-amd64"
    daemon.docker("pull", f"dlist@{images.dlist.digest}")
    assert daemon.docker("run", "--rm", "--network", "none", f"dlist@{images.dlist.digest}", "cat",
                         "/etc/image-marker").stdout == "dlist-amd64"
    repo_digests = daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}", "multi:1").stdout
    assert images.multi.digest in repo_digests or amd64.digest in repo_digests, repo_digests
    for name, item in (("library/multi", images.multi), ("library/dlist", images.dlist)):
        for where in (a, b):
            raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false",
                                  f"docker://{where.address}/{name}:1"],
                                 capture_output=True, check=True, timeout=120).stdout
            assert sha256(raw) == item.digest


@pytest.mark.slow
def test_real_docker_save_is_preloaded_pulled_and_run(
    images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
    dockerd_factory: Callable[..., Dockerd], tmp_path: Path
) -> None:
    token = operator_token(tmp_path)
    server = mirror_factory(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)})  # online: dockerd gets the image first
    daemon = dockerd_factory(registry_mirror=server.url)
    daemon.docker("pull", "small:1")
    daemon.docker("tag", "small:1", "saved-app:7")
    daemon.docker("tag", "small:1", "ghcr.io/acme/saved-app:7")
    saved = tmp_path / "saved.tar"
    daemon.docker("save", "-o", str(saved), "saved-app:7", "ghcr.io/acme/saved-app:7")
    daemon.docker("rmi", "saved-app:7", "ghcr.io/acme/saved-app:7", "small:1")

    out = ok(mirror_cli("preload", "--url", server.url, "--token-file", token, saved))  # into the running mirror
    assert "1 image, 2 tags" in out
    assert "nothing new" in ok(preload(server.data_dir, saved))
    upstream.clear_counts()
    daemon.docker("pull", "saved-app:7")  # exists only through the preload: not upstream
    assert daemon.docker("run", "--rm", "--network", "none", "saved-app:7", "cat", "/etc/image-marker").stdout \
        == "small"
    assert upstream.count(None, "/v2/library/saved-app/", status=200) == 0


@pytest.mark.slow
def test_skopeo_oci_archive_is_preloaded_with_digests_preserved(
    images: StandardImages, upstream: UpstreamRegistry, offline_mirror: Callable[..., MirrorServer], skopeo: str,
    http: httpx.Client, tmp_path: Path
) -> None:
    source = upstream.url.removeprefix("http://")
    oci = tmp_path / "multi.tar"  # an OCI index: skopeo keeps it byte for byte
    subprocess.run([skopeo, "copy", "--all", "--preserve-digests", "--src-tls-verify=false",
                    f"docker://{source}/library/multi:1", f"oci-archive:{oci}:docker.io/library/multi:1"],
                   check=True, capture_output=True, timeout=120)
    converted = tmp_path / "dlist.tar"  # a Docker manifest list: skopeo rewrites it as OCI (new digests)
    subprocess.run([skopeo, "copy", "--all", "--src-tls-verify=false", f"docker://{source}/library/dlist:1",
                    f"oci-archive:{converted}:dlist:1"], check=True, capture_output=True, timeout=120)
    archived = sha256(subprocess.run([skopeo, "inspect", "--raw", f"oci-archive:{converted}:dlist:1"],
                                     check=True, capture_output=True, timeout=120).stdout)
    assert archived != images.dlist.digest

    server = offline_mirror()
    ok(preload(server.data_dir, oci, compress(converted, "zstd")))
    server.start()
    assert_serves(http, server.url, "library/multi", "1", images.multi)
    answer = manifest(http, server.url, "library/dlist", "1")
    assert answer.status_code == 200 and answer.headers["docker-content-digest"] == archived == sha256(answer.content)
    for child in json.loads(answer.content)["manifests"]:
        body = manifest(http, server.url, "library/dlist", child["digest"])
        assert sha256(body.content) == child["digest"]
        for descriptor in [json.loads(body.content)["config"], *json.loads(body.content)["layers"]]:
            assert blob_digest(http, server.url, "library/dlist", descriptor["digest"]) == descriptor["digest"]


@pytest.mark.parametrize("command", ["preload", "export"])
def test_an_unusable_data_directory_is_a_clear_error(tmp_path: Path, command: str) -> None:
    """``--data`` naming a regular file: one line saying so, exit status 2, no traceback."""
    data = tmp_path / "not-a-directory"
    data.write_text("x")
    args = [str(tmp_path / "missing.tar")] if command == "preload" else ["library/x:1", "-o", str(tmp_path / "o.tar")]
    done = mirror_cli(command, "--data", str(data), *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"mirror: cannot use data directory {data}:" in done.stderr
    assert "Traceback" not in done.stderr
