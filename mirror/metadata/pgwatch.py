"""Whether the ``postgres`` driver's server answers, and the pooled connections in use: so that no
call waits long on a server that hangs.

A server that hangs (its processes stopped, or behind a network that drops packets without a reset)
ends no read with an error: its kernel may even go on acknowledging what is sent, so TCP's own
timeouts do not fire either.  A query in flight would block its worker thread until TCP gives up
(many minutes), and the calls after it would queue for pool connections or block too.  The
listener's heartbeat (:class:`~mirror.metadata.pgschema.NotifiedGeneration`) finds such a server
within ``HEARTBEAT + HEARTBEAT_WAIT`` seconds; :class:`ServerWatch` acts on what it finds:

* each connection the pool hands out is registered as in use (the pool's ``check``, which runs
  before it is handed out) until the call gives it back;
* when the server is taken for silent (:meth:`ServerWatch.silent`), the socket of each connection
  in use is shut down, as the listener's own is: the read blocked on it ends at once with an
  error, libpq marks the connection bad, and the pool discards it rather than hand it out again;
* while silent, a call fails at once, without waiting for a pool connection or connecting;
* once the listener has a working connection again (:meth:`ServerWatch.answered`), calls go to
  the pool again, which replaces the connections it discarded.

Every such failure is :class:`~mirror.metadata.driver.MetadataUnavailable` naming the database
(``503 UNAVAILABLE`` at the HTTP edge).  A change whose connection is shut down while its commit is
on the way may still be applied when the server goes on, as with any connection lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .driver import MetadataUnavailable

__all__ = ["ServerWatch", "shut_down"]

log = logging.getLogger("mirror.metadata")
Row = tuple[Any, ...]


def shut_down(fd: int) -> None:
    """Shut down the socket *fd* both ways (a read blocked on it, in any thread, ends at once);
    the descriptor stays open: its owner closes it."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class ServerWatch:
    """The server's state as the listener last found it, and the pooled connections in use.

    *where* names the database in messages (``pgschema.describe``).  Thread-safe: the pool's
    clients register and release connections while the listener's threads report."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._lock = threading.Lock()
        self._in_use: dict[int, psycopg.Connection[Row]] = {}  # by id(): handed out, not given back yet
        self._silence: str | None = None  # why calls fail at once, while the server does not answer
        self._refused: str | None = None  # why the listener's last connection attempt failed, until one works

    @property
    def silence(self) -> str | None:
        """Why the server is taken for silent (``"not answering (...)"``), or None while it answers."""
        return self._silence

    def silent(self, reason: str) -> None:
        """The server did not answer (*reason*, as messages give it after the database): end the
        queries in flight by shutting down their sockets, and fail new calls until :meth:`answered`."""
        with self._lock:
            first = self._silence is None
            self._silence = reason
            for conn in self._in_use.values():
                with contextlib.suppress(psycopg.Error):
                    shut_down(conn.pgconn.socket)  # raises if libpq already dropped it (no descriptor to reuse)
            ended = len(self._in_use)
        if first:
            log.warning("%s: %s: %d queries in flight ended", self._where, reason, ended)

    def refused(self, reason: str) -> None:
        """The listener's attempt to connect failed (libpq's *reason*: the server refused, the database does
        not exist, the password was wrong...): said with a call that waited in vain for a pool connection."""
        self._refused = reason

    def answered(self) -> None:
        """The server answers again (the listener connected and read): calls go to the pool again."""
        with self._lock:
            back, self._silence, self._refused = self._silence is not None, None, None
        if back:
            log.info("%s answers again", self._where)

    def check(self, conn: psycopg.Connection[Row]) -> None:
        """The pool's ``check`` of *conn* before it is handed out: refused while silent; otherwise
        registered as in use (so :meth:`silent` can end its queries, this check's first), then checked
        with a round trip (a connection that does not work is discarded by the pool)."""
        with self._lock:
            if self._silence is not None:
                raise psycopg.OperationalError(self._silence)
            self._in_use[id(conn)] = conn
        try:
            ConnectionPool.check_connection(conn)
        except BaseException:
            self._release(conn)
            raise

    def _release(self, conn: psycopg.Connection[Row]) -> None:
        with self._lock:
            self._in_use.pop(id(conn), None)

    @contextmanager
    def cursor(self, pool: ConnectionPool[psycopg.Connection[Row]], *,
               transaction: bool = False) -> Iterator[psycopg.Cursor[Row]]:
        """A cursor of a connection from *pool* (checked by :meth:`check`), in a transaction if
        *transaction*; ``OperationalError`` (a lost connection, ``PoolTimeout``), any call while
        silent, and a query of a table that is gone (the database dropped and made again under the running
        mirror), as ``MetadataUnavailable`` naming the database."""
        try:
            if self._silence is not None:
                raise psycopg.OperationalError(self._silence)
            with pool.connection() as conn:
                try:
                    if transaction:
                        with conn.transaction(), conn.cursor() as cur:
                            yield cur
                    else:
                        with conn.cursor() as cur:
                            yield cur
                finally:
                    self._release(conn)
        except psycopg.OperationalError as exc:
            # Ended by silent(): say why, not libpq's "server closed the connection unexpectedly".
            reason = self._silence or str(exc).partition("\n")[0]  # libpq's hints follow on further lines
            if isinstance(exc, PoolTimeout) and self._refused is not None:
                reason = f"{reason}; the last attempt to connect: {self._refused}"
            raise MetadataUnavailable(f"metadata database unavailable: {self._where}: {reason}") from exc
        except psycopg.errors.UndefinedTable as exc:
            reason = str(exc).partition("\n")[0]
            raise MetadataUnavailable(f"metadata database unavailable: {self._where}: {reason} (the database was "
                                      "dropped or made again while the mirror ran: restart it)") from exc
