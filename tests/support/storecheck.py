"""Checks that a mirror's data directory holds nothing wrong."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from .images import file_digest
from .mirror import PROJECT_ROOT


def assert_store_sound(data_dir: Path, expected: Iterable[str] = ()) -> set[str]:
    """Every file under ``DATA/blobs`` hashes to its name, the *expected* digests are all
    there, and ``mirror fsck --verify-content`` finds the store clean; return the digests."""
    found = set()
    for path in (data_dir / "blobs" / "sha256").glob("*/*"):
        assert file_digest(path) == f"sha256:{path.name}", f"corrupt blob in the store: {path}"
        found.add(f"sha256:{path.name}")
    missing = set(expected) - found
    assert not missing, f"not in the store: {missing}"
    fsck = subprocess.run([sys.executable, "-m", "mirror", "fsck", "--data", str(data_dir), "--verify-content"],
                          capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr
    return found
