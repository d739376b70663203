"""The data directory (``--data``, ``storage.path``): every path under it, produced here and nowhere else.

::

    DATA/
      blobs/                              verified objects (layers, configs, manifests), read-only (0444)
        <algorithm>/<hex[:2]>/<hex>       one object, named by its digest (``storage/filesystem.py``)
      tmp/                                work in progress, on the same filesystem as blobs/ (renames)
        <algorithm>-<hex>.partial         the shared fetch of one digest; its leader holds flock on it
        <algorithm>-<hex>.meta            {"ino", "size"} of that fetch, for the readers following it
                                          ({"ino", "origin"} while it waits for an upstream's answer)
        <algorithm>-<hex>.meta.<random>   that file being written (then renamed)
        <algorithm>-<hex>.meta-upload     {"key", "upload"}: the multipart upload of that fetch (S3 driver)
        <algorithm>-<hex>.reading         held with a shared flock by each reader of that object (S3 driver)
        ingest-<random>.partial           any other ingest (manifests, small objects); flock'ed by its writer
        stage-<random>.partial            the lock keeping a preload's staging directory alive
        stage-<random>.d/<n>              blobs of a preload, verified, waiting for the whole archive
        preload-<random>.partial          the lock of an archive being uploaded to ``/_mirror/preload``
        preload-<random>.fifo             the named pipe it is read from (removed once both ends are open)
        readyz-<random>.partial           the write probe of ``/readyz``
        auth-key-<random>.partial         ``auth.key`` being created
      index/                              metadata in diskcache (``metadata/diskcache.py``)
        generation                        8 bytes that change when the index withdraws something
      uploads/<uuid>                      a client's blob upload in progress (survives restarts)
      refused                             the last write the filesystem refused (``storage/refusals.py``)
      gc.lock                             one collector at a time; writers making objects reachable
                                          hold it shared (``maintenance/gc.py``)
      auth.key                            the key signing login tokens (``api/auth.py``), mode 0600
      index.json                          which index holds this store's metadata (``metadata/opening.py``)
      store-id                            this store's random id, recorded in a PostgreSQL index (same file)

In an object store (``storage/s3.py``) only ``blobs/`` exists, as keys under the bucket's
``rootdirectory``: ``<rootdirectory>/blobs/<algorithm>/<hex[:2]>/<hex>`` (:func:`object_key`), each
written once by an upload completed after its digest was verified.  A push upload's parts go to a
multipart upload of ``<rootdirectory>/uploads/<uuid>/data`` (:func:`upload_key`), completed there
at the upload's end, copied in the bucket to its digest's key once verified, then deleted; replicas of a
cluster keep its unsent tail in ``<rootdirectory>/uploads/<uuid>/tail`` (:func:`upload_tail_key`).

Every ``*.partial`` in ``tmp/`` is flock'ed by the process writing it: the start-up sweep
(``Store.sweep_tmp``) removes exactly the leftovers of writers that died.  Paths of objects are
only ever built from a validated :class:`~mirror.spec.reference.Digest`, and upload paths from an
id :func:`new_upload_id` made.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..spec.reference import Digest

UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")
#: The digest algorithms an object may be stored under, with the form of their hex part.
HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "sha512": re.compile(r"[0-9a-f]{128}")}
PARTIAL = ".partial"
FIFO = ".fifo"


def generation_file(index: Path) -> Path:
    """The generation token of the index kept in the directory *index*."""
    return index / "generation"


def new_upload_id() -> str:
    return secrets.token_hex(16)


def temp_file(tmp: Path, kind: str) -> Path:
    """A new name ``tmp/<kind>-<random>.partial`` (``kind``: ``ingest``, ``preload``, ``auth-key``...)."""
    return tmp / f"{kind}-{secrets.token_hex(12)}{PARTIAL}"


def object_key(digest: Digest) -> str:
    """An object's key below an object store's root: ``blobs/<algorithm>/<hex[:2]>/<hex>``."""
    return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


#: The key prefix below an object store's root of every push upload's objects (:func:`upload_key`).
UPLOADS_PREFIX = "uploads/"
#: Seconds an upload's leftover without a record is kept before it is removed as left behind: a
#: replica's local file comes before its record, and an upload's completed object (``uploads/<uuid>/data``)
#: listed while its commit runs may be looked up after the commit deleted the record.
ORPHAN_GRACE = 60.0


def upload_key(uuid: str) -> str:
    """The key below an object store's root where the push upload *uuid* (from :func:`new_upload_id`)
    collects: ``uploads/<uuid>/data``; never a digest's key."""
    if not UPLOAD_ID_RE.fullmatch(uuid):
        raise ValueError(f"invalid upload id {uuid!r}")
    return f"{UPLOADS_PREFIX}{uuid}/data"


def upload_tail_key(uuid: str) -> str:
    """The key below an object store's root where the replicas of a cluster keep the unsent tail of the
    push upload *uuid* between its requests: ``uploads/<uuid>/tail``; never a digest's key."""
    return upload_key(uuid).removesuffix("/data") + "/tail"


def parse_object_key(relative: str) -> tuple[str, Digest | None]:
    """``(name, digest)`` of a key below ``blobs/`` (``<algorithm>/<hex[:2]>/<hex>``): the name as
    ``<algorithm>:<last part>``, the digest None when the key is not a well-formed object (a stray)."""
    parts = relative.split("/")
    name = f"{parts[0]}:{parts[-1]}"
    pattern = HEX.get(parts[0])
    if len(parts) == 3 and pattern is not None and pattern.fullmatch(parts[2]) and parts[1] == parts[2][:2]:
        return name, Digest(parts[0], parts[2])
    return name, None


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """A file found under ``blobs/``: ``name`` is ``<algorithm>:<file name>`` as found, ``digest`` its
    digest when the place is a well-formed object path (a regular file), else None (a stray)."""

    name: str
    path: str
    entry: os.DirEntry[str]
    digest: Digest | None


@dataclass(frozen=True, slots=True)
class Layout:
    """The paths of one data directory (see the module docstring)."""

    root: Path

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def generation(self) -> Path:
        return generation_file(self.index)

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def refused(self) -> Path:
        return self.root / "refused"

    @property
    def gc_lock(self) -> Path:
        return self.root / "gc.lock"

    @property
    def auth_key(self) -> Path:
        return self.root / "auth.key"

    @property
    def index_binding(self) -> Path:
        """Which index describes this directory's blobs (``metadata/opening.py``)."""
        return self.root / "index.json"

    @property
    def store_id(self) -> Path:
        """The id a PostgreSQL index records for the store in this directory (``metadata/opening.py``)."""
        return self.root / "store-id"

    def directories(self) -> tuple[Path, ...]:
        """The directories a data directory is created with."""
        return self.blobs, self.tmp, self.index, self.uploads

    # -- objects and fills: only ever built from a validated Digest --

    def blob(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def fill(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.algorithm}-{digest.hex}{PARTIAL}"

    def fill_meta(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.algorithm}-{digest.hex}.meta"

    def fill_upload(self, digest: Digest) -> Path:
        """The note of the multipart upload a fill sends its bytes to (``storage/s3fill.py``)."""
        return self.tmp / f"{digest.algorithm}-{digest.hex}.meta-upload"

    def reading(self, digest: Digest) -> Path:
        """The file every reader of a stored object holds a shared ``flock`` on (``storage/s3objects.py``)."""
        return self.tmp / f"{digest.algorithm}-{digest.hex}.reading"

    def reading_entries(self) -> list[Path]:
        """Every such file in ``tmp/`` (see :meth:`reading`)."""
        return [Path(entry.path) for entry in _scandir(self.tmp) if entry.name.endswith(".reading")]

    def upload_notes(self) -> Iterator[tuple[Path, Path]]:
        """``(note, fill file)`` of every multipart upload note in ``tmp/`` (see :meth:`fill_upload`)."""
        for entry in _scandir(self.tmp):
            if entry.name.endswith(".meta-upload"):
                yield Path(entry.path), self.tmp / (entry.name.removesuffix(".meta-upload") + PARTIAL)

    def temp(self, kind: str) -> Path:
        """A new temp file name in ``tmp/`` (see :func:`temp_file`)."""
        return temp_file(self.tmp, kind)

    def stage(self) -> tuple[Path, Path]:
        """A new staging area: (its lock file, its directory)."""
        token = secrets.token_hex(8)
        return self.tmp / f"stage-{token}{PARTIAL}", self.tmp / f"stage-{token}.d"

    def stages(self) -> list[tuple[Path, Path]]:
        """Every staging directory in ``tmp/``, with the lock file that keeps it alive."""
        if not self.tmp.is_dir():
            return []
        return [(d.with_suffix(PARTIAL), d) for d in self.tmp.glob("stage-*.d")]

    def upload(self, uuid: str) -> Path:
        """Where a blob upload's bytes collect; *uuid* must come from :func:`new_upload_id`."""
        if not UPLOAD_ID_RE.fullmatch(uuid):
            raise ValueError(f"invalid upload id {uuid!r}")
        return self.uploads / uuid

    # -- walks --

    def blob_entries(self) -> Iterator[BlobEntry]:
        """Every file under ``blobs/`` (the one walk of it), strays included: a file where a directory of
        an algorithm or a prefix would be is one too."""
        for algorithm in _scandir(self.blobs):
            if _is_file(algorithm):
                yield BlobEntry(algorithm.name, algorithm.path, algorithm, None)
            pattern = HEX.get(algorithm.name)
            for prefix in _scandir(algorithm.path):
                if _is_file(prefix):
                    yield BlobEntry(f"{algorithm.name}:{prefix.name}", prefix.path, prefix, None)
                for entry in _scandir(prefix.path):
                    well_formed = (pattern is not None and pattern.fullmatch(entry.name) is not None
                                   and prefix.name == entry.name[:2] and _is_file(entry))
                    yield BlobEntry(f"{algorithm.name}:{entry.name}", entry.path, entry,
                                    Digest(algorithm.name, entry.name) if well_formed else None)

    def fill_entries(self) -> Iterator[tuple[str, str]]:
        """``(digest, path)`` of every fill file in ``tmp/`` (``<algorithm>-<hex>.partial``)."""
        for entry in _scandir(self.tmp):
            algorithm, dash, rest = entry.name.partition("-")
            if not dash or not rest.endswith(PARTIAL) or algorithm not in HEX:
                continue
            yield f"{algorithm}:{rest[:-len(PARTIAL)]}", entry.path

    def temp_entries(self) -> list[os.DirEntry[str]]:
        """Everything in ``tmp/``."""
        return _scandir(self.tmp)

    def abandoned_temps(self, *, remove: bool = False) -> list[str]:
        """Temp files whose writer is gone (no flock held), removed while locked if *remove*."""
        found = []
        for entry in self.temp_entries():
            if not entry.name.endswith(".partial"):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                found.append(entry.path)
                if remove:  # still under our lock: no new writer can have taken it over
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        for entry in self.temp_entries():  # what sits beside a writer's .partial goes with it
            base, meta, _ = entry.path.partition(".meta")
            if not meta and entry.name.endswith(FIFO):
                base, meta = entry.path[:-len(FIFO)], FIFO
            if meta and (base + ".partial" in found or not os.path.exists(base + ".partial")):
                found.append(entry.path)
                if remove:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
        if remove:  # a preload's staging directory whose lock is gone (made first, removed last: it died)
            for lock, directory in self.stages():
                if not lock.exists():
                    shutil.rmtree(directory, ignore_errors=True)
        return found

    def upload_entries(self) -> list[os.DirEntry[str]]:
        """Everything in ``uploads/``."""
        return _scandir(self.uploads)


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _scandir(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def foreign_data_directory(data: Path) -> str | None:
    """Why *data* is another program's directory, not one for a mirror's store, or None.

    * A distribution registry's storage: its ``rootdirectory`` (``docker/registry/v2`` under it) or a
      directory of that path down to ``v2``, which holds ``repositories/``.  The mirror would serve
      none of it while writing its own store beside it (and take its ``blobs/`` for its own).
    * An OCI image layout (``oci-layout``, OCI image-layout spec): an archive to preload, whose
      ``index.json`` and ``blobs/`` a store would take for its own.

    A mirror's store never holds ``repositories/`` or ``oci-layout``."""
    for v2 in (data / "docker" / "registry" / "v2", data / "registry" / "v2", data / "v2", data):
        if (v2 / "repositories").is_dir():
            return (f"{data} holds a distribution registry's storage ({v2.relative_to(data.parent)}), which this "
                    "mirror does not read: start it with another --data (storage.path), then copy the images in, "
                    "e.g. with `skopeo sync --all` from that registry serving it, or `mirror preload` of an export")
    if (data / "oci-layout").is_file():
        return (f"{data} is an OCI image layout, not a mirror's data directory: to load its images, name it after "
                "--data DIR (mirror preload --data DIR LAYOUT)")
    return None
