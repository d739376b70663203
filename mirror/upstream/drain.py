"""A large blob body drained from its connection by a thread of its own, straight into a fill.

Read on the event loop (``rawbody.py``), a cold fill of a large layer kept one core busy with the
loop's turn per socket read (uvloop hands over at most 256 KiB at a time), the batching of reads and
a thread hop per batch, while the clients following the fill waited for that same loop
(``tests/bench/README.md``).  :class:`Drain` hands the body over to one thread instead: it receives
into one reused buffer with ``recv_into`` and passes each read to the fill's writer (which writes it,
and hashes it, or past the first bytes has another thread hash it: ``storage/filehash.py``; ``recv``,
``write`` and ``hashlib`` all let go of the GIL), so the loop only wakes the
fill's readers, once per batch of reads that landed while it was busy.

How the connection is taken over, with nothing awaited in between (so no byte can be read by both):
the bytes h11 already holds past the headers are taken (one item of ``aiter_raw()``), the
connection's transport stops reading, and what it had already read (anyio's queue of received
chunks) is taken too and written at once, from the loop (the fill's readers get their first bytes
without waiting for the thread to start and take the GIL); the thread then reads a duplicate of the
socket's descriptor.  Those are private parts of anyio's asyncio backend (``SocketStream._transport``
and ``._protocol.read_queue``; pyproject bounds anyio): :func:`drainable` checks for them and returns
None when they are missing, or the connection is TLS (its bytes are decrypted on the loop), and the
body is then read by ``rawbody.py``.  As there, the body is read only when it is announced by
``Content-Length`` and at least :data:`~mirror.upstream.rawbody.RAW_AT_LEAST` bytes long, the
connection is not reused, and errors are httpx's: a read timing out (the client's read timeout,
per read) is :class:`httpx.ReadTimeout`, a reset :class:`httpx.ReadError`, a body ending early
:class:`httpx.RemoteProtocolError` (RFC 9112 section 6.3).

Imports ``rawbody`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

import httpx

from .rawbody import incomplete, raw_length

__all__ = ["Drain", "drainable"]

#: Bytes asked of the socket per read (the size of the drain's one buffer).
RECV_BYTES = 1 << 20
#: Event-loop turns the readers of the first bytes get before the thread goes on: the readers woken
#: by them run in the next turn, and a request that started the fill (woken through a shielded
#: future) in the one after; one more for good measure.
READERS_TURNS = 3
#: Seconds per wait for bytes when the client has no read timeout (the wait then starts again).
_NO_TIMEOUT_WAIT = 60.0


def drainable(response: httpx.Response, count: Callable[[int], None] | None = None) -> Drain | None:
    """A :class:`Drain` of *response*'s body, or None when it is read otherwise (too short or of
    unknown length, coded, chunked, not HTTP/1.1, TLS, or anyio's asyncio stream not as expected).
    *count* is told the bytes received, on the event loop, in batches."""
    size = raw_length(response)
    network = response.extensions.get("network_stream")
    inner = getattr(network, "_stream", None)  # httpcore's AnyIOStream wraps anyio's stream
    transport: Any = getattr(inner, "_transport", None)
    protocol: Any = getattr(inner, "_protocol", None)
    if (size is None or not isinstance(getattr(protocol, "read_queue", None), deque)
            or not callable(getattr(transport, "pause_reading", None))
            or transport.get_extra_info("sslcontext") is not None):
        return None
    raw = transport.get_extra_info("socket")
    if raw is None or not callable(getattr(raw, "fileno", None)):
        return None
    timeouts = response.request.extensions.get("timeout") or {}
    return Drain(response, transport, protocol, raw.fileno(), size, timeouts.get("read"), count)


class Drain:
    """*size* bytes of a body, received by a thread of its own and passed to a writer (:meth:`into`)."""

    def __init__(self, response: httpx.Response, transport: Any, protocol: Any, fd: int, size: int,
                 timeout: float | None, count: Callable[[int], None] | None) -> None:
        self.response, self.size = response, size
        self._transport, self._protocol, self._fd = transport, protocol, fd
        self._timeout, self._count = timeout, count
        self._stopping = False
        self.received = 0  # bytes passed to the writer so far (by the thread once it runs)

    async def into(self, write: Callable[[memoryview], None], wrote: Callable[[], None]) -> None:
        """Receive the whole body and pass it to *write*, in order, from the drain's thread (*write*
        must not keep the view: its buffer is read into again); what was read before this call (a
        few KiB, usually) is passed from the event loop, at once, before the thread starts.  *wrote*
        is called on the event loop after bytes were written (at most one call pending at a time:
        reads that land meanwhile share it) and once at the end.  What *write* raises, or the
        receiving (httpx's errors), is raised here; if the caller is cancelled, the thread stops
        after its current read and the cancellation is raised once it did (the writer is never used
        after this returns)."""
        loop = asyncio.get_running_loop()
        head = cast(AsyncGenerator[bytes, None], self.response.aiter_raw())
        try:
            taken: list[bytes] = []
            async for first in head:  # what h11 holds past the headers, or one read of the socket
                taken.append(first)
                break
            # Nothing is awaited from here until the thread runs: the loop reads this socket no more.
            self._transport.pause_reading()
            taken += self._protocol.read_queue
            self._protocol.read_queue.clear()
            # What was read already is written here: the readers get the first bytes without waiting
            # for the thread to start and then for the event loop to let go of the GIL (up to 5 ms).
            for piece in taken:
                if piece := piece[:self.size - self.received]:
                    write(memoryview(piece))
                    self.received += len(piece)
            sock = socket.socket(fileno=os.dup(self._fd))
            done: asyncio.Future[None] = loop.create_future()
            pending = False
            reported = 0

            def wake() -> None:
                nonlocal pending, reported
                pending = False
                if self._count is not None and self.received > reported:
                    self._count(self.received - reported)
                    reported = self.received
                wrote()

            def progressed() -> None:
                nonlocal pending
                if not pending:
                    pending = True
                    loop.call_soon_threadsafe(wake)

            def run() -> None:
                try:
                    self._receive(sock, write, progressed)
                except BaseException as exc:  # noqa: BLE001 (raised on the event loop)
                    _settle(loop, done, exc)
                else:
                    _settle(loop, done, None)
                finally:
                    sock.close()

            # The readers woken by the bytes written above send them in the loop's next turns; the
            # thread starts once they did, so that the first thing each client gets waits neither for
            # the thread's start (the loop waits until a new thread runs) nor for its work (it takes
            # the GIL between its system calls).  It starts even if this is cancelled meanwhile: it
            # then stops at once (``_stopping``) and settles ``done``.
            thread = threading.Thread(target=run, name="upstream-drain", daemon=True)
            if self.received:
                wake()
                _after_turns(loop, READERS_TURNS, thread.start)
            else:
                thread.start()
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                self._stopping = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # a read waiting for bytes returns at once
                with contextlib.suppress(BaseException):
                    await done
                raise
            finally:
                wake()
        finally:
            await head.aclose()

    def _receive(self, sock: socket.socket, write: Callable[[memoryview], None],
                 progressed: Callable[[], None]) -> None:
        size, request = self.size, self.response.request
        if self._stopping:
            raise httpx.ReadError(os.strerror(errno.ECANCELED), request=request)
        sock.settimeout(self._timeout if self._timeout is not None else _NO_TIMEOUT_WAIT)
        buffer = memoryview(bytearray(min(RECV_BYTES, max(size - self.received, 1))))
        while self.received < size:
            try:
                got = sock.recv_into(buffer, min(len(buffer), size - self.received))
            except TimeoutError as exc:
                if self._timeout is None and not self._stopping:
                    continue
                raise httpx.ReadTimeout("timed out", request=request) from exc
            except OSError as exc:
                raise httpx.ReadError(os.strerror(exc.errno) if exc.errno else str(exc), request=request) from exc
            if self._stopping:
                raise httpx.ReadError(os.strerror(errno.ECANCELED), request=request)
            if not got:
                raise incomplete(request, self.received, size)
            write(buffer[:got])
            self.received += got
            progressed()


def _after_turns(loop: asyncio.AbstractEventLoop, turns: int, then: Callable[[], None]) -> None:
    """Call *then* on *loop* once it ran *turns* more turns (each runs what the one before made ready)."""
    if turns <= 0:
        then()
    else:
        loop.call_soon(_after_turns, loop, turns - 1, then)


def _settle(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None], exc: BaseException | None) -> None:
    """Hand the thread's outcome to the event loop (gone at shutdown: nobody waits then)."""

    def settle() -> None:
        if not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)
