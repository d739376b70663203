"""An upload whose process ended as it finished: the blob stored (its file moved into the store),
its record not yet dropped.  Before, the record stayed for good: ``mirror fsck`` failed on it until
``--repair`` and its name stayed a pushed repository, never falling through to the upstream again."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import httpx
import pytest

from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.storecheck import mirror_cli
from tests.support.waiting import eventually


@pytest.mark.parametrize("metadata", ["diskcache", "postgres"])
def test_an_upload_record_left_without_its_file_is_dropped_and_its_name_given_back(
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client, request: pytest.FixtureRequest, metadata: str,
) -> None:
    env = {"MIRROR_PUSH_UPLOAD_TTL": "1s"}  # swept at start and every second
    if metadata == "postgres":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        env |= {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": postgres.create_database()}
    mirror = mirror_factory(env=env)
    layer = os.urandom(4096)
    digest = hashlib.sha256(layer).hexdigest()
    location = http.post(f"{mirror.url}/v2/team/crashed/blobs/uploads/").headers["location"]
    assert http.patch(mirror.url + location, content=layer).status_code == 202
    assert http.get(f"{mirror.url}/v2/_catalog").json() == {"repositories": ["team/crashed"]}
    mirror.stop()
    # What a process killed between storing the blob and forgetting the upload leaves.
    upload = mirror.data_dir / "uploads" / location.rsplit("/", 1)[1]
    blob = mirror.data_dir / "blobs" / "sha256" / digest[:2] / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    upload.rename(blob)
    found = mirror_cli("fsck", "--data", mirror.data_dir, env=env, timeout=120)
    assert found.returncode == 1 and location.rsplit("/", 1)[1] in found.stdout + found.stderr, found

    mirror.start()
    assert eventually(lambda: http.get(f"{mirror.url}/v2/_catalog").json() == {"repositories": []}, timeout=20), \
        http.get(f"{mirror.url}/v2/_catalog").json()  # the name given back
    gone = http.get(mirror.url + location)
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert "has no file left (its process ended as it finished): its record dropped" in mirror.log_tail(200)
    mirror.stop()
    clean = mirror_cli("fsck", "--data", mirror.data_dir, env=env, timeout=120)
    assert clean.returncode == 0, clean
