"""The end-to-end scenarios on S3 + PostgreSQL: objects in a real SeaweedFS bucket, the index in a real
PostgreSQL database, a real upstream registry, the real mirror under uvicorn, real clients (dockerd, skopeo).

The same scenarios run on the filesystem and diskcache in test_clients.py, test_gc.py and
test_push_clients.py; here each also checks the bucket (objects under their digests, no multipart upload
left) and the rows in PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from tests.support.catalog import StandardImages
from tests.support.dockerd import Dockerd, pull, run
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.registry import UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3
from tests.support.skopeo import everything
from tests.support.waiting import wait_for
from tests.test_s3_serve import Bucket

pytestmark = pytest.mark.slow
#: How the index names library/small of the default upstream (keys carry the registry's name).
HUB_SMALL = "docker.io/library/small"


@dataclass
class Backends:
    """The bucket and the database of one test: ``env`` starts the mirror (or its CLI) on both."""

    bucket: Bucket
    dsn: str

    def env(self, **extra: str) -> dict[str, str]:
        return self.bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=self.dsn, **extra)

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(sql, params).fetchall()


@pytest.fixture
def backends(seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer) -> Backends:
    return Backends(Bucket(seaweedfs, s3_bucket), postgres.create_database())


def blob_path(name: str, digest: str) -> re.Pattern[str]:
    return re.compile(rf"^/v2/{re.escape(name)}/blobs/{re.escape(digest)}$")


def test_dockerd_pulls_and_runs_an_image_kept_in_the_bucket_and_indexed_in_postgres(
    backends: Backends, images: StandardImages, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer], dockerd_factory: Callable[..., Dockerd],
) -> None:
    small, bucket = images.small, backends.bucket
    mirror = mirror_factory(env=backends.env())
    daemon = dockerd_factory(registry_mirror=mirror.url)
    upstream.clear_counts()

    pull(daemon, "small:1")
    assert run(daemon, "small:1", "cat", "/etc/image-marker") == "small"
    assert daemon.docker("image", "inspect", "--format", "{{index .RepoDigests 0}}", "small:1").stdout.strip() \
        == f"small@{small.digest}"
    assert {d: upstream.count("GET", blob_path("library/small", d)) for d in small.blobs} \
        == dict.fromkeys(small.blobs, 1)

    # The objects in the bucket, each whole under its digest; nothing left half sent.
    wait_for(lambda: set(bucket.objects()) == everything(small), timeout=30, what="the image in the bucket")
    for digest in bucket.objects():
        assert bucket.digest_of(digest) == digest
    assert bucket.uploads() == []
    # The rows in PostgreSQL; no index in the data directory.
    assert backends.rows("SELECT repo, tag, digest FROM tags") == [(HUB_SMALL, "1", small.digest)]
    assert backends.rows("SELECT digest, size FROM manifests") == [(small.digest, small.size)]
    linked = {d for (d,) in backends.rows("SELECT digest FROM links WHERE repo = %s", HUB_SMALL)}
    assert set(small.blobs) <= linked
    assert not (mirror.data_dir / "index").exists()
