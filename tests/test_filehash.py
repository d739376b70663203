"""The hash of a fill's file taken beside its writes (``storage/filehash.py``), on real files."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from mirror.storage import filehash
from mirror.storage.filehash import INLINE_BYTES, FileHash


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fill-hash"]


def _wait_no_hash_thread(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _hash_threads():
        assert time.monotonic() < deadline, "the hashing thread did not end"
        time.sleep(0.01)


@pytest.mark.parametrize("size", [0, 1, INLINE_BYTES, INLINE_BYTES + 1, 3 * INLINE_BYTES + 12345])
def test_the_hash_is_that_of_every_byte_written_in_order_small_or_large(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    fd = os.open(tmp_path / "fill", os.O_RDWR | os.O_CREAT)
    before = _open_fds()
    try:
        hashed = FileHash(hashlib.sha256(), fd)
        offset, step = 0, 1
        while offset < size:  # pieces of every size from 1 byte to 2 MiB
            piece = memoryview(data)[offset:offset + step]
            os.write(fd, piece)
            hashed.update(piece)
            offset, step = offset + len(piece), min(step * 3, 2 << 20)
        assert hashed.hexdigest() == hashlib.sha256(data).hexdigest()
        _wait_no_hash_thread()
        assert _open_fds() == before  # the thread's own descriptor is closed
    finally:
        os.close(fd)


def test_what_is_hashed_past_the_first_bytes_is_what_the_file_holds(tmp_path: Path) -> None:
    """The thread reads the file back: a file that lost bytes counted fails the hash, never passes it."""
    fd = os.open(tmp_path / "fill", os.O_RDWR | os.O_CREAT)
    try:
        hashed = FileHash(hashlib.sha256(), fd)
        data = os.urandom(INLINE_BYTES + (1 << 20))
        os.write(fd, data[:INLINE_BYTES])
        hashed.update(data[:INLINE_BYTES])
        hashed.update(data[INLINE_BYTES:])  # counted, never written
        with pytest.raises(OSError, match="ended at"):
            hashed.hexdigest()
    finally:
        os.close(fd)


def test_a_body_that_stalls_past_the_idle_time_is_still_hashed_whole(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filehash, "IDLE", 0.05)
    data = os.urandom(INLINE_BYTES + (3 << 20))
    fd = os.open(tmp_path / "fill", os.O_RDWR | os.O_CREAT)
    try:
        hashed = FileHash(hashlib.sha256(), fd)
        half = INLINE_BYTES + (1 << 20)
        os.write(fd, data[:half])
        hashed.update(data[:half])
        _wait_no_hash_thread()  # idle: it ended
        os.write(fd, data[half:])
        hashed.update(data[half:])
        assert hashed.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)


def test_a_fill_given_up_stops_its_hashing_and_lets_go_of_the_file(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "fill", os.O_RDWR | os.O_CREAT)
    before = _open_fds()
    try:
        hashed = FileHash(hashlib.sha256(), fd)
        data = os.urandom(INLINE_BYTES + (4 << 20))
        os.write(fd, data)
        hashed.update(data)
        hashed.close()
        _wait_no_hash_thread(timeout=1.0)  # not the idle time: at once
        assert _open_fds() == before
        with pytest.raises(OSError, match="given up"):
            hashed.hexdigest()
    finally:
        os.close(fd)
