"""What the S3 driver says of settings the object store refuses, on a real SeaweedFS that checks
credentials (``tests/support/seaweedfs.py``: one identity in its ``-s3.config``) and a real PostgreSQL
index: keys it refuses, and a bucket that does not exist.

``mirror gc``, ``mirror fsck`` and ``mirror serve``'s start-up stop with one line that says so, naming
the bucket, the endpoint and the settings to check, never any part of a secret, and exit non-zero;
a running mirror whose keys the store stops taking (rotated on the store) says it in ``/readyz`` and
in its log (``storage/s3client.py``: ``settings_problem``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.mirror import PROJECT_ROOT, MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.procs import free_port
from tests.support.seaweedfs import SeaweedS3
from tests.support.storecheck import mirror_cli
from tests.support.waiting import wait_for
from tests.test_observability import worker_pids
from tests.test_s3_serve import Bucket, blob_url, get_digest

#: What gc and fsck exit with when the bucket cannot be used now; serve's start-up exits 2.
EXIT = {"gc": 1, "fsck": 1, "serve": 2}


@pytest.fixture
def bucket(seaweedfs: SeaweedS3, s3_bucket: str) -> Bucket:
    return Bucket(seaweedfs, s3_bucket)


def run(command: str, data: Path, env: Mapping[str, str]) -> tuple[int, str]:
    """``mirror COMMAND --data DATA`` (serve on a free port): its exit status and stderr."""
    extra = ["--listen", f"127.0.0.1:{free_port()}"] if command == "serve" else []
    done = mirror_cli(command, *extra, "--data", data, env=env, timeout=60)
    return done.returncode, done.stderr


def one_line(command: str, status: int, stderr: str) -> str:
    """The single line *command* printed, after checking that it exited as it should and that no
    traceback went with it (serve logs at INFO: botocore's "Found credentials in ..." may come first)."""
    assert status == EXIT[command], (command, status, stderr)
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and [line for line in lines if " INFO " not in line] == lines[-1:], \
        (command, stderr)
    assert lines[-1].startswith("mirror: "), lines[-1]
    return lines[-1]


def no_secret(text: str, *secrets: str) -> None:
    """No 8 characters in a row of any of *secrets* appear in *text*."""
    for secret in secrets:
        pieces = {secret[i:i + 8] for i in range(len(secret) - 7)}
        assert not any(piece in text for piece in pieces), "a piece of a secret key is shown"


def indexed_in_postgres(bucket: Bucket, postgres: PostgresServer) -> dict[str, str]:
    """The environment of a mirror on *bucket* with its index in a new PostgreSQL database."""
    return bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=postgres.create_database())


def set_up(bucket: Bucket, env: Mapping[str, str], mirror_factory: Callable[..., MirrorServer]) -> Path:
    """Serve once on *bucket* (the data directory and the bucket bound to the index), then stop;
    the data directory."""
    mirror = mirror_factory(env=env)
    mirror.stop()
    done = mirror_cli("fsck", "--data", mirror.data_dir, env=env)
    assert done.returncode == 0 and "clean" in done.stdout, done.stdout + done.stderr
    return mirror.data_dir


def test_gc_fsck_and_serve_say_in_one_line_that_the_object_store_refused_the_credentials(
    bucket: Bucket, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    server = bucket.server
    env = indexed_in_postgres(bucket, postgres)
    data = set_up(bucket, env, mirror_factory)
    wrong_secret = "0123456789abcdefghij" * 2
    (tmp_path / "access").write_text(server.accesskey + "\n")
    (tmp_path / "secret").write_text(wrong_secret + "\n")
    without_keys = {k: v for k, v in env.items() if not k.startswith("MIRROR_STORAGE_S3_") or "KEY" not in k}
    # The SDK's other sources out of the way: no profile files, no instance metadata service.
    sdk_elsewhere = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                     "AWS_CONFIG_FILE": str(tmp_path / "none")}
    variants = {
        "a secret key of another": ({**env, "MIRROR_STORAGE_S3_SECRETKEY": wrong_secret}, "storage.s3.secretkey"),
        "an access key it does not know": ({**env, "MIRROR_STORAGE_S3_ACCESSKEY": "AKNOSUCHKEY0000000000"},
                                           "storage.s3.accesskey"),
        "keys from files": ({**without_keys, "MIRROR_STORAGE_S3_ACCESSKEY_FILE": str(tmp_path / "access"),
                             "MIRROR_STORAGE_S3_SECRETKEY_FILE": str(tmp_path / "secret")},
                            "storage.s3.secretkey_file"),
        "the AWS SDK's own chain": ({**without_keys, **sdk_elsewhere, "AWS_ACCESS_KEY_ID": server.accesskey,
                                     "AWS_SECRET_ACCESS_KEY": wrong_secret}, "AWS_SECRET_ACCESS_KEY"),
    }
    for variant, (wrong, setting) in variants.items():
        for command in ("gc", "fsck", "serve"):
            line = one_line(command, *run(command, data, wrong))
            assert f"the object store at {server.endpoint} refused the credentials for bucket {bucket.name!r}" \
                in line, (variant, command, line)
            assert setting in line, (variant, command, line)
            no_secret(line, wrong_secret, server.secretkey)
    # No keys at all (none set, none for the SDK to find): said before anything is asked of the store.
    nowhere = {**without_keys, **sdk_elsewhere}
    for command in ("gc", "serve"):
        line = one_line(command, *run(command, data, nowhere))
        assert f"no credentials for bucket {bucket.name!r} at {server.endpoint}" in line, (command, line)
        assert "storage.s3.accesskey is not set and the AWS SDK found none" in line, (command, line)
    # The right keys again: nothing was changed.
    done = mirror_cli("fsck", "--data", data, env=env)
    assert done.returncode == 0 and "clean" in done.stdout, done.stdout + done.stderr


def test_a_bucket_that_does_not_exist_is_named_by_serve_gc_and_fsck(
    seaweedfs: SeaweedS3, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    # A new mirror named a bucket nobody created (a typo): serve's start-up says so.
    typo = Bucket(seaweedfs, "no-such-bucket-here")
    status, stderr = run("serve", tmp_path / "new", indexed_in_postgres(typo, postgres))
    line = one_line("serve", status, stderr)
    assert f"bucket 'no-such-bucket-here' does not exist at {seaweedfs.endpoint}" in line, line
    assert "storage.s3.bucket" in line, line
    # The endpoint set the AWS SDK's way, not in storage.s3.regionendpoint: that one is named (was "AWS S3").
    sdk_way = {**{k: v for k, v in indexed_in_postgres(typo, postgres).items()
                  if k != "MIRROR_STORAGE_S3_REGIONENDPOINT"}, "AWS_ENDPOINT_URL_S3": seaweedfs.endpoint}
    line = one_line("serve", *run("serve", tmp_path / "sdk", sdk_way))
    assert f"bucket 'no-such-bucket-here' does not exist at {seaweedfs.endpoint}" in line, line
    # gc and fsck of a data directory with a new database and the typo: refused before the new
    # index records which store it holds, so the right bucket is taken on the next run.
    (tmp_path / "spool" / "uploads").mkdir(parents=True)
    dsn = postgres.create_database()
    for command in ("gc", "fsck"):
        typo_env = typo.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=dsn)
        line = one_line(command, *run(command, tmp_path / "spool", typo_env))
        assert f"bucket 'no-such-bucket-here' does not exist at {seaweedfs.endpoint}" in line, (command, line)
    right = Bucket(seaweedfs, seaweedfs.new_bucket())
    done = mirror_cli("fsck", "--data", tmp_path / "spool",
                      env=right.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=dsn))
    assert done.returncode == 0 and "clean" in done.stdout, done.stdout + done.stderr

    # The bucket of a mirror that served is gone: every command says so.
    bucket = Bucket(seaweedfs, seaweedfs.new_bucket())
    env = indexed_in_postgres(bucket, postgres)
    try:
        data = set_up(bucket, env, mirror_factory)
    finally:
        seaweedfs.drop_bucket(bucket.name)
    for command in ("gc", "fsck", "serve"):
        line = one_line(command, *run(command, data, env))
        assert f"bucket {bucket.name!r} does not exist at {seaweedfs.endpoint}" in line, (command, line)
        assert "storage.s3.bucket" in line, (command, line)


def test_a_mirror_whose_keys_the_store_stops_taking_says_so_in_readyz_and_its_log(
    own_seaweedfs: SeaweedS3, postgres: PostgresServer, images: StandardImages,
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """The operator rotates the keys on the store and not in the mirror's settings (given inline)."""
    server = own_seaweedfs
    bucket = Bucket(server, server.new_bucket())
    mirror = mirror_factory(env=indexed_in_postgres(bucket, postgres), workers=2)
    assert http.get(f"{mirror.url}/readyz").status_code == 200
    layer = images.small.layers[-1].digest
    url = blob_url(mirror, "library/small", layer)
    assert get_digest(http, url)[:2] == (200, layer)
    wait_for(lambda: layer in bucket.objects(), timeout=30, what="the layer in the bucket")
    old_secret = server.secretkey

    server.change_keys()
    # The HEAD of the object is refused (the store is unavailable): the upstream's copy is streamed through.
    assert get_digest(http, url) == (200, layer, images.small.layers[-1].size, "BYPASS")
    ready = http.get(f"{mirror.url}/readyz")
    assert ready.status_code == 503, ready.text
    problem = ready.json()["problems"]["store"]
    assert problem.startswith(f"the object store at {server.endpoint} refused the credentials for bucket "
                              f"{bucket.name!r}"), problem
    assert "storage.s3.accesskey" in problem, problem
    # Keys given inline reach the workers in files of the server's own: not files the operator can write to.
    assert "keys written to those files" not in problem, problem
    log = mirror.log_tail(400)
    assert f"refused the credentials for bucket {bucket.name!r}" in log, log
    assert "Traceback" not in log and "[Errno" not in log, log
    no_secret(ready.text + log, old_secret, server.secretkey)


@pytest.mark.slow
def test_keys_rotated_in_their_files_are_taken_without_a_restart(
    own_seaweedfs: SeaweedS3, postgres: PostgresServer, images: StandardImages,
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path,
) -> None:
    """Keys given as files (Docker and Kubernetes secrets) were read once, at the start: after a
    rotation the mirror kept the old keys, and ``/readyz`` repeated advice already followed until it
    was restarted.  The files are read again every 30 s, by every worker; the message says so."""
    server = own_seaweedfs
    bucket = Bucket(server, server.new_bucket())
    access, secret = tmp_path / "access", tmp_path / "secret"
    access.write_text(server.accesskey + "\n")
    secret.write_text(server.secretkey + "\n")
    env = {k: v for k, v in indexed_in_postgres(bucket, postgres).items()
           if not k.endswith(("_ACCESSKEY", "_SECRETKEY"))}
    mirror = mirror_factory(env={**env, "MIRROR_STORAGE_S3_ACCESSKEY_FILE": str(access),
                                 "MIRROR_STORAGE_S3_SECRETKEY_FILE": str(secret)}, workers=2)
    layer = images.small.layers[-1]
    url = blob_url(mirror, "library/small", layer.digest)
    assert get_digest(http, url)[:2] == (200, layer.digest)
    wait_for(lambda: layer.digest in bucket.objects(), timeout=30, what="the layer in the bucket")
    pids = worker_pids(mirror)

    server.change_keys()
    ready = http.get(f"{mirror.url}/readyz")
    assert ready.status_code == 503, ready.text
    assert "keys written to those files are taken within 30 s, without a restart" in ready.text, ready.text
    for path, value in ((access, server.accesskey), (secret, server.secretkey)):  # as a secret's volume does
        path.with_suffix(".new").write_text(value + "\n")
        path.with_suffix(".new").replace(path)
    # Every worker answers (each /readyz asks the bucket), with the keys of the files.
    wait_for(lambda: all(http.get(f"{mirror.url}/readyz").status_code == 200 for _ in range(6)), timeout=75,
             interval=1.0, what="both workers ready with the new keys")
    assert get_digest(http, url) == (200, layer.digest, layer.size, "HIT")
    assert worker_pids(mirror) == pids, "no worker was restarted"
    no_secret(mirror.log_tail(800), server.secretkey)


def test_a_stale_aws_profile_does_not_matter_with_the_keys_set_and_is_named_in_one_line_without(
    bucket: Bucket, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer], tmp_path: Path,
) -> None:
    """``AWS_PROFILE`` naming no profile (left on a host), or an AWS config file the SDK cannot parse:
    with ``storage.s3.accesskey`` set the SDK's profile is not read and everything works; without it,
    ``serve``, ``gc`` and ``fsck`` say in one line what to check and exit 2 (it was a botocore traceback)."""
    env = indexed_in_postgres(bucket, postgres)
    stale = {**env, "AWS_PROFILE": "nosuchprofile"}
    mirror = mirror_factory(env=stale)
    assert httpx.get(f"{mirror.url}/v2/", timeout=10).status_code == 200
    mirror.stop()
    for command in ("gc", "fsck"):
        done = mirror_cli(command, "--data", mirror.data_dir, env=stale)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (command, done.stdout + done.stderr)
    server = bucket.server
    (tmp_path / "config").write_text("[profile broken\nregion = us-east-1\n")
    sdk = {**{k: v for k, v in env.items() if not k.startswith("MIRROR_STORAGE_S3_") or "KEY" not in k},
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": server.accesskey,
           "AWS_SECRET_ACCESS_KEY": server.secretkey}
    broken = {"The config profile (nosuchprofile) could not be found": {"AWS_PROFILE": "nosuchprofile"},
              f"Unable to parse config file: {tmp_path / 'config'}": {"AWS_CONFIG_FILE": str(tmp_path / "config")}}
    for says, variables in broken.items():
        for command in ("gc", "fsck", "serve"):
            status, stderr = run(command, mirror.data_dir, {**sdk, **variables})
            lines = stderr.strip().splitlines()
            assert status == 2 and "Traceback" not in stderr and len(lines) == 1, (command, status, stderr)
            assert lines[0].startswith(f"mirror: the AWS SDK cannot make a client for bucket {bucket.name!r}: "
                                       f"{says}: check AWS_PROFILE, AWS_CONFIG_FILE"), lines[0]
            no_secret(stderr, server.secretkey)


def test_the_workers_get_inline_secrets_in_files_not_in_their_environment(
    bucket: Bucket, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """``--workers 2`` with the secret key and the database password given inline (here in ``MIRROR_*``
    variables): the workers read them from files the server writes in a directory of its own (0700,
    removed when it stops), so neither secret is in any worker's environment (``/proc/PID/environ``,
    ``ps eww``), and both work in every worker (the store checks the keys, the database the password)."""
    password = "Pg-pw-0123456789abcdef"
    postgres.add_password_login("mirror_secret", password)
    dsn = f"{postgres.create_database()} user=mirror_secret password={password}"
    env = bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=dsn)
    mirror = mirror_factory(env=env, workers=2)
    workers = worker_pids(mirror)
    assert len(workers) == 2, workers
    secrets = (bucket.server.secretkey.encode(), password.encode())
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert not any(secret in environ for secret in secrets), f"a secret is in worker {pid}'s environment"
        assert b"MIRROR_STORAGE_S3_SECRETKEY_FILE=" in environ and b"MIRROR_METADATA_POSTGRES_DSN_FILE=" in environ
    blob = b"pushed through both workers" * 1000
    digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"
    with httpx.Client(timeout=30, trust_env=False) as http:
        answered = http.post(f"{mirror.url}/v2/team/secrets/blobs/uploads/", params={"digest": digest}, content=blob)
        assert answered.status_code == 201, answered.text
        for _ in range(60):  # new connections: the kernel spreads them over both workers
            answer = httpx.get(f"{mirror.url}/v2/team/secrets/blobs/{digest}", timeout=30, trust_env=False)
            assert answer.status_code == 200 and answer.content == blob
    wait_for(lambda: {e["pid"] for e in mirror.access_entries() if e["route"] == "blob"} == workers, timeout=10,
             what="both workers to have served the blob")
    mirror.stop()
    left = [path for path in Path(tempfile.gettempdir()).glob("mirror-metrics-*/secrets/*")
            if path.read_text() in (bucket.server.secretkey, password)]
    assert left == [], "the secrets' files outlived the server"


def test_gc_and_serve_on_a_host_whose_clock_is_off_say_so_not_that_the_credentials_are_wrong(
    bucket: Bucket, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """S3 refuses a request signed more than 15 minutes off its clock (``RequestTimeTooSkewed``; a HEAD's
    answer has no body, only a 403 and its ``Date``): a host 20 minutes ahead is told to fix its clock."""
    env = bucket.env()
    data = set_up(bucket, env, mirror_factory)
    faketime = shutil.which("faketime")
    assert faketime, "faketime is missing: apt-get install faketime (tests/run.sh installs it)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    for command in ("gc", "serve"):
        extra = ["--listen", f"127.0.0.1:{free_port()}"] if command == "serve" else []
        done = subprocess.run([faketime, "-f", "+20m", sys.executable, "-m", "mirror", command, *extra, "--data",
                               str(data)], env={**clean, **env}, cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=60, check=False, stdin=subprocess.DEVNULL)
        line = one_line(command, done.returncode, done.stderr)
        assert re.search(r"whose clock is \+1[12]\d\ds off its own: S3 refuses requests signed more than 15 minutes "
                         r"off its clock; keep the hosts' clocks synchronized \(NTP\)", line), line
        assert "credentials" not in line, line


def test_an_endpoint_that_does_not_answer_or_speaks_other_than_its_scheme_names_the_setting_to_check(
    bucket: Bucket, postgres: PostgresServer, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A wrong port (nothing listens: connection refused), ``https://`` to the store's plain-HTTP
    port (no TLS answers): ``gc``, ``fsck`` and ``serve``'s start-up say that they cannot connect to
    that endpoint and to check ``storage.s3.regionendpoint`` (or the AWS SDK's ``AWS_ENDPOINT_URL_S3``
    it came from); they said only that the store does not answer."""
    server = bucket.server
    env = indexed_in_postgres(bucket, postgres)
    data = set_up(bucket, env, mirror_factory)
    closed = f"http://127.0.0.1:{free_port()}"
    tls = server.endpoint.replace("http://", "https://")
    for endpoint in (closed, tls):
        for command in ("gc", "fsck", "serve"):
            line = one_line(command, *run(command, data, {**env, "MIRROR_STORAGE_S3_REGIONENDPOINT": endpoint}))
            assert f"cannot connect to {endpoint} (" in line, (endpoint, command, line)
            assert "check storage.s3.regionendpoint: its scheme" in line, (endpoint, command, line)
            assert ("(TLS failed" if endpoint == tls else "(Connection refused)") in line, (endpoint, command, line)
    sdk_way = {**{k: v for k, v in env.items() if k != "MIRROR_STORAGE_S3_REGIONENDPOINT"},
               "AWS_ENDPOINT_URL_S3": closed}
    line = one_line("serve", *run("serve", data, sdk_way))
    assert f"cannot connect to {closed} (" in line and "check AWS_ENDPOINT_URL_S3" in line, line
    done = mirror_cli("fsck", "--data", data, env=env)
    assert done.returncode == 0 and "clean" in done.stdout, done.stdout + done.stderr
