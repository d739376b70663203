"""A worker replaced while the object store or the index's database is down.

uvicorn's supervisor replaces a worker that dies (``kill -9`` here, as the kernel's OOM killer does).
If the replacement's start-up failed on the outage, the supervisor stopped the whole mirror: the bucket
or the database coming back found no mirror.  Now the replacement starts (bucket down: what needs it
answers 503 meanwhile) or waits (database down), while the other worker serves, and serves once it
answers; the mirror never stops.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.faults import FaultProxy
from tests.support.images import Image
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.waiting import wait_for
from tests.test_s3_outage import bucket, cached, s3_proxy  # noqa: F401 (fixtures)
from tests.test_s3_serve import Bucket
from tests.test_worker_takeover import client_per_worker

STARTED = "Application startup complete"


def a_worker(mirror: MirrorServer) -> int:
    """The pid of one of *mirror*'s workers (found while everything answers)."""
    with client_per_worker(mirror) as clients:
        return sorted(clients)[0]


def each_worker_answers(mirror: MirrorServer, path: str, image: Image) -> None:
    """GET *path* on new connections until a worker started after the test's first requests
    answered it too: every answer is *image*'s manifest."""
    before = {entry["pid"] for entry in mirror.access_entries()}
    for _ in range(60):
        with httpx.Client(base_url=mirror.url, trust_env=False, timeout=30) as client:
            answer = client.get(path, headers={"accept": image.media_type})
        assert answer.status_code == 200 and answer.content == image.manifest, answer.text
        if {entry["pid"] for entry in mirror.access_entries() if entry["path"] == path} - before:
            return
    raise AssertionError(f"the new worker never answered\n{mirror.log_tail(100)}")


def startups(mirror: MirrorServer) -> int:
    return mirror.log_tail(100_000).count(STARTED)


def test_a_worker_replaced_while_the_bucket_does_not_answer_starts_and_the_mirror_serves_on(
    bucket: Bucket, s3_proxy: FaultProxy, images: StandardImages,  # noqa: F811
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    mirror = mirror_factory(env=bucket.env(MIRROR_STORAGE_S3_REGIONENDPOINT=s3_proxy.url), workers=2)
    image = images.small
    wait_for(lambda: startups(mirror) == 2, timeout=30, what="both workers' start-up")
    cached(mirror, http, images, bucket)
    victim = a_worker(mirror)
    s3_proxy.add("refuse", "")  # nothing answers
    try:
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: startups(mirror) == 3 or not mirror.running, timeout=60, what="the new worker's start-up")
        assert mirror.running, mirror.log_tail(200)
        assert startups(mirror) == 3, mirror.log_tail(200)
        each_worker_answers(mirror, "/v2/library/small/manifests/1", image)  # the new one too
        assert http.get(f"{mirror.url}/readyz").status_code == 503  # the bucket: said, not hidden
    finally:
        s3_proxy.clear_rules()
    wait_for(lambda: http.get(f"{mirror.url}/readyz").status_code == 200, timeout=30, what="readiness")
    log = mirror.log_tail(400)
    assert "Traceback" not in log and "object store not reached at this worker's start" in log, log


@pytest.mark.slow
def test_a_worker_replaced_while_the_database_is_down_waits_for_it_and_the_mirror_serves_on(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    with PostgresServer() as own:
        mirror = mirror_factory(env={"MIRROR_METADATA_DRIVER": "postgres",
                                     "MIRROR_METADATA_POSTGRES_DSN": own.create_database()}, workers=2)
        name, tag, item = images.refs["small"]
        assert isinstance(item, Image)
        url = f"{mirror.url}/v2/{name}/manifests/{tag}"
        wait_for(lambda: startups(mirror) == 2, timeout=30, what="both workers' start-up")
        assert http.get(url, headers={"accept": item.media_type}).content == item.manifest
        victim = a_worker(mirror)
        own.halt()
        os.kill(victim, signal.SIGKILL)
        time.sleep(6)  # the replacement's first attempts to open the index fail
        assert mirror.running, mirror.log_tail(200)
        assert startups(mirror) == 2, mirror.log_tail(200)
        assert http.get(url, headers={"accept": item.media_type}).status_code == 503  # the other worker answers
        own.resume()
        wait_for(lambda: startups(mirror) == 3 or not mirror.running, timeout=60, what="the new worker's start-up")
        assert mirror.running, mirror.log_tail(200)
        each_worker_answers(mirror, url.removeprefix(mirror.url), item)
        log = mirror.log_tail(400)
        assert "Traceback" not in log and "this worker waits for it before it serves" in log, log
        # The DSN was given inline (handed to the workers in a file of the server's): named as the user set it.
        assert "in metadata.postgres.dsn:" in log and "dsn_file" not in log, log
    mirror.stop()
