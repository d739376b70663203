"""The private registry with real clients: docker push/pull and skopeo copy into the mirror.

The mirror must behave exactly as ``registry:2`` does for the images pushed to it, while
Docker Hub content (the session upstream, reached through ``--registry-mirror``) keeps
being cached beside them.  Once pushed to, a repository never reaches the upstream: the tests
count the upstream's requests for the pushed names, and read the mirror's own access log to
see how the clients pushed (uploads, existence checks, cross-repository mounts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.dockerd import Dockerd, forget_all, pull, run
from tests.support.images import (
    DOCKER_MANIFEST,
    MANIFEST_MEDIA_TYPES,
    Index,
    sha256_digest as sha256,
    write_oci_layout,
)
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.skopeo import everything, layout_blobs, skopeo_run
from tests.support.storecheck import verified_objects

pytestmark = pytest.mark.slow

LIBRARY = {"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"}
ACCEPT_ALL = ", ".join(MANIFEST_MEDIA_TYPES)
PUSHED_DIGEST = re.compile(r"^\S+: digest: (sha256:[0-9a-f]{64}) size: \d+$", re.MULTILINE)


# -- helpers ---------------------------------------------------------------------------


def http_get(mirror: MirrorServer, path: str, *, method: str = "GET", accept: str = ACCEPT_ALL) -> httpx.Response:
    return httpx.request(method, f"{mirror.url}{path}", headers={"accept": accept}, trust_env=False, timeout=30)


def catalog(mirror: MirrorServer) -> list[str]:
    answer = http_get(mirror, "/v2/_catalog")
    assert answer.status_code == 200, answer.text
    repositories: list[str] = answer.json()["repositories"]
    return repositories


def local_manifest(mirror: MirrorServer, name: str, reference: str) -> httpx.Response:
    """GET a pushed manifest from the mirror, which must answer it as LOCAL."""
    answer = http_get(mirror, f"/v2/{name}/manifests/{reference}")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-mirror-cache"] == "LOCAL"
    assert answer.headers["docker-content-digest"] == sha256(answer.content)
    return answer


def layer_digests(manifest: bytes) -> list[str]:
    return [layer["digest"] for layer in json.loads(manifest)["layers"]]


def config_digest(manifest: bytes) -> str:
    digest: str = json.loads(manifest)["config"]["digest"]
    return digest


def docker_push(daemon: Dockerd, ref: str) -> tuple[str, str]:
    """``docker push``; return the manifest digest docker reports and its output."""
    out = daemon.docker("push", ref).stdout
    m = PUSHED_DIGEST.search(out)
    assert m, out
    return m.group(1), out


def docker_push_fails(daemon: Dockerd, ref: str) -> str:
    """``docker push`` that must fail; return what docker printed."""
    done = daemon.docker("push", ref, check=False, timeout=120)
    assert done.returncode != 0, done.stdout
    return done.stdout + done.stderr


def query(uri: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(uri).query).items()}


def upload_requests(mirror: MirrorServer, name: str) -> list[tuple[str, int, dict[str, str]]]:
    """``(method, status, query)`` of every request on an upload of *name*, in order."""
    prefix = f"/v2/{name}/blobs/uploads/"
    return [(e.method, e.status, query(e.uri)) for e in mirror.access.requests() if e.path.startswith(prefix)]


def uploaded_digests(mirror: MirrorServer, name: str) -> set[str]:
    """Blobs whose bytes were sent to the mirror: uploads finished with ``?digest=``.

    A monolithic upload (``POST ...?digest=``) counts as well; a mount does not.
    """
    return {q["digest"] for method, _, q in upload_requests(mirror, name)
            if method in ("PUT", "POST") and "digest" in q and "mount" not in q}


def refused_uploads(mirror: MirrorServer, name: str) -> set[int]:
    """Statuses of the upload requests on *name*, which must all have been refused."""
    answers = upload_requests(mirror, name)
    assert answers and all(method == "POST" for method, _, _ in answers), answers
    return {status for _, status, _ in answers}


def nothing_stored(mirror: MirrorServer) -> bool:
    """No blob in the store and no upload in progress."""
    data = mirror.data_dir
    return not any(path.is_file() for path in (data / "blobs").rglob("*")) and not any((data / "uploads").iterdir())


def assert_only_existence_checks_reached_the_upstream(upstream: UpstreamRegistry, name: str,
                                                     digests: Iterable[str]) -> None:
    """Nothing of a push to *name* (of blobs known to docker as *digests*) reached the upstream but
    the question, before its first upload, whether the upstream serves that repository (one
    ``GET /v2/<name>/tags/list?n=1``: ``registry/shadowing.py``).

    dockerd begins a push with a HEAD in the target repository for each layer digest it
    remembers (from a pull, or a push to another repository), before its first upload makes
    the repository local.  The mirror answers those from its own store: blobs of a repository
    nothing was ever pulled from are not asked about upstream (which would make docker skip
    uploads of blobs this registry does not have).
    """
    seen = [e for e in upstream.requests() if name in e.uri]
    assert [(e.method, e.path.endswith(f"/{name}/tags/list")) for e in seen] == [("GET", True)], seen


# -- docker push / pull ------------------------------------------------------------------


def test_docker_pushes_and_pulls_a_private_image_beside_the_cached_hub_image(
    dockerd_factory: Callable[..., Dockerd], mirror_factory: Callable[..., MirrorServer],
    upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    mirror = mirror_factory(env=LIBRARY)
    daemon = dockerd_factory(registry_mirror=mirror.url, insecure_registries=[mirror.address])
    upstream.clear_counts()
    mine = f"{mirror.address}/my-small:1"

    # Docker Hub content, cached by the mirror.
    pull(daemon, "small:1")
    assert http_get(mirror, "/v2/library/small/manifests/1").headers["x-mirror-cache"] == "HIT"

    daemon.docker("tag", "small:1", mine)
    pushed, out = docker_push(daemon, mine)
    assert "Pushed" in out, out
    small_layers = [layer.digest for layer in images.small.layers]
    assert_only_existence_checks_reached_the_upstream(upstream, "my-small", small_layers)
    upstream.clear_counts()
    manifest = local_manifest(mirror, "my-small", "1")
    assert manifest.headers["docker-content-digest"] == pushed
    assert manifest.headers["content-type"] == DOCKER_MANIFEST  # what docker 20.10 pushes
    stored = verified_objects(mirror.data_dir)
    assert {pushed, config_digest(manifest.content), *layer_digests(manifest.content)} <= stored

    daemon.docker("image", "rm", "small:1", mine)
    assert daemon.docker("images", "-q").stdout.strip() == ""
    pull(daemon, mine)
    assert run(daemon, mine, "cat", "/etc/image-marker") == "small"
    assert run(daemon, mine, "sh", "-c", "echo $((6 * 7))") == "42\n"
    assert daemon.docker("image", "inspect", "--format", "{{index .RepoDigests 0}}", mine).stdout.strip() \
        == f"{mirror.address}/my-small@{pushed}"

    assert sorted(catalog(mirror)) == ["library/small", "my-small"]
    tags = http_get(mirror, "/v2/my-small/tags/list")
    assert tags.status_code == 200 and tags.json() == {"name": "my-small", "tags": ["1"]}
    # Once pushed, the private image never reaches the upstream.
    assert upstream.count(None, "my-small") == 0


def test_docker_skips_blobs_the_registry_has_and_mounts_them_across_repositories(
    dockerd_factory: Callable[..., Dockerd], mirror_factory: Callable[..., MirrorServer],
    upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    mirror = mirror_factory(env=LIBRARY)
    daemon = dockerd_factory(registry_mirror=mirror.url, insecure_registries=[mirror.address])
    first, second, other = (f"{mirror.address}/{ref}" for ref in ("my-small:1", "my-small:2", "team/other:1"))
    pull(daemon, "small:1")
    for ref in (first, second, other):
        daemon.docker("tag", "small:1", ref)

    mirror.access.clear()
    pushed, _ = docker_push(daemon, first)
    manifest = local_manifest(mirror, "my-small", "1").content
    layers, config = layer_digests(manifest), config_digest(manifest)
    assert uploaded_digests(mirror, "my-small") == {*layers, config}
    stored = verified_objects(mirror.data_dir)

    # The same image again, under another tag: docker finds every blob there (HEAD 200).
    mirror.access.clear()
    again, out = docker_push(daemon, second)
    assert again == pushed
    assert out.count("Layer already exists") == len(layers), out
    assert upload_requests(mirror, "my-small") == []
    assert mirror.access.count("PUT", "/v2/my-small/manifests/2", 201) == 1
    assert local_manifest(mirror, "my-small", "2").content == manifest

    # Into another repository of the same registry: the layers are mounted, not uploaded.
    upstream.clear_counts()
    mirror.access.clear()
    mounted, out = docker_push(daemon, other)
    assert mounted == pushed
    assert out.count("Mounted from my-small") == len(layers), out
    mounts = [(status, q["mount"]) for method, status, q in upload_requests(mirror, "team/other")
              if method == "POST" and q.get("from") == "my-small"]
    assert sorted(mounts) == sorted((201, digest) for digest in layers)
    # Only the config is sent again (docker checks it with a HEAD, then uploads it: it never mounts configs).
    assert uploaded_digests(mirror, "team/other") == {config}
    assert mirror.access.count("PATCH", "/v2/team/other/blobs/uploads/") == 1
    assert local_manifest(mirror, "team/other", "1").content == manifest
    for digest in (*layers, config):
        answer = http_get(mirror, f"/v2/team/other/blobs/{digest}", method="HEAD")
        assert (answer.status_code, answer.headers["x-mirror-cache"]) == (200, "LOCAL")
    # Nothing new in the store, and nothing of it asked of the upstream.
    assert verified_objects(mirror.data_dir) == stored
    assert_only_existence_checks_reached_the_upstream(upstream, "team/other", layers)
    assert sorted(catalog(mirror)) == ["library/small", "my-small", "team/other"]


# -- skopeo ----------------------------------------------------------------------------


def check_index_copy(skopeo: str, mirror: MirrorServer, name: str, multi: Index, layout: Path) -> None:
    """*name*:1 in the mirror is *multi*, byte for byte, and copies back out unchanged."""
    ref = f"docker://{mirror.address}/{name}:1"
    raw = skopeo_run(skopeo, "inspect", "--raw", "--tls-verify=false", ref)
    assert raw == multi.manifest and sha256(raw) == multi.digest
    for child in multi.children:
        child_raw = skopeo_run(skopeo, "inspect", "--raw", "--tls-verify=false",
                               f"docker://{mirror.address}/{name}@{child.digest}")
        assert child_raw == child.manifest
    index = local_manifest(mirror, name, "1")
    assert (index.content, index.headers["content-type"]) == (multi.manifest, multi.media_type)

    skopeo_run(skopeo, "copy", "--all", "--preserve-digests", "--src-tls-verify=false", ref, f"oci:{layout}:out")
    assert layout_blobs(layout) == everything(multi)
    (entry,) = json.loads((layout / "index.json").read_bytes())["manifests"]
    assert (entry["mediaType"], entry["digest"], entry["size"]) == (multi.media_type, multi.digest, multi.size)
    for digest, (_, document) in multi.manifests.items():
        assert (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes() == document
    for digest, path in multi.blobs.items():
        assert (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes() == path.read_bytes()


def test_skopeo_copies_a_multi_arch_index_in_and_out_byte_for_byte(
    skopeo: str, mirror_factory: Callable[..., MirrorServer], upstream: UpstreamRegistry,
    images: StandardImages, tmp_path: Path,
) -> None:
    mirror = mirror_factory(env=LIBRARY)
    copy_an_index_in_and_out(skopeo, mirror, upstream, images.multi, tmp_path)
    assert verified_objects(mirror.data_dir) == everything(images.multi)


def copy_an_index_in_and_out(skopeo: str, mirror: MirrorServer, upstream: UpstreamRegistry, multi: Index,
                             tmp: Path) -> None:
    """``skopeo copy --all`` *multi* from an OCI layout into the mirror's ``team/multi:1`` and out again,
    then from the upstream's ``library/multi:1`` (pulled through) into ``team/multi-copy:1``: every copy
    byte for byte, layers mounted, and the upstream asked only whether it serves the pushed names."""
    upstream.clear_counts()

    # From an OCI layout on disk (not the mirror's own content) into the mirror, and back out.
    source = write_oci_layout(tmp / "source", multi, "1")
    skopeo_run(skopeo, "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
               source, f"docker://{mirror.address}/team/multi:1")
    assert uploaded_digests(mirror, "team/multi") == set(multi.blobs)
    check_index_copy(skopeo, mirror, "team/multi", multi, tmp / "out")
    assert_only_existence_checks_reached_the_upstream(upstream, "team/multi", multi.blobs)
    assert upstream.count(None, "library/multi") == 0

    # From the upstream's copy, cached by the mirror, into a pushed repository of the mirror.
    mirror.access.clear()
    skopeo_run(skopeo, "copy", "--all", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
               f"docker://{mirror.address}/library/multi:1", f"docker://{mirror.address}/team/multi-copy:1")
    check_index_copy(skopeo, mirror, "team/multi-copy", multi, tmp / "out-copy")
    # skopeo knows where the layers are in this registry and mounts them; configs it sends again.
    layers = {layer.digest for child in multi.children for layer in child.layers}
    mounted = {q["mount"] for method, status, q in upload_requests(mirror, "team/multi-copy")
               if method == "POST" and "mount" in q and status == 201}
    assert mounted == layers
    assert uploaded_digests(mirror, "team/multi-copy") == {child.config_digest for child in multi.children}
    assert_only_existence_checks_reached_the_upstream(upstream, "team/multi-copy", multi.blobs)
    assert sorted(catalog(mirror)) == ["library/multi", "team/multi", "team/multi-copy"]


# -- policy ----------------------------------------------------------------------------


def test_push_policy_refuses_with_clear_errors_and_stores_nothing(
    dockerd_factory: Callable[..., Dockerd], mirror_factory: Callable[..., MirrorServer],
    upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    cache = mirror_factory(env=LIBRARY)
    disabled = mirror_factory(env={**LIBRARY, "MIRROR_PUSH_ENABLED": "false"})
    team_only = mirror_factory(env={**LIBRARY, "MIRROR_PUSH_PREFIXES": "team"})
    daemon = dockerd_factory(registry_mirror=cache.url,
                             insecure_registries=[m.address for m in (cache, disabled, team_only)])
    pull(daemon, "small:1")

    refs = {
        "disabled": f"{disabled.address}/my-small:1",
        "outside": f"{team_only.address}/other/x:1",
        "inside": f"{team_only.address}/team/x:1",
        "cached": f"{cache.address}/library/small:1",
        "upstream": f"{cache.address}/dlist:1",  # the upstream's library/dlist, never pulled here
    }
    for ref in refs.values():
        daemon.docker("tag", "small:1", ref)

    # Push disabled: UNSUPPORTED (405) at the first upload, and not a byte kept.
    out = docker_push_fails(daemon, refs["disabled"])
    assert "unsupported: push is disabled on this registry" in out, out
    assert refused_uploads(disabled, "my-small") == {405}
    assert catalog(disabled) == []
    assert nothing_stored(disabled)

    # Push allowed under "team/" only: DENIED (403) elsewhere, and team/x works.
    out = docker_push_fails(daemon, refs["outside"])
    assert "denied: push to other/x is not allowed here" in out, out
    assert refused_uploads(team_only, "other/x") == {403}
    assert nothing_stored(team_only)
    pushed, _ = docker_push(daemon, refs["inside"])
    assert local_manifest(team_only, "team/x", "1").headers["docker-content-digest"] == pushed
    assert catalog(team_only) == ["team/x"]

    # A repository the mirror caches from the upstream cannot be pushed over.
    before = verified_objects(cache.data_dir)
    assert before == everything(images.small)
    out = docker_push_fails(daemon, refs["cached"])
    assert "denied: library/small is a cache of the upstream registry" in out, out
    assert refused_uploads(cache, "library/small") == {403}
    assert cache.access.count("PUT", "/v2/library/small/") == 0
    cached = http_get(cache, "/v2/library/small/manifests/1")
    assert (cached.status_code, cached.headers["x-mirror-cache"], cached.content) \
        == (200, "HIT", images.small.manifest)
    assert verified_objects(cache.data_dir) == before
    assert catalog(cache) == ["library/small"]

    # Nor can a repository the upstream serves, before anyone pulled it: the push would stand in for it.
    out = docker_push_fails(daemon, refs["upstream"])
    assert "denied: dlist is a repository of the upstream registry" in out, out
    assert refused_uploads(cache, "dlist") == {403}
    assert verified_objects(cache.data_dir) == before
    assert catalog(cache) == ["library/small"]
    pulled = http_get(cache, "/v2/library/dlist/manifests/1")
    assert (pulled.status_code, pulled.headers["x-mirror-cache"]) == (200, "MISS")


# -- restart ---------------------------------------------------------------------------


def test_pushed_images_survive_a_restart_without_the_upstream(
    dockerd_factory: Callable[..., Dockerd], mirror_factory: Callable[..., MirrorServer],
    upstream_factory: Callable[[], UpstreamRegistry], images: StandardImages,
) -> None:
    registry = upstream_factory()  # our own, to stop
    registry.push_image("library/small", "1", images.small)
    mirror = mirror_factory(registry.url, env=LIBRARY)
    daemon = dockerd_factory(registry_mirror=mirror.url, insecure_registries=[mirror.address])
    mine = f"{mirror.address}/team/app:1"
    pull(daemon, "small:1")
    daemon.docker("tag", "small:1", mine)
    pushed, _ = docker_push(daemon, mine)
    small_layers = [layer.digest for layer in images.small.layers]

    registry.stop()
    mirror.restart()
    forget_all(daemon)
    pull(daemon, mine)
    assert run(daemon, mine, "cat", "/etc/image-marker") == "small"
    assert daemon.docker("image", "inspect", "--format", "{{index .RepoDigests 0}}", mine).stdout.strip() \
        == f"{mirror.address}/team/app@{pushed}"
    assert local_manifest(mirror, "team/app", "1").headers["docker-content-digest"] == pushed
    # The Hub image it was built from is still served from the cache beside it.
    pull(daemon, "small:1")
    assert run(daemon, "small:1", "cat", "/etc/image-marker") == "small"
    assert sorted(catalog(mirror)) == ["library/small", "team/app"]
    # No upload was left behind, and the pushed repository never reached the upstream.
    assert not any((mirror.data_dir / "uploads").iterdir())
    assert_only_existence_checks_reached_the_upstream(registry, "team/app", small_layers)
