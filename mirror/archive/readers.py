"""The three archive readers, and which one a path needs: a plain tar file, a compressed (or
unseekable) tar, an OCI image layout directory.

Compression is detected by magic bytes (:func:`detect`).  A plain tar file is read in place
(``pread`` at each entry's offset); a compressed one cannot be, so it is read once, from start to
end, and the content of its entries is *staged* (``storage/staging.py``) as it passes, hashed on the way,
except blobs named by a digest the caller already has.  Staged files become store objects by
rename.  A decompressed stream larger than ``MAX_EXPANSION`` times its file is refused (a
decompression bomb), as is a tar that ends without its end-of-archive marker or declares data past
the end of the file.  Every entry header is checked by :class:`archive.Archive` while the archive
is listed.

Imports ``archive`` (the entry model and its checks) and ``staging`` only.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ..config.values import human
from ..storage.staging import CHUNK, Staging, copy_hashing
from .members import Archive, ArchiveError, ContentMismatch, Member, NoRoom, Reader, blob_name_digest, clean_name

#: A compressed archive may expand to at most this many times its size (gzip's own limit is ~1032).
MAX_EXPANSION = 1000
MIN_EXPANSION_LIMIT = 64 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip"}


# tarfile's header errors (private names, stable since Python 3.2; not in typeshed, hence getattr).
_EOF_HEADER: type[Exception] = getattr(tarfile, "EOFHeaderError")  # noqa: B009
_SHORT_HEADERS: tuple[type[Exception], ...] = (
    getattr(tarfile, "EmptyHeaderError"), getattr(tarfile, "TruncatedHeaderError"))  # noqa: B009


class _PreadSlice:
    """``size`` bytes at ``offset`` of a file descriptor, read with ``pread``."""

    def __init__(self, fd: int, offset: int, size: int, name: str) -> None:
        self.fd, self.pos, self.left, self.name = fd, offset, size, name

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        if want == 0:
            return b""
        data = os.pread(self.fd, want, self.pos)
        if not data:
            raise ArchiveError(self.name, "archive is truncated: entry data ends early")
        self.pos += len(data)
        self.left -= len(data)
        return data

    def __enter__(self) -> _PreadSlice:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _StrictInfo(tarfile.TarInfo):
    """Records why tarfile stopped listing: ``tarfile`` treats a corrupt header or EOF as the end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _StrictInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.stop_reason = exc  # type: ignore[attr-defined]
            raise


def _check_end(tar: tarfile.TarFile, last: str | None) -> None:
    reason = getattr(tar, "stop_reason", None)
    if isinstance(reason, _EOF_HEADER):
        return  # a zero block: the end-of-archive marker
    where = f"after {last}" if last else "at its start"
    if isinstance(reason, _SHORT_HEADERS) or reason is None:
        raise ArchiveError(None, f"archive is truncated: it ends {where} without the end-of-archive marker")
    raise ArchiveError(None, f"corrupt tar header {where}: {reason}")


def _not_tar(label: str, exc: Exception) -> ArchiveError:
    return ArchiveError(None, f"not a tar archive ({exc})")


class TarArchive(Archive):
    """A plain tar file, read in place."""

    def __init__(self, path: Path, label: str) -> None:
        super().__init__(label)
        self._file = open(path, "rb")
        try:
            self._scan()
        except BaseException:
            self._file.close()
            raise

    def _scan(self) -> None:
        file_size = os.fstat(self._file.fileno()).st_size
        try:
            tar = tarfile.open(fileobj=self._file, mode="r:", tarinfo=_StrictInfo)
        except tarfile.ReadError as exc:
            raise _not_tar(self.label, exc) from None
        last = None
        try:
            for info in tar:
                member = self._add(info)
                name = clean_name(info.name)
                end = info.offset_data + info.size
                if member is not None and end > file_size:
                    if info.size > 2 * file_size:
                        raise ArchiveError(name, f"declares {human(info.size)}, far more than the whole archive "
                                                 f"({human(file_size)}): refusing a tar bomb")
                    raise ArchiveError(name, f"archive is truncated: the entry needs {human(end - file_size)} "
                                             "past the end of the file")
                if member is not None:
                    member.offset = info.offset_data
                last = name
                cast(Any, tar).members.clear()  # the table above is all we keep
        except tarfile.ReadError as exc:
            raise ArchiveError(last, f"corrupt tar archive: {exc}") from None
        _check_end(tar, last)

    def open(self, member: Member) -> Reader:
        assert member.offset is not None
        return _PreadSlice(self._file.fileno(), member.offset, member.size, member.name)

    def close(self) -> None:
        self._file.close()


class _Counting:
    """Pass reads of the compressed file through, reporting progress."""

    def __init__(self, raw: Any, progress: Callable[[int], None] | None) -> None:
        self.raw, self.progress, self.total = raw, progress, 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.raw.read(n)
        self.total += len(data)
        if self.progress is not None and data:
            self.progress(len(data))
        return data


class _Forward:
    """A decompressed stream as a file that seeks forward only, bounded to *limit* bytes.

    ``tarfile``'s random-access reader only ever seeks ahead while it lists entries, so it
    parses headers from this; entry data is read here directly, without tarfile's copies.
    """

    def __init__(self, raw: Any, limit: int | None, compressed: _Counting | None = None) -> None:
        self.raw, self.limit, self.compressed = raw, limit, compressed
        self.pos = 0

    def tell(self) -> int:
        return self.pos

    def _read(self, n: int) -> bytes:
        try:
            data: bytes = self.raw.read(n)
        except EOFError:
            raise ArchiveError(None, "archive is truncated: the compressed stream ends early") from None
        except (OSError, zlib.error) as exc:
            raise ArchiveError(None, f"corrupt compressed stream: {exc}") from None
        except Exception as exc:  # zstandard.ZstdError
            if type(exc).__name__ == "ZstdError":
                raise ArchiveError(None, f"corrupt zstd stream: {exc}") from None
            raise
        self.pos += len(data)
        if self.limit is not None and self.pos > self.limit:
            raise ArchiveError(None, f"decompresses to more than {human(self.limit)} "
                                     f"({MAX_EXPANSION}x its size): refusing a decompression bomb")
        if self.limit is None and self.compressed is not None \
                and self.pos > max(MIN_EXPANSION_LIMIT, MAX_EXPANSION * self.compressed.total):
            raise ArchiveError(None, f"decompresses to more than {MAX_EXPANSION}x the "
                                     f"{human(self.compressed.total)} read: refusing a decompression bomb")
        return data

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = (self.limit if self.limit is not None else 1 << 62) - self.pos + 1
        parts = []
        while n > 0:
            data = self._read(min(n, CHUNK))
            if not data:
                break
            parts.append(data)
            n -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.pos:
            raise OSError("this stream only seeks forward")
        while self.pos < pos and self._read(min(CHUNK, pos - self.pos)):
            pass
        return self.pos


class StreamArchive(Archive):
    """A compressed (or unseekable) tar, read once; entry content is staged as it passes."""

    def __init__(self, path: Path, label: str, compression: str | None, staging: Staging,
                 have: Callable[[str], bool], progress: Callable[[int], None] | None, size: int | None = None) -> None:
        super().__init__(label)
        self.staging = staging
        self._have = have
        raw = open(path, "rb")
        try:
            st = os.fstat(raw.fileno())
            if stat.S_ISFIFO(st.st_mode) and compression is None:  # its first bytes, peeked: still to be read
                compression = compression_of(raw.peek(len(ZSTD_MAGIC)))
            # A pipe's size is known when its writer says it (*size*); else what it decompresses to is
            # bounded as it is read (MAX_EXPANSION times what came through so far: _Forward).
            size = st.st_size if stat.S_ISREG(st.st_mode) else size
            self.limit = max(MIN_EXPANSION_LIMIT, MAX_EXPANSION * size) if compression and size is not None else None
            counted = _Counting(raw, progress)
            decompressed: Any
            if compression == "gzip":
                decompressed = gzip.GzipFile(fileobj=cast(Any, counted), mode="rb")
            elif compression == "zstd":
                import zstandard

                decompressed = zstandard.ZstdDecompressor().stream_reader(cast(Any, counted),
                                                                          read_across_frames=True)
            else:
                decompressed = counted
            self._stream = _Forward(decompressed, self.limit, counted if compression else None)
            self._scan(compression)
        finally:
            raw.close()

    def _scan(self, compression: str | None) -> None:
        after = f" after {compression} decompression" if compression else ""
        try:
            tar = tarfile.open(fileobj=cast(Any, self._stream), mode="r:", tarinfo=_StrictInfo)
        except tarfile.ReadError as exc:
            raise ArchiveError(None, f"not a tar archive{after} ({exc})") from None
        last = None
        try:
            for info in tar:
                member = self._add(info)
                name = clean_name(info.name)
                if member is not None:
                    if self.limit is not None and info.offset_data + info.size > self.limit:
                        raise ArchiveError(name, f"declares {human(info.size)}, more than the archive can "
                                                 f"decompress to ({human(self.limit)}): refusing a tar bomb")
                    self._stage(info, member)
                last = name
                cast(Any, tar).members.clear()
        except tarfile.ReadError as exc:
            raise ArchiveError(last, f"archive is truncated or corrupt: {exc}") from None
        _check_end(tar, last)

    def _stage(self, info: tarfile.TarInfo, member: Member) -> None:
        named = blob_name_digest(member.name)
        if named is not None and self._have(named):
            member.present = True
            return  # tarfile skips the data on its way to the next header
        if member.size > self.staging.free_bytes():
            raise NoRoom(member.name, f"needs {human(member.size)}, more than is free in the data directory")
        if self._stream.tell() != info.offset_data:
            raise ArchiveError(member.name, "unexpected position in the stream")
        algorithm = named.partition(":")[0] if named else "sha256"
        path, fd = self.staging.new_file()
        try:
            hexdigest = copy_hashing(self._stream.read, fd, member.size, algorithm)
        except EOFError:
            raise ArchiveError(member.name, "archive is truncated: entry data ends early") from None
        finally:
            os.close(fd)
        member.path, member.digest = path, f"{algorithm}:{hexdigest}"
        if named is not None and named != member.digest:
            raise ContentMismatch(member.name, f"content does not match its digest (got {member.digest})")


class DirArchive(Archive):
    """An OCI image layout (or an unpacked ``docker save``) in a directory."""

    def __init__(self, root: Path, label: str) -> None:
        super().__init__(label)
        self.root = Path(os.path.realpath(root))

    def member(self, name: str) -> Member | None:
        name = clean_name(name)
        candidate = self.root / name
        try:
            resolved = Path(os.path.realpath(candidate))
        except OSError as exc:
            raise ArchiveError(name, f"cannot resolve: {exc.strerror}") from None
        if resolved != self.root and self.root not in resolved.parents:
            raise ArchiveError(name, "symlink points outside the directory")
        try:
            st = os.stat(resolved)
        except FileNotFoundError:
            return None
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            raise ArchiveError(name, "device file in layout")
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveError(name, "not a regular file")
        return Member(name, st.st_size, path=resolved)


def compression_of(head: bytes) -> str | None:
    """``"gzip"`` or ``"zstd"`` if *head*, a file's first bytes, begins with that format's magic number."""
    return "gzip" if head.startswith(GZIP_MAGIC) else "zstd" if head.startswith(ZSTD_MAGIC) else None


def detect(path: Path) -> tuple[str, str | None]:
    """``("dir", None)``, ``("tar", None|"gzip"|"zstd")``, or ``("stream", ...)`` for unseekable files."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        return "dir", None
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISFIFO(st.st_mode):
        raise ArchiveError(None, "not a regular file or directory")
    if stat.S_ISFIFO(st.st_mode):
        return "stream", None  # its magic bytes are peeked when it is read (StreamArchive)
    with open(path, "rb") as f:
        head = f.read(512)
    if compression := compression_of(head):
        return "stream", compression
    for magic, kind in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise ArchiveError(None, f"{kind} files are not supported: use a tar, gzip- or zstd-compressed tar")
    if not head:
        raise ArchiveError(None, "empty file: not a tar archive")
    if len(head) < 512 or head[257:262] != b"ustar":
        raise ArchiveError(None, "not a tar archive, OCI image layout, or gzip/zstd-compressed tar")
    return "tar", None


def open_archive(path: Path, staging: Staging, have: Callable[[str], bool],
                 progress: Callable[[int], None] | None = None, size: int | None = None) -> Archive:
    """Open *path* (file or directory) for reading, listing and checking every entry.

    *have* says whether the caller already holds a blob (by digest): a compressed archive
    then skips its content instead of staging it.  *progress* gets byte counts of a
    compressed archive as it is read.  *size*: the bytes a pipe will bring, when its writer says.
    """
    label = os.fspath(path)
    try:
        kind, compression = detect(path)
    except FileNotFoundError:
        raise ArchiveError(None, "no such file or directory") from None
    except PermissionError:
        raise ArchiveError(None, "permission denied") from None
    if kind == "dir":
        return DirArchive(path, label)
    if kind == "tar":
        return TarArchive(path, label)
    return StreamArchive(path, label, compression, staging, have, progress, size)
