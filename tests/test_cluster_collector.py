"""One collector at a time across hosts that share one PostgreSQL index and one bucket: a collector
of another host (another data directory) holds the index's ``collector`` lease, and this one waits
for it instead of sweeping at the same time; once the lease is given up, it runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from mirror.maintenance.collecting import LEASE
from mirror.metadata.postgres import PostgresMetadata
from tests.support.catalog import StandardImages
from tests.support.client import pull_checked
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.seaweedfs import SeaweedS3
from tests.support.storecheck import mirror_cli
from tests.support.waiting import wait_for
from tests.test_s3_serve import Bucket


def test_a_collector_waits_while_another_hosts_collector_holds_the_lease(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, images: StandardImages,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    dsn = postgres.create_database()
    bucket = Bucket(seaweedfs, s3_bucket)
    serving = bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=dsn)
    mirror, replica = mirror_factory(env=serving), mirror_factory(env=serving)
    replica.stop()  # another replica, with a data directory of its own
    with httpx.Client(timeout=30.0, trust_env=False) as http:
        pull_checked(http, mirror.url, "library/small", "1", images.small)
    wait_for(lambda: len(bucket.objects()) == 4, timeout=30, what="the image in the bucket")
    mirror.stop()
    stored = bucket.objects()

    index = PostgresMetadata(dsn)
    try:
        other = index.take_lease(LEASE, "other-host:4242", 120.0)  # a collector on another host, running
        assert other is not None
        # Another replica (its own data directory) collects with a budget that evicts everything.
        evicting = {**serving, "MIRROR_CACHE_MAX_SIZE": "1", "MIRROR_CACHE_KEEP_RECENT": "0s", "MIRROR_GC_GRACE": "0s"}
        done: list[str] = []
        runner = threading.Thread(target=lambda: done.append(
            (lambda r: f"{r.returncode}:{r.stdout}{r.stderr}")(
                mirror_cli("gc", "--data", replica.data_dir, env=evicting))))
        runner.start()
        time.sleep(8)
        assert done == [], f"collected while another host's collector held the lease: {done}"
        assert bucket.objects() == stored
        current = index.current_lease(LEASE)
        assert current is not None and current.holder == "other-host:4242"

        assert index.release_lease(other)
        runner.join(60)
        assert done and done[0].startswith("0:"), done
        assert "4 objects" in done[0] and bucket.objects() == {}, done
        assert index.current_lease(LEASE) is None  # given up when it finished
    finally:
        index.close()
