"""Whether other processes have an index open now (a server's workers, ``mirror gc``, a preload):
what ``mirror migrate`` asks before copying an index that must not change meanwhile.

Best effort, never a false alarm: an answer of "in use" always means a live process holds the
index; "not seen" may miss one (the README tells operators to stop the server).

* ``diskcache``: SQLite in WAL mode keeps, for as long as a connection is open, a shared POSIX
  lock on the "dead man switch" byte of the database's ``-shm`` file (byte 128, after the eight
  WAL lock slots at 120; SQLite's unix VFS, ``walformat.html``).  A lock dies with its process,
  so a stale one cannot exist.  Ask before this process opens the index itself: POSIX locks are
  per process, and closing any descriptor of the file would drop those SQLite holds.
* ``postgres``: every open instance keeps a listening connection named
  :data:`~mirror.metadata.pgschema.LISTENER` to its database (``pg_stat_activity``).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..config.sections import MetadataConfig

__all__ = ["in_use_elsewhere"]

#: The byte of a WAL database's ``-shm`` file every open connection holds a shared lock on.
DMS_BYTE = 128


def in_use_elsewhere(config: MetadataConfig, index: Path) -> str | None:
    """Who else has the index *config* names (diskcache: in *index*, ``DATA/index/``) open now, and
    that they are to be stopped (``...; stop it``, ``...; stop them``), or None when no one is seen (or
    it cannot be reached: opening it then says why)."""
    if config.driver == "postgres":
        assert config.postgres_dsn is not None  # checked by MetadataConfig
        return _postgres_listeners(config.postgres_dsn)
    import diskcache

    return _sqlite_connections(index / diskcache.core.DBNAME)


def _sqlite_connections(database: Path) -> str | None:
    try:
        fd = os.open(f"{database}-shm", os.O_RDWR)
    except OSError:
        return None  # no connection since the last one closed (it removes the file), or not a WAL database
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, DMS_BYTE)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return (f"another process has the index in {database.parent} open (a server, mirror gc or a preload);"
                    " stop it")
        return None
    finally:
        os.close(fd)  # drops the lock if it was taken
    return None


def _postgres_listeners(dsn: str) -> str | None:
    import psycopg

    from .pgschema import LISTENER

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                               " AND application_name = %s", (LISTENER,)).fetchone()
    except psycopg.Error:
        return None
    count = int(row[0]) if row else 0
    if count == 1:
        return "1 mirror process has the index in this database open; stop it"
    return f"{count} mirror processes have the index in this database open; stop them" if count else None
