"""Which index an S3 store's objects belong to: the object ``<rootdirectory>/index-id`` in its bucket.

An index records the store it describes (a PostgreSQL index: ``settings.store``; a data directory:
``DATA/index.json``), and the bucket records its index in turn (``metadata/opening.py``
:func:`~mirror.metadata.opening.bind_bucket`).  A second index on the same bucket, a new or
re-created database, a staging deployment pointed at production's bucket, would see every object as
unreferenced, and its collector would delete them all: such a start is refused instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from .s3objects import backend_error, missing

if TYPE_CHECKING:
    from .s3 import S3Store

#: The key, under ``rootdirectory``, of the object naming the index (its id, one line of text).
BINDING = "index-id"


def recorded_index(store: S3Store) -> str | None:
    """The id of the index the bucket's objects belong to, or None if none was recorded.

    Raises ``StoreUnavailable`` if the store does not answer or refuses."""
    try:
        answer = store.client.get_object(Bucket=store.bucket, Key=store.root + BINDING)
        return str(answer["Body"].read().decode("utf-8", "replace").strip()) or None
    except (BotoCoreError, ClientError) as exc:
        if missing(exc):
            return None
        what = f"reading {store.root + BINDING!r} in bucket {store.bucket!r}"
        raise backend_error(exc, what, store.options) from exc


def record_index(store: S3Store, index_id: str) -> None:
    """Record that the bucket's objects belong to the index *index_id*.  Raises ``StoreUnavailable``."""
    try:
        store.send.put_object(Bucket=store.bucket, Key=store.root + BINDING, Body=f"{index_id}\n".encode())
    except (BotoCoreError, ClientError) as exc:
        what = f"writing {store.root + BINDING!r} in bucket {store.bucket!r}"
        raise backend_error(exc, what, store.options) from exc


def holds_objects(store: S3Store) -> bool:
    """Whether any object is stored under ``<rootdirectory>/blobs/``.  Raises ``StoreUnavailable``."""
    try:
        answer = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.root + "blobs/", MaxKeys=1)
    except (BotoCoreError, ClientError) as exc:
        raise backend_error(exc, f"listing bucket {store.bucket!r}", store.options) from exc
    return bool(answer.get("Contents"))
