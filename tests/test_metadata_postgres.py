"""What the postgres metadata driver does beyond the contract (tests/test_metadata_contract.py):
its schema's versions, leases timed by the database's clock, the generation while its LISTEN
connection is lost; and the real mirror configured with it.  Against the session's real
PostgreSQL 15."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from mirror.config.load import load_config, to_environ
from mirror.config.sections import ConfigError, MetadataConfig
from mirror.config.values import SecretFile
from mirror.maintenance.upkeep import AccessTracker
from mirror.metadata.driver import ManifestRecord, MetadataUnavailable, TagRecord
from mirror.metadata.opening import CannotOpenIndex, bind_data_directory, open_metadata
from mirror.metadata.pgschema import HEARTBEAT, HEARTBEAT_WAIT, LISTENER, SCHEMA_VERSION, SchemaTooNew, describe
from mirror.metadata.postgres import POOL_WAIT, PostgresMetadata
from mirror.registry.reads import INDEX_THREADS, MIXED_THREADS
from mirror.storage.filesystem import Store
from tests.support.catalog import StandardImages
from tests.support.images import MANIFEST_MEDIA_TYPES, Image
from tests.support.metrics import parse, scrape, value
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.procs import free_port
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import mirror_cli, settle, stored_objects
from tests.support.waiting import eventually
from tests.test_push_api import push_image

#: The Accept header of a client that takes every manifest type.
ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}

REPO = "docker.io/library/alpine"
D1, D2 = (f"sha256:{c * 64}" for c in "12")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture
def dsn(postgres: PostgresServer) -> str:
    return postgres.create_database()


def _query(dsn: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql)  # type: ignore[call-overload]
        return cur.fetchall() if cur.description else []


def _database_time(dsn: str) -> float:
    return float(_query(dsn, "SELECT extract(epoch from clock_timestamp())::float8")[0][0])  # type: ignore[arg-type]


def test_the_schema_is_made_once_and_a_newer_one_is_refused(dsn: str) -> None:
    first = PostgresMetadata(dsn)
    first.set_tag(REPO, "1", TagRecord(D1, OCI_MANIFEST, 1.0))
    first.close()
    second = PostgresMetadata(dsn)  # a second start migrates nothing and keeps the data
    try:
        assert second.get_tag(REPO, "1") == TagRecord(D1, OCI_MANIFEST, 1.0)
    finally:
        second.close()
    assert _query(dsn, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]

    _query(dsn, f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")  # as a newer mirror leaves it
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade the mirror"):
        PostgresMetadata(dsn)
    assert _query(dsn, "SELECT version FROM schema_version") == [(SCHEMA_VERSION + 1,)]
    assert _query(dsn, "SELECT digest FROM tags") == [(D1,)]


def test_leases_expire_by_the_database_clock(dsn: str) -> None:
    one, two = PostgresMetadata(dsn), PostgresMetadata(dsn)
    try:
        before = _database_time(dsn)
        lease = one.take_lease("sha256:abc", "replica-1", ttl=1.0)
        after = _database_time(dsn)
        assert lease is not None and before + 1.0 <= lease.expires <= after + 1.0
        assert two.take_lease("sha256:abc", "replica-2", ttl=1.0) is None
        assert two.current_lease("sha256:abc") == lease
        renewed = one.renew_lease(lease, ttl=1.0)
        assert renewed is not None and renewed.expires >= lease.expires
        time.sleep(max(0.0, renewed.expires - time.time()) + 0.2)  # the clocks of one host
        assert two.current_lease("sha256:abc") is None
        taken = two.take_lease("sha256:abc", "replica-2", ttl=30)
        assert taken is not None and taken.token > lease.token
        assert one.renew_lease(lease, ttl=30) is None and not one.release_lease(lease)
    finally:
        one.close()
        two.close()


def test_the_generation_is_never_stale_while_its_connection_is_lost(dsn: str) -> None:
    """Cut off from notifications, an instance cannot know what others withdraw: until it listens
    again every read differs (memos miss); then it reads the counter, with what it missed."""
    index, other = PostgresMetadata(dsn), PostgresMetadata(dsn)
    try:
        other.set_tag(REPO, "1", TagRecord(D1, OCI_MANIFEST, 1.0))
        steady = index.generation.read()
        assert index.generation.read() == steady
        _query(dsn, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{LISTENER}'"
                    " AND datname = current_database()")
        assert eventually(lambda: index.generation.read() != index.generation.read(), timeout=5)
        other.untag(REPO, "1")  # withdrawn meanwhile (the listeners reconnect after a second)
        listening = [index.generation, other.generation]
        assert eventually(lambda: all(g.read() == g.read() for g in listening), timeout=10)
        assert index.generation.read() != steady
        assert index.generation.read() == other.generation.read()
    finally:
        index.close()
        other.close()


def test_the_generation_is_never_stale_while_the_server_does_not_answer() -> None:
    """A server that hangs (or a network that drops packets) ends no read with an error: the listener
    checks its quiet connection every ``HEARTBEAT`` seconds, and once an answer is ``HEARTBEAT_WAIT``
    late every read differs (memos and kept answers miss) until it listens again.  On a cluster of
    the test's own."""
    with PostgresServer() as own:
        index = PostgresMetadata(own.create_database())
        try:
            assert eventually(lambda: index.generation.read() == index.generation.read(), timeout=10)
            own.freeze()
            try:
                started = time.monotonic()
                assert eventually(lambda: index.generation.read() != index.generation.read(),
                                  timeout=HEARTBEAT + HEARTBEAT_WAIT + 5)
                assert time.monotonic() - started >= HEARTBEAT_WAIT - 0.5  # not before an answer is late
            finally:
                own.thaw()
            assert eventually(lambda: index.generation.read() == index.generation.read(), timeout=15)
        finally:
            index.close()


def test_a_lock_on_the_counter_the_heartbeat_reads_is_not_taken_for_a_server_that_does_not_answer(dsn: str) -> None:
    """``VACUUM FULL counters`` or an ``ALTER TABLE`` hold a lock that stops every read of the table
    the listener's heartbeat reads, longer than it waits for an answer: the server still answers
    (the read gives up on the lock), so calls go on working and the generation stays known."""
    index = PostgresMetadata(dsn, pool_size=2)
    try:
        index.set_tag(REPO, "1", TagRecord(D1, OCI_MANIFEST, 1.0))
        with psycopg.connect(dsn) as locker:
            locker.execute("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE")
            time.sleep(2 * HEARTBEAT + HEARTBEAT_WAIT + 1)  # a heartbeat waited on the lock long enough
            assert index.get_tag(REPO, "1") == TagRecord(D1, OCI_MANIFEST, 1.0)
            assert index.generation.read() == index.generation.read()  # known: memos may hit
            locker.rollback()
        assert index.get_tag(REPO, "1") == TagRecord(D1, OCI_MANIFEST, 1.0)
    finally:
        index.close()


@pytest.mark.slow
def test_a_query_in_flight_when_the_server_hangs_ends_and_later_calls_fail_at_once() -> None:
    """A query waiting on the server when it stops answering is ended once the heartbeat finds it
    silent (``MetadataUnavailable``, not a thread blocked until TCP gives up); calls meanwhile fail at
    once; once it answers again, the pool has new connections for them.  On a cluster of the test's own."""
    with PostgresServer() as own:
        dsn = own.create_database()
        index = PostgresMetadata(dsn, pool_size=2)
        try:
            index.set_tag(REPO, "1", TagRecord(D1, OCI_MANIFEST, 1.0))
            with ThreadPoolExecutor(1) as pool, psycopg.connect(dsn) as locker:  # unlocked before the wait for it
                locker.execute("LOCK TABLE tags IN ACCESS EXCLUSIVE MODE")
                waiting = pool.submit(index.get_tag, REPO, "1")
                assert eventually(lambda: _query(dsn, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] == 1,
                                  timeout=10)
                own.freeze()
                frozen = time.monotonic()
                try:
                    with pytest.raises(MetadataUnavailable, match=r"at 127\.0\.0\.1:\d+: not answering"):
                        waiting.result(timeout=60)
                    assert time.monotonic() - frozen < HEARTBEAT + HEARTBEAT_WAIT + 3
                    started = time.monotonic()
                    with pytest.raises(MetadataUnavailable, match="not answering"):
                        index.get_tag(REPO, "1")
                    assert time.monotonic() - started < 0.5
                finally:
                    own.thaw()
                locker.rollback()
            assert eventually(lambda: _answers(index), timeout=10)
            assert index.get_tag(REPO, "1") == TagRecord(D1, OCI_MANIFEST, 1.0)
        finally:
            index.close()


def _answers(index: PostgresMetadata) -> bool:
    try:
        return index.get_tag(REPO, "1") is not None
    except MetadataUnavailable:
        return False


def test_a_link_seen_is_answered_without_a_query_until_the_generation_moves(dsn: str) -> None:
    """``is_linked`` (each blob GET's first question, on the event loop) asks the database once per
    link; a withdrawal by this instance is seen at once, one by another instance once notified, and
    while the listener is cut off every call asks again."""
    index, other = PostgresMetadata(dsn), PostgresMetadata(dsn)
    queries: list[str] = []
    one = index._one
    index._one = lambda query, params=None: queries.append(query) or one(query, params)  # type: ignore[method-assign]
    try:
        index.link(REPO, [D1, D2])
        assert [index.is_linked(REPO, D1) for _ in range(3)] == [True] * 3 and len(queries) == 1
        assert not index.is_linked(REPO, "sha256:" + "3" * 64) and len(queries) == 2  # absent: not remembered
        assert index.unlink(REPO, D1)
        assert not index.is_linked(REPO, D1)  # its own withdrawal: at once
        assert index.is_linked(REPO, D2) and index.is_linked(REPO, D2)
        assert other.unlink(REPO, D2)
        assert eventually(lambda: not index.is_linked(REPO, D2), timeout=5)  # another's: once notified
        index.link(REPO, [D2])
        _query(dsn, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{LISTENER}'"
                    " AND datname = current_database()")
        assert eventually(lambda: index.generation.read() != index.generation.read(), timeout=5)
        before = len(queries)
        assert index.is_linked(REPO, D2) and index.is_linked(REPO, D2)
        assert len(queries) == before + 2  # deaf to others' withdrawals: nothing is answered from memory
    finally:
        index.close()
        other.close()


def test_a_release_and_a_link_committing_at_the_same_time_never_leave_content_out_of_the_catalog(dsn: str) -> None:
    """``release_repository`` (the collector's, of a cached repository it emptied) and a fill's link
    to it, committing at once: the release waits for the link's transaction and keeps the repository
    (before, it deleted the row the link had found there, and the repository held a blob that
    ``_catalog`` no longer listed); a release that locked the row first is followed by the link's
    putting it back."""
    index, other = PostgresMetadata(dsn), PostgresMetadata(dsn)
    try:
        index.link(REPO, [D1])
        assert index.unlink(REPO, D1) and index.has_repository(REPO)  # empty, still listed
        with ThreadPoolExecutor(1) as pool:
            with index._cursor(transaction=True) as cur:  # a fill's link, not yet committed
                cur.execute("INSERT INTO links VALUES (%s, %s)", (REPO, D1))
                index._register(cur, REPO)
                release = pool.submit(other.release_repository, REPO)
                time.sleep(1.0)
                assert not release.done(), "the release waits for the link's transaction"
            assert release.result(timeout=10) is False
        assert index.has_repository(REPO) and REPO in other.repositories() and other.is_linked(REPO, D1)

        assert index.unlink(REPO, D1)
        with psycopg.connect(dsn) as conn, ThreadPoolExecutor(1) as pool:  # a release that came first
            conn.execute("SELECT 1 FROM repositories WHERE repo = %s FOR UPDATE", (REPO,))
            conn.execute("DELETE FROM repositories WHERE repo = %s", (REPO,))
            link = pool.submit(index.link, REPO, [D2])
            time.sleep(0.5)
            conn.commit()
            link.result(timeout=10)
        assert other.repositories() == [REPO] and other.is_linked(REPO, D2)
    finally:
        index.close()
        other.close()


def test_a_names_kind_and_a_manifest_record_read_are_answered_without_a_query_until_the_generation_moves(
        dsn: str) -> None:
    """``is_local`` (asked by every request) is kept both ways, ``get_manifest`` when found: a name
    made local here is seen at once, one made local by another instance once notified; a record
    this instance writes again is read again; a forgotten one is gone at once."""
    index, other = PostgresMetadata(dsn), PostgresMetadata(dsn)
    queries: list[str] = []
    one = index._one
    index._one = lambda query, params=None: queries.append(query) or one(query, params)  # type: ignore[method-assign]
    try:
        index.put_manifest(D1, OCI_MANIFEST, 10)
        assert index.known_manifest(D1) is None and index.known_local("team/app") is None
        queries.clear()
        assert [index.is_local("team/app") for _ in range(3)] == [False] * 3 and len(queries) == 1
        assert index.known_local("team/app") is False
        assert [index.get_manifest(D1) for _ in range(3)] == [ManifestRecord(OCI_MANIFEST, 10)] * 3
        assert len(queries) == 2 and index.known_manifest(D1) == ManifestRecord(OCI_MANIFEST, 10)
        assert index.get_manifest(D2) is None and index.get_manifest(D2) is None and len(queries) == 4  # absent
        index.put_manifest(D1, OCI_MANIFEST, 11)  # the same digest recorded again here: read again
        assert index.get_manifest(D1) == ManifestRecord(OCI_MANIFEST, 11)
        other.put_manifest(D1, OCI_INDEX, 11)  # by another instance, as another type: once notified
        assert eventually(lambda: index.get_manifest(D1) == ManifestRecord(OCI_INDEX, 11), timeout=5)
        index.mark_local("team/app", 1.0)
        assert index.is_local("team/app")  # its own change: at once
        assert not index.is_local("team/other")
        other.mark_local("team/other", 1.0)
        assert eventually(lambda: index.is_local("team/other"), timeout=5)  # another's: once notified
        index.forget(manifests=[D1])
        assert index.known_manifest(D1) is None and index.get_manifest(D1) is None
    finally:
        index.close()
        other.close()


def test_calls_fail_fast_while_the_server_is_down_and_work_again_once_it_is_back() -> None:
    """A stopped server: every call raises ``MetadataUnavailable`` within the pool's wait, the
    generation never repeats, access times wait in memory; after a restart the pool and the
    listener reconnect by themselves, and no call gets a connection the restart killed.  On a
    cluster of the test's own."""
    with PostgresServer() as own:
        index = PostgresMetadata(own.create_database())
        try:
            index.set_tag(REPO, "1", TagRecord(D1, OCI_MANIFEST, 1.0))
            tracker = AccessTracker(index)
            tracker.touch(REPO, D1)
            own.halt()
            retag = TagRecord(D2, OCI_MANIFEST, 2.0)
            for call in (lambda: index.get_tag(REPO, "1"), lambda: index.set_tag(REPO, "1", retag),
                         tracker.flush):
                started = time.monotonic()
                with pytest.raises(MetadataUnavailable, match="metadata database unavailable"):
                    call()
                assert time.monotonic() - started < POOL_WAIT + 1.0
            assert eventually(lambda: index.generation.read() != index.generation.read(), timeout=5)

            own.resume()
            assert eventually(lambda: index.generation.read() == index.generation.read(), timeout=10)
            assert index.get_tag(REPO, "1") == TagRecord(D1, OCI_MANIFEST, 1.0)
            assert tracker.flush() == 1 and (REPO, D1) in index.access_times()

            own.halt()  # and back before any call: the pooled connection is dead, checked and replaced
            own.resume()
            assert index.get_tag(REPO, "1") == TagRecord(D1, OCI_MANIFEST, 1.0)
        finally:
            index.close()


def test_once_the_listener_finds_the_server_refusing_calls_fail_at_once_and_the_pool_reconnects_once_it_is_back(
) -> None:
    """A stopped server refuses connections: once the listener's attempt to connect was refused, a call
    fails at once (not after waiting ``POOL_WAIT`` for a connection that cannot come), and once the
    server is back the very first call is answered, before the listener tries again.  On a cluster of
    the test's own."""
    with PostgresServer() as own:
        index = PostgresMetadata(own.create_database())
        try:
            index.set_tag(REPO, "1", TagRecord(D1, OCI_MANIFEST, 1.0))
            own.halt()
            with pytest.raises(MetadataUnavailable):  # the listener may not know yet: up to POOL_WAIT
                index.get_tag(REPO, "1")
            time.sleep(1.5)  # the listener tries again every second
            took = []
            for _ in range(5):
                started = time.monotonic()
                with pytest.raises(MetadataUnavailable, match="metadata database unavailable: .*refused"):
                    index.get_tag(REPO, "1")
                took.append(round(time.monotonic() - started, 3))
            assert max(took) < 0.5, took

            own.resume()
            started = time.monotonic()
            assert index.get_tag(REPO, "1") == TagRecord(D1, OCI_MANIFEST, 1.0)  # the very first call after
            assert time.monotonic() - started < 1.0, time.monotonic() - started
            assert index.get_tag(REPO, "2") is None  # and the next
        finally:
            index.close()


def test_each_process_holds_at_most_metadata_postgres_pool_size_connections(dsn: str, tmp_path: Path) -> None:
    """Six calls at once, each kept waiting by a lock: the index opens two connections (the key's
    value, from its environment variable, handed on to workers), not the default four."""
    env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn,
           "MIRROR_STORAGE_PATH": str(tmp_path / "data")}  # its store-id is written there
    with pytest.raises(ConfigError, match=re.escape("bad value for metadata.postgres.pool_size: '0': must be")):
        load_config(env={**env, "MIRROR_METADATA_POSTGRES_POOL_SIZE": "0"})
    assert load_config(env=env).metadata.postgres_pool_size == 4
    config = load_config(env={**env, "MIRROR_METADATA_POSTGRES_POOL_SIZE": "2"})
    assert load_config(env=to_environ(config)).metadata.postgres_pool_size == 2

    def pooled() -> int:  # this index's connections kept waiting by the lock: the calls it runs at once
        # (not every connection to the database: one its listener opens again, or one closing, comes and goes)
        return len(_query(dsn, "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                               f" AND application_name NOT IN ('{LISTENER}', 'locker') AND pid <> pg_backend_pid()"
                               " AND wait_event_type = 'Lock'"))

    index = open_metadata(config.metadata, tmp_path / "index", config.storage)
    try:
        with ThreadPoolExecutor(6) as calls, psycopg.connect(dsn, application_name="locker") as locker:
            locker.execute("LOCK TABLE tags IN ACCESS EXCLUSIVE MODE")  # until the transaction ends
            waiting = [calls.submit(index.get_tag, REPO, str(n)) for n in range(6)]
            assert eventually(lambda: pooled() == 2, timeout=5)
            time.sleep(0.5)
            assert pooled() == 2
            locker.rollback()
            outcomes = [f.exception() for f in waiting]
        assert outcomes.count(None) >= 2, outcomes  # the others timed out in the queue (MetadataUnavailable)
        assert all(o is None or isinstance(o, MetadataUnavailable) for o in outcomes), outcomes
    finally:
        index.close()


def test_the_mirror_keeps_its_index_in_postgres(
    images: StandardImages, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],
    postgres: PostgresServer, http: httpx.Client,
) -> None:
    """Two workers sharing one database: a pull through is cached there and served again without
    the upstream; a push is recorded there and read back."""
    dsn = postgres.create_database()
    mirror = mirror_factory(workers=2, env={"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn})
    name, tag, item = images.refs["small"]
    assert isinstance(item, Image)
    upstream.clear_counts()
    first = http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT)
    assert first.status_code == 200 and first.content == item.manifest
    assert first.headers["x-mirror-cache"] == "MISS"
    layer = item.layers[-1].digest
    assert http.get(f"{mirror.url}/v2/{name}/blobs/{layer}").content == item.blobs[layer].read_bytes()
    for _ in range(4):  # whichever worker answers
        again = http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT)
        assert again.content == item.manifest and again.headers["x-mirror-cache"] == "HIT"
    assert upstream.count("GET", re.compile(rf"^/v2/{re.escape(name)}/manifests/")) == 1
    tags = _query(dsn, "SELECT repo, tag, digest FROM tags")
    assert [(tag, item.digest)] == [(t, d) for repo, t, d in tags if str(repo).endswith(name)]
    assert (item.digest,) in _query(dsn, "SELECT digest FROM manifests")

    manifest, _ = push_image(http, mirror.url, "team/app", "v1", seed=7)
    for _ in range(4):
        pulled = http.get(f"{mirror.url}/v2/team/app/manifests/v1", headers=ACCEPT)
        assert pulled.status_code == 200 and pulled.content == manifest
    assert http.get(f"{mirror.url}/v2/team/app/tags/list").json() == {"name": "team/app", "tags": ["v1"]}
    assert _query(dsn, "SELECT name FROM locals") == [("team/app",)]
    assert ("local/team/app", "v1") in _query(dsn, "SELECT repo, tag FROM tags")
    assert not list((mirror.data_dir / "index").glob("*.db"))  # nothing went to the diskcache driver


@dataclass(frozen=True)
class _Served:
    """A mirror on the database *dsn* that pulled the ``small`` image and was pushed ``team/app:v1``
    (its *manifest*), and the *urls* each answered once, so their links are known: ``/v2/``, a cached
    blob, a pushed blob, a manifest by digest."""

    dsn: str
    mirror: MirrorServer
    manifest: bytes
    urls: list[str]


def _served(images: StandardImages, mirror_factory: Callable[..., MirrorServer], postgres: PostgresServer,
            http: httpx.Client, *, seed: int) -> _Served:
    """A mirror on a new database with a pool of 64 connections, as :class:`_Served` says."""
    dsn = postgres.create_database()
    mirror = mirror_factory(env={"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn,
                                 "MIRROR_METADATA_POSTGRES_POOL_SIZE": "64"})
    name, tag, item = images.refs["small"]
    assert isinstance(item, Image)
    manifest, pushed = push_image(http, mirror.url, "team/app", "v1", seed=seed)
    pushed_layer = f"sha256:{hashlib.sha256(pushed[-1]).hexdigest()}"
    urls = [f"{mirror.url}/v2/", f"{mirror.url}/v2/{name}/blobs/{item.layers[-1].digest}",
            f"{mirror.url}/v2/team/app/blobs/{pushed_layer}", f"{mirror.url}/v2/{name}/manifests/{item.digest}"]
    assert http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT).status_code == 200
    assert all(http.get(url, headers=ACCEPT).status_code == 200 for url in urls)
    return _Served(dsn, mirror, manifest, urls)


def test_queries_held_up_in_the_database_hold_up_no_other_request(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], postgres: PostgresServer, http: httpx.Client,
) -> None:
    """While the ``tags`` table is locked by another session, 60 manifest GETs by tag wait for it
    (a pool of 64 connections: each holds one); meanwhile the same worker answers ``/v2/``, a cached
    blob, a pushed one and a manifest by digest at once: their reads are kept in memory or made
    from worker threads, never on the event loop, and the reads waiting for the database do not
    take the threads that open stored blobs."""
    served = _served(images, mirror_factory, postgres, http, seed=3)
    dsn, mirror, urls = served.dsn, served.mirror, served.urls
    other, other_tag, other_item = images.refs["dlist"]
    waiting = [f"{mirror.url}/v2/{other}/manifests/{other_tag}", *(f"{mirror.url}/v2/library/held/manifests/t{n}"
                                                                 for n in range(59))]
    with psycopg.connect(dsn) as locker, ThreadPoolExecutor(len(waiting)) as pool, \
            httpx.Client(timeout=60, limits=httpx.Limits(max_connections=100)) as crowd:
        locker.execute("LOCK TABLE tags IN ACCESS EXCLUSIVE MODE")  # held until the rollback below
        try:
            held = [pool.submit(crowd.get, url, headers=ACCEPT) for url in waiting]
            # As many wait in the database as threads may read it; the others wait for one of those.
            assert eventually(lambda: _query(dsn, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0]
                              == INDEX_THREADS, timeout=20)
            for url in urls:
                started = time.monotonic()
                answer = http.get(url, headers=ACCEPT, timeout=10)
                assert answer.status_code == 200 and time.monotonic() - started < 2.0, (url, answer.status_code)
            assert not any(f.done() for f in held)
        finally:
            locker.rollback()
        assert held[0].result().status_code == 200 and held[0].result().content == other_item.manifest
        assert {f.result().status_code for f in held[1:]} == {404}


def _held_up(served: _Served, http: httpx.Client, tables: str, requests: list[Callable[[httpx.Client], httpx.Response]],
             waiting: int, what: str) -> list[httpx.Response]:
    """Send *requests* (each given a client of its own pool) while another session holds *tables*
    locked, until *waiting* queries wait for the lock; meanwhile ``/v2/``, a cached blob and a pushed
    one (``served.urls[:3]``) must each answer ``200`` in under 2 s, and none of *requests* may be
    answered.  The answers to *requests*, once the lock is gone."""
    with psycopg.connect(served.dsn) as locker, ThreadPoolExecutor(len(requests)) as pool, \
            httpx.Client(timeout=60, limits=httpx.Limits(max_connections=100)) as crowd:
        locker.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")  # held until the rollback below
        try:
            held = [pool.submit(request, crowd) for request in requests]
            assert eventually(lambda: _query(served.dsn, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0]
                              >= waiting, timeout=20)
            time.sleep(1.0)  # the rest of the crowd arrives at the mirror too
            for url in served.urls[:3]:
                started = time.monotonic()
                try:
                    answer = http.get(url, timeout=10)
                except httpx.TimeoutException:
                    pytest.fail(f"{url} not answered in 10 s while {what} wait for the database")
                assert answer.status_code == 200 and time.monotonic() - started < 2.0, (url, answer.status_code)
            assert not any(f.done() for f in held)
        finally:
            locker.rollback()
        return [f.result() for f in held]


def _get(url: str, client: httpx.Client) -> httpx.Response:
    return client.get(url)


def _put(url: str, body: bytes, client: httpx.Client) -> httpx.Response:
    return client.put(url, content=body, headers={"content-type": OCI_MANIFEST})


def test_writes_held_up_in_the_database_hold_up_no_other_request(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], postgres: PostgresServer, http: httpx.Client,
) -> None:
    """While the ``tags`` table is locked by another session, 60 manifest PUTs of a pushed repository
    (each a manifest of its own, tagged) wait for it, more than anyio's 40 default threads (a pool of
    64 connections: each holds one); meanwhile the same worker answers ``/v2/``, a cached blob and a
    pushed one at once: the writes wait in threads of the index's own, and each save stored its
    manifest from a default thread before, so none of the threads that open and send stored blobs
    waits on the database.  Once the lock is gone every PUT is answered ``201`` and its tag is there."""
    served = _served(images, mirror_factory, postgres, http, seed=5)
    dsn, mirror = served.dsn, served.mirror
    doc = json.loads(served.manifest)
    bodies = [json.dumps({**doc, "annotations": {"n": str(n)}}).encode() for n in range(60)]  # same blobs
    answers = _held_up(served, http, "tags", [
        functools.partial(_put, f"{mirror.url}/v2/team/app/manifests/w{n}", body) for n, body in enumerate(bodies)],
        INDEX_THREADS, "the writes")  # as many wait in the database as threads may write it
    assert [a.status_code for a in answers] == [201] * len(bodies), [a.text for a in answers if a.status_code != 201]
    for n, body in enumerate(bodies):
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        assert answers[n].headers["docker-content-digest"] == digest
        got = http.get(f"{mirror.url}/v2/team/app/manifests/w{n}", headers=ACCEPT)
        assert got.status_code == 200 and got.content == body and got.headers["docker-content-digest"] == digest
    listed = http.get(f"{mirror.url}/v2/team/app/tags/list").json()["tags"]
    assert sorted(listed) == sorted(["v1", *(f"w{n}" for n in range(len(bodies)))])
    assert len(_query(dsn, "SELECT tag FROM tags WHERE repo = 'local/team/app'")) == len(bodies) + 1


def test_web_ui_pages_held_up_in_the_database_hold_up_no_other_request(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], postgres: PostgresServer, http: httpx.Client,
) -> None:
    """While the ``tags`` and ``manifests`` tables are locked by another session, 30 GETs of a pushed
    repository's page in the web UI (its tags) and 30 of its images' pages (each a manifest never read
    before, so its record is asked of the database) wait for them, more than anyio's 40 default
    threads; meanwhile the same worker answers ``/v2/``, a cached blob and a pushed one at once: the
    pages wait in threads of the index's own, and read the store's bytes from default threads only
    once the index answered.  Once the lock is gone every page is answered ``200`` with its content."""
    served = _served(images, mirror_factory, postgres, http, seed=9)
    mirror = served.mirror
    doc = json.loads(served.manifest)
    bodies = [json.dumps({**doc, "annotations": {"n": str(n)}}).encode() for n in range(30)]  # same blobs
    digests = [f"sha256:{hashlib.sha256(body).hexdigest()}" for body in bodies]
    for n, body in enumerate(bodies):  # pushed, never read: the pages ask the database for their records
        put = http.put(f"{mirror.url}/v2/team/app/manifests/m{n}", content=body, headers={"content-type": OCI_MANIFEST})
        assert put.status_code == 201, put.text
    pages = [f"{mirror.url}/ui/r/team/app"] * len(bodies) + [f"{mirror.url}/ui/r/team/app@{d}" for d in digests]
    answers = _held_up(served, http, "tags, manifests", [functools.partial(_get, url) for url in pages],
                       INDEX_THREADS, "the web UI's pages")
    assert [a.status_code for a in answers] == [200] * len(pages)
    for answer in answers[:len(bodies)]:
        shown = re.findall(r'<th scope="row" class="tag">([^<]*)</th>', answer.text)
        assert sorted(shown) == sorted(["v1", *(f"m{n}" for n in range(len(bodies)))])
        assert all(f"@{digest}" in answer.text for digest in digests)  # each stored: a link to its page
    for n, answer in enumerate(answers[len(bodies):]):
        assert digests[n] in answer.text and f"<td><code>n</code></td><td>{n}</td>" in answer.text


def test_figures_held_up_in_the_database_hold_up_no_other_request(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], postgres: PostgresServer, http: httpx.Client,
) -> None:
    """While the ``counters`` table (the store's size) is locked by another session, 30 scrapes of
    ``/metrics`` and 30 views of the web UI's cache page wait for it, more than anyio's 40 default
    threads; meanwhile the same worker answers ``/v2/``, a cached blob and a pushed one at once: the
    figures, which read the store and the index in one call, wait in a few threads of their own.
    Once the lock is gone every scrape and page is answered ``200`` with the store's size."""
    served = _served(images, mirror_factory, postgres, http, seed=13)
    mirror = served.mirror
    pages = [f"{mirror.url}/metrics"] * 30 + [f"{mirror.url}/ui/cache"] * 30
    answers = _held_up(served, http, "counters", [functools.partial(_get, url) for url in pages],
                       MIXED_THREADS, "the figures")
    assert [a.status_code for a in answers] == [200] * len(pages)
    settle(mirror.data_dir)
    objects = stored_objects(mirror.data_dir)
    size = sum(path.stat().st_size for path in objects.values())
    for scraped in answers[:30]:  # the figures read once the lock was gone: the index's and the store's
        samples = parse(scraped.text)
        assert value(samples, "mirror_store_size_bytes") == size and value(samples, "mirror_index_up") == 1
        assert value(samples, "mirror_store_objects") == len(objects), scraped.text
    for page in answers[30:]:
        assert '<meter id="budget" class="budget" min="0"' in page.text and f'value="{size}"' in page.text, page.text
        assert f"<dt>Objects</dt><dd>{len(objects)}</dd>" in page.text, page.text


def test_a_mirror_whose_database_cannot_be_reached_does_not_start_and_says_why(
    mirror_factory: Callable[..., MirrorServer], postgres: PostgresServer,
) -> None:
    dsn = f"host=127.0.0.1 port={postgres.port} dbname=absent user=postgres password=s3cr3t-pw connect_timeout=5"
    env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn}
    mirror = mirror_factory(start=False, env=env)
    with pytest.raises(RuntimeError, match="mirror did not come up") as failed:
        mirror.start(timeout=30)
    assert 'database "absent" does not exist' in str(failed.value)
    assert "s3cr3t-pw" not in mirror.log_tail(500)


def test_a_database_that_cannot_be_used_stops_serve_gc_and_fsck_with_one_line(
    postgres: PostgresServer, tmp_path: Path,
) -> None:
    """Refused, no such database, a wrong password, a schema from a newer mirror, a user that may not
    create tables, another application's tables, a schema version removed: ``serve`` exits 3
    (before any worker starts), ``gc`` and ``fsck`` 1 (``preload`` 2, as for any data directory it
    cannot use), each with one line naming the server and the database, why, and what to check;
    never a traceback or the password."""
    postgres.add_password_login("mirror_pw", "r1ght-pw")
    newer = postgres.create_database()
    PostgresMetadata(newer).close()
    _query(newer, f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")  # as a newer mirror leaves it
    # A database handed over with CONNECT only: PostgreSQL 15 lets no one but its owner create tables in it.
    _query(postgres.dsn(), "CREATE ROLE mirror_plain LOGIN NOSUPERUSER")
    granted = postgres.create_database()
    # Another application's database, with a table of a name the mirror uses; a mirror's, its version row removed.
    foreign, emptied = postgres.create_database(), postgres.create_database()
    _query(foreign, "CREATE TABLE tags (label text); INSERT INTO tags VALUES ('theirs')")
    PostgresMetadata(emptied).close()
    _query(emptied, "DELETE FROM schema_version")
    closed, here = free_port(), f"127.0.0.1:{postgres.port}"

    def named(dsn: str) -> str:
        return f"'{dsn.split('dbname=')[1].split()[0]}' at {here}"
    cases = [
        (f"host=127.0.0.1 port={closed} dbname=mirror user=postgres", f"'mirror' at 127.0.0.1:{closed}",
         "Connection refused: check that PostgreSQL runs there and takes connections, and the host and port"),
        (f"{postgres.dsn()} sslmode=bogus", f"'postgres' at {here}",
         'invalid sslmode value: "bogus": correct that option in metadata.postgres.dsn'),
        (f"{postgres.dsn()} connect_timeout=abc", f"'postgres' at {here}",
         "bad value for connect_timeout: 'abc': correct that option in metadata.postgres.dsn"),
        (postgres.dsn("absent"), f"'absent' at {here}",
         'database "absent" does not exist: create it, or correct the database name in metadata.postgres.dsn'),
        (f"{postgres.dsn()} user=mirror_pw", f"'postgres' at {here}",
         'password authentication failed for user "mirror_pw": check the user and password in metadata.postgres.dsn'),
        (newer, named(newer),
         f"has schema version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION} this mirror knows: upgrade"),
        (f"{granted} user=mirror_plain", named(granted),
         "refused the mirror's schema: permission denied for schema public: the mirror creates its tables at its "
         "first start: make its user the database's owner, or grant it CREATE on the schema"),
        (foreign, named(foreign), "has tables named tags but no schema version of this mirror: another application's"),
        (emptied, named(emptied), "has tables named access, counters, "),
    ]

    def run(n: int, dsn: str, command: list[str]) -> subprocess.CompletedProcess[str]:
        env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": f"{dsn} password=s3cr3t-pw"}
        return mirror_cli(*command, "--data", tmp_path / str(n), env=env, timeout=60)

    commands = [(3, ["serve", "--workers", "2", "--listen", f"127.0.0.1:{free_port()}"]), (1, ["gc"]), (1, ["fsck"]),
                (2, ["preload", str(tmp_path / "none.tar")])]
    for n, _ in enumerate(cases):
        Store(tmp_path / str(n)).create()
    with ThreadPoolExecutor(4) as pool:
        runs = [(n, status, pool.submit(run, n, dsn, command))
                for n, (dsn, _, _) in enumerate(cases) for status, command in commands]
        for n, status, running in runs:
            done = running.result()
            _, where, says = cases[n]
            assert done.returncode == status, (n, status, done.returncode, done.stderr)
            line = done.stderr.strip()
            assert "\n" not in line and line.startswith(f"mirror: PostgreSQL database {where}"), line
            assert says in line, line
            assert "s3cr3t-pw" not in done.stderr + done.stdout
    # Nothing of the other application's was changed, nor made beside it.
    assert _query(foreign, "SELECT label FROM tags") == [("theirs",)]
    assert _query(foreign, "SELECT to_regclass('schema_version')") == [(None,)]


def test_a_mirror_answers_503_while_its_database_is_down_and_recovers_when_it_is_back(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """A running mirror whose PostgreSQL stops: what needs the index fails fast with ``503
    UNAVAILABLE`` and ``Retry-After`` (no 500, no password), ``/readyz`` names the database,
    ``/metrics`` answers without the figures the index gives (``mirror_index_up 0``); once the
    server is back the pool and the listener reconnect by themselves.  On a cluster of the test's own."""
    with PostgresServer() as own:
        dsn = f"{own.create_database()} password=s3cr3t-pw"  # trust auth: only to prove it is never shown
        mirror = mirror_factory(env={"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn})
        database = f"PostgreSQL database '{dsn.split('dbname=')[1].split()[0]}' at 127.0.0.1:{own.port}"
        up = scrape(f"{mirror.url}/metrics")
        assert value(up, "mirror_index_up") == 1 and "mirror_store_size_bytes" in {name for name, _, _ in up}
        name, tag, item = images.refs["small"]
        assert isinstance(item, Image)
        assert http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT).content == item.manifest
        other, other_tag, other_item = images.refs["dlist"]  # never asked before: nothing in memory answers it

        own.halt()
        started = time.monotonic()
        down = http.get(f"{mirror.url}/v2/{other}/manifests/{other_tag}", headers=ACCEPT)
        took = time.monotonic() - started
        assert down.status_code == 503, down.text
        assert down.json() == {"errors": [{"code": "UNAVAILABLE", "message": "metadata database unavailable"}]}
        assert down.headers["retry-after"] == "5"
        assert took < 5.0, f"503 after {took:.1f}s"
        head = http.head(f"{mirror.url}/v2/{other}/manifests/{other_tag}", headers=ACCEPT)
        assert head.status_code == 503 and head.headers["retry-after"] == "5"
        time.sleep(1.5)  # each process's listener has found its connection attempt refused by now
        started = time.monotonic()
        again = http.get(f"{mirror.url}/v2/{other}/manifests/{other_tag}", headers=ACCEPT)
        assert again.status_code == 503 and time.monotonic() - started < 0.5, time.monotonic() - started
        ready = http.get(f"{mirror.url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["problems"]["index"].startswith(f"metadata database unavailable: {database}: ")
        started = time.monotonic()
        figures = scrape(f"{mirror.url}/metrics")  # 200, or it fails
        assert time.monotonic() - started < 5.0
        assert value(figures, "mirror_index_up") == 0 and value(figures, "mirror_workers") == 1
        names = {name for name, _, _ in figures}
        assert "mirror_store_objects" in names and "mirror_http_requests_total" in names
        assert not names & {"mirror_store_size_bytes", "mirror_store_manifests", "mirror_store_repositories",
                            "mirror_uploads_in_progress"}  # the index's figure, not a guess from the spool

        own.resume()
        started = time.monotonic()
        assert eventually(lambda: http.get(f"{mirror.url}/v2/{other}/manifests/{other_tag}",
                                           headers=ACCEPT).status_code == 200, timeout=15, interval=0.25), \
            mirror.log_tail()
        recovered = time.monotonic() - started
        assert http.get(f"{mirror.url}/v2/{other}/manifests/{other_tag}", headers=ACCEPT).content \
            == other_item.manifest, f"recovered after {recovered:.1f}s"
        assert http.get(f"{mirror.url}/readyz").status_code == 200
        assert value(scrape(f"{mirror.url}/metrics"), "mirror_index_up") == 1
        assert http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT).content == item.manifest
        log = mirror.log_tail(500)
        assert "s3cr3t-pw" not in log and "s3cr3t-pw" not in down.text + ready.text
        assert "Traceback" not in log, log
        assert "psycopg.pool" not in log, log  # the mirror says it once; not the pool's every attempt
        assert f"{database}: " in log, log  # said by the mirror, naming the database


def test_a_database_dropped_or_made_again_under_a_running_mirror_is_said_so_with_503s(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client, postgres: PostgresServer,
) -> None:
    """The index's database dropped while the mirror runs: ``503 UNAVAILABLE``, and ``/readyz`` says why the
    pool gets no connection (libpq's answer to the last attempt: the database does not exist), not only that
    it waited.  The database made again, empty, under it: still 503 (not a 500 with a traceback), saying the
    tables are gone and that a restart is needed."""
    dsn = postgres.create_database()
    name = dsn.split("dbname=")[1].split()[0]
    mirror = mirror_factory(env={"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn})
    image, tag, item = images.refs["small"]
    assert isinstance(item, Image)
    assert http.get(f"{mirror.url}/v2/{image}/manifests/{tag}", headers=ACCEPT).content == item.manifest

    _query(postgres.dsn(), f'DROP DATABASE "{name}" WITH (FORCE)')
    gone = http.get(f"{mirror.url}/v2/_catalog")
    assert gone.status_code == 503 and gone.json()["errors"][0]["code"] == "UNAVAILABLE", gone.text
    said = f'FATAL:  database "{name}" does not exist'
    assert eventually(lambda: said in http.get(f"{mirror.url}/readyz").json().get("problems", {}).get("index", ""),
                      timeout=15, interval=0.5), http.get(f"{mirror.url}/readyz").text

    _query(postgres.dsn(), f'CREATE DATABASE "{name}"')
    for path in (f"/v2/{image}/manifests/{tag}", "/v2/_catalog", "/readyz"):
        empty = http.get(f"{mirror.url}{path}", headers=ACCEPT)
        assert empty.status_code == 503, empty.text
    ready = http.get(f"{mirror.url}/readyz").json()["problems"]["index"]
    assert "does not exist (the database was dropped or made again while the mirror ran: restart it)" in ready
    assert "Traceback" not in mirror.log_tail(500), mirror.log_tail(500)


def test_a_data_directory_opens_only_with_the_index_that_describes_its_blobs(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], postgres: PostgresServer,
    http: httpx.Client,
) -> None:
    """A store kept with PostgreSQL, restarted without those settings (or with another database),
    would see every blob as unreferenced and collect them all: serve, gc, fsck and preload refuse
    it with one line, and nothing is deleted."""
    dsn = postgres.create_database()
    env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": f"{dsn} password=s3cr3t-pw"}
    mirror = mirror_factory(env=env)
    name, tag, item = images.refs["small"]
    assert isinstance(item, Image)
    layer = item.layers[-1].digest
    assert http.get(f"{mirror.url}/v2/{name}/blobs/{layer}").status_code == 200
    mirror.stop()
    settle(mirror.data_dir)
    stored = stored_objects(mirror.data_dir)
    assert layer in stored

    other = postgres.create_database()
    for wrong, says in (({}, "but this start uses diskcache"),
                        ({"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": other},
                         "but this start uses PostgreSQL database")):
        for command in (["gc"], ["fsck"], ["preload", "none.tar"], ["serve", "--listen", "127.0.0.1:1"]):
            done = mirror_cli(*command, "--data", mirror.data_dir, env={"MIRROR_GC_GRACE": "0s", **wrong}, timeout=30)
            assert done.returncode == 2, (command, done.stdout, done.stderr)
            assert says in done.stderr and "holds the blobs of the index in PostgreSQL" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr and "s3cr3t-pw" not in done.stderr
    assert stored_objects(mirror.data_dir) == stored  # nothing collected
    again = mirror_cli("fsck", "--data", mirror.data_dir, env=env)  # the right index: clean
    assert again.returncode == 0, again.stdout + again.stderr


def test_gc_and_fsck_need_no_index_directory_when_the_index_is_in_postgres(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], postgres: PostgresServer,
    http: httpx.Client,
) -> None:
    """With the index in PostgreSQL, ``DATA/index/`` holds nothing: a data directory without it (made
    by hand, or restored from a backup of blobs/ only) is checked and collected like any other."""
    env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": postgres.create_database()}
    mirror = mirror_factory(env=env)
    name, tag, item = images.refs["small"]
    assert isinstance(item, Image)
    assert http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT).status_code == 200
    for layer in item.layers:
        assert http.get(f"{mirror.url}/v2/{name}/blobs/{layer.digest}").status_code == 200
    mirror.stop()
    settle(mirror.data_dir)
    shutil.rmtree(mirror.data_dir / "index")
    stored = stored_objects(mirror.data_dir)
    assert item.digest in stored and all(layer.digest in stored for layer in item.layers)

    checked = mirror_cli("fsck", "--data", mirror.data_dir, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(stored)} objects" in checked.stdout and checked.stdout.rstrip().endswith(": clean"), checked.stdout
    collected = mirror_cli("gc", "--data", mirror.data_dir, env={**env, "MIRROR_GC_GRACE": "0s"})
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert stored_objects(mirror.data_dir) == stored  # everything is referenced by the database's index


def test_a_database_describes_one_blob_store_and_refuses_another_data_directory(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], postgres: PostgresServer,
    http: httpx.Client, tmp_path: Path,
) -> None:
    """A second data directory (another blob store) on the database of a first would take the
    first one's records as its own: serve, gc and fsck refuse it, and nothing is changed.  The
    store is known by the id in its directory, not by its path: moved, it is still itself."""
    dsn = postgres.create_database()
    env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn, "MIRROR_GC_GRACE": "0s"}
    mirror = mirror_factory(env=env)
    name, tag, item = images.refs["small"]
    assert isinstance(item, Image)
    assert http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT).status_code == 200
    mirror.stop()
    settle(mirror.data_dir)
    first_id = (mirror.data_dir / "store-id").read_text().strip()
    records = _query(dsn, "SELECT repo, tag, digest FROM tags")
    assert records and _query(dsn, "SELECT value FROM settings WHERE name = 'store'")[0][0] == {
        "driver": "filesystem", "id": first_id, "path": str(mirror.data_dir)}

    second = tmp_path / "second"
    Store(second).create()
    for status, command in ((3, ["serve", "--listen", f"127.0.0.1:{free_port()}"]), (1, ["gc"]), (1, ["fsck"])):
        done = mirror_cli(*command, "--data", second, env=env, timeout=60)
        assert done.returncode == status, (command, done.stdout, done.stderr)
        line = done.stderr.strip()
        assert "\n" not in line and line.startswith("mirror: PostgreSQL database "), line
        assert f"holds the index of the data directory with id {first_id} (seen at {mirror.data_dir})" in line
        assert "give each store a database of its own" in line
    assert _query(dsn, "SELECT repo, tag, digest FROM tags") == records

    moved = tmp_path / "moved"
    mirror.data_dir.rename(moved)
    checked = mirror_cli("fsck", "--data", moved, env=env)
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith(": clean"), checked.stdout + checked.stderr


def test_an_s3_store_is_known_by_its_bucket_and_rootdirectory_whatever_host_opens_it(
    dsn: str, tmp_path: Path,
) -> None:
    """Replicas share one S3 store and one database, each with a local data directory of its own:
    they are one store.  Another rootdirectory, or a filesystem store, is another and is refused."""
    def opened(data: str, **storage: str) -> None:
        env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn,
               "MIRROR_STORAGE_PATH": str(tmp_path / data), **storage}
        config = load_config(env=env)
        open_metadata(config.metadata, tmp_path / data / "index", config.storage).close()

    s3 = {"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": "images", "MIRROR_CACHE_MAX_SIZE": "10GiB"}
    opened("replica-1", **s3, MIRROR_STORAGE_S3_ROOTDIRECTORY="/mirror/")
    opened("replica-2", **s3, MIRROR_STORAGE_S3_ROOTDIRECTORY="mirror")
    for data, storage in (("replica-3", {**s3, "MIRROR_STORAGE_S3_ROOTDIRECTORY": "other"}),
                          ("replica-4", {**s3, "MIRROR_STORAGE_S3_BUCKET": "more-images"}), ("local", {})):
        with pytest.raises(CannotOpenIndex, match="holds the index of S3 bucket 'images' under 'mirror', not of"):
            opened(data, **storage)
    assert _query(dsn, "SELECT value FROM settings WHERE name = 'store'") == [
        ({"driver": "s3", "bucket": "images", "rootdirectory": "mirror"},)]


@pytest.mark.parametrize(("dsn", "says"), [
    ("postgresql+psycopg://mir:Sup3rS3cretPw@127.0.0.1/db", "not a libpq connection string"),
    ("postgresql://mir:Sup3r@S3cretPw@127.0.0.1:5432/db", "percent-encode the password"),
    ("postgresql://mir:Sup3r@S3cret:Pw/x@127.0.0.1:5432/db", "percent-encode the password"),  # port "Pw"
    ("postgresql://mir:Sup3r@S3cret/Pw@127.0.0.1:5432/db", "percent-encode the password"),  # database "Pw@..."
    ("postgresql://mir:Sup3r/S3cretPw@127.0.0.1:5432/db", "percent-encode the password"),  # host "mir", port "Sup3r"
    ("postgresql://mir:Sup3r@S3cret:1/Pw@127.0.0.1:5432/db", "percent-encode the password"),  # database "Pw@..."
])
def test_a_dsn_that_cannot_be_read_is_refused_without_quoting_it(tmp_path: Path, dsn: str, says: str) -> None:
    binding = tmp_path / "index.json"
    problem = bind_data_directory(MetadataConfig(driver="postgres", postgres_dsn=dsn), binding)
    assert problem is not None and says in problem
    assert "S3cret" not in problem and not binding.exists()


def test_a_dsn_read_from_a_file_is_named_by_its_key_and_path_in_what_to_check(
    postgres: PostgresServer, tmp_path: Path,
) -> None:
    """A DSN set by ``metadata.postgres.dsn_file`` (here MIRROR_METADATA_POSTGRES_DSN_FILE): the
    refusal says to correct it there, with the file's path, not in a ``metadata.postgres.dsn`` the
    user never set."""
    secret = tmp_path / "dsn"
    secret.write_text(f"{postgres.dsn('nosuchdb')} password=s3cr3t-pw\n")
    env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN_FILE": str(secret)}
    Store(tmp_path / "data").create()
    done = mirror_cli("fsck", "--data", tmp_path / "data", env=env, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().endswith(
        f"correct the database name in metadata.postgres.dsn_file ({secret})"), done.stderr
    assert "s3cr3t-pw" not in done.stderr + done.stdout
    unreadable = MetadataConfig(driver="postgres", postgres_dsn="postgresql://mir:Sup3r@S3cretPw@127.0.0.1/db",
                                postgres_dsn_file=SecretFile(secret, "postgresql://mir:Sup3r@S3cretPw@127.0.0.1/db"))
    problem = bind_data_directory(unreadable, tmp_path / "index.json")
    assert problem is not None and problem.startswith(f"metadata.postgres.dsn_file ({secret}): percent-encode"), problem


def test_a_first_start_on_a_database_that_does_not_exist_binds_the_data_directory_to_nothing(
    postgres: PostgresServer, tmp_path: Path,
) -> None:
    """A typo in the DSN of a new data directory: ``serve`` (and ``gc``, ``fsck``, ``preload``) refuse
    it, and record no index in ``DATA/index.json`` (one that never opened describes nothing): once
    the DSN is corrected, every command works, and the directory is bound to the right database."""
    data = tmp_path / "data"
    typo = {"MIRROR_METADATA_DRIVER": "postgres",
            "MIRROR_METADATA_POSTGRES_DSN": f"{postgres.dsn('nosuchdb')} password=s3cr3t-pw"}
    done = mirror_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--data", data, env=typo, timeout=60)
    assert done.returncode == 3 and 'database "nosuchdb" does not exist' in done.stderr, done.stderr
    for command in (["gc"], ["fsck"], ["preload", str(tmp_path / "none.tar")]):
        done = mirror_cli(*command, "--data", data, env=typo, timeout=60)
        assert done.returncode in (1, 2) and 'database "nosuchdb" does not exist' in done.stderr, done.stderr
    assert (data / "blobs").is_dir() and not (data / "index.json").exists()

    right = postgres.create_database()
    env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": right}
    for command in (["fsck"], ["gc"]):
        done = mirror_cli(*command, "--data", data, env=env, timeout=60)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    recorded = json.loads((data / "index.json").read_text())
    assert recorded["database"] == right.split("dbname=")[1].split()[0]


def test_a_binding_to_a_database_that_never_held_anything_says_how_to_start_over(
    postgres: PostgresServer, tmp_path: Path,
) -> None:
    """What an older mirror left after a first start on a typo: ``DATA/index.json`` naming a database
    that does not exist, nothing stored.  The refusal says to remove it (and names ``mirror migrate``)."""
    data = tmp_path / "data"
    Store(data).create()
    stale = {"driver": "postgres", "host": "127.0.0.1", "port": str(postgres.port), "database": "nosuchdb"}
    (data / "index.json").write_text(json.dumps(stale) + "\n")
    env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": postgres.create_database()}
    done = mirror_cli("fsck", "--data", data, env=env, timeout=60)
    line = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in line, line
    assert line.startswith(f"mirror: {data} holds the blobs of the index in PostgreSQL database 'nosuchdb'"), line
    assert "`mirror migrate`" in line, line
    assert line.endswith(f"nothing was ever stored there: to start over with this index, remove {data / 'index.json'}")
    (data / "index.json").unlink()
    assert mirror_cli("fsck", "--data", data, env=env, timeout=60).returncode == 0


def test_a_url_dsn_whose_password_is_not_percent_encoded_is_refused_without_any_part_of_it(
    postgres: PostgresServer, tmp_path: Path,
) -> None:
    """``postgresql://mu:p@ss:w/rd#1@host:port/db``: libpq reads host ``ss``, port ``w``, database
    ``rd#1@host:port/db``, all pieces of the password; the mirror names none of them, here or in
    ``DATA/index.json``."""
    dsn = f"postgresql://mu:p@ss:w/rd#1@127.0.0.1:{postgres.port}/mirror8"
    data = tmp_path / "data"
    done = mirror_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--data", data, timeout=60,
                      env={"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("mirror: metadata.postgres.dsn: percent-encode the password"), done.stderr
    for piece in ("rd#1", "'ss'", "ss:w", "mirror8", "p@ss"):
        assert piece not in done.stderr + done.stdout
    assert not (data / "index.json").exists()


def test_the_refusal_of_another_index_words_what_the_data_directory_holds(tmp_path: Path) -> None:
    """With S3 the data directory holds only work in progress, not blobs; one holding anything stored
    is never said to be safe to start over."""
    data = tmp_path / "data"
    Store(data).create()
    recorded = {"driver": "postgres", "host": "db", "port": "5432", "database": "mirror"}
    (data / "index.json").write_text(json.dumps(recorded) + "\n")
    diskcache = MetadataConfig()
    s3 = load_config(env={"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": "images",
                          "MIRROR_CACHE_MAX_SIZE": "1GiB", "MIRROR_STORAGE_PATH": str(data)}).storage
    problem = bind_data_directory(diskcache, data / "index.json", s3, record=False)
    assert problem is not None and problem.startswith(
        f"{data} holds the work in progress (uploads, temp files) of the store whose index is in PostgreSQL"
        " database 'mirror' at db:5432, but this start uses diskcache"), problem
    assert problem.endswith(f"to start over with this index, remove {data / 'index.json'}"), problem
    (data / "uploads" / "0f1e").write_bytes(b"part")  # a push upload in progress: something stored
    problem = bind_data_directory(diskcache, data / "index.json", s3)
    assert problem is not None and "`mirror migrate`" in problem and "remove" not in problem, problem
    assert json.loads((data / "index.json").read_text()) == recorded
    # mirror gc and fsck say so too, not that it is no data directory (it has no index/: PostgreSQL's).
    s3_dir = tmp_path / "s3-data"
    (s3_dir / "uploads").mkdir(parents=True)
    (s3_dir / "index.json").write_text(json.dumps(recorded) + "\n")
    for command in ("fsck", "gc"):
        done = mirror_cli(command, "--data", s3_dir, env={
            "MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": "images", "MIRROR_CACHE_MAX_SIZE": "1GiB",
            "MIRROR_STORAGE_S3_REGIONENDPOINT": "http://127.0.0.1:1"})
        assert done.returncode == 2, done.stderr
        assert "holds the work in progress (uploads, temp files) of the store whose index is in PostgreSQL" \
            in done.stderr and "not a mirror data directory" not in done.stderr, done.stderr


def test_a_dsn_without_a_host_is_named_as_the_socket_libpq_uses_not_localhost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libpq connects to its Unix socket when a DSN names no host (``postgresql:///mirror``): messages
    said "at localhost:5432", sending the operator to a TCP port nothing was asked of."""
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    assert describe("postgresql:///mirror") == \
        "PostgreSQL database 'mirror' at the Unix socket .s.PGSQL.5432 in libpq's default directory"
    assert describe("postgresql://m@%2Frun%2Fpostgresql:5433/x") == \
        "PostgreSQL database 'x' at the Unix socket .s.PGSQL.5433 in /run/postgresql"
    assert describe("postgresql://m:secret@db.example:6000/x") == "PostgreSQL database 'x' at db.example:6000"
    monkeypatch.setenv("PGHOST", "db.internal")
    assert describe("dbname=x") == "PostgreSQL database 'x' at db.internal:5432"
