"""A mirror's data directory as the tests look at it: its objects, ``mirror`` commands run on it, and
checks that it holds nothing wrong."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from mirror.storage.filesystem import Store
from mirror.storage.growing import fills_in_progress

from .mirror import PROJECT_ROOT
from .waiting import eventually, wait_for


def mirror_cli(*args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 120,
               module: str = "mirror") -> subprocess.CompletedProcess[str]:
    """``python -m mirror ARGS`` (this checkout's; or *module*, ``tests.support.skewed_clock``) with a
    clean ``MIRROR_*`` environment, plus *env*."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=PROJECT_ROOT, env={**clean, **(env or {})}, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def stored_objects(data_dir: Path) -> dict[str, Path]:
    """Every file under ``DATA/blobs``, by the digest its place names (``algorithm:hex``)."""
    return {f"{p.parent.parent.name}:{p.name}": p for p in sorted((data_dir / "blobs").rglob("*")) if p.is_file()}


def fills_running(data_dir: Path) -> bool:
    """Whether a process is filling an object: the mirror's own probe (a locked fill file in
    ``DATA/tmp``; its leader holds it until the object is synced and moved into ``blobs/``)."""
    return bool(fills_in_progress(Store(data_dir)))


def settle(data_dir: Path, timeout: float = 5.0) -> None:
    """Give fills that are ending (their client already has every byte) up to *timeout* seconds to
    reach the store; fills held open on purpose are left as they are."""
    eventually(lambda: not fills_running(data_dir), timeout)


def verified_objects(data_dir: Path) -> set[str]:
    """The digests of every object under ``DATA/blobs``, after checking that each file sits where its
    name says and hashes to it (fills ending are given a moment first: :func:`settle`)."""
    settle(data_dir)
    found = set()
    for digest, path in stored_objects(data_dir).items():
        algorithm, _, hex_ = digest.partition(":")
        assert path.parent.name == hex_[:2], f"misplaced object in the store: {path}"
        with path.open("rb") as handle:
            actual = hashlib.file_digest(handle, algorithm).hexdigest()
        assert actual == hex_, f"corrupt object in the store: {path}"
        found.add(digest)
    return found


def fsck_clean(data_dir: Path, *, verify_content: bool = True) -> str:
    """``mirror fsck`` (``--verify-content``) of *data_dir* finds nothing wrong; its report."""
    settle(data_dir)
    done = mirror_cli("fsck", "--data", data_dir, *(["--verify-content"] if verify_content else []))
    assert done.returncode == 0 and done.stdout.rstrip().endswith("clean"), done.stdout + done.stderr
    return done.stdout


def assert_store_sound(data_dir: Path, expected: Iterable[str] = (), *, absent: Iterable[str] = (),
                       no_fills_left: bool = False) -> set[str]:
    """Every object under ``DATA/blobs`` hashes to its name (:func:`verified_objects`), the *expected*
    digests are all there and the *absent* ones are not, and ``mirror fsck --verify-content`` finds the
    store clean; return the digests.  *no_fills_left*: first wait for ``DATA/tmp`` to empty (fills still
    finishing)."""
    if no_fills_left:
        wait_for(lambda: not any((data_dir / "tmp").iterdir()), what="the fills' temp files to go")
    found = verified_objects(data_dir)
    missing = set(expected) - found
    assert not missing, f"not in the store: {missing}"
    present = set(absent) & found
    assert not present, f"in the store: {present}"
    fsck_clean(data_dir)
    return found
