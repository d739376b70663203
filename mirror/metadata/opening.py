"""Opening the configured metadata driver (``metadata.driver``): the one place that chooses it."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config.dsn import dsn_key, dsn_problem
from ..config.sections import MetadataConfig, StorageConfig
from ..observe.serverdir import handed_over
from ..storage.driver import BlobStore
from ..storage.layout import Layout
from .driver import Metadata
from .unfinished import directory_problem, index_problem


class CannotOpenIndex(Exception):
    """The configured index cannot be opened: one line naming its server and database (never a
    password), why, and what to check.  ``transient``: the database did not answer or refused the
    connection (it may a moment later); otherwise what it holds or its schema is wrong."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def open_metadata(config: MetadataConfig, index: Path, storage: StorageConfig) -> Metadata:
    """The index as *config* says: the diskcache driver in *index* (``DATA/index/``), or the
    postgres driver at ``metadata.postgres.dsn`` (its schema migrated), with a pool of
    ``metadata.postgres.pool_size`` connections, for the blob store *storage* names
    (:func:`store_identity`).

    Raises :class:`CannotOpenIndex` if the database does not answer (refused, unknown host,
    wrong password, no such database), a newer mirror migrated it
    (:class:`~mirror.metadata.pgschema.SchemaTooNew`), or it holds another store's index.
    """
    if config.driver == "postgres":
        import psycopg  # imported only when it is used

        from .pgschema import ForeignTables, SchemaTooNew, StoreMismatch, describe
        from .postgres import PostgresMetadata

        assert config.postgres_dsn is not None  # checked by MetadataConfig
        wanted = _index_of(config)
        if isinstance(wanted, str):  # (a DSN libpq cannot read)
            raise CannotOpenIndex(wanted)
        where = describe(config.postgres_dsn)  # as libpq reads it: no host is its socket, not localhost
        given = config.postgres_dsn_file  # (one given inline, handed to this worker in a file, is not the user's)
        store, key = store_identity(storage), dsn_key(None if handed_over(given.path if given else None) else given)
        try:
            return PostgresMetadata(config.postgres_dsn, store=store, pool_size=config.postgres_pool_size)
        except psycopg.OperationalError as exc:
            raise CannotOpenIndex(_unanswered(where, str(exc), key), transient=True) from None
        except SchemaTooNew as exc:
            raise CannotOpenIndex(f"{where}: {exc}") from None
        except ForeignTables as exc:
            raise CannotOpenIndex(
                f"{where} has tables named {exc.names} but no schema version of this mirror: another "
                "application's, or the mirror's with its schema_version table emptied: give the mirror a database "
                "of its own (nothing was changed)") from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise CannotOpenIndex(
                f"{where} refused the mirror's schema: {_first_line(exc)}: the mirror creates its tables "
                "at its first start: make its user the database's owner, or grant it CREATE on the schema") from None
        except psycopg.DatabaseError as exc:  # anything else the server refuses at start
            if str(exc).startswith("bad value for "):  # psycopg's own check of an option (connect_timeout)
                raise CannotOpenIndex(_unanswered(where, str(exc), key)) from None
            raise CannotOpenIndex(f"{where} refused the mirror's schema: {_first_line(exc)}") from None
        except StoreMismatch as exc:
            raise CannotOpenIndex(
                f"{where} holds the index of {_describe_store(exc.recorded)}, not of this store, "
                f"{_describe_store(store)}: give each store a database of its own (each would take the other's "
                "records as its own, and the collector would delete blobs the other needs)") from None
    import sqlite3

    from .diskcache import DiskcacheMetadata

    try:
        return DiskcacheMetadata(index)
    except (sqlite3.Error, OSError) as exc:  # a read-only or full disk, a file where the directory goes...
        raise CannotOpenIndex(f"cannot open the index in {index}: {exc}: the index is a SQLite database the "
                              "mirror writes, so the data directory must be writable") from None


def store_identity(storage: StorageConfig) -> dict[str, str]:
    """What names the blob store *storage* configures, as a PostgreSQL index records it: the
    bucket and ``rootdirectory`` of an S3 store (the same for every replica sharing it); for a
    data directory, the random id in ``DATA/store-id``, made the first time (the same wherever the
    directory is mounted).  ``path`` (the data directory) is only shown in messages.

    Raises :class:`CannotOpenIndex` if the id cannot be written.
    """
    if storage.driver == "s3":
        return {"driver": "s3", "bucket": storage.s3_bucket or "", "rootdirectory": storage.s3_rootdirectory.strip("/")}
    path = Layout(storage.path).store_id
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
            partial.write_text(f"{uuid.uuid4().hex}\n")
            with contextlib.suppress(FileExistsError):  # another process made it first: theirs it is
                os.link(partial, path)
            partial.unlink()
        ident = path.read_text().strip()
    except OSError as exc:
        raise CannotOpenIndex(f"cannot record this data directory's id in {path}: {exc.strerror or exc}") from None
    return {"driver": "filesystem", "id": ident, "path": str(storage.path.absolute())}


def bound_elsewhere(storage: StorageConfig, store: BlobStore, *ids: str | None) -> str | None:
    """For an S3 store: why its bucket holds the objects of another index than one of *ids* (``mirror
    migrate``'s source and target), or None.  A copy made before into that bucket, recorded by the
    database it went to, would otherwise be taken over by a run into another (a mistyped database name)."""
    if storage.driver != "s3":
        return None
    from ..storage.s3 import S3Store
    from ..storage.s3binding import recorded_index

    assert isinstance(store, S3Store)
    recorded = recorded_index(store)
    if recorded is None or recorded in ids:
        return None
    return (f"{_describe_store(store_identity(storage))} holds the objects of another index (id {recorded}), not"
            " this run's source or target: name the database that holds it (a copy made before), or choose another"
            " storage.s3.rootdirectory (that index would lose its objects)")


def bind_bucket(config: MetadataConfig, storage: StorageConfig, store: BlobStore, metadata: Metadata, *,
                rebind: bool = False) -> str | None:
    """Check that *metadata*, the index *config* names, is no target of a ``mirror migrate`` stopped
    midway (``metadata/unfinished.py``; unless *rebind*), and, for an S3 store, that its bucket's objects
    belong to it, recording it the first time (``storage/s3binding.py``; a data directory is bound by
    :func:`bind_data_directory`).  Returns why not, or None; *rebind*: record *metadata* whatever the
    bucket recorded (``mirror migrate``, once it copied the objects and their records there).

    Refused: a bucket that records another index; one that records none but holds objects while the
    index has no manifest (a new or re-created database, a mirror pointed at another's bucket).  Either
    index would see every object as unreferenced, and the collector would delete them all.  Raises
    ``StoreUnavailable`` (an ``OSError``) if the bucket does not answer.
    """
    if not rebind and (unfinished := index_problem(metadata, _describe(_index_of(config)))) is not None:
        return unfinished
    if storage.driver != "s3":
        return None
    from ..storage.s3 import S3Store
    from ..storage.s3binding import holds_objects, record_index, recorded_index

    assert isinstance(store, S3Store)
    mine, recorded = metadata.index_id(), None if rebind else recorded_index(store)
    where, index = _describe_store(store_identity(storage)), _describe(_index_of(config))
    if recorded is None:
        if not rebind and holds_objects(store) and metadata.count_manifests() == 0:
            _forget_store(metadata)
            return (f"{where} holds objects, and {index} records none of them (a new or re-created database, or"
                    " another mirror's bucket, or a `mirror migrate` into it stopped midway: run it again): point this"
                    " mirror at the database that holds their index; if it is lost, empty the bucket's blobs/ or"
                    " choose another storage.s3.rootdirectory (this index"
                    " would see every object as unreferenced, and the collector would delete them)")
        record_index(store, mine)
    elif recorded != mine:
        _forget_store(metadata)
        return (f"{where} holds the objects of another index (id {recorded}), not of {index} (id {mine}):"
                " point this mirror at the database that holds their index (after a `mirror migrate` of this store's"
                " index, the configuration it was moved to; this one would see every object as"
                " unreferenced, and the collector would delete them); if that index is lost (a database dropped and"
                " made again), empty the bucket's blobs/ and index-id under that prefix, or choose another"
                " storage.s3.rootdirectory")
    return None


def _forget_store(metadata: Metadata) -> None:
    """A refused start leaves a new database as it found it: free for the store the next start names."""
    if (forget := getattr(metadata, "forget_store", None)) is not None:
        forget()  # (PostgreSQL: the diskcache index is the data directory's, which records no store)


def _describe_store(store: Mapping[str, Any]) -> str:
    if store.get("driver") == "s3":
        return f"S3 bucket {store.get('bucket')!r} under {store.get('rootdirectory') or '/'!r}"
    return f"the data directory with id {store.get('id')} (seen at {store.get('path')})"


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0].strip()


def _unanswered(where: str, error: str, key: str) -> str:
    """One line from libpq's *error* (``connection failed: connection to server at ... failed:
    FATAL:  database "x" does not exist``, then hints on more lines): its reason, and what to check in *key*."""
    reason = (error.splitlines() or ["no answer"])[0].rpartition(" failed: ")[2].replace("FATAL:  ", "").strip()
    reason = reason.removeprefix("connection is bad: ")
    if reason.startswith("database ") and reason.endswith("does not exist"):
        check = f"create it, or correct the database name in {key}"
    elif any(word in reason for word in ("password", "authentication", "role ", "pg_hba.conf")):
        check = f"check the user and password in {key} and the server's pg_hba.conf"
    elif reason.startswith(("invalid ", "unrecognized ", "bad value for ")):  # an option refused before connecting
        check = f"correct that option in {key} (libpq's connection parameters)"
    else:
        check = f"check that PostgreSQL runs there and takes connections, and the host and port in {key}"
    return f"{where} cannot be used: {reason}: {check}"  # libpq's messages never quote the password


def bind_data_directory(config: MetadataConfig, binding: Path, storage: StorageConfig | None = None, *,
                        record: bool = True, index_id: str | None = None, migrating: bool = False) -> str | None:
    """Check that the data directory whose binding file is *binding* (``DATA/index.json``) is
    opened with the index that describes what it holds, and (unless *migrating*: ``mirror migrate``
    going on with it) is no target of a ``mirror migrate`` stopped midway (``DATA/migrating``), which
    holds part of a store; with *record*, record that index the first time.

    Returns why not, or None.  A store opened with another index (a restart that forgot
    ``metadata.driver: postgres``, or pointed at another database) would see every blob as
    unreferenced, and the collector would delete them all: it is refused instead.  The record
    names the driver and, for PostgreSQL, the server and database (never a password) and the
    index's id (``settings.index_id``), given as *index_id* once the index opened.

    A PostgreSQL index is known by its id, not by where it is: a database restored from a backup
    under another name, moved to another server, or named by another host spelling (``localhost``
    for ``127.0.0.1``) holds the same id and is taken (the record then names the new place); a
    database dropped and made again at the same place holds another id and is refused.  Before the
    index opened (*index_id* None), another place of a recorded id is left to the check after it.

    Callers check (``record=False``) before they open the index and record only once it opened (and
    an S3 store's bucket was bound to it, :func:`bind_bucket`): a first start refused on a typo in
    the DSN (no such database, a wrong host) must not bind the directory to an index that never
    opened, which would refuse every start after the typo is corrected.  *storage* (the data
    directory's) words the message: with S3, the directory holds only work in progress.
    """
    if not migrating and (unfinished := directory_problem(binding)) is not None:
        return unfinished
    wanted = _index_of(config)
    if isinstance(wanted, str):
        return wanted
    if index_id and wanted.get("driver") == "postgres":
        wanted = {**wanted, "index_id": index_id}
    try:
        recorded = json.loads(binding.read_text())
    except FileNotFoundError:
        if not record:
            return None
        try:
            recorded = _record(binding, wanted)
        except OSError as exc:
            return f"cannot record which index holds this store's metadata in {binding}: {exc.strerror or exc}"
    except (OSError, ValueError) as exc:
        return f"{binding}: unreadable ({exc}); it records which index holds this store's metadata"
    if not isinstance(recorded, dict):
        return f"{binding}: unreadable (not an object); it records which index holds this store's metadata"
    known = recorded.get("index_id")
    same_place = _place(recorded) == _place(wanted)
    if same_place and (not known or not index_id or known == index_id):
        if record and index_id and recorded != wanted:  # the id, first recorded now
            return _rewrite(binding, wanted)
        return None
    if known and recorded.get("driver") == wanted.get("driver") == "postgres":
        if index_id is None:  # asked before the index is opened (which would make its schema there)
            index_id = _peek_settings(config.postgres_dsn or "").get("index_id")
            if index_id is None or known == index_id:
                return None  # no answer (opening it says why), or the same index: taken once it opened
        if known == index_id:  # the same index, restored or moved: the record follows it
            return _rewrite(binding, wanted) if record else None
    if storage is not None and storage.driver == "s3":
        holds = (f"{binding.parent} holds the work in progress (uploads, temp files) of the store whose index is in"
                 f" {_describe(recorded)}")
        why = "that index records its uploads"
    else:
        holds = f"{binding.parent} holds the blobs of the index in {_describe(recorded)}"
        why = "another index would see every blob as unreferenced, and the collector would delete them"
    advice = f"start it with the same metadata settings ({why}), or move the store's index with `mirror migrate`"
    if not _holds_anything(Layout(binding.parent)):
        advice += f"; nothing was ever stored there: to start over with this index, remove {binding}"
    return f"{holds}, but this start uses {_describe(wanted)}: {advice}"


def peek_lineage(config: MetadataConfig, index: Path) -> tuple[str | None, str | None]:
    """``(index_id, copy_of)`` of the index *config* names (``Metadata.index_id``, ``copy_of``), read
    without changing anything (neither is made, nor a table); None for what it has not, or both when
    there is no index there.  :class:`CannotOpenIndex` (as opening it says) if its database does not answer."""
    if config.driver == "postgres":
        found = _peek_settings(config.postgres_dsn or "")
        if (error := found.get("error")) is not None and isinstance(wanted := _index_of(config), dict):
            key = dsn_key(config.postgres_dsn_file)
            raise CannotOpenIndex(_unanswered(_describe(wanted), error, key), transient=True)
        return found.get("index_id") or None, found.get("copy_of") or None
    if not (index / "cache.db").is_file():
        return None, None
    import diskcache

    with diskcache.Cache(str(index)) as cache:  # its own settings, as recorded
        return cache.get("index_id"), cache.get("copy-of")


def _peek_settings(dsn: str) -> dict[str, str | None]:
    """``{"index_id", "copy_of"}`` of the index in the database *dsn* names, read without changing
    anything: ``""`` for each when it holds no mirror's tables, None when it does not answer (and libpq's ``error``)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from .postgres import CONNECT_TIMEOUT

    if "connect_timeout" not in conninfo_to_dict(dsn):
        dsn = make_conninfo(dsn, connect_timeout=CONNECT_TIMEOUT)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT name, value FROM settings WHERE name IN ('index_id', 'copy_of')").fetchall()
    except psycopg.OperationalError as exc:
        return {"index_id": None, "copy_of": None, "error": str(exc)}
    except psycopg.Error:  # no settings table: not a mirror's index (yet)
        return {"index_id": "", "copy_of": ""}
    return {"index_id": "", "copy_of": "", **{str(name): str(value) for name, value in rows}}


def _place(index: Mapping[str, Any]) -> dict[str, Any]:
    """A binding record less the index's id: the driver and, for PostgreSQL, where the database is."""
    return {k: v for k, v in index.items() if k != "index_id"}


def _rewrite(binding: Path, wanted: dict[str, str]) -> str | None:
    """Record *wanted* in *binding* in place of what it recorded; why not, or None."""
    partial = binding.with_name(f".{binding.name}.{uuid.uuid4().hex}.partial")
    try:
        partial.write_text(json.dumps(wanted, sort_keys=True) + "\n")
        os.replace(partial, binding)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        return f"cannot record which index holds this store's metadata in {binding}: {exc.strerror or exc}"
    return None


def _record(binding: Path, wanted: dict[str, str]) -> Any:
    """Record *wanted* in *binding* unless another process recorded an index first; the index recorded."""
    binding.parent.mkdir(parents=True, exist_ok=True)
    partial = binding.with_name(f".{binding.name}.{uuid.uuid4().hex}.partial")
    partial.write_text(json.dumps(wanted, sort_keys=True) + "\n")
    try:
        os.link(partial, binding)
    except FileExistsError:  # another start recorded its index first: compared with this one's
        return json.loads(binding.read_text())
    finally:
        partial.unlink()
    return wanted


def _holds_anything(layout: Layout) -> bool:
    """Whether anything was ever stored in the data directory *layout*: a blob, an upload, or the
    diskcache index's files (a start that failed leaves its directories, empty)."""
    for directory in (layout.blobs, layout.uploads, layout.index):
        try:
            if any(path.is_file() for path in directory.rglob("*")):
                return True
        except OSError:
            return True  # cannot tell: say nothing of starting over
    return False


def rebind_data_directory(config: MetadataConfig, binding: Path, index_id: str | None = None) -> str | None:
    """Record that the index *config* names (whose id is *index_id*) now describes the data
    directory's blobs (after ``mirror migrate`` copied its metadata there), whatever index it
    recorded before; returns why not (an unreadable DSN), or None."""
    wanted = _index_of(config)
    if isinstance(wanted, str):
        return wanted
    binding.unlink(missing_ok=True)
    return bind_data_directory(config, binding, record=True, index_id=index_id)


def index_identity(config: MetadataConfig, index: Path) -> str:
    """What tells the index *config* names from any other: the resolved *index* directory for
    diskcache (``DATA/index/``), the server and database for PostgreSQL (never a password)."""
    wanted = _index_of(config)
    if isinstance(wanted, str) or config.driver != "postgres":
        return f"{config.driver} {index.resolve()}"
    return _describe(wanted)


def _index_of(config: MetadataConfig) -> dict[str, str] | str:
    """What identifies the configured index, or a message if its DSN cannot be read."""
    if config.driver != "postgres":
        return {"driver": config.driver}
    from psycopg import conninfo

    # Never named when it cannot be read: the host, port or database read so may hold pieces of the password.
    if (problem := dsn_problem(config.postgres_dsn or "")) is not None:
        return f"{dsn_key(config.postgres_dsn_file)}: {problem}"
    parts = conninfo.conninfo_to_dict(config.postgres_dsn or "")
    return {"driver": "postgres", "host": str(parts.get("host") or parts.get("hostaddr") or "localhost"),
            "port": str(parts.get("port") or "5432"), "database": str(parts.get("dbname") or parts.get("user") or "")}


def _describe(index: object) -> str:
    if not isinstance(index, dict):
        return repr(index)
    if index.get("driver") == "postgres":
        ident = f" (index id {index['index_id']})" if index.get("index_id") else ""
        return f"PostgreSQL database {index.get('database')!r} at {index.get('host')}:{index.get('port')}{ident}"
    return f"{index.get('driver')} (DATA/index/)"
