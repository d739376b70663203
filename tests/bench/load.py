"""Load generators: a lean blob downloader and a wrapper around ``wrk``.

The downloader speaks just enough HTTP/1.1 for a keep-alive ``GET`` with a
``Content-Length`` body and discards the body with ``recv_into`` into one
reused buffer, so the client costs little more than the kernel's copy.  It
runs one thread per client: ``recv_into`` releases the GIL, and a GIL switch
per megabyte is cheap.  nginx on the same machine shows how fast the client
lets any server go.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

RECV_BYTES = 4 << 20
HEAD_LIMIT = 64 << 10
SOCKET_TIMEOUT = 120.0


class BlobClient:
    """One keep-alive connection that GETs paths and throws the bodies away."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        assert parts.hostname is not None and parts.port is not None, base_url
        self._host = f"{parts.hostname}:{parts.port}"
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout=SOCKET_TIMEOUT)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._view = memoryview(bytearray(RECV_BYTES))
        #: ``perf_counter()`` when the last :meth:`get` received its first body byte.
        self.first_byte = 0.0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._sock.close()

    def get(self, path: str) -> int:
        """GET *path*, expect 200 with a ``Content-Length``; return the body's size."""
        self._sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self._host}\r\nAccept: */*\r\n\r\n".encode())
        head, early = self._read_head()
        length = _content_length(head, path)
        remaining = length - early
        if early == 0 and remaining > 0:
            count = self._sock.recv_into(self._view, min(remaining, RECV_BYTES))
            if count == 0:
                raise ConnectionError(f"GET {path}: connection closed before the body")
            remaining -= count
        self.first_byte = time.perf_counter()
        while remaining > 0:
            count = self._sock.recv_into(self._view, min(remaining, RECV_BYTES))
            if count == 0:
                raise ConnectionError(f"GET {path}: connection closed {remaining} bytes before the end")
            remaining -= count
        return length

    def _read_head(self) -> tuple[bytes, int]:
        """The status line and headers, and how many body bytes came with them."""
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > HEAD_LIMIT:
                raise ConnectionError("response head too large")
            more = self._sock.recv(HEAD_LIMIT)
            if not more:
                raise ConnectionError("connection closed before the response head")
            data += more
        return data[:end], len(data) - end - 4


def _content_length(head: bytes, path: str) -> int:
    """The ``Content-Length`` of a 200 answer; anything else is an error."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    if status != 200:
        raise RuntimeError(f"GET {path}: status {status}")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value)
    raise RuntimeError(f"GET {path}: no Content-Length")


@dataclass(frozen=True)
class Downloads:
    """What a round of concurrent downloads moved, how long it took, and the client's CPU time."""

    clients: int
    bytes: int
    seconds: float
    client_cpu: float
    #: Seconds from the start until the slowest client's first body byte (of its first GET).
    first_byte: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9


def download(base_url: str, path: str, clients: int, repeats: int) -> Downloads:
    """*clients* connections each GET *path* *repeats* times, all starting together.

    The clock runs from the moment every client is connected until the last one is done.
    """
    totals = [0] * clients
    first_bytes = [0.0] * clients
    errors: list[BaseException] = []
    started: list[float] = []
    barrier = threading.Barrier(clients, action=lambda: started.append(time.perf_counter()))

    def run(slot: int) -> None:
        try:
            with BlobClient(base_url) as client:
                barrier.wait()
                for repeat in range(repeats):
                    totals[slot] += client.get(path)
                    if repeat == 0:
                        first_bytes[slot] = client.first_byte
        except (OSError, RuntimeError, ValueError) as exc:  # handed to the caller below
            errors.append(exc)
            barrier.abort()

    cpu_before = _own_cpu()
    threads = [threading.Thread(target=run, args=(slot,), daemon=True) for slot in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    finished = time.perf_counter()
    cpu = _own_cpu() - cpu_before
    if errors:
        cause = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        raise RuntimeError(f"a client failed on {base_url}{path}: {cause!r}") from cause
    return Downloads(clients, sum(totals), finished - started[0], cpu, max(first_bytes) - started[0])


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


@dataclass(frozen=True)
class WrkResult:
    """Requests per second and the answers that were not 2xx/3xx or failed at the socket."""

    rps: float
    bad: int


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def wrk(url: str, *, accept: str, seconds: int = 5, threads: int = 2, connections: int = 32) -> WrkResult:
    """Run ``wrk`` against *url* with an ``Accept`` header and parse its summary."""
    result = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-H", f"Accept: {accept}", url],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    )
    found = _RPS.search(result.stdout)
    if found is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{result.stdout}{result.stderr}")
    bad = 0
    if (non_2xx := _NON_2XX.search(result.stdout)) is not None:
        bad += int(non_2xx.group(1))
    if (socket_errors := _SOCKET_ERRORS.search(result.stdout)) is not None:
        bad += sum(int(count) for count in socket_errors.groups())
    return WrkResult(float(found.group(1)), bad)
