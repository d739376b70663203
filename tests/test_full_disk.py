"""A store that cannot take writes: its filesystem full (a small tmpfs as DATA/, filled with a
ballast file), or read-only (a read-only bind mount of DATA/tmp).

Pulls still get the upstream's bytes, verified, answered as ``X-Mirror-Cache: BYPASS`` and counted
(whether the store refused them before the first byte or in the middle); cached content is still
served; ``/readyz`` answers 503 with the reason, in every worker, until there is room again; the
collector evicts to make that room; nothing partial is left in DATA/ (``mirror fsck`` finds it
clean); pushes get a clear 507 and their uploads stay intact.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.client import push_image
from tests.support.dockerd import Dockerd, forget_all, pull, run
from tests.support.faults import FaultProxy
from tests.support.images import MANIFEST_MEDIA_TYPES, OCI_MANIFEST, build_image, random_layer, sha256_digest as sha256
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.smallfs import MIB, fill_up, free_bytes, read_only, tmpfs
from tests.support.storecheck import fsck_clean, mirror_cli, stored_objects
from tests.support.waiting import wait_for
from tests.test_faults import get_blob, get_manifest
from tests.test_push_api import image_manifest, push_blob

T = TypeVar("T")
ENV = {"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"}
ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}
#: The tmpfs holding DATA/: the index and a few small objects, not the 8 MiB layer once ballasted.
SIZE_MIB = 24


@pytest.fixture
def small_mirror(mirror_factory: Callable[..., MirrorServer]) -> Iterator[Callable[..., MirrorServer]]:
    """Make a mirror whose DATA/ is a tmpfs of :data:`SIZE_MIB` MiB; it is stopped before the unmount."""
    with contextlib.ExitStack() as stack:

        def make(upstream_url: str | None = None, workers: int = 1, env: Mapping[str, str] | None = None
                 ) -> MirrorServer:
            server = mirror_factory(upstream_url, env={**ENV, **(env or {})}, workers=workers, start=False)
            stack.enter_context(tmpfs(server.data_dir, SIZE_MIB))
            stack.callback(server.stop)
            return server.start()

        yield make


def stored(mirror: MirrorServer) -> list[str]:
    return sorted(p.name for p in stored_objects(mirror.data_dir).values())


def temp_files(mirror: MirrorServer) -> list[str]:
    return sorted(os.listdir(mirror.data_dir / "tmp"))


def filling(mirror: MirrorServer) -> int:
    """Bytes written so far by the fills in progress."""
    total = 0
    for path in (mirror.data_dir / "tmp").glob("sha256-*.partial"):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def ready(mirror: MirrorServer) -> httpx.Response:
    return httpx.get(f"{mirror.url}/readyz", timeout=30.0, trust_env=False)


def store_problem(mirror: MirrorServer) -> str:
    answer = ready(mirror)
    assert answer.status_code == 503, answer.text
    problems = answer.json()["problems"]
    assert set(problems) == {"store"}, problems
    return str(problems["store"])


def ask_every_worker(mirror: MirrorServer, ask: Callable[[MirrorServer], T]) -> list[T]:
    """*ask* (on new connections: any worker may answer) until every worker answered /readyz; the answers."""
    start = len(mirror.access_entries())
    answers: list[T] = []
    for _ in range(100):
        answers.append(ask(mirror))

        def asked() -> list[dict[str, Any]]:  # (another request's line may come after start, late)
            return [e for e in mirror.access_entries()[start:] if e["path"] == "/readyz"]

        wait_for(lambda: len(asked()) >= len(answers), what="the access log")
        pids = {e["pid"] for e in asked()}
        if len(pids) == mirror.workers:
            return answers
    raise AssertionError(f"only workers {pids} answered")


def test_a_blob_larger_than_the_free_space_is_served_through_and_stored_once_there_is_room(
    small_mirror: Callable[..., MirrorServer], upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    image, layer = images.big, images.big.layers[1]  # 8 MiB
    mirror = small_mirror(workers=2)
    upstream.clear_counts()
    answer = httpx.get(f"{mirror.url}/v2/big/manifests/1", headers=ACCEPT, timeout=30.0, trust_env=False)
    assert (answer.status_code, answer.headers["x-mirror-cache"]) == (200, "MISS")
    assert get_blob(mirror, "big", image.config_digest).headers["x-mirror-cache"] == "MISS"
    # A fetched blob is moved into the store just after its last byte was sent.
    wait_for(lambda: image.config_digest.removeprefix("sha256:") in stored(mirror), what="the config stored")
    before = stored(mirror)
    ballast = mirror.data_dir / "ballast"
    assert fill_up(ballast, leave=4 * MIB) < layer.size

    through = get_blob(mirror, "big", layer.digest)
    assert (through.status, through.error, through.headers["x-mirror-cache"]) == (200, None, "BYPASS")
    assert (through.digest, through.received) == (layer.digest, layer.size)
    assert int(through.headers["content-length"]) == layer.size
    assert stored(mirror) == before and temp_files(mirror) == []
    # Whichever worker answers (one of them only saw the refusal) says so.
    assert {problem.partition(" (")[0] for problem in ask_every_worker(mirror, store_problem)} \
        == {"no space left on device"}
    assert httpx.get(f"{mirror.url}/healthz", trust_env=False).status_code == 200  # alive all the same
    samples = scrape(f"{mirror.url}/metrics")
    assert value(samples, "mirror_cache_requests_total", kind="blob", outcome="bypass") == 1
    assert value(samples, "mirror_cache_served_bytes_total", kind="blob", outcome="bypass") == layer.size
    wait_for(lambda: any(e.get("cache") == "BYPASS" for e in mirror.access_entries()), what="the access log")
    [entry] = [e for e in mirror.access_entries() if e.get("cache") == "BYPASS"]
    assert (entry["route"], entry["status"], entry["bytes"]) == ("blob", 200, layer.size)

    ballast.unlink()
    assert set(ask_every_worker(mirror, lambda m: ready(m).status_code)) == {200}
    again = get_blob(mirror, "big", layer.digest)
    assert (again.status, again.error, again.headers["x-mirror-cache"], again.digest) == \
        (200, None, "MISS", layer.digest)
    wait_for(lambda: layer.digest.removeprefix("sha256:") in stored(mirror), what="the layer to be stored")
    hit = get_blob(mirror, "big", layer.digest)
    assert (hit.status, hit.error, hit.headers["x-mirror-cache"], hit.digest) == (200, None, "HIT", layer.digest)
    assert upstream.count("GET", f"/blobs/{layer.digest}") == 2  # the bypass, then the fill
    mirror.stop()
    assert temp_files(mirror) == []
    fsck_clean(mirror.data_dir, verify_content=False)


def test_clients_sharing_a_fill_the_store_refuses_all_get_the_bytes(
    small_mirror: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages,
) -> None:
    """Two workers, six clients at once on an upstream that sends slowly: every one of them gets
    the whole layer, verified, however it joined (as the leader's client, or following it)."""
    layer = images.big.layers[1]
    mirror = small_mirror(fault_proxy.url, workers=2)
    fill_up(mirror.data_dir / "ballast", leave=4 * MIB)
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", chunk_size=MIB, delay=0.1)
    fault_proxy.clear_counts()
    with ThreadPoolExecutor(6) as pool:
        transfers = list(pool.map(lambda _: get_blob(mirror, "big", layer.digest), range(6)))
    for transfer in transfers:
        assert (transfer.status, transfer.error, transfer.digest) == (200, None, layer.digest), transfer
        assert transfer.headers["x-mirror-cache"] == "BYPASS"
    assert 1 <= fault_proxy.count("GET", f"/blobs/{layer.digest}") <= 6
    assert stored(mirror) == [] and temp_files(mirror) == []


def test_a_fill_the_disk_runs_out_under_is_finished_from_the_upstream(
    small_mirror: Callable[..., MirrorServer], fault_proxy: FaultProxy, images: StandardImages,
) -> None:
    """There was room when the fill started; the disk fills up meanwhile.  The clients, whose
    headers said MISS already, still get every byte, verified; nothing partial stays behind."""
    layer = images.big.layers[1]
    mirror = small_mirror(fault_proxy.url)
    fill_up(mirror.data_dir / "ballast", leave=12 * MIB)
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1, after_bytes=MIB,
                    chunk_size=512 * 1024, delay=0.1)
    fault_proxy.clear_counts()
    with ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(get_blob, mirror, "big", layer.digest) for _ in range(3)]
        wait_for(lambda: filling(mirror) > 0, what="the fill to start writing")
        fill_up(mirror.data_dir / "more-ballast")  # every byte left
        transfers = [p.result() for p in pending]
    for transfer in transfers:
        assert (transfer.status, transfer.error, transfer.digest) == (200, None, layer.digest), transfer
        assert transfer.headers["x-mirror-cache"] in {"MISS", "COALESCED"}
    assert stored(mirror) == [] and temp_files(mirror) == []
    assert store_problem(mirror).startswith("no space left on device")
    assert "store refused the fill" in mirror.log_tail(200)
    (mirror.data_dir / "more-ballast").unlink()
    assert ready(mirror).status_code == 200


def test_a_blob_the_disk_has_no_room_for_makes_the_collector_evict_to_make_room(
    small_mirror: Callable[..., MirrorServer], upstream: UpstreamRegistry, images: StandardImages, tmp_path: Path,
) -> None:
    """The store is within its budget, but other files filled its disk: the least recently used
    cached image is evicted to make room for the blob that found none, which is stored next time."""
    old = images.big.layers[1]
    new_image = build_image(tmp_path / "new", [random_layer(tmp_path / "new", 6 * MIB, 77)])
    push_image(upstream.url, "library/new", "1", new_image)
    new = new_image.layers[0]
    mirror = small_mirror(env={"MIRROR_CACHE_KEEP_RECENT": "1s"})
    assert get_manifest(mirror, "big", "1").headers["x-mirror-cache"] == "MISS"
    assert get_blob(mirror, "big", old.digest).headers["x-mirror-cache"] == "MISS"
    assert get_manifest(mirror, "new", "1").headers["x-mirror-cache"] == "MISS"
    fill_up(mirror.data_dir / "ballast", leave=5 * MIB)
    time.sleep(1.5)  # the big image is no longer recent; the new one is used again below

    through = get_blob(mirror, "new", new.digest)
    assert (through.status, through.error, through.headers["x-mirror-cache"], through.digest) == \
        (200, None, "BYPASS", new.digest)
    wait_for(lambda: old.digest.removeprefix("sha256:") not in stored(mirror), what="the old image's eviction")
    assert ready(mirror).status_code == 200
    assert get_blob(mirror, "new", new.digest).headers["x-mirror-cache"] == "MISS"
    wait_for(lambda: new.digest.removeprefix("sha256:") in stored(mirror), what="the new layer to be stored")
    assert get_blob(mirror, "new", new.digest).headers["x-mirror-cache"] == "HIT"
    assert "evicting 1 cached images" in mirror.log_tail(200)
    assert get_blob(mirror, "big", old.digest).headers["x-mirror-cache"] == "BYPASS"  # no room for it now


def test_cached_images_are_served_from_a_full_store_tags_revalidated(
    small_mirror: Callable[..., MirrorServer], upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    image = images.small
    mirror = small_mirror(env={"MIRROR_CACHE_TAG_TTL": "0"})  # every pull revalidates the tag
    assert get_manifest(mirror, "small", "1").headers["x-mirror-cache"] == "MISS"
    for digest in image.blobs:
        assert get_blob(mirror, "small", digest).headers["x-mirror-cache"] == "MISS"
    assert fill_up(mirror.data_dir / "ballast") == 0
    upstream.clear_counts()
    for _ in range(2):
        answer = get_manifest(mirror, "small", "1")
        assert (answer.status_code, answer.headers["x-mirror-cache"], answer.content) == (200, "HIT", image.manifest)
        for digest in image.blobs:
            got = get_blob(mirror, "small", digest)
            assert (got.status, got.error, got.digest, got.headers["x-mirror-cache"]) == (200, None, digest, "HIT")
    assert upstream.count("HEAD", "/manifests/1") == 2 and upstream.count("GET", "/blobs/") == 0


@pytest.mark.parametrize("state", ["full", "read-only"])
def test_uncached_images_are_pulled_through_a_store_that_takes_no_writes(
    state: str, small_mirror: Callable[..., MirrorServer], upstream: UpstreamRegistry, images: StandardImages,
) -> None:
    image = images.small
    mirror = small_mirror()
    ballast = mirror.data_dir / "ballast"
    with contextlib.ExitStack() as stack:
        if state == "full":
            assert fill_up(ballast) == 0
            reason = "no space left on device"
        else:
            stack.enter_context(read_only(mirror.data_dir / "tmp"))
            reason = "read-only file system"
        for _ in range(2):  # and again: nothing was kept
            answer = httpx.get(f"{mirror.url}/v2/small/manifests/1", headers=ACCEPT, timeout=30.0, trust_env=False)
            assert (answer.status_code, answer.headers["x-mirror-cache"]) == (200, "BYPASS"), answer.text
            assert answer.content == image.manifest
            for digest in (image.config_digest, *(layer.digest for layer in image.layers)):
                got = get_blob(mirror, "small", digest)
                assert (got.status, got.error, got.digest, got.headers["x-mirror-cache"]) == \
                    (200, None, digest, "BYPASS")
                # The repository was pulled from, though not recorded: a HEAD agrees with the GET.
                head = httpx.head(f"{mirror.url}/v2/small/blobs/{digest}", timeout=30.0, trust_env=False)
                assert (head.status_code, head.headers.get("docker-content-digest")) == (200, digest), head.text
        assert stored(mirror) == []
        assert store_problem(mirror).startswith(reason)
    if state == "full":
        ballast.unlink()
    assert ready(mirror).status_code == 200
    answer = httpx.get(f"{mirror.url}/v2/small/manifests/1", headers=ACCEPT, timeout=30.0, trust_env=False)
    assert answer.headers["x-mirror-cache"] in {"MISS", "HIT"}
    for digest in (image.config_digest, *(layer.digest for layer in image.layers)):
        assert get_blob(mirror, "small", digest).headers["x-mirror-cache"] == "MISS"
        assert get_blob(mirror, "small", digest).headers["x-mirror-cache"] == "HIT"
    mirror.stop()
    assert temp_files(mirror) == []
    fsck_clean(mirror.data_dir, verify_content=False)


def test_a_push_to_a_full_store_gets_a_clear_error_and_its_upload_stays_intact(
    small_mirror: Callable[..., MirrorServer],
) -> None:
    mirror = small_mirror()
    data = os.urandom(6 * MIB)
    first, second = data[:MIB], data[MIB:]
    config = b'{"architecture": "amd64", "os": "linux"}'
    manifest = image_manifest(config, [data])
    ballast = mirror.data_dir / "ballast"
    with httpx.Client(base_url=mirror.url, timeout=30.0, trust_env=False) as http:
        push_blob(http, mirror.url, "team/app", config)
        started = http.post("/v2/team/app/blobs/uploads/")
        assert started.status_code == 202, started.text
        location = started.headers["location"]
        assert http.patch(location, content=first).status_code == 202
        fill_up(ballast, leave=2 * MIB)

        refused = http.patch(location, content=second)
        assert refused.status_code == 507, refused.text
        [error] = refused.json()["errors"]
        assert error["code"] == "UNAVAILABLE" and error["detail"].endswith("no space left on device"), error
        status = http.get(location)  # as it was before the refused chunk
        assert (status.status_code, status.headers["range"]) == (204, f"0-{MIB - 1}")
        assert store_problem(mirror).startswith("no space left on device")

        ballast.unlink()
        assert http.patch(location, content=second).status_code == 202
        done = http.put(location, params={"digest": sha256(data)})
        assert done.status_code == 201, done.text

        fill_up(ballast)
        put = http.put("/v2/team/app/manifests/1", content=manifest, headers={"content-type": OCI_MANIFEST})
        assert put.status_code == 507, put.text
        assert put.json()["errors"][0]["code"] == "UNAVAILABLE"
        ballast.unlink()
        put = http.put("/v2/team/app/manifests/1", content=manifest, headers={"content-type": OCI_MANIFEST})
        assert put.status_code == 201, put.text
        got = http.get("/v2/team/app/manifests/1", headers=ACCEPT)
        assert got.status_code == 200 and got.content == manifest
        got = http.get(f"/v2/team/app/blobs/{sha256(data)}")
        assert got.status_code == 200 and got.content == data
    mirror.stop()
    fsck_clean(mirror.data_dir, verify_content=False)


def test_readyz_is_ready_again_once_a_push_refused_for_space_goes_through(
    small_mirror: Callable[..., MirrorServer],
) -> None:
    """A refused chunk's size is unknown: its refusal is over once the push goes through, even
    if that push leaves less room than there was when the chunk was refused."""
    mirror = small_mirror()
    data = os.urandom(14 * MIB)
    ballast = mirror.data_dir / "ballast"
    with httpx.Client(base_url=mirror.url, timeout=30.0, trust_env=False) as http:
        location = http.post("/v2/team/app/blobs/uploads/").headers["location"]
        fill_up(ballast, leave=10 * MIB)
        assert http.patch(location, content=data).status_code == 507
        problem = store_problem(mirror)
        free_then = int(problem.rpartition("(")[2].split()[0])
        assert problem == f"no space left on device ({free_then} bytes free)"

        ballast.unlink()
        assert http.patch(location, content=data).status_code == 202
        assert http.put(location, params={"digest": sha256(data)}).status_code == 201
        assert free_bytes(mirror.data_dir) < free_then + MIB  # less room than then: only the push proves it
        assert ask_every_worker(mirror, lambda m: ready(m).status_code) == [200]


@pytest.mark.slow
def test_dockerd_pulls_and_runs_an_image_through_a_full_store(
    small_mirror: Callable[..., MirrorServer], dockerd_factory: Callable[..., Dockerd], upstream: UpstreamRegistry,
    images: StandardImages,
) -> None:
    image = images.small
    mirror = small_mirror()
    daemon = dockerd_factory(registry_mirror=mirror.url)
    ballast = mirror.data_dir / "ballast"
    assert fill_up(ballast) == 0
    upstream.clear_counts()

    pull(daemon, "small:1")  # no other registry is reachable: the mirror answered every request
    assert run(daemon, "small:1", "cat", "/etc/image-marker") == "small"
    gets = [e for e in mirror.access_entries() if e["route"] in ("manifest", "blob") and e["method"] == "GET"]
    assert {e["cache"] for e in gets} == {"BYPASS"}, gets
    assert {e["path"].rpartition("/")[2] for e in gets if e["route"] == "blob"} == set(image.blobs)
    assert stored(mirror) == [] and temp_files(mirror) == []
    assert store_problem(mirror).startswith("no space left on device")

    ballast.unlink()
    assert ready(mirror).status_code == 200
    forget_all(daemon)
    pull(daemon, "small:1")
    assert stored(mirror) == sorted(d.removeprefix("sha256:") for d in (image.digest, *image.blobs))
    forget_all(daemon)
    pull(daemon, "small:1")
    assert run(daemon, "small:1", "cat", "/etc/image-marker") == "small"
    assert {d: upstream.count("GET", f"/blobs/{d}") for d in image.blobs} == dict.fromkeys(image.blobs, 2)
    mirror.stop()
    fsck_clean(mirror.data_dir, verify_content=False)


def test_a_data_directory_that_is_read_only_at_start_up_is_refused_by_every_command_in_one_line(
    mirror_factory: Callable[..., MirrorServer], tmp_path: Path
) -> None:
    """The index is a SQLite database the mirror writes (a store copied to read-only media, say)."""
    mirror = mirror_factory()
    mirror.stop()
    dead = ["--upstream", "http://127.0.0.1:1"]
    commands = {"serve": ["--listen", "127.0.0.1:0", *dead], "gc": [], "fsck": [],
                "export": ["library/x:1", "-o", str(tmp_path / "x.tar"), *dead], "preload": [str(tmp_path)]}
    with read_only(mirror.data_dir):
        for command, args in commands.items():
            done = mirror_cli(command, "--data", mirror.data_dir, *args, timeout=60)
            assert done.returncode != 0, (command, done)
            assert f"mirror: cannot open the index in {mirror.data_dir}/index: " in done.stderr, (command, done.stderr)
            assert "writable" in done.stderr and "Traceback" not in done.stderr, (command, done.stderr)
    fsck_clean(mirror.data_dir)
