"""In-use marks in the index (``metadata/marks.py``, ``metadata/pgmarks.py``, ``maintenance/inuse.py``):
what replicas serve from the bucket or fill, seen by a collector on any of them.  Against the session's
real PostgreSQL 15; the diskcache driver keeps none (one host: its data directory's marks do)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from mirror.maintenance.inuse import IndexMarks
from mirror.metadata.diskcache import DiskcacheMetadata
from mirror.metadata.postgres import PostgresMetadata
from mirror.spec.reference import parse_digest
from tests.support.postgres import PostgresServer
from tests.support.waiting import wait_for

D1, D2 = (f"sha256:{c * 64}" for c in "12")


@pytest.fixture
def dsn(postgres: PostgresServer) -> str:
    return postgres.create_database()


@pytest.fixture
def index(dsn: str) -> Iterator[PostgresMetadata]:
    metadata = PostgresMetadata(dsn)
    yield metadata
    metadata.close()


def _rows(dsn: str) -> dict[tuple[str, str], float]:
    with psycopg.connect(dsn) as conn:
        return {(d, h): float(e) for d, h, e in conn.execute("SELECT digest, holder, expires FROM in_use")}


def test_marks_of_any_holder_are_seen_until_withdrawn_or_expired(postgres: PostgresServer) -> None:
    now = [1000.0]
    index = PostgresMetadata(postgres.create_database(), clock=lambda: now[0])
    try:
        index.mark_in_use("a", [D1, D2], 10.0)
        index.mark_in_use("b", [D1], 30.0)
        assert index.in_use() == {D1, D2}
        with index.unmarked(D1) as free:
            assert not free
        index.unmark_in_use("a", [D1])
        assert index.in_use() == {D1, D2}  # b's mark stays
        now[0] += 15  # a's mark of D2 expired: as a holder that died leaves it
        assert index.in_use() == {D1}
        with index.unmarked(D2) as free:
            assert free
        index.unmark_in_use("b", [D1])
        assert index.in_use() == set()
    finally:
        index.close()


def test_a_mark_taken_while_a_collector_deletes_waits_for_the_delete(index: PostgresMetadata) -> None:
    marked = threading.Event()
    with index.unmarked(D1) as free:
        assert free
        marking = threading.Thread(target=lambda: (index.mark_in_use("reader", [D1, D2], 10.0), marked.set()))
        marking.start()
        time.sleep(1.0)
        assert not marked.is_set()  # the reader waits: the object is being deleted
    marking.join(10)
    assert marked.is_set() and index.in_use() == {D1, D2}
    # Marks never wait for each other, and a collector then sees the object in use.
    index.mark_in_use("another reader", [D1], 10.0)
    with index.unmarked(D1) as free:
        assert not free


def test_a_process_writes_a_mark_once_renews_it_while_held_and_withdraws_it_when_let_go(
        index: PostgresMetadata, dsn: str) -> None:
    marks = IndexMarks(index, "replica-1 pid 7", ttl=3.0)  # a beat of one second
    digest = parse_digest(D1)
    try:
        marks.hold(digest)
        first = _rows(dsn)[D1, "replica-1 pid 7"]
        marks.hold(digest)  # a second transfer of a fresh mark: no write
        marks.release(digest)
        assert _rows(dsn) == {(D1, "replica-1 pid 7"): first}
        # Renewed by the beats while a transfer holds it, past its first expiry.
        time.sleep(4.0)
        assert _rows(dsn)[D1, "replica-1 pid 7"] > first + 2
        assert index.in_use() == {D1}
        marks.release(digest)
        wait_for(lambda: not _rows(dsn), timeout=5, what="the mark withdrawn once let go")
        assert index.in_use() == set()
        marks.hold(digest)
        assert index.in_use() == {D1}
    finally:
        marks.close()
    assert _rows(dsn) == {}  # closing withdraws what it held


def test_an_index_of_one_host_keeps_no_marks(tmp_path: Path) -> None:
    index = DiskcacheMetadata(tmp_path / "index")
    try:
        index.mark_in_use("a", [D1], 10.0)
        assert index.in_use() == set()
        with index.unmarked(D1) as free:
            assert free
    finally:
        index.close()
