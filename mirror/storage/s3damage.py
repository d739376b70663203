"""Objects of the S3 driver found damaged in the bucket: replaced or truncated behind the mirror's back.

Nothing guards a bucket against a writer other than the mirror (or bit rot), and S3 user metadata
is no record (a replacing ``PutObject`` sets its own), so what is read whole is hashed: a manifest
read with :func:`checked_bytes`, a blob as it streams (``S3Reader``, whose last byte waits for the
verdict).  An object that does not match its digest is logged once per process, counted
(``S3Store.on_corrupt``) and removed (:func:`condemn`): a cached blob is then fetched again from
its upstream, a pushed one is unknown; its bytes are never answered as the blob.

A range cannot be checked by itself: it is served only from an object whose ``ETag`` this process
saw with content that matched (:func:`vouch`: an object it stored or read whole); any other is
first read whole and hashed (:func:`verify_whole`), once.  A whole read of such an object is not
hashed again either.  That holds because the ``ETag`` is a function of the content: the MD5 of the
object (``PutObject``), or the MD5 of its parts' MD5s and their count (a multipart upload), in S3
and in SeaweedFS alike (metadata rewrites, as ``S3Store.touch`` does, keep it); any rewrite of the
key with other bytes changes it, and a GET's ``ETag`` comes in the same answer as its body.  What
it does not cover is an MD5 collision crafted by someone who both wrote the blob and can write to
the bucket, or bytes changed under the store's own API (the store's checksums are for that).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
from typing import IO, TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from ..spec.manifest import MAX_MANIFEST_BYTES
from ..spec.reference import Digest
from .reads import ShortFile
from .verify import signed_schema1_named

if TYPE_CHECKING:
    from .s3 import S3Store

log = logging.getLogger("mirror.storage.s3")
#: ETags remembered (:func:`vouch`), the least recently vouched forgotten first.
VOUCHED = 65536


class CorruptObject(ShortFile):
    """An object read from the bucket does not hash to its digest (replaced or truncated there): the
    transfer is aborted before its last byte, as for a stored file that ends early."""


def vouch(store: S3Store, digest: Digest, etag: str | None) -> None:
    """The object *digest* with *etag* was seen matching its digest (stored or read whole).  An ETag is
    compared without its quotes: SeaweedFS answers a ``CopyObject``'s bare and a HEAD's quoted."""
    if etag:
        store.vouched[digest] = etag.strip('"')
        store.vouched.move_to_end(digest)
        while len(store.vouched) > VOUCHED:
            store.vouched.popitem(last=False)


def vouched(store: S3Store, digest: Digest, etag: str | None) -> bool:
    return etag is not None and store.vouched.get(digest) == etag.strip('"')


def verify_whole(store: S3Store, digest: Digest, etag: str | None) -> None:
    """Read the object whole and hash it before a range of it (with *etag*) is served; raise
    :class:`CorruptObject` (and condemn it) if it does not match, :class:`ShortFile` if it changed
    meanwhile.  Blocks: call it in a worker thread."""
    answer = store.get_range(digest, 0, (1 << 62))
    hasher, size = hashlib.new(digest.algorithm), 0
    with answer["Body"] as body:
        while data := body.read(1 << 20):
            hasher.update(data)
            size += len(data)
    got = hasher.hexdigest()
    if got != digest.hex and mismatched(store, digest, size, got, etag):
        raise CorruptObject(errno.EIO, f"{digest}: the object in the bucket does not match it")
    vouch(store, digest, answer.get("ETag"))
    if answer.get("ETag") != etag:
        raise ShortFile(errno.EIO, f"{digest} changed in the bucket while a range of it was read")


def read_whole(store: S3Store, digest: Digest) -> bytes | None:
    """The object's bytes as they are in the bucket (None: missing); not checked."""
    try:
        with store.open_stream(digest) as body:
            data: bytes = body.read()
            return data
    except FileNotFoundError:
        return None


def checked_bytes(store: S3Store, digest: Digest) -> bytes | None:
    """The whole object, or None if it is missing or does not match *digest* (then condemned)."""
    data = read_whole(store, digest)
    if data is None:
        return None
    got = hashlib.new(digest.algorithm, data).hexdigest()
    if got != digest.hex and not signed_schema1_named(data, digest):
        condemn(store, digest, len(data), got)
        return None
    return data


def mismatched(store: S3Store, digest: Digest, size: int, got: str, etag: str | None = None) -> bool:
    """An object of *size* bytes (with *etag*, if known) read whole hashed to *got*, not to *digest*:
    True, and it is condemned, unless it is a signed schema 1 manifest (named by its payload's digest)."""
    if size <= MAX_MANIFEST_BYTES:
        whole = read_whole(store, digest)
        if whole is not None and signed_schema1_named(whole, digest):
            return False
    condemn(store, digest, size, got, etag)
    return True


def condemn(store: S3Store, digest: Digest, size: int, got: str, etag: str | None = None) -> None:
    """Log (once per process), count and remove an object that does not match *digest*: the one read
    (with *etag*, if known).  One that replaced it meanwhile (a push of the blob, verified) is kept: its
    ``ETag`` is another, or this process vouched for it."""
    key = store.key(digest)
    try:
        now = store.quick.head_object(Bucket=store.bucket, Key=key).get("ETag")
    except (BotoCoreError, ClientError):
        now = None  # gone already, or the store does not answer: the delete below says which
    if now is not None and (vouched(store, digest, now) or (etag is not None and now != etag)):
        log.warning("object %s in bucket %r did not match its digest as read (%d bytes hashing to %s:%s), but"
                    " was replaced meanwhile: the new one is kept", key, store.bucket, size, digest.algorithm, got)
        return
    if digest not in store.condemned:
        store.condemned.add(digest)
        log.error("object %s in bucket %r does not match its digest (%d bytes hashing to %s:%s):"
                  " removed, never served", key, store.bucket, size, digest.algorithm, got)
    if store.on_corrupt is not None:
        store.on_corrupt(digest)
    try:
        store.remove_key(key)
    except OSError as exc:
        log.warning("could not remove the damaged object %s: %s", key, exc)
    else:
        if now is not None:
            store.committed(-size)  # no longer in the store's size


def checked_copy(store: S3Store, digest: Digest) -> IO[bytes] | None:
    """A local temporary copy of the object (in ``tmp/``; closing it removes it) for readers that
    must read on once it is deleted, or None if it does not match *digest*: a tampered object is not
    handed on (its readers are cut short).  Blocks: call it in a worker thread."""
    hasher = digest.hasher()
    copy = tempfile.TemporaryFile(dir=store.layout.tmp)
    with store.open_stream(digest) as body:
        while data := body.read(1 << 20):
            hasher.update(data)
            copy.write(data)
    copy.flush()
    size = copy.tell()
    if hasher.hexdigest() == digest.hex or (
            size <= MAX_MANIFEST_BYTES and signed_schema1_named(os.pread(copy.fileno(), size, 0), digest)):
        return copy
    copy.close()
    log.warning("%s does not match its digest in the bucket: readers of it are cut short", digest)
    return None
