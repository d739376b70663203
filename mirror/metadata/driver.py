"""The metadata driver interface: everything the index keeps, as typed operations.

The index says what the store's bytes mean: which tags point where, which repository may serve
which digest, what is pinned, uploaded, pushed, when it was last used and how big the store is.
Every layer above (routes, pull-through, local, referrers, the collector, fsck, metrics) is
typed against :class:`Metadata`, never against a driver; none of them builds a key.  Drivers:

* ``diskcache`` (:class:`mirror.metadata.diskcache.DiskcacheMetadata`, the default): SQLite in WAL mode
  under ``DATA/index/``, shared by the worker processes and the CLI of one host.
* ``postgres`` (:class:`mirror.metadata.postgres.PostgresMetadata`): a PostgreSQL database, shared
  by several hosts; the generation is pushed to every instance by LISTEN/NOTIFY, leases expire by
  the database's clock.

Every driver passes ``tests/test_metadata_contract.py``.  What it promises besides the shapes:

* **Shared.** Several instances over the same data (worker processes, ``mirror gc``, replicas)
  see each other's writes; read-modify-writes (a repository's tag list, the catalog, a subject's
  referrers, the usage count) are atomic across them.
* **Generation.** :attr:`Metadata.generation` changes whenever the index *withdraws* something
  (a link, a manifest record, a tag moved or removed) or a repository turns local (or back), and
  not for additions.  Answers kept in memory (``api/memo.py``) compare it on every lookup, so it must be as
  cheap as a memory read.  A driver's own withdrawals show when the call returns; another
  instance's as soon as the driver learns of them (at once for a shared file).  A driver may
  answer :meth:`RepositoryIndex.is_linked` from links it found while the generation stood still.
* **Leases** (:class:`Leases`): exclusive, expiring claims on a name (say, a digest to fetch
  once), with a fencing token that grows with every grant of it, measured by the driver's clock.
* **In-use marks** (``marks.py``): digests a host serves from the blob store or fills, spared by collectors.
* Repositories are keys like ``docker.io/library/alpine`` (cached, under their registry) or
  ``local/<name>`` (pushed to, :func:`local_repo`); digests are ``<algorithm>:<hex>`` strings.
  Calls block: the server makes writes from a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..storage.driver import UploadParts
from .marks import InUseMarks
from .records import RecordListing

LOCAL = "local"


def local_repo(name: str) -> str:
    """The index key of a pushed repository."""
    return f"{LOCAL}/{name}"


def unpin_if_untagged(metadata: Metadata, repo: str, digest: str) -> None:
    """Unpin *digest* in *repo* once no tag there names it, if its pin is one that goes with its last
    tag (``pin(tagged=True)``: a preload under a tag, deleted or moved by a later preload), so eviction
    and the collector may free it.  A pin of a user's, or of a preload by digest, stays."""
    if metadata.is_pinned(repo, digest) and not metadata.tags_pointing_to(repo, digest):
        metadata.unpin_tagged(repo, digest)


class MetadataUnavailable(RuntimeError):
    """The index cannot be reached now (its database server is down, unreachable or not answering):
    nothing was read by the failed call, and a later call may succeed.  A change whose connection was
    lost while its commit was on the way may still be applied by the server.  Its message names the
    database and never holds a password; the HTTP edge answers it with ``503 UNAVAILABLE``."""


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: str
    media_type: str
    fetched_at: float  # time.time() when the upstream last confirmed it (pushed: when pushed)


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class UploadRecord:
    """A push upload in progress: the repository *name* it is for, when it started (``time.time()``),
    and where its first bytes went in the blob store (``parts``; None while all are in its local file).

    Replicas of a cluster (``registry/roaming.py``) also keep the upload's unsent *tail* in the
    bucket: *tail* is how many bytes past the parts it holds (the upload's offset is
    ``parts.sent + tail``), *written_at* when a request last wrote to the upload (``time.time()``).
    One host keeps its tail in its local file only: 0 and None, and names itself as the upload's
    *holder* (``metadata/holders.py``; None in a record made before records named it, and a replica's).
    """

    name: str
    started_at: float
    parts: UploadParts | None = None
    tail: int = 0
    written_at: float | None = None
    holder: str | None = None

    def flat(self) -> tuple[str, float, str | None, int | None, list[str] | None, int, float | None, str | None]:
        """As a driver keeps it: ``(name, started_at, upload_id, part_size, etags, tail, written_at, holder)``."""
        sent = (p.upload_id, p.part_size, list(p.etags)) if (p := self.parts) else (None, None, None)
        return (self.name, self.started_at, *sent, self.tail, self.written_at, self.holder)

    @classmethod
    def unflat(cls, name: str, started_at: float, upload_id: str | None = None, part_size: int | None = None,
               etags: Iterable[str] | None = None, tail: int | None = 0, written_at: float | None = None,
               holder: str | None = None, *later: object) -> UploadRecord:
        """The record :meth:`flat` gave (a version that kept less: its first two, five or seven; more,
        *later*: the fields a later version added, which a rollback to this one leaves aside)."""
        parts = None if upload_id is None else UploadParts(upload_id, int(part_size or 0), tuple(etags or ()))
        return cls(name, float(started_at), parts, int(tail or 0), None if written_at is None else float(written_at),
                   holder)


@dataclass(frozen=True, slots=True)
class UpstreamReferrers:
    """An upstream's referrers list as kept (:meth:`ReferrerIndex.put_upstream_referrers`):
    *artifact_type* None for the whole list, else the type the upstream filtered it by."""

    repo: str
    subject: str
    artifact_type: str | None
    fetched_at: float
    descriptors: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Lease:
    """An exclusive claim on *name* by *holder* until *expires* (seconds, the driver's clock).

    *token* is the fencing token: larger than that of every earlier grant of the name, so a holder
    that lost its lease (paused past the expiry, then taken over) carries a smaller one than its
    successor, and a write checked against the current lease refuses it.  Holders renew well before
    their ``ttl`` passes by their own clock and never compare *expires* with it."""

    name: str
    holder: str
    token: int
    expires: float


class Generation(Protocol):
    """A token that changes when the index withdraws something (see the module's docstring)."""

    def read(self) -> bytes:
        """The token now: a few bytes, compared for equality only; costs a memory read."""
        ...


class TagIndex(Protocol):
    def get_tag(self, repo: str, tag: str) -> TagRecord | None: ...

    def set_tag(self, repo: str, tag: str, record: TagRecord) -> None:
        """Point *tag* at a manifest and register *repo* in the catalog; moving it from another
        digest or media type is a withdrawal (the generation moves)."""
        ...

    def untag(self, repo: str, tag: str) -> bool:
        """Forget a tag (the generation moves); False if it was not known."""
        ...

    def untag_many(self, repo: str, tags: Iterable[str]) -> None:
        """Forget several tags of one repository at once (eviction); moves the generation unless
        *tags* is empty."""
        ...

    def tags(self, repo: str) -> list[str]: ...  # sorted

    def tags_pointing_to(self, repo: str, digest: str) -> list[str]: ...

    def all_tags(self) -> list[tuple[str, str, TagRecord]]:
        """Every ``(repo, tag, record)``: a snapshot, for the collector and fsck."""
        ...


class ManifestIndex(Protocol):
    def get_manifest(self, digest: str) -> ManifestRecord | None: ...

    def put_manifest(self, digest: str, media_type: str, size: int) -> None:
        """Record that the stored object *digest* is a manifest of *media_type*, *size* bytes.  Recording
        it again with another media type or size moves the generation (answers kept of it are out of date)."""
        ...

    def manifest_digests(self) -> list[str]: ...  # every digest with a manifest record: a snapshot

    def count_manifests(self) -> int: ...

    def link(self, repo: str, digests: Iterable[str]) -> None:
        """Let *repo* serve *digests* (manifests and blobs); registers *repo* in the catalog."""
        ...

    def unlink(self, repo: str, digest: str) -> bool:
        """Take a digest away from a repository (the generation moves); False if not linked."""
        ...

    def is_linked(self, repo: str, digest: str) -> bool: ...

    def all_links(self) -> list[tuple[str, str]]: ...  # every (repo, digest) link: a snapshot


class RepositoryIndex(Protocol):
    def repositories(self) -> list[str]: ...  # every repository key (tagged, linked or made local), sorted

    def has_repository(self, repo: str) -> bool: ...

    def mark_local(self, name: str, now: float) -> None:
        """Make ``local/<name>`` a pushed repository, created at *now*: its requests never go to
        the upstream again.  The first mark moves the generation; later ones change nothing."""
        ...

    def is_local(self, name: str) -> bool: ...

    def release_local(self, name: str) -> bool:
        """Undo :meth:`mark_local` of *name* if it holds nothing (no link, tag or referrer in
        ``local/<name>``) and has no upload: its pushes given up before any content landed.  It
        leaves the catalog and the generation moves; False if it holds something or is not local."""
        ...

    def release_repository(self, repo: str) -> bool:
        """Take *repo* out of the catalog if it holds nothing (a ``local/<name>``: :meth:`release_local`);
        the generation moves.  False if it holds something or is not there (``mirror migrate --delete``)."""
        ...


class ReferrerIndex(Protocol):
    def add_referrer(self, repo: str, subject: str, descriptor: dict[str, object]) -> None:
        """Add the descriptor of a manifest whose ``subject`` is *subject* (once per its ``digest``)."""
        ...

    def remove_referrer(self, repo: str, subject: str, digest: str) -> None: ...

    def referrers(self, repo: str, subject: str) -> list[dict[str, object]]:
        """Descriptors added for *subject* in *repo*, in the order they were added."""
        ...

    def put_upstream_referrers(self, repo: str, subject: str, artifact_type: str | None,
                               descriptors: Iterable[dict[str, Any]], now: float) -> None:
        """Keep an upstream's complete referrers list (of *artifact_type* only, if it filtered)."""
        ...

    def upstream_referrers(self, repo: str, subject: str, artifact_type: str | None) -> list[dict[str, Any]] | None:
        """The upstream's last list that covers *artifact_type* (its filtered list, else the whole one),
        unfiltered; None if it never answered one."""
        ...

    def set_referrers_api(self, registry: str, present: bool) -> None: ...

    def referrers_api(self, registry: str) -> bool | None:
        """Whether *registry* answered the Referrers API when last asked; None if never asked."""
        ...


class PinIndex(Protocol):
    def pin(self, repo: str, digest: str, now: float | None = None, *, tagged: bool = False) -> None:
        """Keep a manifest root (and what it references) in *repo* whatever eviction and GC decide.
        *tagged*: until its last tag goes (:meth:`unpin_tagged`); a pin stays *tagged* only while
        every pin of it was."""
        ...

    def unpin(self, repo: str, digest: str) -> bool: ...

    def unpin_tagged(self, repo: str, digest: str) -> bool:
        """Unpin *digest* in *repo* if its pin is *tagged*; whether it was."""
        ...

    def is_pinned(self, repo: str, digest: str) -> bool: ...

    def pins(self, *, tagged: bool = False) -> list[tuple[str, str]]:
        """Every pinned ``(repo, digest)``; only the *tagged* ones if asked."""
        ...


class UploadIndex(Protocol):
    def put_upload(self, uuid: str, record: UploadRecord) -> None: ...

    def get_upload(self, uuid: str) -> UploadRecord | None: ...

    def delete_upload(self, uuid: str) -> None: ...

    def upload_ids(self) -> list[str]:
        """The uuid of every upload record: a snapshot, for fsck."""
        ...


class UpkeepIndex(Protocol):
    """Non-distributable layers' urls, access times, the byte count, and withdrawals in bulk."""

    def set_foreign_urls(self, digest: str, urls: Iterable[str]) -> None: ...

    def foreign_urls(self, digest: str) -> tuple[str, ...]:
        """Where a non-distributable layer can be downloaded, as a cached manifest said; () if unknown."""
        ...

    def record_access(self, seen: Mapping[tuple[str, str], float]) -> None:
        """Merge a batch of ``{(repo, digest): last used}`` into the index, keeping the later time."""
        ...

    def access_times(self) -> dict[tuple[str, str], float]:
        """``{(repo, digest): last used}`` of every manifest served since it was linked: a snapshot."""
        ...

    def forget(self, *, links: Iterable[tuple[str, str]] = (), manifests: Iterable[str] = (),
               accesses: Iterable[tuple[str, str]] = ()) -> None:
        """Withdraw ``(repo, digest)`` links, manifest records and access times in one
        transaction; the generation moves if any of them was there."""
        ...

    def add_usage(self, delta: int) -> int:
        """Adjust the store's byte count (shared by every instance) and return it; atomic."""
        ...

    def set_usage(self, value: int) -> None: ...

    def usage(self) -> int:
        """Bytes in the store as counted; 0 before anything was counted."""
        ...

    def set_held(self, held: dict[str, int]) -> None:
        """What kept the store above its eviction target at the last collection: reason -> bytes."""
        ...

    def held(self) -> dict[str, int]: ...


class Leases(Protocol):
    """Exclusive, expiring claims on names, with fencing tokens (see :class:`Lease`).

    A name is free when no lease on it was granted, or the last one was released or expired by
    the driver's clock.  Tokens come from one counter that only grows (a sequence), so they grow
    per name across releases and expiries too.
    """

    def take_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        """Claim *name* for *ttl* seconds if it is free; None while someone (*holder* too) holds it."""
        ...

    def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        """Extend a lease still held to *ttl* seconds from now (same token); None if it expired or
        was taken over: the holder must stop acting under it."""
        ...

    def release_lease(self, lease: Lease) -> bool:
        """Give the name up if *lease* is still its latest grant; True if it had not expired."""
        ...

    def current_lease(self, name: str) -> Lease | None:
        """The unexpired lease on *name* (who holds it, its token), or None if it is free."""
        ...

    def prune_leases(self, keep: float) -> int:
        """Forget leases released or expired more than *keep* seconds ago (by the driver's clock), of
        which one is left per name ever leased (a fill per blob, an upload): how many were.  What a
        later grant of such a name draws is unchanged: tokens come from the one counter."""
        ...


class Metadata(TagIndex, ManifestIndex, RepositoryIndex, ReferrerIndex, PinIndex, UploadIndex, UpkeepIndex,
               RecordListing, Leases, InUseMarks, Protocol):
    """The whole index, as one driver keeps it (see the module's docstring)."""

    #: True when instances on other hosts may share this index: what they must do one at a time
    #: (the collector) they then settle through its leases, not through files of one data directory.
    shared_by_hosts: bool = False

    #: True when reads are answered in this process (a database file on local disk, microseconds):
    #: code on the event loop calls them directly.  False for a database server (a round trip):
    #: code on the event loop asks :meth:`known_link` and its siblings, then reads from a worker
    #: thread only when they do not know (``registry/reads.py``), so one slow query holds up no
    #: other request.
    local: bool = True

    def open_thread(self) -> None:
        """Open what this thread's reads need, if the driver opens it per thread on first use
        (SQLite: one connection per thread): called on the event loop at start-up, so that the
        first request after a start does not pay for it.  Raises what a read raises."""
        return None

    def known_link(self, repo: str, digest: str) -> bool:
        """True when this instance knows, without I/O, that *repo* holds *digest* (False: it does
        not know; ask :meth:`is_linked`).  A driver that keeps no answers never knows."""
        return False

    def known_local(self, name: str) -> bool | None:
        """What :meth:`is_local` would answer, when known without I/O; else None."""
        return None

    def known_manifest(self, digest: str) -> ManifestRecord | None:
        """The manifest record of *digest* when known without I/O; else None (ask :meth:`get_manifest`)."""
        return None

    @property
    def generation(self) -> Generation:
        """Changes on every withdrawal, by any instance over the same data."""
        ...

    def index_id(self) -> str:
        """What tells this index from every other: made by its first opening, kept for ever (a bucket
        records the index its objects belong to: ``storage/s3binding.py``)."""
        raise NotImplementedError

    def close(self) -> None: ...
