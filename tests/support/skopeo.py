"""skopeo as the tests run it, and what it leaves in an OCI layout."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .images import Image, Index, file_digest


def skopeo_run(skopeo: str, *args: str, timeout: float = 180) -> bytes:
    """``skopeo ARGS``, which must succeed; its stdout."""
    done = subprocess.run([skopeo, *args], capture_output=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"skopeo {' '.join(args)}: {done.stderr.decode()}"
    return done.stdout


def layout_blobs(layout: Path) -> set[str]:
    """Digests in an OCI layout, after checking that every file hashes to its name."""
    found = set()
    for path in (layout / "blobs" / "sha256").iterdir():
        digest = f"sha256:{path.name}"
        assert file_digest(path) == digest, f"skopeo wrote a corrupt blob {path}"
        found.add(digest)
    return found


def everything(item: Image | Index) -> set[str]:
    """Every digest of an image or index: manifests, configs, layers."""
    return set(item.blobs) | set(item.manifests)
