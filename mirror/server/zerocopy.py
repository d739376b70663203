"""Zero-copy blob bodies: ASGI's ``http.response.zerocopysend`` extension, for uvicorn's httptools protocol.

uvicorn has no such extension, so :func:`offer` adds it to a plain-HTTP request cycle: the app
sends ``{"type": "http.response.zerocopysend", "file": fd, "offset": o, "count": n,
"more_body": False}`` after its ``http.response.start`` (with a ``Content-Length``), and the
kernel copies the bytes from the page cache to the socket with ``sendfile(2)``: no read into
Python, no write from it (``tests/bench/pull_bench.py``: a quarter to a half less CPU per
gigabyte than reading and writing 256 KiB chunks, close to nginx's).

The copy runs in a worker thread on a duplicate of the socket's descriptor, so a disk read
never stalls the event loop, and the event loop closing the connection meanwhile can never
hand the number to another file.  The cycle's own bookkeeping (``Content-Length``, keep-alive,
completion) still goes through uvicorn: the body is followed by an empty ``http.response.body``.
A client that goes away or stops reading for ``timeout`` ends the connection quietly.

A second message, ``{"type": "mirror.response.abort"}`` (offered with TLS too), ends a response
whose headers are gone but whose body cannot be finished (a fetch that failed verification): the
connection is closed, and uvicorn is told the client went away rather than left to log an
unfinished response as an error.

The headers of an answer whose ``Content-Length`` is at most :data:`JOIN_BYTES` (a manifest, an
error) wait for its first body message and go out with it in one write: on loopback a write costs
the receiver's TCP processing too, and two of them were a quarter of a memoized manifest answer's
time (``tests/bench/README.md``).

With TLS the bytes must pass through the TLS layer: the extension is not offered, and apps
fall back to ordinary body messages (:func:`read_chunks`).  When every sending thread is busy,
the bytes are read and sent as ordinary body messages instead, so a crowd of stalled clients
cannot hold up everyone else's transfers.  Ordinary body messages get the same deadline: a
client whose buffers stay full for ``timeout`` is disconnected (uvicorn alone waits for ever).
"""

from __future__ import annotations

import asyncio
import os
import select
from typing import Any

import anyio
import anyio.to_thread
from starlette.types import Message, Send

from ..api.extensions import ABORT, EXTENSION
from ..storage.reads import ShortFile, read_chunks

#: A response whose Content-Length is at most this goes out in one write with its headers.
JOIN_BYTES = 64 << 10
#: Transfers in progress per process; beyond this, responses use ordinary body messages.
MAX_SENDERS = 64


class Senders:
    """The sending threads of one server: at most ``limit`` transfers at a time, claimed without waiting."""

    def __init__(self, limit: int = MAX_SENDERS) -> None:
        self.limit = limit
        self.busy = 0
        # Never waited on: a transfer claims its place (busy) before it asks for a thread.
        self.threads = anyio.CapacityLimiter(limit)

    def claim(self) -> bool:
        if self.busy >= self.limit:
            return False
        self.busy += 1
        return True

    def release(self) -> None:
        self.busy -= 1


class ZeroCopySend:
    """A request cycle's ``send``, taking ``http.response.zerocopysend`` and ``mirror.response.abort``
    too, and cutting off a client that reads nothing of a body for ``timeout`` (uvicorn would wait
    for it for ever).

    When a zero-copy send returns, the message's ``"sent"`` says how many bytes went out: all of
    ``count``, or fewer when the client went away or stalled (the connection is then closed); and
    ``"sendfile"`` how many of them ``sendfile(2)`` sent (0 when they were read and written).
    """

    def __init__(self, cycle: Any, send: Send, timeout: float, senders: Senders) -> None:
        self.cycle = cycle
        self.send = send
        self.timeout = timeout
        self.senders = senders
        self._start: Message | None = None  # a response's headers, held for its first body message

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._start = None  # one held and never sent (its app failed before a body) is replaced
            if _small(message):
                self._start = message  # sent with what follows: a small answer goes out in one write
                return
        if self._start is not None:
            start, self._start = self._start, None
            if kind == "http.response.body" and not self.cycle.flow.write_paused:
                await self._joined(start, message)
                return
            await self.send(start)
        if kind == EXTENSION:
            await self._zero_copy(message)
        elif kind == ABORT:
            if not self.cycle.disconnected:
                self._abandon()
        elif kind == "http.response.body" and self.cycle.flow.write_paused and not self.cycle.disconnected:
            try:  # the client's buffers are full: it has this long to make room
                await asyncio.wait_for(self.send(message), self.timeout)
            except TimeoutError:
                self._abandon()
        else:
            await self.send(message)

    async def _joined(self, start: Message, body: Message) -> None:
        """uvicorn's writes of the headers and of the first body message, as one write (one system
        call and one packet: a tenth of a memoized manifest answer's time on this project's VM)."""
        cycle = self.cycle
        transport = cycle.transport
        joined = _JoinedWrites(transport)
        cycle.transport = joined
        try:
            await self.send(start)
            await self.send(body)
        finally:
            cycle.transport = transport
            joined.flush()

    async def _zero_copy(self, message: Message) -> None:
        cycle = self.cycle
        message["sent"] = message["sendfile"] = 0
        if cycle.disconnected:
            return
        if not cycle.response_started or cycle.response_complete or cycle.chunked_encoding:
            raise RuntimeError(f"{EXTENSION} needs a started response with a Content-Length")
        count = int(message["count"])
        if count > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        if count and cycle.scope["method"] != "HEAD":
            source = message["file"]
            file_fd = source if isinstance(source, int) else source.fileno()
            offset = int(message.get("offset", 0))
            if self.senders.claim():
                try:
                    sent = message["sendfile"] = await self._send_file(file_fd, offset, count)
                finally:
                    self.senders.release()
            else:
                sent = await self._send_read(file_fd, offset, count)
            message["sent"] = sent
            if sent < count:
                if not cycle.disconnected:
                    self._abandon()
                return
        await self.send({"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)})

    async def _send_file(self, file_fd: int, offset: int, count: int) -> int:
        transport = self.cycle.transport
        while transport.get_write_buffer_size() and not transport.is_closing():
            await anyio.sleep(0.001)  # what uvicorn already wrote (the headers) goes first
        try:
            socket_fd = os.dup(transport.get_extra_info("socket").fileno())
        except (AttributeError, OSError):
            return 0
        try:
            # What the socket takes at once goes from here: a thread hop (which waits for the GIL while
            # a fill hashes) only for the rest.  A fill's reader so sends its first bytes at once.
            sent = send_now(socket_fd, file_fd, offset, min(count, INLINE_BYTES))
            if 0 <= sent < count:
                sent += await anyio.to_thread.run_sync(send_file, socket_fd, file_fd, offset + sent, count - sent,
                                                       self.timeout, limiter=self.senders.threads)
            sent = max(sent, 0)
        finally:
            os.close(socket_fd)
        self.cycle.expected_content_length -= sent
        return sent

    async def _send_read(self, file_fd: int, offset: int, count: int) -> int:
        """The same bytes as ordinary body messages (every sending thread is busy)."""
        sent = 0
        try:
            async for data in read_chunks(file_fd, offset, count):
                await self({"type": "http.response.body", "body": data, "more_body": True})
                if self.cycle.disconnected:
                    break
                sent += len(data)
        except ShortFile:
            pass
        return sent

    def _abandon(self) -> None:
        """End the connection: part of the body is gone, and nothing else can be said on it."""
        self.cycle.transport.close()
        self.cycle.disconnected = True  # later sends are dropped, as after the client hung up


def _small(start: Message) -> bool:
    """Whether a response's headers announce a body of :data:`JOIN_BYTES` at most (one known to come
    at once: a longer one, or one of unknown length, may start later, and its headers go first)."""
    for name, value in start.get("headers", ()):
        if name.lower() == b"content-length":
            return value.isdigit() and int(value) <= JOIN_BYTES
    return False


class _JoinedWrites:
    """A transport whose writes are kept until :meth:`flush` (or a close) and then written as one;
    anything else is the transport's own."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data, self._pending = b"".join(self._pending), []
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


#: Bytes a span may send from the event loop, as far as the socket takes them without waiting.
INLINE_BYTES = 1 << 20


def send_now(socket_fd: int, file_fd: int, offset: int, count: int) -> int:
    """How many of *count* bytes of *file_fd* from *offset* a non-blocking socket takes at once
    (0: none now), or -1 if the client is gone (``EPIPE``, ``ECONNRESET``)."""
    try:
        return os.sendfile(socket_fd, file_fd, offset, count)
    except BlockingIOError:
        return 0
    except OSError:
        return -1


def send_file(socket_fd: int, file_fd: int, offset: int, count: int, timeout: float) -> int:
    """Copy up to *count* bytes of *file_fd* from *offset* to a non-blocking socket; how many went.

    Fewer when the client goes away, reads nothing for *timeout*, or the file is shorter.
    Blocking: run it in a thread.
    """
    poller = select.poll()
    poller.register(socket_fd, select.POLLOUT)
    sent = 0
    while sent < count:
        try:
            done = os.sendfile(socket_fd, file_fd, offset + sent, count - sent)
        except BlockingIOError:
            if not poller.poll(timeout * 1000):
                break
            continue
        except OSError:  # EPIPE, ECONNRESET: the client is gone
            break
        if done == 0:
            break
        sent += done
    return sent


def offer(cycle: Any, server_state: Any, timeout: float, *, zero_copy: bool) -> None:
    """Give a new uvicorn request cycle the abort message, and the zero-copy extension unless
    *zero_copy* is false (TLS); call it before the cycle's ASGI task has started."""
    senders = getattr(server_state, "zerocopy_senders", None)
    if senders is None:  # one per server (process), made on its event loop
        senders = server_state.zerocopy_senders = Senders()
    extensions = cycle.scope.setdefault("extensions", {})
    extensions[ABORT] = {}
    if zero_copy:
        extensions[EXTENSION] = {}
    cycle.send = ZeroCopySend(cycle, cycle.send, timeout, senders)


