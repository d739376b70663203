"""A data directory is bound to its PostgreSQL index by the index's id (``DATA/index.json``), not by
where the database is: a backup restored under another name, or the database named by another host
spelling, is taken; a database dropped and made again at the same place is refused (its empty index
would see every blob as unreferenced).  Real PostgreSQL, the real mirror, its real commands."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support.images import OCI_MANIFEST
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.procs import free_port
from tests.support.registry import UpstreamRegistry
from tests.support.storecheck import mirror_cli, stored_objects
from tests.test_push_api import push_image
from tests.test_s3_serve import Bucket


def _database(dsn: str) -> str:
    return dsn.split("dbname=")[1].split()[0]


def _admin(postgres: PostgresServer, sql: str) -> None:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def _env(dsn: str) -> dict[str, str]:
    return {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn}


@pytest.mark.parametrize("storage", ["filesystem", "s3"])
def test_a_restored_or_renamed_database_is_taken_and_one_made_again_empty_is_refused(
    storage: str, postgres: PostgresServer, upstream: UpstreamRegistry, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    data, extra = tmp_path / "data", {}
    if storage == "s3":
        bucket = Bucket(request.getfixturevalue("seaweedfs"), request.getfixturevalue("s3_bucket"))
        extra = bucket.env()

    def env(dsn: str) -> dict[str, str]:
        return {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn, **extra}

    def objects() -> object:
        return bucket.objects() if storage == "s3" else stored_objects(data)

    first = postgres.create_database()
    with MirrorServer(data, upstream.url, env=env(first), log_dir=tmp_path / "first") as mirror, \
            httpx.Client(timeout=30) as http:
        manifest, _ = push_image(http, mirror.url, "team/app", "1", seed=7)
    bound = json.loads((data / "index.json").read_text())
    assert bound["database"] == _database(first), bound
    stored = objects()
    assert stored

    # A backup restored under another name (CREATE DATABASE ... TEMPLATE copies it as pg_restore would),
    # the old one gone; and the new one named as "localhost", not "127.0.0.1".
    restored = f"restored_{_database(first)}"
    _admin(postgres, f'CREATE DATABASE "{restored}" TEMPLATE "{_database(first)}"')
    _admin(postgres, f'DROP DATABASE "{_database(first)}"')
    moved = postgres.dsn(restored).replace("host=127.0.0.1", "host=localhost")
    done = mirror_cli("fsck", "--data", data, env=env(moved), timeout=60)
    assert done.returncode == 0, done.stderr
    rebound = json.loads((data / "index.json").read_text())
    assert (rebound["host"], rebound["database"]) == ("localhost", restored), rebound
    assert rebound["index_id"] == bound["index_id"] != "", (bound, rebound)
    with MirrorServer(data, upstream.url, env=env(moved), log_dir=tmp_path / "restored") as mirror, \
            httpx.Client(timeout=30) as http:
        answer = http.get(f"{mirror.url}/v2/team/app/manifests/1", headers={"Accept": OCI_MANIFEST})
        assert (answer.status_code, answer.content) == (200, manifest), answer.text

    # The same place, the database dropped and made again: an empty index of another id.
    _admin(postgres, f'DROP DATABASE "{restored}"')
    _admin(postgres, f'CREATE DATABASE "{restored}"')
    refused = (f"mirror: {data} holds the blobs of the index in PostgreSQL database '{restored}' at "
               f"localhost:{postgres.port} (index id {bound['index_id']}), but this start uses"
               if storage == "filesystem" else  # the bucket says it first
               f"mirror: S3 bucket '{bucket.name}' under 'registry' holds the objects of another index"
               f" (id {bound['index_id']}), not of PostgreSQL database '{restored}'")
    for command in (["fsck"], ["gc"], ["serve", "--listen", f"127.0.0.1:{free_port()}"]):
        done = mirror_cli(*command, "--data", data, env=env(moved), timeout=60)
        line = done.stderr.strip()
        assert done.returncode == 2 and "\n" not in line and line.startswith(refused), line
        if storage == "s3":  # and the way out, if that index is lost
            assert line.endswith("(a database dropped and made again), empty the bucket's blobs/ and index-id under"
                                 " that prefix, or choose another storage.s3.rootdirectory"), line
    assert objects() == stored and json.loads((data / "index.json").read_text()) == rebound


def test_migrate_between_two_spellings_of_one_database_and_one_store_is_refused(
    postgres: PostgresServer, tmp_path: Path,
) -> None:
    """``localhost`` and ``127.0.0.1`` name one index: nothing to migrate (it would copy every record
    into itself), as for two identical configurations."""
    dsn = postgres.create_database()
    data = tmp_path / "data"
    configs = []
    for n, spelling in enumerate((dsn, dsn.replace("host=127.0.0.1", "host=localhost"))):
        config = tmp_path / f"config-{n}.yaml"
        config.write_text(json.dumps({"storage": {"path": str(data)},
                                      "metadata": {"driver": "postgres", "postgres": {"dsn": spelling}}}))
        configs.append(config)
    with MirrorServer(data, "http://127.0.0.1:1", env=_env(dsn), log_dir=tmp_path / "made"):
        pass  # the data directory and its index made, and bound
    done = mirror_cli("migrate", "--from-config", configs[0], "--to-config", configs[1], timeout=60)
    assert done.returncode != 0, done.stdout
    assert "the same index (id " in done.stderr and "nothing to migrate" in done.stderr, done.stderr


def test_another_database_is_refused_before_anything_is_made_in_it(
    postgres: PostgresServer, upstream: UpstreamRegistry, tmp_path: Path,
) -> None:
    """A data directory bound to an index, started on another (empty) database: refused, and that
    database is left as it was (opening it would make the mirror's tables in it, and record this store)."""
    data, first, other = tmp_path / "data", postgres.create_database(), postgres.create_database()
    with MirrorServer(data, upstream.url, env=_env(first), log_dir=tmp_path / "first"):
        pass
    bound = json.loads((data / "index.json").read_text())
    for command in (["fsck"], ["serve", "--listen", f"127.0.0.1:{free_port()}"]):
        done = mirror_cli(*command, "--data", data, env=_env(other), timeout=60)
        assert done.returncode == 2, done.stderr
        assert f"index in PostgreSQL database '{_database(first)}'" in done.stderr, done.stderr
    with psycopg.connect(other) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
    assert json.loads((data / "index.json").read_text()) == bound


def test_a_first_start_refused_for_another_indexs_bucket_leaves_the_new_database_free(
    postgres: PostgresServer, upstream: UpstreamRegistry, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    """A new database, started first with a bucket that holds another index's objects (a copied
    configuration, a typo): refused.  Before, the database kept that bucket as its store, and the
    corrected configuration was refused too ("holds the index of S3 bucket ..."), until the database
    was dropped.  Now the refused start forgets what it recorded, and the corrected one starts."""
    seaweedfs = request.getfixturevalue("seaweedfs")
    used, new = Bucket(seaweedfs, seaweedfs.new_bucket()), Bucket(seaweedfs, seaweedfs.new_bucket())
    with MirrorServer(tmp_path / "first", upstream.url, env={**_env(postgres.create_database()), **used.env()},
                      log_dir=tmp_path / "first-log") as mirror, httpx.Client(timeout=30) as http:
        push_image(http, mirror.url, "team/app", "1", seed=8)
    held = used.objects()
    fresh, data = postgres.create_database(), tmp_path / "data"
    done = mirror_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--data", data,
                      env={**_env(fresh), **used.env()}, timeout=60)
    assert done.returncode == 2 and "holds the objects of another index" in done.stderr, done.stderr
    with MirrorServer(data, upstream.url, env={**_env(fresh), **new.env()}, log_dir=tmp_path / "second") as mirror, \
            httpx.Client(timeout=30) as http:
        manifest, _ = push_image(http, mirror.url, "team/other", "1", seed=9)
        answer = http.get(f"{mirror.url}/v2/team/other/manifests/1", headers={"Accept": OCI_MANIFEST})
        assert (answer.status_code, answer.content) == (200, manifest), answer.text
    assert used.objects() == held  # the other index's bucket: untouched
    with psycopg.connect(fresh) as conn:
        row = conn.execute("SELECT value FROM settings WHERE name = 'store'").fetchone()
    assert row is not None and row[0]["bucket"] == new.name, row
