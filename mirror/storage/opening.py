"""Opening the configured blob-store driver (``storage.driver``): the one place that chooses it."""

from __future__ import annotations

from ..config.sections import StorageConfig
from .driver import BlobStore, StoreSetupError, UploadTails


def open_blob_store(storage: StorageConfig, *, replica: bool = False) -> BlobStore:
    """The store as *storage* says: the filesystem driver under ``storage.path`` (``--data``), or
    the S3 driver on ``storage.s3.*``, whose local data directory (fills in progress, uploads,
    locks) is ``storage.path`` too.  *replica*: for a replica of a cluster (``cluster.advertise``),
    whose push uploads may have their local file on another replica (``S3Store.shared_pushes``).

    Nothing is created or contacted here (call ``create()``); boto3 is imported only for ``s3``
    (:class:`StoreSetupError` when it is not installed).
    """
    if storage.driver == "s3":
        try:
            from .s3 import S3Store
        except ModuleNotFoundError as exc:  # boto3 comes with the s3 extra
            raise StoreSetupError(
                f"storage.driver s3 needs boto3, which is not installed ({exc}): install the mirror with its s3"
                " extra (pip install 'mirror[s3]', or '.[s3]' from a checkout; the image: build it with"
                " --build-arg EXTRAS=s3)") from None
        from .s3options import S3Options

        store = S3Store(S3Options.from_config(storage), storage.path)
        store.shared_pushes = replica
        return store
    from .filesystem import Store

    return Store(storage.path)


def upload_tails(store: BlobStore) -> UploadTails:
    """Where the replicas of a cluster keep the unsent tails of push uploads: the bucket of *store*,
    which must be the S3 driver's (a cluster needs ``storage.driver: s3``)."""
    from .s3 import S3Store
    from .s3uploads import S3UploadTails

    if not isinstance(store, S3Store):
        raise TypeError("the uploads of a cluster's replicas need the s3 storage driver")
    return S3UploadTails(store)
