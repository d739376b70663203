"""What every benchmark script does around its measurements: progress lines, and a scratch
directory that SIGTERM and errors clean up (unwinding every ``with`` stops the servers)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def scratch(prefix: str, *, keep: bool) -> Iterator[Path]:
    """A temp directory for one run, removed afterwards unless *keep*; SIGTERM ends the run cleanly."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


#: Bytes :func:`new_pages_write` writes: the cold blob's size.
NEW_PAGES_BYTES = 256 << 20


def new_pages_write(dir: Path) -> float:
    """Seconds to write :data:`NEW_PAGES_BYTES` to a new file in *dir* (the page cache, no fsync),
    1 MiB per ``write``; the file is removed.  A cold fill writes its blob so before its client gets
    the bytes.  About 0.05 s on a host whose free memory is backed; on a VM whose hypervisor takes
    back free memory (virtio-balloon free page reporting) each new page is backed on first touch,
    and it took 0.5-0.7 s on this project's 2-core machines: the cold fills' figures follow it."""
    data, path = os.urandom(1 << 20), dir / "new-pages"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(NEW_PAGES_BYTES >> 20):
            os.write(fd, data)
        return time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
