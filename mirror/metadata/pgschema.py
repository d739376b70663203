"""The postgres metadata driver's schema, its migrations, and the generation pushed by LISTEN/NOTIFY.

The schema is versioned in ``schema_version`` (one row).  :func:`migrate` brings a database up to
:data:`SCHEMA_VERSION` at start, under an advisory lock so that workers starting together apply a
migration once; a database whose version is newer than this code knows is refused
(:class:`SchemaTooNew`) rather than written to by code that does not know its meaning.

Keys are ``text COLLATE "C"``: sorted by code point, like the diskcache driver's lists, and
compared byte for byte (digests, repository names and tags are ASCII).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from .pgwatch import ServerWatch, shut_down

__all__ = ["CHANNEL", "SCHEMA_VERSION", "UPLOAD_COLUMNS", "UPLOAD_UPDATES", "ForeignTables", "NotifiedGeneration",
           "SchemaTooNew",
           "StoreMismatch", "describe", "migrate"]

#: The NOTIFY channel on which each withdrawal publishes the new generation counter.
CHANNEL = "mirror_metadata_generation"
#: The application_name of each instance's listening connection (in pg_stat_activity).
LISTENER = "mirror-metadata-generation"
#: Seconds without a notification after which the listener asks the server for the counter: a round
#: trip that shows its connection still works (and brings any change it missed).
HEARTBEAT = 2.0
#: Seconds the listener waits for that answer before taking its connection for lost: a server that
#: hangs, or a network that drops packets without a reset, ends no read with an error by itself.
HEARTBEAT_WAIT = 3.0
#: Seconds the listener's reads of the counter wait for a lock on its table (``VACUUM FULL``, ``ALTER
#: TABLE``, an explicit ``LOCK``) before the server answers that they gave up: a server that answers
#: so is not silent, and the heartbeat then learns nothing new, but ends nothing either.
HEARTBEAT_LOCK_WAIT = 1.0
#: The tables the first migration creates (a database with one of them and no version is not new).
_FIRST_TABLES = ("tags", "manifests", "links", "repositories", "locals", "referrers", "upstream_referrers",
                 "referrers_api", "pins", "uploads", "foreign_urls", "access", "counters", "settings", "leases")
_LOCK = 0x6D6972726F72  # pg_advisory_xact_lock key of migrations ("mirror")

_KEY = 'text COLLATE "C" NOT NULL'

#: MIGRATIONS[n] brings a database from version n to n + 1.
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE tags (repo {_KEY}, tag {_KEY}, digest {_KEY}, media_type text NOT NULL,
                       fetched_at double precision NOT NULL, PRIMARY KEY (repo, tag));
    CREATE INDEX tags_by_digest ON tags (repo, digest);
    CREATE TABLE manifests (digest {_KEY} PRIMARY KEY, media_type text NOT NULL, size bigint NOT NULL);
    CREATE TABLE links (repo {_KEY}, digest {_KEY}, PRIMARY KEY (repo, digest));
    CREATE TABLE repositories (repo {_KEY} PRIMARY KEY);
    CREATE TABLE locals (name {_KEY} PRIMARY KEY, created_at double precision NOT NULL);
    CREATE TABLE referrers (repo {_KEY}, subject {_KEY}, digest {_KEY},
                            added bigint GENERATED ALWAYS AS IDENTITY, descriptor jsonb NOT NULL,
                            PRIMARY KEY (repo, subject, digest));
    CREATE TABLE upstream_referrers (repo {_KEY}, subject {_KEY}, filter {_KEY},
                                     fetched_at double precision NOT NULL, descriptors jsonb NOT NULL,
                                     PRIMARY KEY (repo, subject, filter));
    CREATE TABLE referrers_api (registry {_KEY} PRIMARY KEY, present boolean NOT NULL);
    CREATE TABLE pins (repo {_KEY}, digest {_KEY}, pinned_at double precision NOT NULL,
                       PRIMARY KEY (repo, digest));
    CREATE TABLE uploads (uuid {_KEY} PRIMARY KEY, name text NOT NULL, started_at double precision NOT NULL);
    CREATE TABLE foreign_urls (digest {_KEY} PRIMARY KEY, urls text[] NOT NULL);
    CREATE TABLE access (repo {_KEY}, digest {_KEY}, used_at double precision NOT NULL,
                         PRIMARY KEY (repo, digest));
    CREATE TABLE counters (name {_KEY} PRIMARY KEY, value bigint NOT NULL);
    INSERT INTO counters VALUES ('usage', 0), ('generation', 0);
    CREATE TABLE settings (name {_KEY} PRIMARY KEY, value jsonb NOT NULL);
    CREATE TABLE leases (name {_KEY} PRIMARY KEY, holder text NOT NULL, token bigint NOT NULL,
                         expires double precision NOT NULL);
    CREATE SEQUENCE lease_tokens AS bigint;
    """,
    # A push upload's parts sent to the blob store (UploadRecord.parts).
    "ALTER TABLE uploads ADD COLUMN upload_id text, ADD COLUMN part_size bigint, ADD COLUMN etags text[];",
    # Digests being served from the blob store or filled, per holder (pgmarks.py).
    f"CREATE TABLE in_use (digest {_KEY}, holder {_KEY}, expires double precision NOT NULL,"
    " PRIMARY KEY (digest, holder));",
    # A push upload's tail kept in the bucket by the replicas of a cluster, and its last write (UploadRecord).
    "ALTER TABLE uploads ADD COLUMN tail bigint NOT NULL DEFAULT 0, ADD COLUMN written_at double precision;",
    # A pin that goes with its image's last tag (pgpins.py); those made before were all kept for good.
    "ALTER TABLE pins ADD COLUMN tagged boolean NOT NULL DEFAULT false;",
    # The instance whose data directory holds a push upload's file, one host's (UploadRecord.holder).
    "ALTER TABLE uploads ADD COLUMN holder text;",
)

SCHEMA_VERSION = len(MIGRATIONS)
#: The columns of ``uploads`` besides its key, in the order of ``UploadRecord.flat``; their update from ``excluded``.
UPLOAD_COLUMNS = "name, started_at, upload_id, part_size, etags, tail, written_at, holder"
UPLOAD_UPDATES = ", ".join(f"excluded.{column}" for column in UPLOAD_COLUMNS.split(", "))


def describe(dsn: str) -> str:
    """The database *dsn* names, as messages name it: ``PostgreSQL database 'mirror' at db:5432``, or
    ``... at the Unix socket .s.PGSQL.5432 in /run/postgresql`` (libpq's defaults and ``PGHOST``/``PGPORT``
    for what it leaves out: no host is libpq's socket directory, not localhost; never the password)."""
    parts = conninfo_to_dict(dsn)
    host = str(parts.get("host") or parts.get("hostaddr") or os.environ.get("PGHOST") or "").split(",")[0]
    port = str(parts.get("port") or os.environ.get("PGPORT") or 5432).split(",")[0]
    database = str(parts.get("dbname") or parts.get("user") or "")
    directory = host or "libpq's default directory"
    where = f"{host}:{port}" if host and not host.startswith("/") else f"the Unix socket .s.PGSQL.{port} in {directory}"
    return f"PostgreSQL database {database!r} at {where}"


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer mirror than this one."""


class ForeignTables(RuntimeError):
    """The database has tables of the names this mirror creates, but no schema version of its own:
    another application's, or a mirror's whose ``schema_version`` was removed (:attr:`names`)."""

    def __init__(self, names: str) -> None:
        super().__init__(f"tables named {names} but no schema version of this mirror")
        self.names = names


class StoreMismatch(RuntimeError):
    """The database holds the index of another blob store (:attr:`recorded`) than the one opening it."""

    def __init__(self, recorded: dict[str, Any]) -> None:
        super().__init__(f"the index of another blob store: {recorded}")
        self.recorded = recorded


def migrate(conn: psycopg.Connection[tuple[Any, ...]], store: Mapping[str, str] | None = None) -> tuple[int, bool]:
    """Bring the database of *conn* (autocommit) to :data:`SCHEMA_VERSION`; return the version it had,
    and whether this call recorded *store* (:func:`forget_store` undoes it while the index is empty).

    *store*, if given, names the blob store whose index this is (its driver and identity, plus a
    ``path`` shown in messages only): recorded in ``settings`` by the first start, compared by
    every later one.  Two stores on one database would each see the other's records as their own
    (links to blobs they lack; blobs the index does not reference, which the collector deletes).

    Raises :class:`SchemaTooNew` if its version is newer than this code's, :class:`ForeignTables` if
    it has no version but tables of this mirror's names (written over, they would be another's data),
    :class:`StoreMismatch` if it describes another store; psycopg's errors if the server refuses the
    schema (``InsufficientPrivilege``: the user may not create tables).
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        found = int(row[0]) if row is not None and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(f"the metadata database has schema version {found}, newer than the {SCHEMA_VERSION}"
                               " this mirror knows: upgrade the mirror (or point it at another database)")
        if found == 0:
            row = conn.execute("SELECT string_agg(table_name, ', ' ORDER BY table_name) FROM information_schema.tables"
                               " WHERE table_schema = current_schema() AND table_name = ANY(%s)",
                               (list(_FIRST_TABLES),)).fetchone()
            if row is not None and row[0]:
                raise ForeignTables(str(row[0]))
        for version in range(found, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[version])
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version VALUES (%s)", (max(found, SCHEMA_VERSION),))
        # What tells this index from every other (``Metadata.index_id``), made once.
        conn.execute("INSERT INTO settings VALUES ('index_id', %s) ON CONFLICT (name) DO NOTHING",
                     (Jsonb(uuid.uuid4().hex),))
        recorded = False
        if store is not None:
            row = conn.execute("SELECT value FROM settings WHERE name = 'store'").fetchone()
            if row is None:
                conn.execute("INSERT INTO settings VALUES ('store', %s)", (Jsonb(dict(store)),))
                recorded = True
            elif _identity(row[0]) != _identity(store):
                raise StoreMismatch(dict(row[0]))
    return found, recorded


def forget_store(cur: psycopg.Cursor[Any], store: Mapping[str, str]) -> bool:
    """In *cur*'s transaction, remove the record of *store* that :func:`migrate` made, if the index is
    still empty (no manifest, link, pushed name or upload: a start refused at once, e.g. for a bucket
    that holds another index's objects), so that a corrected configuration may open the database;
    whether it went."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
    return cur.execute(
        "DELETE FROM settings WHERE name = 'store' AND value = %s AND NOT EXISTS (SELECT 1 FROM manifests)"
        " AND NOT EXISTS (SELECT 1 FROM links) AND NOT EXISTS (SELECT 1 FROM locals)"
        " AND NOT EXISTS (SELECT 1 FROM uploads) RETURNING 1", (Jsonb(dict(store)),)).fetchone() is not None


def _identity(store: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in store.items() if key != "path"}


class NotifiedGeneration:
    """The generation counter as this process last learnt it, pushed by LISTEN/NOTIFY.

    Every withdrawal increments ``counters.generation`` and, in the same transaction, notifies
    :data:`CHANNEL` with the new value; a background thread of each instance listens on a
    connection of its own and keeps the largest value seen, so :meth:`read` is a memory read.
    The instance's own withdrawals are applied when they commit (:meth:`saw`).  While the
    listener is not connected (before it is, or after losing the server) nothing can be known
    of other processes' withdrawals, so every read returns a new token: memos never hit.  A
    connection that goes quiet is checked every :data:`HEARTBEAT` seconds; one that does not answer
    within :data:`HEARTBEAT_WAIT` is taken for lost at once, as one that fails.

    *watch*, if given, is told what the listener finds (``pgwatch``): the server is silent when a
    check is not answered in time, or a connection attempt times out; it answers again once the
    listener has connected and read the counter.
    """

    def __init__(self, dsn: str, *, wait: float = 10.0, watch: ServerWatch | None = None) -> None:
        self._dsn = dsn
        self._watch = watch
        self._value: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="metadata-generation", daemon=True)
        self._thread.start()
        self._listening.wait(wait)

    def read(self) -> bytes:
        value = self._value
        return os.urandom(8) if value is None else value.to_bytes(8, "big")

    def saw(self, counter: int) -> None:
        """Take a counter value committed by a withdrawal (values only grow: older news changes nothing)."""
        with self._lock:
            if self._value is not None and counter > self._value:
                self._value = counter

    def _listen(self) -> None:
        while not self._stop.is_set():
            connected = False  # a session that ends is not a refusal: the next attempt says
            try:
                with psycopg.connect(self._dsn, autocommit=True, application_name=LISTENER) as conn:
                    connected = True
                    if self._watch is not None:
                        self._watch.reached()
                    conn.execute(f"SET lock_timeout = {int(HEARTBEAT_LOCK_WAIT * 1000)}")
                    conn.execute(f"LISTEN {CHANNEL}")  # before reading: nothing committed after is missed
                    row = conn.execute("SELECT value FROM counters WHERE name = 'generation'").fetchone()
                    with self._lock:
                        self._value = max(int(row[0]) if row else 0, self._value or 0)
                    if self._watch is not None:
                        self._watch.answered()
                    self._listening.set()
                    quiet_since = time.monotonic()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.1):
                            quiet_since = time.monotonic()
                            with contextlib.suppress(ValueError):
                                self.saw(int(note.payload))
                        if time.monotonic() - quiet_since >= HEARTBEAT:
                            self._beat(conn)
                            quiet_since = time.monotonic()
            except psycopg.errors.ConnectionTimeout:  # connect_timeout: the server does not answer either
                with self._lock:
                    self._value = None
                if self._watch is not None:
                    self._watch.silent("not answering (no answer to a connection attempt in time)")
                self._stop.wait(1.0)
            except psycopg.Error as exc:
                with self._lock:
                    self._value = None
                if self._watch is not None and isinstance(exc, psycopg.OperationalError) and not connected:
                    self._watch.refused(str(exc).partition("\n")[0])
                self._stop.wait(1.0)

    def _beat(self, conn: psycopg.Connection[Any]) -> None:
        """Read the counter on the listener's connection; if no answer comes within :data:`HEARTBEAT_WAIT`
        seconds, the connection is lost (:meth:`_lose`) and the read ends with an error."""
        watchdog = threading.Timer(HEARTBEAT_WAIT, self._lose, args=(conn.pgconn.socket,))
        watchdog.daemon = True
        watchdog.start()
        try:
            row = conn.execute("SELECT value FROM counters WHERE name = 'generation'").fetchone()
        except psycopg.errors.LockNotAvailable:  # the table is locked: the server answered all the same
            row = None
        finally:
            watchdog.cancel()
        if row is not None:
            self.saw(int(row[0]))

    def _lose(self, fd: int) -> None:
        """The listener's connection (socket *fd*) stopped answering: from now on nothing is known of
        other processes' withdrawals, and its socket is shut down so the listener connects again; the
        watch ends the pooled queries in flight (the server hangs: they wait for it too)."""
        with self._lock:
            self._value = None
        shut_down(fd)
        if self._watch is not None:
            self._watch.silent(f"not answering (no answer to a check within {HEARTBEAT_WAIT:g} s)")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
