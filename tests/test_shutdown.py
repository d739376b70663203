"""SIGTERM: transfers under way may finish for ``http.draintimeout`` (distribution's key), then are
cut off, and the process ends by itself before an orchestrator's grace period runs out.  New
connections are refused from the signal on.  Real mirror processes (one worker and two), a pushed
blob, clients on raw sockets that read at their own pace."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.client import push_blob
from tests.support.mirror import MirrorServer

MIB = 1 << 20
BLOB_SIZE = 32 * MIB
DRAIN_S = 2.0


def _blob(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "blob"
    data = os.urandom(BLOB_SIZE)
    path.write_bytes(data)
    return path, f"sha256:{hashlib.sha256(data).hexdigest()}"


def _get(mirror: MirrorServer, digest: str) -> socket.socket:
    """A blob GET on a raw socket, its small receive buffer read by the caller (or not at all)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", mirror.port))
    sock.sendall(f"GET /v2/team/app/blobs/{digest} HTTP/1.1\r\nHost: {mirror.address}\r\n\r\n".encode())
    return sock


def _read_all(sock: socket.socket, pause_s: float) -> bytes:
    """Everything until the server closes, 1 MiB at a time with *pause_s* between reads."""
    got = bytearray()
    since_pause = 0
    while piece := sock.recv(MIB):
        got += piece
        since_pause += len(piece)
        if since_pause >= MIB:
            time.sleep(pause_s)
            since_pause = 0
    return bytes(got)


def _body(response: bytes) -> bytes:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return body


def _refused(mirror: MirrorServer) -> bool:
    """Whether a new connection is refused (or closed unanswered) at once: False when it is answered,
    or left hanging (taken by the kernel's backlog for a socket no process accepts on any more)."""
    try:
        with socket.create_connection(("127.0.0.1", mirror.port), timeout=0.5) as late:
            late.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {mirror.address}\r\n\r\n".encode())
            late.settimeout(0.5)
            return not late.recv(1024)
    except TimeoutError:
        return False
    except OSError:  # refused, or reset
        return True


def _serving(tmp_path: Path, mirror_factory: Callable[..., MirrorServer], workers: int,
             drain: float = DRAIN_S) -> tuple[MirrorServer, str]:
    mirror = mirror_factory(workers=workers, env={"MIRROR_HTTP_DRAINTIMEOUT": f"{drain:g}s",
                                                  "MIRROR_HTTP_IDLE_TIMEOUT": "60s"})
    path, digest = _blob(tmp_path)
    with httpx.Client(timeout=30) as client:
        assert push_blob(client, mirror.url, "team/app", digest, path)
    return mirror, digest


def _exited_within(mirror: MirrorServer, seconds: float) -> float:
    pid = mirror.pid
    assert pid is not None
    began = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    while mirror.running and time.monotonic() - began < seconds:
        time.sleep(0.05)
    took = time.monotonic() - began
    assert not mirror.running, (f"still running {took:.1f} s after SIGTERM (http.draintimeout {DRAIN_S:g}s)\n"
                                f"{mirror.log_tail()}")
    return took


@pytest.mark.parametrize("workers", [1, 2])
def test_a_client_that_stops_reading_holds_a_sigterm_for_the_drain_timeout_only(
    tmp_path: Path, mirror_factory: Callable[..., MirrorServer], workers: int,
) -> None:
    """A client that stopped reading a blob (its connection open, 60 s from its idle cut-off) does
    not keep the process alive past ``http.draintimeout``: it is cut off, and the process ends."""
    mirror, digest = _serving(tmp_path, mirror_factory, workers)
    stalled = _get(mirror, digest)
    try:
        assert stalled.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.5)  # the server's send buffer is full by now: it waits for the client
        took = _exited_within(mirror, DRAIN_S + 8)
        assert took >= DRAIN_S - 0.5, f"ended {took:.1f} s after SIGTERM, before the drain timeout"
        stalled.settimeout(5)
        received = 0
        while piece := stalled.recv(MIB):  # what was in flight, then the cut: never the whole blob
            received += len(piece)
        assert received < BLOB_SIZE
    finally:
        stalled.close()
    log = mirror.log_path.read_text()
    assert "cut off, http.draintimeout over" in log and "Traceback" not in log, log[-3000:]


def test_an_upload_cut_off_at_the_end_of_the_drain_is_answered_503_to_retry(
    tmp_path: Path, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A ``PATCH`` whose client had sent part of its body when SIGTERM came, and nothing more by the end
    of the drain: ``503 UNAVAILABLE`` with ``Retry-After`` (before: ``500`` and a traceback)."""
    mirror, _ = _serving(tmp_path, mirror_factory, 1)
    with httpx.Client(timeout=30) as client:
        location = client.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["location"]
    with socket.create_connection(("127.0.0.1", mirror.port)) as patching:
        patching.sendall(f"PATCH {location} HTTP/1.1\r\nHost: {mirror.address}\r\nContent-Length: {MIB}\r\n"
                         "Content-Type: application/octet-stream\r\n\r\n".encode() + b"x" * 4096)
        time.sleep(0.3)
        _exited_within(mirror, DRAIN_S + 8)
        patching.settimeout(5)
        answer = patching.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b"retry-after: 5" in answer.lower() and b'"UNAVAILABLE"' in answer, answer
    log = mirror.log_path.read_text()
    assert "PATCH /v2/team/app/blobs/uploads/" in log and "cut off" in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_transfer_under_way_finishes_within_the_drain_timeout_and_new_connections_are_refused(
    tmp_path: Path, mirror_factory: Callable[..., MirrorServer], workers: int,
) -> None:
    """A client reading a 32 MiB blob at ~40 MiB/s when SIGTERM comes gets all of it, the right bytes;
    a connection tried after the signal is refused at once (with several workers too: their
    supervisor's copy of the listening socket is closed first); the process then ends by itself."""
    mirror, digest = _serving(tmp_path, mirror_factory, workers, drain=6.0)
    reading = _get(mirror, digest)
    try:
        first = reading.recv(MIB)
        pid = mirror.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        signalled = time.monotonic()
        while not _refused(mirror):  # the supervisor of several workers looks at signals twice a second
            assert time.monotonic() - signalled < 1.5, "new connections still taken 1.5 s after SIGTERM"
            time.sleep(0.1)
        body = _body(first + _read_all(reading, 0.025))
        assert len(body) == BLOB_SIZE and f"sha256:{hashlib.sha256(body).hexdigest()}" == digest
    finally:
        reading.close()
    began = time.monotonic()
    while mirror.running and time.monotonic() - began < 12:
        time.sleep(0.05)
    assert not mirror.running, mirror.log_tail()
