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
* while the listener's last attempt to connect failed (a server stopped, refusing connections) and
  the pool has no connection at hand, a call does not wait ``POOL_WAIT`` for a connection that cannot
  come: it tries to connect once itself (refused again: it fails at once), one call at a time, the
  others failing at once meanwhile (after a server answered and refused, one call every
  :data:`TRY_EVERY` seconds, the others waiting for the pool as before);
* once the listener has a working connection again (:meth:`ServerWatch.answered`), calls go to
  the pool again, which is told to replace the connections it lost at once (``on_back``: its own
  retries back off for seconds).

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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .driver import MetadataUnavailable

__all__ = ["ServerWatch", "shut_down"]

log = logging.getLogger("mirror.metadata")
#: Seconds between two calls' own attempts to connect after a server refused one (it logs each).
TRY_EVERY = 0.2
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

    def __init__(self, where: str, connect: Callable[[], psycopg.Connection[Row]] | None = None) -> None:
        self._where = where
        self._connect = connect  # a connection of the pool's kind, made outside it
        self._trying = threading.Lock()  # held by the one call that connects while the listener was refused
        self._tried = 0.0  # when that call last tried (time.monotonic())
        self._lock = threading.Lock()
        self._in_use: dict[int, psycopg.Connection[Row]] = {}  # by id(): handed out, not given back yet
        self._silence: str | None = None  # why calls fail at once, while the server does not answer
        self._refused: str | None = None  # why the listener's last connection attempt failed, until one works
        #: Called (in the listener's thread) when the server answers again after it did not.
        self.on_back: Callable[[], object] | None = None

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
        not exist, the password was wrong...): until the listener connects again, a call the pool has no
        connection at hand for tries to connect itself rather than wait for the pool (:meth:`_connection`)."""
        self._refused = reason

    def reached(self) -> None:
        """The listener connected (whatever its session finds next): calls go to the pool again."""
        with self._lock:
            refused, self._refused = self._refused, None
        if refused is not None:
            self._back()

    def answered(self) -> None:
        """The server answers again (the listener connected and read): calls go to the pool again."""
        with self._lock:
            back = self._silence is not None or self._refused is not None
            self._silence = self._refused = None
        if back:
            self._back()
            log.info("%s answers again", self._where)

    def _back(self) -> None:
        if self.on_back is not None:
            try:
                self.on_back()
            except Exception:  # noqa: BLE001 (the pool then reconnects on its own schedule)
                log.debug("%s: the pool's check after the server came back failed", self._where, exc_info=True)

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
    def _connection(self, pool: ConnectionPool[psycopg.Connection[Row]]) -> Iterator[psycopg.Connection[Row]]:
        """A connection for one call: the pool's; or, while the listener's last attempt to connect was
        refused and the pool has none at hand, one this call makes itself (closed after it), so that the
        first call after the server is back need not wait for the listener's next attempt nor for the
        pool's backed-off retry.  One call at a time tries; the others fail at once meanwhile, as does
        the call whose attempt is refused too (``OperationalError``).  After an attempt a server answered
        and refused (a password, a database that does not exist: the server logs each), calls try at
        most one every :data:`TRY_EVERY` seconds, and wait for the pool in between, as before."""
        if (self._refused is None or self._connect is None or time.monotonic() - self._tried < TRY_EVERY
                or pool.get_stats().get("pool_available")):
            with pool.connection() as conn:
                yield conn
            return
        if not self._trying.acquire(blocking=False):
            raise psycopg.OperationalError(self._refused)
        try:
            conn = self._connect()
        except psycopg.OperationalError as exc:
            if "FATAL:" in str(exc):  # the server's own refusal (libpq's words for one)
                self._tried = time.monotonic()
            raise
        finally:
            self._trying.release()
        with conn:
            with self._lock:
                self._in_use[id(conn)] = conn  # silent() can end its query
            self.reached()  # the server takes connections again: the pool connects at once
            yield conn

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
            with self._connection(pool) as conn:
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
