"""The store's byte count (``mirror_store_size_bytes``, the cache page, the eviction budget) when
objects are committed while the PostgreSQL index is down: their sizes wait in memory and are added
within one flush of the database's return, without a collection to recount them, and a collection
run meanwhile does not count them twice.  On a cluster of the test's own (stopped by the test)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mirror.config.sections import CacheConfig, GcConfig
from mirror.maintenance.gc import Collector
from mirror.maintenance.upkeep import FLUSH_INTERVAL, AccessTracker, Maintenance
from mirror.metadata.postgres import POOL_WAIT, PostgresMetadata
from mirror.spec.reference import parse_digest
from mirror.storage.filesystem import Store
from tests.support.catalog import StandardImages
from tests.support.faults import FaultProxy
from tests.support.images import MANIFEST_MEDIA_TYPES
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.storecheck import settle, stored_objects
from tests.support.waiting import eventually, wait_for

MIB = 1024 * 1024
ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}


def _stored_bytes(data_dir: Path) -> int:
    return sum(path.stat().st_size for path in stored_objects(data_dir).values())


@pytest.mark.slow
def test_an_object_committed_while_the_database_is_down_is_counted_once_it_is_back(
    images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    with PostgresServer() as own:
        mirror = mirror_factory(fault_proxy.url, env={"MIRROR_METADATA_DRIVER": "postgres",
                                                      "MIRROR_METADATA_POSTGRES_DSN": own.create_database()})
        assert http.get(f"{mirror.url}/v2/library/big/manifests/1", headers=ACCEPT).status_code == 200
        layer = images.big.layers[1]  # 8 MiB: 1 MiB at once, then a trickle the database stops during
        rule = fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", times=1,
                               after_bytes=MIB, chunk_size=64 * 1024, delay=0.03)
        partial = mirror.data_dir / "tmp" / f"sha256-{layer.digest.removeprefix('sha256:')}.partial"
        answer: list[httpx.Response] = []
        reader = threading.Thread(target=lambda: answer.append(
            httpx.get(f"{mirror.url}/v2/library/big/blobs/{layer.digest}", timeout=60, trust_env=False)))
        reader.start()
        wait_for(lambda: partial.exists() and partial.stat().st_size >= MIB, 30, "the fill to get going",
                 interval=0.01)
        own.halt()
        assert rule.sent < layer.size, "the fill ended before the database stopped"
        reader.join(60)
        assert answer and answer[0].status_code == 200
        assert hashlib.sha256(answer[0].content).hexdigest() == layer.digest.removeprefix("sha256:")
        settle(mirror.data_dir)
        assert layer.digest in stored_objects(mirror.data_dir)  # committed while the index was down
        time.sleep(POOL_WAIT + 1.0)  # the count of it waits that long for a connection, then gives up

        own.resume()
        expected = _stored_bytes(mirror.data_dir)
        seen: list[float] = []

        def counted() -> bool:
            seen.append(value(scrape(f"{mirror.url}/metrics"), "mirror_store_size_bytes"))
            return seen[-1] == expected

        # gc.interval is the default hour: only the upkeep's flush can have counted it.
        assert eventually(counted, timeout=FLUSH_INTERVAL + 5, interval=0.25), (seen[-1], expected, mirror.log_tail())
        log = mirror.log_tail(500)
        assert "could not account for a stored object" not in log, log
        assert "collector:" not in log and "Traceback" not in log, log


def test_a_collection_right_after_the_database_is_back_counts_such_objects_once(tmp_path: Path) -> None:
    """The collector's scan finds the object the index could not count: the size kept for it is
    added before the scan, not after it as well."""
    with PostgresServer() as own:
        index = PostgresMetadata(own.create_database())
        store = Store(tmp_path / "data")
        store.create()
        maintenance = Maintenance(Collector(store, index, CacheConfig(), GcConfig()), AccessTracker(index), 0)
        store.on_commit = maintenance.note_commit

        def put(data: bytes) -> None:
            store.put_bytes(parse_digest(f"sha256:{hashlib.sha256(data).hexdigest()}"), data)

        try:
            put(b"counted at once")
            own.halt()
            put(b"committed while the index is down" * 100)
            own.resume()
            expected = _stored_bytes(store.root)
            assert index.usage() == len(b"counted at once") < expected
            asyncio.run(maintenance._collect(woken=False))
            assert index.usage() == expected
            maintenance.flush()
            assert index.usage() == expected
        finally:
            index.close()
