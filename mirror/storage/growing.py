"""Following a fetch in progress: the readers of ``tmp/<alg>-<hex>.partial`` (``storage/fill.py`` leads it).

Every reader -- the leader's own client included -- *follows* the growing file with ``pread``:
its first bytes go out as soon as they are written, and a client that disconnects stops only its
own reading.  Readers in any process learn the outcome from the file itself:

* mode :data:`~mirror.storage.filesystem.VERIFIED_MODE` -> complete and verified (the leader may still be
  making it durable: ``fsync`` and rename into ``blobs/``, or the last part sent to the object
  store, follow the readers' last byte);
* mode :data:`REFUSED_MODE`, lock free -> the store refused it: the rest comes from the upstream;
* lock still held            -> more bytes may come;
* lock free, and the inode is now the stored object (``BlobStore.fill_placed``) -> complete and verified;
* lock free otherwise         -> the fetch failed (the leader unlinked the file): abort; or, when
  the file is still there under its name, its leader's process died without settling it (killed):
  a reader that can fetch takes the fill over (:meth:`GrowingBlob.chunks`).

The fetch's size is published in ``<alg>-<hex>.meta`` (with the inode, so a reader never
mistakes an older attempt's file for the current one): :func:`write_meta`, :func:`read_meta`.  With
several upstreams, the leader first says there which upstream it waits for (:func:`write_pending`).

A reader of a stored blob (and of a fill, once it is done) holds a shared ``flock`` on it until it
closes: the collector keeps an image while any of its objects is filling or so marked
(:func:`fills_in_progress`, ``BlobStore.serving``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import anyio.to_thread

from ..spec.reference import Digest
from .bypass import Download, FillFailed
from .driver import BlobStore
from .filesystem import VERIFIED_MODE
from .marks import SharedHold, mark_reading, unmark_reading
from .reads import read_cached

if TYPE_CHECKING:
    from .fill import Fills

log = logging.getLogger("mirror.storage.fill")

CHUNK = 1 << 20
#: Most bytes of a fill handed out at once as a span of its file (:meth:`GrowingBlob.spans`).
SPAN = 64 << 20
#: A fill's temp file gets this mode when the store refused it: its readers fetch on their own.
REFUSED_MODE = 0o600

Fetch = Callable[[], AbstractAsyncContextManager[Download]]


class FillRefused(FillFailed):
    """The store could not take the fetch being followed: its bytes must come from the upstream."""


class FillOrphaned(FillFailed):
    """The leader of the fetch being followed died without settling it (its process was killed: the
    file left unlocked under its name, neither verified nor refused)."""


class GrowingBlob:
    """A reader following a fetch in progress (``coalesced`` when another request leads it)."""

    def __init__(self, fills: Fills, digest: Digest, fd: int, size: int | None, coalesced: bool,
                 fetch: Fetch | None = None, *, verified: bool = False) -> None:
        self.fills = fills
        self.digest = digest
        self.fd = fd
        self.size = size
        self.coalesced = coalesced
        #: Already verified when joined (its leader was making it durable): served as if stored.
        self.verified = verified
        #: Where the bytes come from if the store refuses the fill (None: the reader fails instead).
        self.fetch = fetch
        if coalesced:
            fills.metrics.waiting(1)
        # Where the fill's file does not become the stored object (an object store), the object is marked as a
        # reader of it marks it (``S3Store.serving``): the fill may end while this reader still sends its bytes.
        self._marked = None if fills.store.local else fills.store.layout.reading(digest)
        self._mark = None if self._marked is None else mark_reading(self._marked)
        self._shared: SharedHold | None = None

    async def marked(self) -> GrowingBlob:
        """This reader, its object marked in the index too where hosts share the store (``S3Store.in_use``), for
        the collectors of other replicas.  Raises what the mark raises (``MetadataUnavailable``), then closed."""
        if self._marked is not None and (marks := getattr(self.fills.store, "in_use", None)) is not None:
            self._shared = await SharedHold.taken(marks, self.digest, self.close)
        return self

    def close(self) -> None:
        os.close(self.fd)
        if self._shared is not None:
            self._shared.release()
        if self._marked is not None and self._mark is not None:
            unmark_reading(self._marked, self._mark)
            self._mark = None
        if self.coalesced:
            self.fills.metrics.waiting(-1)

    def state(self) -> str:
        """``filling``, ``done``, ``refused`` or ``failed``; once done, the blob is marked as being served."""
        state = fill_state(self.fd, lambda: self.fills.store.fill_placed(self.digest, self.fd))
        if state == "done":
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return state

    async def verdict(self) -> str:
        """The fill's end (see :meth:`state`): ``done`` (verified), ``refused`` or ``failed``."""
        while (state := self.state()) == "filling":
            await self.fills.changed(self.digest, self.fills.poll_interval)
        return state

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``start..end`` (inclusive) as they become available; raises :class:`FillFailed`.

        If the store refuses the fill, the rest comes straight from the upstream (:class:`BypassBlob`).
        """
        offset = start
        try:
            async for data in self._follow(start, end):
                assert isinstance(data, bytes)
                offset += len(data)
                yield data
        except FillRefused:
            if self.fetch is None:
                raise
            async for data in self._bypassed(offset, end):
                yield data
        except FillOrphaned:
            if self.fetch is None:
                raise
            async for data in self._taken_over(offset, end):
                yield data

    async def spans(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes | tuple[int, int]]:
        """As :meth:`chunks`, but what is already in the file comes as ``(offset, count)``, to send
        from ``fd`` (``sendfile``) without reading it; the last byte, held back until the verdict,
        and what comes from the upstream after a refused fill come as bytes."""
        offset = start
        try:
            async for data in self._follow(start, end, spans=True):
                if isinstance(data, _Span):
                    offset += data.count
                    yield data.offset, data.count
                else:
                    offset += len(data)
                    yield data
        except FillRefused:
            if self.fetch is None:
                raise
            async for piece in self._bypassed(offset, end):
                yield piece
        except FillOrphaned:
            if self.fetch is None:
                raise
            async for data in self._taken_over(offset, end):  # bytes: another file's, perhaps
                yield data

    async def _bypassed(self, offset: int, end: int | None) -> AsyncIterator[bytes]:
        """Bytes ``offset..end`` straight from the upstream, the store having refused the fill."""
        assert self.fetch is not None
        log.info("store refused the fill of %s: streaming it from the upstream from byte %d", self.digest, offset)
        try:
            bypass = await self.fills.bypass(self.digest, self.fetch)
        except Exception as exc:  # the upstream's own errors: headers are gone, the transfer is cut short
            raise FillFailed(f"{self.digest}: the upstream failed after the store refused the fill: {exc}") from exc
        try:
            if bypass.size != self.size:
                raise FillFailed(f"{self.digest}: the upstream now announces {bypass.size} bytes, not {self.size}")
            async for data in bypass.chunks(offset, end):
                yield data
        finally:
            bypass.close()

    async def _taken_over(self, offset: int, end: int | None) -> AsyncIterator[bytes]:
        """Bytes ``offset..end`` of a fill whose leader died (:class:`FillOrphaned`): from a fill started
        anew, which this reader leads or follows (the first reader of any process to ask leads it, the
        others follow as usual: one upstream fetch), or from the store if it was stored meanwhile.
        Before, a worker killed mid-fill cut every reader of the fill, those of the other workers too."""
        assert self.fetch is not None
        log.warning("the fill of %s stopped at byte %d without an outcome (its worker process ended): "
                    "fetching it again for its readers", self.digest, offset)
        try:
            reader = await self.fills.open(self.digest, self.fetch)
        except Exception as exc:  # the upstream's own errors: headers are gone, the transfer is cut short
            raise FillFailed(f"{self.digest}: fetching it again failed: {exc}") from exc
        try:
            if self.size is not None and reader.size is not None and reader.size != self.size:
                raise FillFailed(f"{self.digest}: the upstream now announces {reader.size} bytes, not {self.size}")
            async for data in reader.chunks(offset, end):
                yield data
        finally:
            reader.close()

    def _failed(self, message: str) -> FillFailed:
        """The error of a fill that ended unverified: :class:`FillOrphaned` if its leader died."""
        orphaned = names_inode(self.fills.store.layout.fill(self.digest), self.fd)
        return FillOrphaned(message) if orphaned else FillFailed(message)

    async def _follow(self, start: int, end: int | None, *, spans: bool = False) -> AsyncIterator[bytes | _Span]:
        offset = start
        stop = None if end is None else end + 1
        poll = self.fills.poll_interval
        settled = False
        # The last byte asked for (of the blob, or of a range) waits for the verdict: nothing
        # unverified is ever answered as a success.
        last = stop if stop is not None else self.size
        # Only chunks are read into it: a span is sent from the file.  (Allocating it costs its page
        # faults, ~0.7 ms a MiB here: the whole cost of a reader's first span, eight times over
        # when eight clients wait for one fill's first bytes.)
        buffer = None if spans else memoryview(bytearray(CHUNK if stop is None else min(CHUNK, stop - offset)))
        while stop is None or offset < stop:
            data: bytes | _Span | None
            if spans:
                want = SPAN if stop is None else min(SPAN, stop - offset)
                data = _Span(offset, max(0, min(want, os.fstat(self.fd).st_size - offset)))
            else:
                want = CHUNK if stop is None else min(CHUNK, stop - offset)
                # What was just written is in the page cache: read right here, without a thread hop
                # (which, while the fill's own thread hashes, waits for the GIL).
                assert buffer is not None
                data = read_cached(self.fd, buffer[:want], offset)
                if data is None:
                    data = await anyio.to_thread.run_sync(os.pread, self.fd, want, offset)
            if data:
                if last is not None and offset + len(data) >= last:
                    if len(data) > 1:
                        yield data[:-1] if isinstance(data, bytes) else _Span(offset, len(data) - 1)
                    while (state := self.state()) == "filling":
                        await self.fills.changed(self.digest, poll)
                    if state == "refused":
                        raise FillRefused(f"{self.digest}: the store refused the fill")
                    if state != "done":
                        raise self._failed(f"{self.digest}: the fetch failed (its warning says why)")
                    offset, data = offset + len(data) - 1, (
                        data[-1:] if isinstance(data, bytes) else os.pread(self.fd, 1, offset + len(data) - 1))
                offset += len(data)
                yield data
                continue
            if settled:  # nothing more after the writer finished
                state = self.state()
                if state == "done" and stop is None:
                    return
                if state == "refused":
                    raise FillRefused(f"{self.digest}: the store refused the fill at {offset} bytes")
                raise self._failed(f"{self.digest}: fetch ended at {offset} bytes")
            state = self.state()
            if state == "filling":
                await self.fills.changed(self.digest, poll)
            else:
                settled = True  # re-read once: bytes may have landed just before the lock was released
        while (state := self.state()) == "filling":
            await self.fills.changed(self.digest, poll)
        if state == "refused":
            raise FillRefused(f"{self.digest}: the store refused the fill")
        if state != "done":
            raise self._failed(f"{self.digest}: fetch failed")


@dataclass(frozen=True, slots=True)
class _Span:
    """Bytes ``offset..offset+count`` of a fill's file, not read."""

    offset: int
    count: int

    def __len__(self) -> int:
        return self.count


def known_size(store: BlobStore, digest: Digest) -> int | None:
    """The size of *digest* if stored, or if its fill is all there and verified, only not yet
    stored (its leader makes it durable after its readers' last byte), or if its fill is under way
    and the upstream announced its size; else None.

    A HEAD during or right after a GET is so answered as the GET is, without asking the upstream
    (which may answer a HEAD otherwise meanwhile: a 429)."""
    size = store.size(digest)
    if size is not None:
        return size
    path = store.layout.fill(digest)
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return store.size(digest)  # moved into the store in between
    if status.st_mode & 0o777 == VERIFIED_MODE:
        return status.st_size
    meta = read_meta(store.layout.fill_meta(digest))
    if meta is not None and meta.ino == status.st_ino and meta.size is not None and filling(path):
        return int(meta.size)
    return None


def fill_state(fd: int, placed: Callable[[], bool]) -> str:
    """The state of the fill open as *fd* (see the module docstring); *placed* says whether its file
    is now the stored object (``BlobStore.fill_placed``)."""
    # Verified: done, even while the leader still makes it durable (fsync, rename, the last part) or
    # after it was committed and evicted since.  A crash before that loses the fetch, never a byte:
    # the temp file is swept at start-up.
    if os.fstat(fd).st_mode & 0o777 == VERIFIED_MODE:
        return "done"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return "filling"
    fcntl.flock(fd, fcntl.LOCK_UN)
    status = os.fstat(fd)
    if status.st_mode & 0o777 == VERIFIED_MODE:  # verified between the two looks
        return "done"
    if status.st_mode & 0o777 == REFUSED_MODE:
        return "refused"
    return "done" if placed() else "failed"


def fills_in_progress(store: BlobStore) -> set[str]:
    """Digests (``sha256:<hex>``) whose fetch is in progress, in any process: the locked fill files."""
    return {digest for digest, path in store.layout.fill_entries() if filling(path)}


def filling(path: os.PathLike[str] | str) -> bool:
    """Whether the fill file at *path* is locked by its writer (a fetch in progress, in any process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def names_inode(path: os.PathLike[str] | str, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class FillMeta(NamedTuple):
    """What ``<alg>-<hex>.meta`` says of the fetch whose temp file is inode *ino*."""

    ino: int
    #: The upstream's announced size (None: not announced).  Meaningful once *answered*.
    size: int | None
    #: False while the leader still waits for the upstream's answer (only a fill with an *origin*
    #: says so: :func:`write_pending`).
    answered: bool
    #: The upstream registry the fetch asks (``docker.io``, ``ghcr.io``), when the leader said.
    origin: str | None
    #: When the file was written (``time.time()`` seconds): for a pending fill, when its fetch began.
    written: float


def write_meta(path: os.PathLike[str] | str, ino: int, size: int | None) -> None:
    """Publish the fetch's size: its readers go on (see the module docstring)."""
    _write(path, {"ino": ino, "size": size})


def write_pending(path: os.PathLike[str] | str, ino: int, origin: str) -> None:
    """Say which upstream the fetch of inode *ino* waits for, before it answered: a reader asking
    another upstream for the same digest need not wait on this one for long (``Fills._follow``)."""
    _write(path, {"ino": ino, "origin": origin})


def _write(path: os.PathLike[str] | str, meta: dict[str, object]) -> None:
    tmp = f"{os.fspath(path)}.{secrets.token_hex(6)}"
    try:
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, path)
    except BaseException:  # a full disk: nothing left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_meta(path: os.PathLike[str] | str) -> FillMeta | None:
    try:
        with open(path) as f:
            written = os.fstat(f.fileno()).st_mtime
            meta = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return FillMeta(int(meta["ino"]), meta.get("size"), "size" in meta, meta.get("origin"), written)
