"""Opening the configured blob-store driver (``storage.driver``): the one place that chooses it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config.sections import StorageConfig
from .layout import Layout

if TYPE_CHECKING:
    from .filesystem import Store
    from .s3 import S3Store


def open_blob_store(storage: StorageConfig) -> Store | S3Store:
    """The store as *storage* says: the filesystem driver under ``storage.path`` (``--data``), or
    the S3 driver on ``storage.s3.*`` whose local spool is ``DATA/tmp/``.

    Nothing is created or contacted here (call ``create()``); boto3 is imported only for ``s3``.
    """
    if storage.driver == "s3":
        from .s3 import S3Store
        from .s3objects import S3Options

        return S3Store(S3Options.from_config(storage), Layout(storage.path).tmp)
    from .filesystem import Store

    return Store(storage.path)
