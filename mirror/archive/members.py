"""Image archives read safely (tar files, plain, gzip or zstd, and OCI image layout directories):
the entries-by-name model every reader shares, and the checks on every entry.

What comes in is untrusted.  No path is ever built from an entry's name: entries are looked up
by name in a table (a tar) or under a checked root (a directory).  Every entry header is checked
while the archive is listed, and any of these rejects the whole archive:

* a name that is absolute or has a ``..`` component, or the same name twice;
* a symbolic link whose target leaves the archive, a hard link to no earlier entry;
* device files, FIFOs, sparse files and unknown entry types;
* data declared past the end of the file (a tar bomb, or a truncated archive), a missing
  end-of-archive marker, a corrupt header;
* a decompressed stream larger than ``MAX_EXPANSION`` times its file (a decompression bomb).

Which reader opens a path, and how each reads tar files and compressed streams, is
``archive/readers.py``.

Exceptions::

    ArchiveError            bad input; ``entry`` names the offending entry (or None)
      +-- ContentMismatch   bytes do not match the digest that names or describes them
      +-- MissingContent    a manifest names a blob the archive does not hold

Imports ``reference`` only.
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..config.values import human
from ..spec.reference import ParseError, parse_digest

MAX_ENTRIES = 200_000


class Reader(Protocol):
    """What :meth:`Archive.open` returns: exactly an entry's bytes, as a context manager."""

    def read(self, n: int = -1) -> bytes: ...

    def __enter__(self) -> Reader: ...

    def __exit__(self, *exc: object) -> None: ...


class ArchiveError(Exception):
    """The input is not a usable image archive; ``entry`` is the entry at fault, if any."""

    code = "BLOB_UPLOAD_INVALID"

    def __init__(self, entry: str | None, message: str) -> None:
        self.entry = entry
        self.reason = message
        super().__init__(f"{entry}: {message}" if entry else message)


class ContentMismatch(ArchiveError):
    code = "DIGEST_INVALID"


class NoRoom(ArchiveError):
    """The data directory has no room for what the archive brings: not the archive's fault (``507``)."""

    code = "UNAVAILABLE"


class MissingContent(ArchiveError):
    code = "MANIFEST_BLOB_UNKNOWN"


# -- entries --


@dataclass
class Member:
    """A regular file of the archive, with what is needed to read it."""

    name: str
    size: int
    offset: int | None = None     # plain tar: where its data starts
    path: Path | None = None      # directory input, or staged content
    digest: str | None = None     # staged: the digest computed while staging
    present: bool = False         # not read: the caller already has the blob it names


def clean_name(name: str) -> str:
    """An entry's name made canonical (no ``./``, no trailing ``/``); rejects unsafe names."""
    if "\x00" in name:
        raise ArchiveError(repr(name), "NUL byte in entry name")
    if name.startswith("/"):
        raise ArchiveError(name, "absolute path in archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(name, "path with '..' in archive")
    return "/".join(parts)


def blob_name_digest(name: str) -> str | None:
    """``blobs/sha256/<hex>`` -> ``sha256:<hex>`` (None for any other name)."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "blobs":
        return None
    try:
        return str(parse_digest(f"{parts[1]}:{parts[2]}"))
    except ParseError:
        return None


class Archive:
    """Regular files of an image archive by name (links resolved); base of the three readers."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._members: dict[str, Member] = {}
        self._links: dict[str, tuple[str, bool]] = {}  # name -> (target, is_symlink)
        self._dirs: set[str] = set()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    # listing (tar readers)

    def _add(self, info: tarfile.TarInfo) -> Member | None:
        """Check one tar header and file it; return the Member of a regular file."""
        name = clean_name(info.name)
        if len(self._members) + len(self._links) + len(self._dirs) >= MAX_ENTRIES:
            raise ArchiveError(name, f"more than {MAX_ENTRIES} entries")
        if not name:
            if info.isdir():
                return None
            raise ArchiveError(info.name, "entry without a name")
        if info.isdir():
            if name in self._members or name in self._links:
                raise ArchiveError(name, "duplicate entry")
            self._dirs.add(name)
            return None
        if name in self._members or name in self._links or name in self._dirs:
            raise ArchiveError(name, "duplicate entry")
        if info.ischr() or info.isblk():
            raise ArchiveError(name, "device file in archive")
        if info.isfifo():
            raise ArchiveError(name, "FIFO in archive")
        if info.issparse():
            raise ArchiveError(name, "sparse file in archive")
        if info.issym():
            target = info.linkname
            if target.startswith("/"):
                raise ArchiveError(name, f"symlink points outside the archive (to {target})")
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if joined == ".." or joined.startswith("../"):
                raise ArchiveError(name, f"symlink points outside the archive (to {target})")
            self._links[name] = (joined, True)
            return None
        if info.islnk():
            target = info.linkname
            if target.startswith("/") or ".." in target.split("/"):
                raise ArchiveError(name, f"hard link points outside the archive (to {target})")
            target = clean_name(target)
            if target not in self._members and target not in self._links:
                raise ArchiveError(name, f"hard link to {target}, which is not an earlier entry")
            self._links[name] = (target, False)
            return None
        if not info.isreg():
            raise ArchiveError(name, f"unsupported entry type {info.type!r}")
        member = Member(name, info.size)
        self._members[name] = member
        return member

    # lookup

    def member(self, name: str) -> Member | None:
        """The regular file *name* names, following links inside the archive; None if absent."""
        name = clean_name(name)
        for _ in range(16):
            found = self._members.get(name)
            if found is not None:
                return found
            link = self._links.get(name)
            if link is None:
                return None
            name = link[0]
        raise ArchiveError(name, "too many levels of links")

    def open(self, member: Member) -> Reader:
        """A reader of exactly ``member.size`` bytes (raises ArchiveError if it ends early)."""
        if member.path is None:
            raise ArchiveError(member.name, "entry content is not available")
        return _Exact(open(member.path, "rb"), member.size, member.name)

    def read(self, name: str, limit: int) -> bytes:
        """A small entry (JSON) in full."""
        member = self.member(name)
        if member is None:
            raise ArchiveError(name, "missing from the archive")
        if member.size > limit:
            raise ArchiveError(name, f"is {human(member.size)}, larger than the {human(limit)} allowed")
        with self.open(member) as reader:
            return reader.read(member.size)


class _Exact:
    """Read exactly *size* bytes from a file object, then EOF; fewer is a truncated archive."""

    def __init__(self, raw: Any, size: int, name: str) -> None:
        self.raw = raw
        self.left = size
        self.name = name

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        if want == 0:
            return b""
        data: bytes = self.raw.read(want)
        if not data:
            raise ArchiveError(self.name, "archive is truncated: entry data ends early")
        self.left -= len(data)
        return data

    def __enter__(self) -> _Exact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()

