"""Small and degraded filesystems for the store: a tmpfs of a given size, filled up on demand, and a
read-only bind mount (both need root, as the test machines run).

Each is a context manager that unmounts however the block ends (lazily if a process still holds
files there: stop the mirror first to get a clean unmount).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MIB = 1 << 20


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


def _unmount(directory: Path) -> None:
    if _run("umount", str(directory)).returncode != 0:
        _run("umount", "--lazy", str(directory))


@contextlib.contextmanager
def tmpfs(directory: Path, size_mib: int, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of *size_mib* MiB (and at most *inodes* files and directories) mounted on *directory* for the block."""
    directory.mkdir(parents=True, exist_ok=True)
    options = f"size={size_mib}m" + (f",nr_inodes={inodes}" if inodes is not None else "")
    done = _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory))
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs on {directory} (root needed): {done.stderr.strip()}", pytrace=False)
    try:
        yield directory
    finally:
        _unmount(directory)


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[Path]:
    """*directory* bind-mounted read-only over itself for the block (writes there fail with EROFS).

    The bind and the remount read-only are two steps: a file a running process opens for writing in
    between makes the remount fail ("mount point is busy").  The bind is then detached (that file stays
    on it) and made again, a few times."""
    for _ in range(20):
        done = _run("mount", "--bind", str(directory), str(directory))
        if done.returncode != 0:
            pytest.fail(f"cannot bind-mount {directory}: {done.stderr.strip()}", pytrace=False)
        done = _run("mount", "-o", "remount,bind,ro", str(directory))
        if done.returncode == 0:
            break
        _run("umount", "--lazy", str(directory))
        time.sleep(0.05)
    else:
        pytest.fail(f"cannot make {directory} read-only: {done.stderr.strip()}", pytrace=False)
    try:
        yield directory
    finally:
        _unmount(directory)


def use_inodes(ballast: Path, leave: int) -> None:
    """Make empty files in the new directory *ballast* until its filesystem has *leave* inodes free."""
    ballast.mkdir()
    made = 0
    while True:
        try:
            (ballast / str(made)).touch()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            break
        made += 1
    for name in range(made - 1, made - 1 - leave, -1):
        (ballast / str(name)).unlink()
    assert os.statvfs(ballast).f_ffree == leave


def free_bytes(path: Path) -> int:
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


def fill_up(ballast: Path, leave: int = 0) -> int:
    """Write *ballast* until its filesystem has about *leave* bytes free (none at all for 0);
    return the free bytes left."""
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        room = free_bytes(ballast.parent) - leave
        if room > 0 and leave:
            os.posix_fallocate(fd, os.fstat(fd).st_size, room)
        elif room > 0:
            block = MIB
            while block:
                try:
                    os.write(fd, bytes(block))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    block //= 2
    finally:
        os.close(fd)
    return free_bytes(ballast.parent)
