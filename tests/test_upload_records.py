"""An upload whose process ended as it finished: the blob stored (its file moved into the store),
its record not yet dropped.  Before, the record stayed for good: ``mirror fsck`` failed on it until
``--repair`` and its name stayed a pushed repository, never falling through to the upstream again."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

import httpx
import pytest

from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.seaweedfs import SeaweedS3
from tests.support.storecheck import mirror_cli
from tests.support.waiting import eventually
from tests.test_s3_serve import Bucket

MIB = 1 << 20


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


@pytest.mark.slow
def test_two_mirrors_without_cluster_settings_on_one_index_leave_each_others_uploads_alone(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """Two mirrors without ``cluster`` settings on one bucket and database (a rollout's new pod beside the
    one it replaces while that drains; ``mirror fsck`` run from another host) each find the other's upload
    records without a file of their own.  Before, the other's sweep dropped such a record at its second
    look and its ``fsck --repair`` at once: the push in progress got 404 ``BLOB_UPLOAD_UNKNOWN``.
    A record whose mirror has ended on this host is still found and dropped."""
    env = Bucket(seaweedfs, s3_bucket).env(MIRROR_METADATA_DRIVER="postgres",
                                           MIRROR_METADATA_POSTGRES_DSN=postgres.create_database())
    first = mirror_factory(env=env)
    layer = os.urandom(7 * MIB)  # a 5 MiB part goes to the bucket, the rest stays in first's file
    location = http.post(f"{first.url}/v2/team/app/blobs/uploads/").headers["location"]
    uuid = location.rsplit("/", 1)[1]
    assert http.patch(first.url + location, content=layer[:6 * MIB]).status_code == 202
    second = mirror_factory(env=env | {"MIRROR_PUSH_UPLOAD_TTL": "16s"})  # sweeps at start and every 8 s
    time.sleep(9)
    assert second.running
    went_on = http.patch(first.url + location, content=layer[6 * MIB:], headers={
        "Content-Range": f"{6 * MIB}-{len(layer) - 1}"})
    assert went_on.status_code == 202, (went_on.text, second.log_tail(20))

    checked = mirror_cli("fsck", "--repair", "--data", second.data_dir, env=env, timeout=120)
    assert checked.returncode == 0 and "upload record" not in checked.stdout, checked.stdout + checked.stderr
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    done = http.put(f"{first.url}{location}?digest={digest}")
    assert done.status_code == 201, done.text
    pulled = http.get(f"{second.url}/v2/team/app/blobs/{digest}")
    assert pulled.status_code == 200 and hashlib.sha256(pulled.content).hexdigest() == digest[7:]

    left = http.post(f"{first.url}/v2/team/left/blobs/uploads/").headers["location"].rsplit("/", 1)[1]
    first.stop()  # its file stays in its data directory, which no other mirror sees
    found = mirror_cli("fsck", "--data", second.data_dir, env=env, timeout=120)
    assert found.returncode == 1 and f"upload record without its file: {left}" in found.stdout, found.stdout
    assert uuid not in found.stdout
    assert eventually(lambda: "has no file left" in second.log_tail(200), timeout=30), second.log_tail(20)
    assert http.get(f"{second.url}/v2/_catalog").json() == {"repositories": ["team/app"]}


@pytest.mark.slow
def test_the_upload_records_of_a_mirror_that_ended_on_another_host_go_once_its_running_lease_lapses(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client,
) -> None:
    """A rollout's pod killed on another host leaves its upload records in the shared index, their files
    gone with it.  Before, such a record was spared as another running mirror's until ``push.upload_ttl``
    (a day by default): its repository stayed a pushed one and its parts stayed in the bucket.  Each mirror
    on an object store and a shared index now holds a running lease (``metadata/holders.py``): while it
    runs its records are left alone; once its lease lapses they are found, and repaired, at once."""
    bucket = Bucket(seaweedfs, s3_bucket)
    env = bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=postgres.create_database(),
                     MIRROR_CLUSTER_LEASE_TTL="1s")  # the running lease lasts 4 s unrenewed
    elsewhere = ["unshare", "--uts", "sh", "-c", 'hostname pod-on-another-host && exec "$@"', "sh"]
    first = mirror_factory(env=env, wrapper=elsewhere)
    location = http.post(f"{first.url}/v2/team/gone/blobs/uploads/").headers["location"]
    uuid = location.rsplit("/", 1)[1]
    assert http.patch(first.url + location, content=os.urandom(6 * MIB)).status_code == 202  # a part sent
    second = mirror_factory(env=env)
    time.sleep(5)  # longer than the lease: the first renews it
    running = mirror_cli("fsck", "--data", second.data_dir, env=env, timeout=120)
    assert running.returncode == 0 and uuid not in running.stdout, running.stdout + running.stderr

    first.kill9()  # no graceful stop: its lease lapses
    time.sleep(5)
    found = mirror_cli("fsck", "--repair", "--data", second.data_dir, env=env, timeout=120)
    assert found.returncode == 0 and f"upload record without its file: {uuid} (repaired)" in found.stdout, \
        found.stdout + found.stderr
    assert bucket.uploads() == []  # its part aborted with it
    assert http.get(f"{second.url}/v2/_catalog").json() == {"repositories": []}  # the name given back
    clean = mirror_cli("fsck", "--data", second.data_dir, env=env, timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
