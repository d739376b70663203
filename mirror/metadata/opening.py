"""Opening the configured metadata driver (``metadata.driver``): the one place that chooses it."""

from __future__ import annotations

from pathlib import Path

from ..config.sections import MetadataConfig
from .driver import Metadata


def open_metadata(config: MetadataConfig, index: Path) -> Metadata:
    """The index as *config* says: the diskcache driver in *index* (``DATA/index/``), or the
    postgres driver at ``metadata.postgres.dsn`` (its schema migrated).

    Raises ``psycopg.OperationalError`` if the database cannot be reached and
    :class:`~mirror.metadata.pgschema.SchemaTooNew` if a newer mirror migrated it; neither message
    holds the DSN's password.
    """
    if config.driver == "postgres":
        from .postgres import PostgresMetadata  # psycopg is imported only when it is used

        assert config.postgres_dsn is not None  # checked by MetadataConfig
        return PostgresMetadata(config.postgres_dsn)
    from .diskcache import DiskcacheMetadata

    return DiskcacheMetadata(index)
