"""Where and how the S3 driver reaches its bucket: the ``storage.s3`` settings it uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config.sections import StorageConfig

__all__ = ["DEFAULT_CHUNK", "S3Options"]

#: ``storage.s3.chunksize`` when not set: the size of a multipart upload's parts.
DEFAULT_CHUNK = 16 << 20


@dataclass(frozen=True, slots=True)
class S3Options:
    """Where and how to reach the bucket (distribution's s3 driver keys; ``accesskey`` empty: the
    SDK's default credentials, from the environment or the instance)."""

    bucket: str
    region: str = "us-east-1"
    regionendpoint: str | None = None
    rootdirectory: str = ""
    accesskey: str = ""
    secretkey: str = ""
    forcepathstyle: bool = False
    chunksize: int = DEFAULT_CHUNK
    redirect: bool = False
    #: The files ``accesskey`` and ``secretkey`` were read from (``storage.s3.accesskey_file``,
    #: ``secretkey_file``), read again while the mirror runs (``s3client.py``): keys rotated there are taken.
    key_files: tuple[Path | None, Path | None] = field(default=(None, None), compare=False)

    @classmethod
    def from_config(cls, storage: StorageConfig) -> S3Options:
        """The options of the ``storage.s3.*`` keys (``storage.driver: s3`` has made sure of a bucket)."""
        key, secret = storage.s3_accesskey_file, storage.s3_secretkey_file
        return cls(storage.s3_bucket or "", storage.s3_region, storage.s3_regionendpoint, storage.s3_rootdirectory,
                   storage.s3_accesskey or "", storage.s3_secretkey or "", storage.s3_forcepathstyle,
                   storage.s3_chunksize, storage.s3_redirect,
                   (key.path if key else None, secret.path if secret else None))

    def __repr__(self) -> str:  # never show the secret
        return (f"S3Options(bucket={self.bucket!r}, region={self.region!r}, regionendpoint={self.regionendpoint!r},"
                f" rootdirectory={self.rootdirectory!r}, chunksize={self.chunksize}, redirect={self.redirect})")
