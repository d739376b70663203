"""One repository, whatever holds it: the protocol the /v2/ routes call, and its result types.

A :class:`Repository` is bound to one name as the client spelt it (``registry/namespaces.py`` picks the
implementation: a pushed repository, ``registry/local.py``, or the cache of an upstream registry,
``registry/cached.py``).  Routes parse the request, call one method and render what it returns; they
never ask which kind of repository they hold.

Every method raises :class:`~mirror.spec.errors.APIError` with the spec's code for what the client
did wrong or what is missing (``MANIFEST_UNKNOWN``, ``BLOB_UNKNOWN``, ``BLOB_UPLOAD_UNKNOWN``...).
A repository that takes no pushes refuses every write with the error of the namespace policy
(``UNSUPPORTED`` when push is disabled, ``DENIED`` outside ``push.prefixes``), before it reads
anything of the request body.

Every implementation passes ``tests/test_repository_contract.py``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..spec.errors import APIError
from ..spec.reference import Digest
from ..storage.bypass import BypassBlob
from ..storage.driver import BlobReader
from ..storage.growing import GrowingBlob


class Outcome(str, enum.Enum):
    """How an answer was served: the ``X-Mirror-Cache`` header and the metrics' label."""

    HIT = "HIT"  # from the store
    MISS = "MISS"  # from the upstream, stored while it was served
    STALE = "STALE"  # from the store, the upstream failing
    COALESCED = "COALESCED"  # following another request's fetch from the upstream
    BYPASS = "BYPASS"  # from the upstream, not stored (the store refused it, or another upstream's fill hangs)
    LOCAL = "LOCAL"  # from a pushed repository


@dataclass(frozen=True)
class ManifestResult:
    body: bytes
    media_type: str
    digest: str
    outcome: Outcome
    #: For an answer by tag: the ``time.time()`` until which it may be given again without asking
    #: the upstream (one ``tag_ttl`` after the upstream last confirmed it); None otherwise.
    fresh_until: float | None = None
    #: Whether the same answer may be given again from memory (``api/memo.py``) until the index moves,
    #: and until :attr:`fresh_until` if set.
    memorable: bool = False
    #: Records a use of the manifest for eviction, to repeat for answers given from memory.
    touch: Callable[[], None] | None = None

    @property
    def remembered_outcome(self) -> str:
        """The ``X-Mirror-Cache`` of this answer given again from memory: it is stored by then."""
        return Outcome.LOCAL.value if self.outcome is Outcome.LOCAL else Outcome.HIT.value


@dataclass(frozen=True)
class BlobHead:
    #: Bytes.
    size: int
    outcome: Outcome


@dataclass
class BlobResult:
    """A blob to send (``responses.BlobResponse`` closes the source); ``source.size`` is None
    while a fill of unknown length grows."""

    source: BlobReader | GrowingBlob | BypassBlob
    outcome: Outcome


@dataclass(frozen=True)
class ReferrersResult:
    #: Descriptors of the manifests whose subject is the digest (OCI distribution spec, "Listing Referrers").
    manifests: list[dict[str, Any]]
    outcome: Outcome


@dataclass(frozen=True)
class TagsPage:
    #: Lexically sorted, at most ``n`` of them after ``last``.
    tags: list[str]
    #: Whether more follow this page.
    more: bool
    outcome: Outcome


@dataclass(frozen=True)
class UploadState:
    uuid: str
    #: Bytes received so far.
    offset: int


@dataclass(frozen=True)
class PushedManifest:
    digest: str
    #: The digest in the manifest's ``subject``, if any (answered as ``OCI-Subject``).
    subject: str | None


class Repository(Protocol):
    """One repository, bound to the name the client used (``name``, for ``Location`` headers)."""

    name: str

    # -- reads --

    async def manifest(self, reference: str | Digest, accept: set[str]) -> ManifestResult:
        """A manifest by tag or digest; *accept* is the client's media types (an index may be
        answered with its linux/amd64 manifest to a client that reads none)."""
        ...

    async def manifest_head(self, reference: str | Digest, accept: set[str]) -> ManifestResult:
        """As :meth:`manifest`, for a ``HEAD`` (the body gives the ``Content-Length``)."""
        ...

    async def blob_head(self, digest: Digest) -> BlobHead:
        ...

    async def blob(self, digest: Digest) -> BlobResult:
        ...

    async def tags(self, n: int | None, last: str | None) -> TagsPage:
        """One page of tags (OCI distribution spec, "Listing Tags")."""
        ...

    async def referrers(self, digest: Digest, artifact_type: str | None) -> ReferrersResult:
        """The referrers of *digest*, only those of *artifact_type* if given."""
        ...

    # -- writes --

    async def put_manifest(self, reference: str | Digest, content_type: str, body: AsyncIterator[bytes],
                           declared_length: str | None) -> PushedManifest:
        """Check and store a pushed manifest (at most ``MAX_MANIFEST_BYTES``, else ``413``)."""
        ...

    async def delete_manifest(self, reference: str | Digest) -> None:
        """Untag a tag, or forget a manifest by digest with its tags (``delete.enabled``)."""
        ...

    async def delete_blob(self, digest: Digest) -> None:
        ...

    # -- uploads (distribution-spec, "Pushing blobs") --

    async def start_upload(self) -> UploadState:
        ...

    async def mount(self, digest: Digest, source: str) -> bool:
        """Link a blob repository *source* holds into this one; False when it cannot be mounted."""
        ...

    async def upload_status(self, uuid: str) -> UploadState:
        ...

    async def append(self, uuid: str, body: AsyncIterator[bytes], content_range: str | None,
                     length: int | None = None) -> UploadState:
        """Add a chunk at the end of the upload (``Content-Range`` must start there and span the body's
        *length*, its ``Content-Length``, else ``416``)."""
        ...

    async def finish(self, uuid: str, digest: Digest, body: AsyncIterator[bytes],
                     content_range: str | None = None, length: int | None = None) -> None:
        """Append the last bytes (as :meth:`append`), verify *digest* and move the blob into the store."""
        ...

    async def cancel(self, uuid: str) -> None:
        ...


def paginate(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """At most *n* of *items* (sorted) after *last*, and whether more follow."""
    selected = [t for t in sorted(items) if last is None or t > last]
    if n is None:
        return selected, False
    return selected[:n], len(selected) > n


async def read_limited(body: AsyncIterator[bytes], declared_length: str | None, limit: int) -> bytes:
    """A request body of at most *limit* bytes (a manifest), else ``413`` ``MANIFEST_INVALID``
    as soon as its ``Content-Length`` or its bytes say so."""
    declared = declared_length
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise APIError("MANIFEST_INVALID", f"manifest is larger than {limit} bytes", status=413)
    received = bytearray()
    async for chunk in body:
        received += chunk
        if len(received) > limit:
            raise APIError("MANIFEST_INVALID", f"manifest is larger than {limit} bytes", status=413)
    return bytes(received)


def followed(shared: tuple[ManifestResult, bool]) -> ManifestResult:
    """A single-flight manifest result as this caller saw it: a fetch it joined is ``COALESCED``."""
    result, joined = shared
    return replace(result, outcome=Outcome.COALESCED) if joined and result.outcome is Outcome.MISS else result
