"""Answers by tag kept in each worker's memory (``api/memo.py``) end when they must, in every worker:
within one ``tag_ttl`` of the upstream moving a pull-through tag, and at once when a push moves
a pushed tag or a delete removes it.  Two workers, a real upstream registry, real HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.images import OCI_MANIFEST, build_image, random_layer
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.test_push_api import push_image, sha256

TTL = 3.0


def answers_of_both_workers(mirror: MirrorServer, url: str, times: int = 3) -> dict[object, set[str]]:
    """GET *url* on new connections until each of the two workers answered *times* times; what
    each one answered: ``<status> <Docker-Content-Digest>``."""
    by_pid: dict[object, list[str]] = {}
    for _ in range(40):
        sent = {}
        for _ in range(10):
            answer = httpx.get(url, headers={"accept": OCI_MANIFEST}, trust_env=False)
            sent[answer.headers["x-request-id"]] = f"{answer.status_code} {answer.headers.get('docker-content-digest')}"
        deadline = time.monotonic() + 5
        while {e["request_id"] for e in mirror.access_entries()} < set(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        for entry in mirror.access_entries():
            if entry["request_id"] in sent:
                by_pid.setdefault(entry["pid"], []).append(sent[entry["request_id"]])
        if len(by_pid) == 2 and all(len(got) >= times for got in by_pid.values()):
            return {pid: set(got) for pid, got in by_pid.items()}
    raise AssertionError(f"the kernel did not spread 400 connections over two workers: {by_pid}")


def test_a_remembered_tag_follows_the_upstream_within_one_ttl_in_every_worker(
    tmp_path: Path, upstream_factory: Callable[[], UpstreamRegistry],
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    own = upstream_factory()
    first = build_image(tmp_path / "a", [random_layer(tmp_path / "a", 4096, seed=1)])
    second = build_image(tmp_path / "b", [random_layer(tmp_path / "b", 4096, seed=2)])
    own.push_image("library/app", "latest", first)
    mirror = mirror_factory(own.url, workers=2, env={"MIRROR_CACHE_TAG_TTL": f"{int(TTL)}s"})
    url = f"{mirror.url}/v2/library/app/manifests/latest"

    started = time.monotonic()
    before = answers_of_both_workers(mirror, url)
    assert all(got == {f"200 {first.digest}"} for got in before.values()), before
    own.push_image("library/app", "latest", second)
    moved = time.monotonic()
    # Within one TTL of the move, every worker answers with the new manifest, and keeps doing so.
    time.sleep(max(0.0, started + TTL + 0.2 - time.monotonic()))
    assert time.monotonic() - moved <= TTL + 0.3
    after = answers_of_both_workers(mirror, url)
    assert set(after) == set(before)
    assert all(got == {f"200 {second.digest}"} for got in after.values()), after


def test_a_push_or_delete_of_a_tag_reaches_what_every_worker_remembers_at_once(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    registry = mirror_factory(workers=2, env={"MIRROR_CACHE_TAG_TTL": "1h"})
    first, _ = push_image(http, registry.url, "team/app", "v1", seed=8)
    second, _ = push_image(http, registry.url, "team/app", "v2", seed=9)
    url = f"{registry.url}/v2/team/app/manifests/v1"
    before = answers_of_both_workers(registry, url)
    assert all(got == {f"200 {sha256(first)}"} for got in before.values()), before

    moved = http.put(url, content=second, headers={"content-type": OCI_MANIFEST})
    assert moved.status_code == 201, moved.text
    after = answers_of_both_workers(registry, url)
    assert all(got == {f"200 {sha256(second)}"} for got in after.values()), after

    assert http.delete(url).status_code == 202
    gone = answers_of_both_workers(registry, url)
    assert all(got == {"404 None"} for got in gone.values()), gone
