"""The ``postgres`` metadata driver: the index (``metadata/driver.py``) in a PostgreSQL database,
for several hosts sharing one index (replicas behind a load balancer).  Tables (``pgschema.py``,
migrated at start): ``tags`` (repo, tag -> digest, media type, fetched-at), ``manifests``, ``links``,
``repositories``, ``locals``, ``referrers`` (in the order added), ``upstream_referrers``,
``referrers_api``, ``pins``, ``uploads``, ``foreign_urls``, ``access``, ``counters``, ``settings``
(``held``; ``store``, the blob store described), ``leases``, the ``lease_tokens`` sequence, ``in_use`` (``pgmarks``).

* Changes of several rows (a tag and the catalog, a withdrawal and the generation, ``forget``)
  are one transaction; read-modify-writes are single statements (``ON CONFLICT``, ``UPDATE ...
  RETURNING``), atomic across instances.
* The generation is a counter bumped, and NOTIFY'd, in the withdrawal's transaction; each
  instance keeps it in memory from LISTEN (:class:`~mirror.metadata.pgschema.NotifiedGeneration`),
  so reading it costs no query; nor does a name's kind, a link or a manifest record already read
  while it stood still (``pgremembered``).
* Leases expire by the database's clock (``statement_timestamp()``, one for every host; a *clock*
  given by tests replaces it).  A name's row stays after release (expired), so a new grant's token
  is drawn from the sequence only while its row is locked: later than every earlier grant's.
* Connections come from a pool (``pool_size``) plus the listener's own; each is checked as it is
  taken, so the dead ones a restarted server left behind are replaced.  A server that cannot be reached
  fails a call with ``MetadataUnavailable`` within :data:`POOL_WAIT`, at once after the listener was refused;
  the pool reconnects (backing off for at most :data:`RECONNECT_WAIT`, then on the next call, or at once
  when the listener connects again).  A server that hangs is found by the listener's heartbeat: the
  queries in flight are ended and calls fail at once until it answers again (``pgwatch``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from .driver import Lease, Metadata, TagRecord, UploadRecord, local_repo
from .pgmarks import NOW as _NOW, PostgresMarks
from .pgpins import PostgresPins
from .pgremembered import Remembered
from .pgschema import CHANNEL, UPLOAD_COLUMNS, UPLOAD_UPDATES, NotifiedGeneration, describe, migrate
from .pgwatch import ServerWatch
from .releases import PostgresReleases
from .scans import PostgresRecords

#: Most connections an instance holds at once (besides the listener's): its worker threads queue for them.
POOL_SIZE = 4
#: Seconds a call waits for a working connection before it fails with ``MetadataUnavailable``.
POOL_WAIT = 2.0
#: Seconds the pool retries a lost connection (backing off; short: a pending retry delays reconnecting).
RECONNECT_WAIT = 1.5
#: Seconds a connection attempt may take, unless the DSN says (``connect_timeout``).
CONNECT_TIMEOUT = 5

Row = tuple[Any, ...]
_BUMP = (f"WITH g AS (UPDATE counters SET value = value + 1 WHERE name = 'generation' RETURNING value)"
         f" SELECT value, pg_notify('{CHANNEL}', value::text) FROM g")


class PostgresMetadata(Remembered, PostgresRecords, PostgresMarks, PostgresPins, PostgresReleases, Metadata):
    """The index in the PostgreSQL database at *dsn* (a libpq connection string or URL).

    *store*, if given, names the blob store it describes (``pgschema.migrate``).  *clock* (seconds),
    if given, times leases instead of the database.  Raises :class:`psycopg.OperationalError` if the
    database cannot be reached at start, and ``SchemaTooNew`` or ``StoreMismatch`` (``pgschema``);
    later calls raise :class:`~mirror.metadata.driver.MetadataUnavailable` while it cannot be reached.
    """

    shared_by_hosts = True
    local = False

    def __init__(self, dsn: str, *, store: Mapping[str, str] | None = None,
                 clock: Callable[[], float] | None = None, pool_size: int = POOL_SIZE) -> None:
        self._where = describe(dsn)
        if "connect_timeout" not in conninfo_to_dict(dsn):
            dsn = make_conninfo(dsn, connect_timeout=CONNECT_TIMEOUT)
        with psycopg.connect(dsn, autocommit=True) as conn:
            self.recorded_store = store if migrate(conn, store)[1] else None  # this start's: forget_store
        self._clock = clock
        self._watch = ServerWatch(self._where, connect=lambda: psycopg.connect(dsn, autocommit=True))
        self._pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, kwargs={"autocommit": True}, open=True, name="metadata",
            timeout=POOL_WAIT, reconnect_timeout=RECONNECT_WAIT, check=self._watch.check)
        self._watch.on_back = self._pool.check  # reconnect at once when the listener finds the server back
        self._generation = NotifiedGeneration(dsn, watch=self._watch)

    @property
    def generation(self) -> NotifiedGeneration:
        return self._generation

    def index_id(self) -> str:
        row = self._one("SELECT value FROM settings WHERE name = 'index_id'")  # made by migrate()
        return str(row[0]) if row is not None else ""

    def close(self) -> None:
        self._generation.close()
        self._pool.close()

    # -- plumbing --

    @contextmanager
    def _cursor(self, *, transaction: bool = False) -> Iterator[psycopg.Cursor[Row]]:
        """A pooled connection's cursor; ``OperationalError`` (and ``PoolTimeout``), or the server
        not answering, as ``MetadataUnavailable`` (``pgwatch``)."""
        with self._watch.cursor(self._pool, transaction=transaction) as cur:
            yield cur

    def _one(self, query: str, params: Any = None) -> Row | None:
        with self._cursor() as cur:
            return cur.execute(query, params).fetchone()

    def _all(self, query: str, params: Any = None) -> list[Row]:
        with self._cursor() as cur:
            return cur.execute(query, params).fetchall()

    @contextmanager
    def _withdrawing(self) -> Iterator[tuple[psycopg.Cursor[Row], Callable[[], None]]]:
        """A transaction that may withdraw: call the given ``bump`` in it when it did; the
        generation moves in the same transaction and, once committed, in this instance."""
        bumped: list[int] = []

        with self._cursor(transaction=True) as cur:
            def bump() -> None:
                if not bumped:
                    row = cur.execute(_BUMP).fetchone()
                    assert row is not None
                    bumped.append(int(row[0]))
            yield cur, bump
        if bumped:
            self._generation.saw(bumped[0])

    # -- tags --

    def get_tag(self, repo: str, tag: str) -> TagRecord | None:
        row = self._one("SELECT digest, media_type, fetched_at FROM tags WHERE repo = %s AND tag = %s", (repo, tag))
        return None if row is None else TagRecord(*row)

    def set_tag(self, repo: str, tag: str, record: TagRecord) -> None:
        new = (repo, tag, record.digest, record.media_type, record.fetched_at)
        with self._withdrawing() as (cur, bump):
            while True:
                if cur.execute("INSERT INTO tags VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                               new).fetchone():
                    break
                old = cur.execute("SELECT digest, media_type FROM tags WHERE repo = %s AND tag = %s FOR UPDATE",
                                  (repo, tag)).fetchone()
                if old is None:
                    continue  # untagged in between: insert again
                cur.execute("UPDATE tags SET digest = %s, media_type = %s, fetched_at = %s"
                            " WHERE repo = %s AND tag = %s", (*new[2:], repo, tag))
                if tuple(old) != (record.digest, record.media_type):
                    bump()
                break
            self._register(cur, repo)

    def untag(self, repo: str, tag: str) -> bool:
        with self._withdrawing() as (cur, bump):
            found = cur.execute("DELETE FROM tags WHERE repo = %s AND tag = %s", (repo, tag)).rowcount > 0
            if found:
                bump()
        return found

    def untag_many(self, repo: str, tags: Iterable[str]) -> None:
        gone = sorted(set(tags))
        if not gone:
            return
        with self._withdrawing() as (cur, bump):
            cur.execute("DELETE FROM tags WHERE repo = %s AND tag = ANY(%s)", (repo, gone))
            bump()

    def tags(self, repo: str) -> list[str]:
        return [tag for (tag,) in self._all("SELECT tag FROM tags WHERE repo = %s ORDER BY tag", (repo,))]

    def tags_pointing_to(self, repo: str, digest: str) -> list[str]:
        rows = self._all("SELECT tag FROM tags WHERE repo = %s AND digest = %s ORDER BY tag", (repo, digest))
        return [tag for (tag,) in rows]

    def all_tags(self) -> list[tuple[str, str, TagRecord]]:
        rows = self._all("SELECT repo, tag, digest, media_type, fetched_at FROM tags")
        return [(repo, tag, TagRecord(*record)) for repo, tag, *record in rows]

    # -- manifests and links --

    def put_manifest(self, digest: str, media_type: str, size: int) -> None:
        with self._withdrawing() as (cur, bump):
            row = cur.execute(
                "INSERT INTO manifests VALUES (%s, %s, %s) ON CONFLICT (digest) DO UPDATE"
                " SET media_type = excluded.media_type, size = excluded.size"
                " WHERE (manifests.media_type, manifests.size) IS DISTINCT FROM (excluded.media_type, excluded.size)"
                " RETURNING xmax::text <> '0'", (digest, media_type, size)).fetchone()
            if row is not None and row[0]:
                bump()  # a record other instances may keep in memory changed (pgremembered)

    def manifest_digests(self) -> list[str]:
        return [digest for (digest,) in self._all("SELECT digest FROM manifests")]

    def count_manifests(self) -> int:
        row = self._one("SELECT count(*) FROM manifests")
        return int(row[0]) if row else 0

    def link(self, repo: str, digests: Iterable[str]) -> None:
        with self._cursor(transaction=True) as cur:
            cur.execute("INSERT INTO links SELECT %s, d FROM unnest(%s::text[]) AS d ON CONFLICT DO NOTHING",
                        (repo, list(digests)))
            self._register(cur, repo)

    def unlink(self, repo: str, digest: str) -> bool:
        with self._withdrawing() as (cur, bump):
            found = cur.execute("DELETE FROM links WHERE repo = %s AND digest = %s", (repo, digest)).rowcount > 0
            if found:
                bump()
        return found

    def all_links(self) -> list[tuple[str, str]]:
        return [(repo, digest) for repo, digest in self._all("SELECT repo, digest FROM links")]

    # -- repositories --

    def repositories(self) -> list[str]:
        return [repo for (repo,) in self._all("SELECT repo FROM repositories ORDER BY repo")]

    def has_repository(self, repo: str) -> bool:
        return self._one("SELECT 1 FROM repositories WHERE repo = %s", (repo,)) is not None

    def mark_local(self, name: str, now: float) -> None:
        with self._withdrawing() as (cur, bump):
            if cur.execute("INSERT INTO locals VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                           (name, now)).fetchone():
                bump()  # its requests no longer go to the upstream
            self._register(cur, local_repo(name))

    # -- referrers --

    def add_referrer(self, repo: str, subject: str, descriptor: dict[str, object]) -> None:
        self._one("INSERT INTO referrers (repo, subject, digest, descriptor) VALUES (%s, %s, %s, %s)"
                  " ON CONFLICT DO NOTHING RETURNING 1", (repo, subject, str(descriptor["digest"]), Jsonb(descriptor)))

    def remove_referrer(self, repo: str, subject: str, digest: str) -> None:
        self._one("DELETE FROM referrers WHERE repo = %s AND subject = %s AND digest = %s RETURNING 1",
                  (repo, subject, digest))

    def referrers(self, repo: str, subject: str) -> list[dict[str, object]]:
        rows = self._all("SELECT descriptor FROM referrers WHERE repo = %s AND subject = %s ORDER BY added",
                         (repo, subject))
        return [dict(descriptor) for (descriptor,) in rows]

    def put_upstream_referrers(self, repo: str, subject: str, artifact_type: str | None,
                               descriptors: Iterable[dict[str, Any]], now: float) -> None:
        self._one("INSERT INTO upstream_referrers VALUES (%s, %s, %s, %s, %s) ON CONFLICT (repo, subject, filter)"
                  " DO UPDATE SET fetched_at = excluded.fetched_at, descriptors = excluded.descriptors RETURNING 1",
                  (repo, subject, _filter(artifact_type), now, Jsonb(list(descriptors))))

    def upstream_referrers(self, repo: str, subject: str, artifact_type: str | None) -> list[dict[str, Any]] | None:
        # The filtered list if there is one (it sorts after the whole one, whose filter is empty).
        row = self._one("SELECT descriptors FROM upstream_referrers WHERE repo = %s AND subject = %s"
                        " AND filter IN ('', %s) ORDER BY filter DESC LIMIT 1",
                        (repo, subject, _filter(artifact_type)))
        return None if row is None else list(row[0])

    def set_referrers_api(self, registry: str, present: bool) -> None:
        self._one("INSERT INTO referrers_api VALUES (%s, %s) ON CONFLICT (registry) DO UPDATE"
                  " SET present = excluded.present WHERE referrers_api.present <> excluded.present RETURNING 1",
                  (registry, present))

    def referrers_api(self, registry: str) -> bool | None:
        row = self._one("SELECT present FROM referrers_api WHERE registry = %s", (registry,))
        return None if row is None else bool(row[0])

    # -- non-distributable layers --

    def set_foreign_urls(self, digest: str, urls: Iterable[str]) -> None:
        self._one("INSERT INTO foreign_urls VALUES (%s, %s) ON CONFLICT (digest) DO UPDATE SET urls = excluded.urls"
                  " RETURNING 1", (digest, list(urls)))

    def foreign_urls(self, digest: str) -> tuple[str, ...]:
        row = self._one("SELECT urls FROM foreign_urls WHERE digest = %s", (digest,))
        return () if row is None else tuple(row[0])

    # -- uploads --

    def put_upload(self, uuid: str, record: UploadRecord) -> None:
        self._one(f"INSERT INTO uploads (uuid, {UPLOAD_COLUMNS}) VALUES (%s{', %s' * 8}) ON CONFLICT (uuid) DO UPDATE"
                  f" SET ({UPLOAD_COLUMNS}) = ({UPLOAD_UPDATES}) RETURNING 1", (uuid, *record.flat()))

    def get_upload(self, uuid: str) -> UploadRecord | None:
        row = self._one(f"SELECT {UPLOAD_COLUMNS} FROM uploads WHERE uuid = %s", (uuid,))
        return None if row is None else UploadRecord.unflat(*row)

    def delete_upload(self, uuid: str) -> None:
        self._one("DELETE FROM uploads WHERE uuid = %s RETURNING 1", (uuid,))

    def upload_ids(self) -> list[str]:
        return [uuid for (uuid,) in self._all("SELECT uuid FROM uploads")]

    def count_uploads(self) -> int:
        """Uploads in progress on every replica (``/metrics``; a replica's spool holds finished ones a while)."""
        row = self._one("SELECT count(*) FROM uploads")
        return int(row[0]) if row else 0

    # -- maintenance: access times, withdrawals in bulk, usage --

    def record_access(self, seen: Mapping[tuple[str, str], float]) -> None:
        if not seen:
            return
        repos, digests, times = zip(*((repo, digest, when) for (repo, digest), when in seen.items()), strict=True)
        self._one("INSERT INTO access SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[])"
                  " ON CONFLICT (repo, digest) DO UPDATE SET used_at = greatest(access.used_at, excluded.used_at)"
                  " RETURNING 1", (list(repos), list(digests), list(times)))

    def access_times(self) -> dict[tuple[str, str], float]:
        return {(repo, digest): when for repo, digest, when in self._all("SELECT repo, digest, used_at FROM access")}

    def forget(self, *, links: Iterable[tuple[str, str]] = (), manifests: Iterable[str] = (),
               accesses: Iterable[tuple[str, str]] = ()) -> None:
        links, manifests, accesses = list(links), list(manifests), list(accesses)
        if not (links or manifests or accesses):
            return
        with self._withdrawing() as (cur, bump):
            deleted = 0
            for table, pairs in (("links", links), ("access", accesses)):
                if pairs:
                    deleted += cur.execute(
                        f"DELETE FROM {table} t USING unnest(%s::text[], %s::text[]) AS g(repo, digest)"
                        " WHERE t.repo = g.repo AND t.digest = g.digest",
                        ([repo for repo, _ in pairs], [digest for _, digest in pairs])).rowcount
            if manifests:
                deleted += cur.execute("DELETE FROM manifests WHERE digest = ANY(%s)", (manifests,)).rowcount
            if deleted:
                bump()

    def add_usage(self, delta: int) -> int:
        row = self._one("UPDATE counters SET value = value + %s WHERE name = 'usage' RETURNING value", (delta,))
        assert row is not None
        return int(row[0])

    def set_usage(self, value: int) -> None:
        self._one("UPDATE counters SET value = %s WHERE name = 'usage' RETURNING value", (value,))

    def clock(self) -> float:
        """Seconds since the epoch by the database's clock, the one every replica's leases go by."""
        row = self._one("SELECT extract(epoch from statement_timestamp())")
        assert row is not None
        return float(row[0])

    def usage(self) -> int:
        row = self._one("SELECT value FROM counters WHERE name = 'usage'")
        return int(row[0]) if row else 0

    def swap_setting(self, name: str, value: Any) -> Any:
        """Record *value* (JSON) as setting *name*; the value it had before (None: none)."""
        row = self._one("WITH old AS (SELECT value FROM settings WHERE name = %s) INSERT INTO settings VALUES (%s, %s)"
                        " ON CONFLICT (name) DO UPDATE SET value = excluded.value RETURNING (SELECT value FROM old)",
                        (name, name, Jsonb(value)))
        return row[0] if row else None

    def set_held(self, held: dict[str, int]) -> None:
        self._one("INSERT INTO settings VALUES ('held', %s) ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                  " RETURNING 1", (Jsonb(dict(held)),))

    def held(self) -> dict[str, int]:
        row = self._one("SELECT value FROM settings WHERE name = 'held'")
        return {} if row is None else {str(k): int(v) for k, v in row[0].items()}

    # -- leases --

    def _now(self) -> float | None:
        return None if self._clock is None else self._clock()

    def take_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        # The token of a new name's first grant is drawn before its row exists, any later one
        # with the row locked (DO UPDATE): after the previous grant committed.
        row = self._one(f"INSERT INTO leases AS l VALUES (%(name)s, %(holder)s, nextval('lease_tokens'),"
                        f" {_NOW} + %(ttl)s) ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                        f" token = nextval('lease_tokens'), expires = excluded.expires WHERE l.expires <= {_NOW}"
                        " RETURNING token, expires", {"name": name, "holder": holder, "ttl": ttl, "now": self._now()})
        return None if row is None else Lease(name, holder, int(row[0]), float(row[1]))

    def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        row = self._one(f"UPDATE leases SET expires = {_NOW} + %(ttl)s WHERE name = %(name)s AND token = %(token)s"
                        f" AND expires > {_NOW} RETURNING holder, expires",
                        {"name": lease.name, "token": lease.token, "ttl": ttl, "now": self._now()})
        return None if row is None else Lease(lease.name, row[0], lease.token, float(row[1]))

    def release_lease(self, lease: Lease) -> bool:
        # The row stays, expired: its next grant draws its token under the row's lock.
        row = self._one(f"WITH old AS (SELECT name, expires FROM leases WHERE name = %(name)s AND token = %(token)s"
                        f" FOR UPDATE) UPDATE leases l SET expires = '-Infinity' FROM old WHERE l.name = old.name"
                        f" RETURNING old.expires > {_NOW}",
                        {"name": lease.name, "token": lease.token, "now": self._now()})
        return row is not None and bool(row[0])

    def current_lease(self, name: str) -> Lease | None:
        row = self._one(f"SELECT holder, token, expires FROM leases WHERE name = %(name)s AND expires > {_NOW}",
                        {"name": name, "now": self._now()})
        return None if row is None else Lease(name, row[0], int(row[1]), float(row[2]))


def _filter(artifact_type: str | None) -> str:
    """The key of an upstream referrers list: '' for the whole one, '?<type>' for a filtered one."""
    return "" if artifact_type is None else f"?{artifact_type}"
