"""The checks every blob-store driver makes before content becomes visible under a digest.

A digest names the identity bytes it hashes, except for a signed Docker schema 1 manifest,
which is named by the digest of its payload (``spec/schema1.py``).  Drivers call these, so the
rule has one home whatever holds the bytes.

May import: ``spec``, and ``driver`` of this package.
"""

from __future__ import annotations

from ..spec import schema1
from ..spec.reference import Digest
from .driver import BlobStore, DigestMismatch, SizeMismatch


def signed_schema1_named(data: bytes, digest: Digest) -> bool:
    """True if *data* is a signed schema 1 manifest whose payload hashes to *digest* (how it is named)."""
    if not schema1.looks_signed(data):
        return False
    try:
        return schema1.digest(data, digest.algorithm) == digest
    except schema1.Schema1Error:
        return False


def check_written(digest: Digest, content: Digest, expected_size: int | None, written: int, hexdigest: str) -> None:
    """Raise :class:`SizeMismatch` or :class:`DigestMismatch` unless *written* bytes hashing to
    *hexdigest* are what an ingest of *digest* (hashed as *content*) expected."""
    if expected_size is not None and written != expected_size:
        raise SizeMismatch(f"{digest}: got {written} bytes, expected {expected_size}")
    if hexdigest != content.hex:
        raise DigestMismatch(f"content does not match {content} (got {content.algorithm}:{hexdigest})")


def put_verified(store: BlobStore, digest: Digest, data: bytes) -> None:
    """Store a small object given in full (a manifest) through *store*'s ingest, unless present.

    *digest* is the hash of *data*, or for a signed schema 1 manifest that of its payload;
    raises :class:`DigestMismatch` when it is neither.
    """
    if store.exists(digest):
        return
    content = Digest.of(data, digest.algorithm)
    if content != digest and not signed_schema1_named(data, digest):
        raise DigestMismatch(f"content does not match {digest} (got {content})")
    ingest = store.ingest(digest, len(data), content=content)
    try:
        ingest.write(data)
        ingest.commit()
    finally:
        ingest.close()
