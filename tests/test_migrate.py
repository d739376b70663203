"""``mirror migrate``: a store moved between drivers (filesystem + diskcache, S3 + PostgreSQL) keeps
every object and every index record, serves the same bytes afterwards, goes on after being
interrupted, and refuses, in one line, what it cannot do.

Stores are filled by the real mirror (pulled through from a real registry, pushed with skopeo) and
by ``mirror preload``; the engines are real (SeaweedFS, PostgreSQL); the migrations run as
``python -m mirror migrate``.  The index is compared record by record through the listings every
driver passes the contract test for (``metadata/transfer.py``'s comparison, ``records`` below).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mirror.archive.offline import TerminalProgress
from mirror.config.load import load_config
from mirror.maintenance.migrate import Migration
from mirror.metadata.diskcache import DiskcacheMetadata
from mirror.metadata.driver import Metadata, TagRecord, local_repo
from mirror.metadata.opening import open_metadata
from mirror.metadata.postgres import PostgresMetadata
from mirror.metadata.records import RecordKind
from mirror.metadata.transfer import compare, copy_records
from mirror.observe.progress import LineProgress
from mirror.spec.reference import parse_digest
from mirror.storage.layout import Layout
from mirror.storage.s3 import MIN_CHUNK
from tests.support import client
from tests.support.asgi import ThreadedServer, UpstreamClient, forward_headers, open_upstream, raw_headers
from tests.support.catalog import StandardImages
from tests.support.faults import FaultProxy
from tests.support.images import Image, Index, build_image, random_layer, sha256_digest, write_oci_layout
from tests.support.mirror import PROJECT_ROOT, MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.procs import free_port
from tests.support.registry import UpstreamRegistry
from tests.support.schema1 import SCHEMA1_SIGNED, signed_schema1
from tests.support.seaweedfs import SeaweedS3
from tests.support.skopeo import everything, layout_blobs, skopeo_run
from tests.support.storecheck import mirror_cli, stored_objects

KIB = 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SIGNATURE = "application/vnd.example.signature"


def write_config(path: Path, data: Path, *, s3: tuple[SeaweedS3, str] | None = None,
                 dsn: str | None = None) -> Path:
    """A config file: the store under *data*, in the bucket ``s3 = (server, bucket)`` if given, its
    index in the PostgreSQL database *dsn* if given (else diskcache under *data*)."""
    doc: dict[str, Any] = {"storage": {"path": str(data)}}
    if s3 is not None:
        server, bucket = s3
        doc["storage"].update(driver="s3", s3={
            "bucket": bucket, "region": server.region, "regionendpoint": server.endpoint, "rootdirectory": "store",
            "accesskey": server.accesskey, "secretkey": server.secretkey, "forcepathstyle": True,
            "chunksize": MIN_CHUNK})
        doc["cache"] = {"max_size": "10GiB"}  # a bucket has no size to take a share of
    if dsn is not None:
        doc["metadata"] = {"driver": "postgres", "postgres": {"dsn": dsn}}
    path.write_text(yaml.safe_dump(doc))
    return path


def migrate(old: Path, new: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return mirror_cli("migrate", "--from-config", old, "--to-config", new, *flags, timeout=300)


def migrated(old: Path, new: Path, *flags: str) -> str:
    done = migrate(old, new, *flags)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("verified"), done.stdout + done.stderr
    return done.stdout


def refused(old: Path, new: Path) -> str:
    """The one line ``mirror migrate`` refused with (exit status 2)."""
    done = migrate(old, new)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirror: migrate: "), done.stderr
    return lines[0]


@contextlib.contextmanager
def opened(config: Path) -> Iterator[Metadata]:
    """The index *config* names."""
    loaded = load_config(config, env={})
    index = open_metadata(loaded.metadata, Layout(loaded.storage.path).index, loaded.storage)
    try:
        yield index
    finally:
        index.close()


def records(config: Path) -> dict[str, Any]:
    """Every record of the (small) index *config* names: ``{kind: {key: value}}``, the usage count
    and the reasons held."""
    with opened(config) as index:
        return {**{kind.value: dict(index.records(kind)) for kind in RecordKind},
                "usage": index.usage(), "held": index.held()}


def tagged_pins(config: Path) -> list[tuple[str, str]]:
    """The pins that go with their image's last tag (a preload's under a tag) in the index *config* names."""
    with opened(config) as index:
        return sorted(index.pins(tagged=True))


def differences(source: Path, copy: Path) -> list[str]:
    """How the index *copy* names differs from the one *source* names (``transfer.compare``)."""
    with opened(source) as old, opened(copy) as new:
        return compare(old, new).differences


def bucket_objects(server: SeaweedS3, bucket: str) -> dict[str, int]:
    """``{digest: size}`` of the objects under the bucket's ``store/blobs/``."""
    found = {}
    for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="store/blobs/"):
        for item in page.get("Contents", []):
            algorithm, _, hex_ = item["Key"].removeprefix("store/blobs/").split("/")
            found[f"{algorithm}:{hex_}"] = item["Size"]
    return found


def sizes(data: Path) -> dict[str, int]:
    return {digest: path.stat().st_size for digest, path in stored_objects(data).items()}


def preloaded(tmp_path: Path, data: Path, name: str, seed: int) -> Image:
    """An image of its own preloaded (pinned) into *data* as ``docker.io/library/<name>:1``."""
    blobs = tmp_path / f"{name}-blobs"
    image = build_image(blobs, [random_layer(blobs, 96 * KIB, seed)])
    layout = tmp_path / f"{name}-layout"
    write_oci_layout(layout, image, f"docker.io/library/{name}:1")
    done = mirror_cli("preload", "--data", data, layout)
    assert done.returncode == 0, done.stdout + done.stderr
    return image


# -- a round trip through S3 and PostgreSQL ------------------------------------------------------


def pull(skopeo: str, address: str, reference: str, layout: Path, *, every_platform: bool) -> set[str]:
    """Copy *reference* from the mirror at *address* into an OCI layout; the digests it holds (checked)."""
    skopeo_run(skopeo, "copy", *(["--all"] if every_platform else []), "--preserve-digests",
               "--src-tls-verify=false", f"docker://{address}/{reference}", f"oci:{layout}:out")
    return layout_blobs(layout)


def push_signature(base_url: str, name: str, subject: Image, tmp_path: Path) -> str:
    """Push an OCI 1.1 artifact whose subject is *subject* (a referrer); its digest."""
    payload, empty = b"signature bytes", b"{}"
    with client.session() as http:
        for data in (payload, empty):
            path = tmp_path / sha256_digest(data).replace(":", "-")
            path.write_bytes(data)
            client.push_blob(http, base_url, name, sha256_digest(data), path)
        body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SIGNATURE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(empty), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sha256_digest(payload),
                        "size": len(payload)}],
            "subject": subject.descriptor(),
        }).encode()
        return client.put_manifest(http, base_url, name, sha256_digest(body), OCI_MANIFEST, body)


@pytest.mark.slow
def test_a_store_moves_to_s3_and_postgres_and_back_and_serves_every_image_byte_for_byte(
    images: StandardImages, upstream_factory: Callable[[], Any], mirror_factory: Callable[..., MirrorServer],
    skopeo: str, seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, http: httpx.Client,
    tmp_path: Path,
) -> None:
    """Cached (pulled through, one platform of a list too), pushed (with a referrer) and preloaded
    (pinned) content goes filesystem + diskcache -> S3 + PostgreSQL -> filesystem + diskcache, and
    -> filesystem + PostgreSQL; mirrors on both copies serve every image by tag and by digest with
    the upstream stopped, byte for byte, and every index record made the trip."""
    registry = upstream_factory()
    wanted = {"small": True, "multi": True, "dlist": False}  # dlist: only this host's platform is pulled
    for short in wanted:
        repo, tag, item = images.refs[short]
        (client.push_index if isinstance(item, Index) else client.push_image)(registry.url, repo, tag, item)
    source = mirror_factory(registry.url)
    expected: dict[str, tuple[set[str], bool]] = {}  # reference -> (its digests, every platform)
    for short, every_platform in wanted.items():
        repo, tag, item = images.refs[short]
        digests = pull(skopeo, source.address, f"{repo}:{tag}", tmp_path / f"first-{short}",
                       every_platform=every_platform)
        expected[f"{repo}:{tag}"] = expected[f"{repo}@{item.digest}"] = digests, every_platform
    blobs = tmp_path / "pushed-blobs"
    pushed = build_image(blobs, [random_layer(blobs, 128 * KIB, 901)])
    skopeo_run(skopeo, "copy", "--preserve-digests", "--dest-tls-verify=false",
               write_oci_layout(tmp_path / "pushed-layout", pushed, "app"), f"docker://{source.address}/team/app:1")
    expected["team/app:1"] = expected[f"team/app@{pushed.digest}"] = everything(pushed), False
    signature = push_signature(source.url, "team/app", pushed, tmp_path)
    source.stop()
    pinned = preloaded(tmp_path, source.data_dir, "pre", 902)
    expected["library/pre:1"] = expected[f"library/pre@{pinned.digest}"] = everything(pinned), False

    old = write_config(tmp_path / "old.yaml", source.data_dir)
    before = records(old)
    assert before["pins"] and before["pushed repositories"] and before["referrers"] and before["access times"]
    assert tagged_pins(old) == sorted(before["pins"])  # preloaded under a tag
    assert len(before["tags"]) >= 5
    dsn = postgres.create_database()
    cloud = write_config(tmp_path / "cloud.yaml", tmp_path / "cloud-spool", s3=(seaweedfs, s3_bucket), dsn=dsn)
    out = migrated(old, cloud)
    assert bucket_objects(seaweedfs, s3_bucket) == sizes(source.data_dir)
    assert differences(old, cloud) == [], out
    assert tagged_pins(cloud) == tagged_pins(old)

    back = mirror_factory(registry.url, start=False)
    out = migrated(cloud, write_config(tmp_path / "back.yaml", back.data_dir), "--verify-content")
    assert f"{len(sizes(source.data_dir))} re-hashed" in out
    assert sizes(back.data_dir) == sizes(source.data_dir)
    assert differences(old, tmp_path / "back.yaml") == [] and records(tmp_path / "back.yaml") == before
    # The filesystem with its index in PostgreSQL (a database of its own: one describes one store).
    own_dsn = postgres.create_database()
    indexed = mirror_factory(registry.url, start=False,
                             env={"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": own_dsn})
    migrated(old, write_config(tmp_path / "pg.yaml", indexed.data_dir, dsn=own_dsn))

    registry.stop()
    for server in (back.start(), indexed.start()):
        for n, (reference, (digests, every_platform)) in enumerate(expected.items()):
            got = pull(skopeo, server.address, reference, tmp_path / f"{server.port}-{n}",
                       every_platform=every_platform)
            assert got == digests, reference
        listed = http.get(f"{server.url}/v2/team/app/referrers/{pushed.digest}").json()
        assert [d["digest"] for d in listed["manifests"]] == [signature], listed


# -- going on after an interruption --------------------------------------------------------------


class BucketGate:
    """A relay between ``mirror migrate`` and the bucket that shuts as soon as an object is stored
    through it (a ``PutObject`` or ``CompleteMultipartUpload`` of a key under ``blobs/`` answered
    200): every request arriving after that waits, and goes on only once :meth:`open` is called,
    never if the gate stops first.

    While it is shut with nothing :attr:`sending`, no request can reach the bucket, so what the bucket
    holds stays as it is however the migration is then stopped, and no request of a stopped client
    is passed on cut short (SeaweedFS stores an empty object for a ``PutObject`` whose connection
    closed right after its headers).
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.shut = False
        self.opened = False
        self.sending = 0  # requests passed on whose answer is not all passed back
        self.held = 0  # requests waiting at the gate
        self._lock = threading.Lock()
        self._upstream = UpstreamClient()
        route = Route("/{path:path}", self._endpoint, methods=["GET", "HEAD", "PUT", "POST", "DELETE"])
        app = Starlette(routes=[route], lifespan=self._upstream.lifespan)
        self._server = ThreadedServer(app, name="bucket-gate", lifespan="on")

    @property
    def url(self) -> str:
        return self._server.url

    def __enter__(self) -> BucketGate:
        self._server.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._server.stop()

    def blocked(self) -> bool:
        """Whether the client waits at the shut gate and nothing it sent is on its way to the bucket."""
        with self._lock:
            return self.shut and not self.opened and self.sending == 0 and self.held > 0

    def open(self) -> None:
        """Let the requests waiting, and every later one, go on."""
        with self._lock:
            self.opened = True

    async def _endpoint(self, request: Request) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        return functools.partial(self._relay, request)

    async def _relay(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        with self._lock:
            admitted = not self.shut or self.opened
            self.sending += admitted
            self.held += not admitted
        while not admitted:  # cancelled when the gate stops: never passed on
            await asyncio.sleep(0.01)
            with self._lock:
                admitted = self.opened
                self.sending += admitted
                self.held -= admitted
        try:
            upstream = await open_upstream(self._upstream.http, request, self.endpoint)
            try:
                if upstream.status_code == 200 and _stores_object(request):
                    with self._lock:
                        self.shut = True  # before the client hears of it and sends its next request
                await send({"type": "http.response.start", "status": upstream.status_code,
                            "headers": raw_headers(forward_headers(upstream.headers.multi_items()))})
                async for data in upstream.aiter_raw():
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await upstream.aclose()
        finally:
            with self._lock:
                self.sending -= 1


def _stores_object(request: Request) -> bool:
    """Whether *request* stores an object under ``blobs/``: a ``PutObject`` (not a part) or a
    ``CompleteMultipartUpload``."""
    query = request.query_params
    return "/blobs/" in request.url.path and (
        (request.method == "PUT" and "partNumber" not in query) or (request.method == "POST" and "uploadId" in query))


@pytest.mark.slow
def test_an_interrupted_migration_run_again_ends_with_the_whole_store(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], skopeo: str, seaweedfs: SeaweedS3,
    s3_bucket: str, postgres: PostgresServer, tmp_path: Path,
) -> None:
    """Stopped by Ctrl-C, by Ctrl-C twice (the second stops at once, the copies in flight waiting on
    a store that does not answer), then killed outright (SIGKILL) while copying, the migration run
    again goes on (what is there is not copied again) and ends with every object and record.

    Each run reaches the bucket through a :class:`BucketGate` and is stopped once an object was
    stored and it waits at the shut gate with nothing on its way there: stopped midway whatever
    the timing, and the bucket then stays as it is.  After Ctrl-C the gate opens so that the copies
    running can end: they leave no upload open."""
    source = mirror_factory()
    for short in ("big", "small", "multi", "dlist"):
        repo, tag, _ = images.refs[short]
        pull(skopeo, source.address, f"{repo}:{tag}", tmp_path / short, every_platform=short != "dlist")
    source.stop()
    old = write_config(tmp_path / "old.yaml", source.data_dir)
    dsn = postgres.create_database()
    new = write_config(tmp_path / "new.yaml", tmp_path / "spool", s3=(seaweedfs, s3_bucket), dsn=dsn)
    everything_stored = sizes(source.data_dir)

    for stop in (signal.SIGINT, "twice", signal.SIGKILL):
        copied_before = len(bucket_objects(seaweedfs, s3_bucket))
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        with BucketGate(seaweedfs.endpoint) as gate:
            gated = write_config(tmp_path / "gated.yaml", tmp_path / "spool",
                                 s3=(dataclasses.replace(seaweedfs, endpoint=gate.url), s3_bucket), dsn=dsn)
            proc = subprocess.Popen([sys.executable, "-m", "mirror", "migrate", "--from-config", str(old),
                                     "--to-config", str(gated)], cwd=PROJECT_ROOT, env=clean,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 60
                while not gate.blocked():
                    assert proc.poll() is None, "ended before it was stopped: " + "".join(proc.communicate())
                    assert time.monotonic() < deadline, "no object was copied"
                    time.sleep(0.02)
                proc.send_signal(signal.SIGINT if stop == "twice" else stop)
                if stop == signal.SIGINT:
                    gate.open()  # the copies running end; a killed process's requests never go on
                if stop == "twice":  # the gate stays shut: the copies in flight would wait for ever
                    time.sleep(0.5)
                    proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=60 if stop != "twice" else 10)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if stop == signal.SIGINT:
            assert proc.returncode == 130 and "interrupted; run it again" in err, out + err
            assert "letting the copies in flight end (Ctrl-C again to stop at once)" in err, err
            assert not seaweedfs.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads"), "uploads left open"
        elif stop == "twice":
            assert proc.returncode == 130 and "Ctrl-C again to stop at once" in err, out + err
            assert "stopped at once; run it again to go on" in err, err
        else:
            assert proc.returncode == -signal.SIGKILL
        copied = bucket_objects(seaweedfs, s3_bucket)
        assert copied_before < len(copied) < len(everything_stored), "not stopped midway"
        assert all(everything_stored[digest] == size for digest, size in copied.items())

    out = migrated(old, new, "--verify-content")
    assert f"; {len(everything_stored) - len(copied)} copied, {len(copied)} already there" in out, out
    assert bucket_objects(seaweedfs, s3_bucket) == everything_stored
    assert differences(old, new) == []
    assert not seaweedfs.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads"), "uploads left open"


def test_a_target_left_midway_is_refused_by_the_server_fsck_and_gc_until_a_run_again_ends(tmp_path: Path) -> None:
    """A run killed midway into a data directory: before, ``fsck`` called the partial copy clean and
    ``serve`` started on it, its pushed names missing (their requests went to the upstream)."""
    data, copy, blobs = tmp_path / "data", tmp_path / "copy", tmp_path / "blobs"
    big = build_image(blobs, [random_layer(blobs, 48 << 20, 931)])
    write_oci_layout(tmp_path / "layout", big, "docker.io/library/big:1")
    assert mirror_cli("preload", "--data", data, tmp_path / "layout").returncode == 0
    preloaded(tmp_path, data, "small", 932)
    old, new = write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", copy)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "migrate", "--from-config", str(old), "--to-config",
                             str(new)], cwd=PROJECT_ROOT, env=clean, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mark = copy / "migrating"
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "ended before its copy began"
            time.sleep(0.002)
        proc.kill()  # the copy under way: the mark goes only at the end of a run
    finally:
        proc.kill()
        proc.wait()
    assert mark.exists() and f"from filesystem {data.resolve()}, begun " in mark.read_text()
    for command in (["fsck"], ["gc"], ["serve", "--listen", f"127.0.0.1:{free_port()}"]):
        done = mirror_cli(*command, "--config", new, timeout=60)
        assert done.returncode == 2, (command, done.stdout + done.stderr)
        assert f"{copy} is the target of a `mirror migrate` that did not finish" in done.stderr, done.stderr
        assert "run the same `mirror migrate` again to finish it" in done.stderr, done.stderr
        assert f"to use the directory as it is, remove {mark}, and from a PostgreSQL index the row 'migrating'" \
            in done.stderr, done.stderr
    migrated(old, new)
    assert not mark.exists() and differences(old, new) == []
    checked = mirror_cli("fsck", "--config", new, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_catch_up_stopped_during_its_withdrawals_leaves_the_target_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--delete`` withdraws records from the copy before it copies any object: a run stopped there
    (the withdrawal failing here, as a kill would stop it) left no mark, and the copy served as a
    complete one with part of the withdrawals done.  Now the mark is there from the first withdrawal."""
    data, copy = tmp_path / "data", tmp_path / "copy"
    preloaded(tmp_path, data, "one", 933)
    old, new = write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", copy)
    migrated(old, new)
    with opened(old) as index:  # as a DELETE of its tag does
        assert index.untag("docker.io/library/one", "1")

    def stopped(*_: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C, between two withdrawals

    monkeypatch.setattr("mirror.maintenance.migrate.withdraw", stopped)
    with pytest.raises(KeyboardInterrupt):
        Migration(load_config(old, env={}), load_config(new, env={}), delete=True).run()
    assert (copy / "migrating").exists()
    done = mirror_cli("fsck", "--config", new, timeout=60)
    assert done.returncode == 2 and "did not finish" in done.stderr, done.stdout + done.stderr
    monkeypatch.undo()
    migrated(old, new, "--delete")
    assert not (copy / "migrating").exists() and differences(old, new) == []


def test_a_copy_left_midway_in_a_bucket_and_database_is_refused_from_every_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer,
) -> None:
    """A run into S3 + PostgreSQL stopped midway marked only its own data directory: a mirror started
    with another one on the same bucket and database (another host, a cluster's replica) took the
    partial copy as a whole store, ``fsck`` called it clean, and ``gc`` would delete the copied objects
    no record named yet.  The database carries the mark too: every data directory is refused, and
    the partial copy is refused as a source, until a run again ends."""
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 935)
    old = write_config(tmp_path / "old.yaml", data)
    dsn = postgres.create_database()
    new = write_config(tmp_path / "new.yaml", tmp_path / "spool", s3=(seaweedfs, s3_bucket), dsn=dsn)
    beside = write_config(tmp_path / "beside.yaml", tmp_path / "spool2", s3=(seaweedfs, s3_bucket), dsn=dsn)
    (tmp_path / "spool2" / "uploads").mkdir(parents=True)  # another replica's work in progress

    def interrupt(_: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C, once the objects and the manifests' records are copied

    def stopped(source: Metadata, target: Metadata) -> None:
        copy_records(source, target, interrupt)

    monkeypatch.setattr("mirror.maintenance.migrate.copy_records", stopped)
    with pytest.raises(KeyboardInterrupt):
        Migration(load_config(old, env={}), load_config(new, env={})).run()
    monkeypatch.undo()
    assert len(bucket_objects(seaweedfs, s3_bucket)) == len(sizes(data))
    assert records(new)[RecordKind.MANIFESTS.value] and not records(new)[RecordKind.LINKS.value]  # none linked
    began = f"is the target of a `mirror migrate` that did not finish (from filesystem {data.resolve()}, begun "
    for command in (["fsck"], ["gc"], ["preload", tmp_path / "one-layout"],
                    ["serve", "--listen", f"127.0.0.1:{free_port()}"]):
        done = mirror_cli(*command, "--config", beside, timeout=60)
        assert done.returncode == 2, (command, done.stdout + done.stderr)
        assert began in done.stderr and "run the same `mirror migrate` again" in done.stderr, done.stderr
        assert "delete the row 'migrating' from that database's settings table" in done.stderr, done.stderr
    line = refused(beside, write_config(tmp_path / "back.yaml", tmp_path / "back"))
    assert line.startswith("mirror: migrate: source: ") and began in line, line
    migrated(old, new)
    assert len(bucket_objects(seaweedfs, s3_bucket)) == len(sizes(data)) and differences(old, new) == []
    checked = mirror_cli("fsck", "--config", beside, timeout=120)
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("clean"), checked.stdout + checked.stderr


def test_moving_only_the_index_leaves_the_pushes_in_progress_in_the_bucket_alone(
    tmp_path: Path, seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer,
) -> None:
    """The index moved to another database, the store staying in its bucket: the run swept the bucket as
    a target of its own, and aborted the source's push uploads in progress (a rollback's clients then got
    "upload lost").  They are left alone: the target is the source's store."""
    preloaded(tmp_path, tmp_path / "data", "one", 936)
    first = write_config(tmp_path / "first.yaml", tmp_path / "spool", s3=(seaweedfs, s3_bucket),
                         dsn=postgres.create_database())
    migrated(write_config(tmp_path / "old.yaml", tmp_path / "data"), first)
    s3 = seaweedfs.client()
    key = "store/uploads/5f0c7c1e-2b1d-4c43-9d8e-0e1c2a3b4c5d/data"  # a push's, as the mirror names them
    pushing = s3.create_multipart_upload(Bucket=s3_bucket, Key=key)
    moved = write_config(tmp_path / "moved.yaml", tmp_path / "spool2", s3=(seaweedfs, s3_bucket),
                         dsn=postgres.create_database())
    migrated(first, moved)
    uploads = s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [upload["UploadId"] for upload in uploads] == [pushing["UploadId"]], uploads
    done = mirror_cli("fsck", "--config", first, timeout=60)  # the old configuration: told where its index went
    assert done.returncode == 2 and "after a `mirror migrate` of this store's index, the configuration it was moved" \
        " to" in done.stderr, done.stderr


# -- refusals --------------------------------------------------------------------------------------


def test_the_same_store_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 911)
    old = write_config(tmp_path / "old.yaml", data)
    line = refused(old, write_config(tmp_path / "again.yaml", tmp_path / "." / "data"))
    assert "same store" in line and str(data) in line


def test_a_target_holding_another_stores_index_is_refused_and_left_alone(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    preloaded(tmp_path, ours, "one", 912)
    preloaded(tmp_path, theirs, "two", 913)
    new = write_config(tmp_path / "new.yaml", theirs)
    objects, kept = sizes(theirs), records(new)
    old = write_config(tmp_path / "old.yaml", ours)
    line = refused(old, new)  # its objects are checked first (before its index is opened)
    assert "it belongs to another store" in line and f"holds {len(objects)} objects the source does not" in line
    assert sizes(theirs) == objects and records(new) == kept
    shutil.rmtree(theirs / "blobs")  # its index alone, then
    (theirs / "blobs").mkdir()
    line = refused(old, new)
    assert "belongs to another store" in line and "docker.io/library/two" in line
    assert "or is a copy of this one made by an older version of the mirror" in line
    deleting = migrate(old, new, "--delete")  # not a copy of this store: left alone all the same
    assert deleting.returncode == 2 and "belongs to another store" in deleting.stderr, deleting.stdout + deleting.stderr
    assert sizes(theirs) == {} and records(new) == kept


def _another_store_in_the_bucket(tmp_path: Path, seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer,
                                 *, seed: int) -> Path:
    """A store ``theirs`` migrated into *s3_bucket* (with a database of its own); the data directory
    of another store, ``ours``, not migrated yet."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    preloaded(tmp_path, ours, "one", seed)
    preloaded(tmp_path, theirs, "two", seed + 1)
    migrated(write_config(tmp_path / "theirs.yaml", theirs),
             write_config(tmp_path / "cloud.yaml", tmp_path / "spool", s3=(seaweedfs, s3_bucket),
                          dsn=postgres.create_database()))
    return ours


def test_a_target_bucket_holding_another_stores_objects_is_refused_though_its_index_is_empty(
        tmp_path: Path, seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer) -> None:
    """A fresh database paired with a bucket another store lives in: the two stores would share
    its objects (a collection of either would take the other's).  Nothing is written."""
    ours = _another_store_in_the_bucket(tmp_path, seaweedfs, s3_bucket, postgres, seed=921)
    objects = bucket_objects(seaweedfs, s3_bucket)
    assert objects == sizes(tmp_path / "theirs")
    new = write_config(tmp_path / "new.yaml", tmp_path / "other-spool", s3=(seaweedfs, s3_bucket),
                       dsn=postgres.create_database())
    line = refused(write_config(tmp_path / "ours.yaml", ours), new)
    assert "belongs to another store" in line and f"{len(objects)} objects the source does not" in line, line
    assert bucket_objects(seaweedfs, s3_bucket) == objects and not any(records(new).values())


def test_a_refused_target_database_is_left_free_for_the_bucket_of_the_next_run(
        tmp_path: Path, seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer) -> None:
    """A migration into a new database whose bucket is refused (another store lives there) records
    no store in that database: the next run, into an empty bucket, takes it."""
    ours = _another_store_in_the_bucket(tmp_path, seaweedfs, s3_bucket, postgres, seed=931)
    dsn, source = postgres.create_database(), write_config(tmp_path / "ours.yaml", ours)
    line = refused(source, write_config(tmp_path / "new.yaml", tmp_path / "new-spool", s3=(seaweedfs, s3_bucket),
                                        dsn=dsn))
    assert "belongs to another store" in line, line
    with psycopg.connect(dsn) as conn:
        tables = conn.execute("SELECT 1 FROM pg_tables WHERE tablename = 'settings'").fetchall()
        assert not tables or conn.execute("SELECT value FROM settings WHERE name = 'store'").fetchall() == []
    assert not (tmp_path / "new-spool" / "index.json").exists()
    empty = seaweedfs.new_bucket()
    try:
        target = write_config(tmp_path / "empty.yaml", tmp_path / "empty-spool", s3=(seaweedfs, empty), dsn=dsn)
        migrated(source, target)
        assert bucket_objects(seaweedfs, empty) == sizes(ours) and differences(source, target) == []
    finally:
        seaweedfs.drop_bucket(empty)


def test_a_target_directory_holding_objects_the_source_does_not_is_refused_with_their_count(tmp_path: Path) -> None:
    """Each object of the target is looked up in the source: one the source has too is not counted,
    and the message names the first of the others in order.  Nothing is written."""
    data, copy = tmp_path / "data", tmp_path / "copy"
    image = preloaded(tmp_path, data, "one", 926)
    bodies = {sha256_digest(body): body for body in (b"theirs 1", b"theirs 2", b"theirs 3")}
    theirs = sorted(bodies)
    bodies[image.layers[0].digest] = stored_objects(data)[image.layers[0].digest].read_bytes()
    for digest, body in bodies.items():
        path = Layout(copy).blob(parse_digest(digest))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    held = sizes(copy)
    line = refused(write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", copy))
    assert f"the target store holds 3 objects the source does not (first: {theirs[0]})" in line, line
    assert sizes(copy) == held


def test_a_target_that_is_an_earlier_partial_copy_is_taken_up(tmp_path: Path) -> None:
    """The opposite of the refusal above: a target holding part of the source's records goes on."""
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 914)
    old, new = write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", tmp_path / "copy")
    migrated(old, new)
    first = sizes(data)
    preloaded(tmp_path, data, "two", 915)  # the source grew since: the copy is a part of it
    out = migrated(old, new)
    assert f"{len(sizes(data)) - len(first)} copied, {len(first)} already there" in out
    assert out.startswith("migrate: objects (")  # not a terminal: plain progress lines
    assert sizes(tmp_path / "copy") == sizes(data)
    assert differences(old, new) == []


def test_a_store_in_use_is_refused(tmp_path: Path) -> None:
    """A collection (``mirror gc``, or a server's) holds ``DATA/gc.lock``; pushes share it."""
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 916)
    fd = os.open(data / "gc.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        line = refused(write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", tmp_path / "b"))
    finally:
        os.close(fd)
    assert "gc.lock is held" in line and "stop it" in line
    assert not (tmp_path / "b" / "blobs").exists()


def test_a_store_a_running_server_has_open_is_refused(
    tmp_path: Path, mirror_factory: Callable[..., MirrorServer], postgres: PostgresServer,
) -> None:
    """Idle servers hold no lock file, but they hold their index open: diskcache's database (as
    SQLite does while connected) or a listening connection to PostgreSQL; either refuses the migration."""
    on_diskcache = mirror_factory()
    dsn = postgres.create_database()
    on_postgres = mirror_factory(env={"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn})
    for server, config in ((on_diskcache, write_config(tmp_path / "disk.yaml", on_diskcache.data_dir)),
                           (on_postgres, write_config(tmp_path / "pg.yaml", on_postgres.data_dir, dsn=dsn))):
        target = write_config(tmp_path / "new.yaml", tmp_path / f"copy-{server.port}")
        line = refused(config, target)
        assert line.startswith("mirror: migrate: source: ") and "open" in line and "stop it" in line, line
        assert not (tmp_path / f"copy-{server.port}" / "blobs").exists()
        if server is on_postgres:  # another process with it open (here this one): "them", not "it"
            beside = PostgresMetadata(dsn)
            try:
                line = refused(config, target)
            finally:
                beside.close()
            assert line.endswith("2 mirror processes have the index in this database open; stop them before"
                                 " migrating"), line
        server.stop()
        migrated(config, target)


def test_a_source_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    line = refused(write_config(tmp_path / "old.yaml", tmp_path / "nothing"),
                   write_config(tmp_path / "new.yaml", tmp_path / "b"))
    assert "source:" in line and "not a mirror data directory" in line
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "b").exists()


def test_a_target_whose_database_cannot_be_reached_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 917)
    dsn = f"host=127.0.0.1 port={free_port()} user=postgres dbname=x password=s3cr3t-pw connect_timeout=3"
    done = migrate(write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", tmp_path / "b",
                                                                           dsn=dsn))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "target: cannot open the index" in done.stderr and "s3cr3t-pw" not in done.stdout + done.stderr
    assert not (tmp_path / "b").exists()  # made for the run, removed with what it held (gc.lock, blobs/, ...)


def test_a_target_bucket_that_does_not_exist_is_refused(tmp_path: Path, seaweedfs: SeaweedS3) -> None:
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 918)
    line = refused(write_config(tmp_path / "old.yaml", data),
                   write_config(tmp_path / "new.yaml", tmp_path / "b", s3=(seaweedfs, "no-such-bucket")))
    assert "target: cannot open the store" in line and "no-such-bucket" in line
    assert not (tmp_path / "b").exists()


# -- only the index moves ----------------------------------------------------------------------------


def test_the_index_alone_moves_to_postgres_and_the_data_directory_follows_it(
    tmp_path: Path, postgres: PostgresServer,
) -> None:
    """The same data directory under another index driver: no object is copied, every record is, and
    ``DATA/index.json`` then names the new index (the old configuration is refused, the new one opens)."""
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 919)
    objects = sizes(data)
    dsn = postgres.create_database()
    old, new = write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", data, dsn=dsn)
    out = migrated(old, new)
    assert "0 copied" in out and f"{data} is now bound to PostgreSQL database" in out
    assert sizes(data) == objects and differences(old, new) == []
    assert tagged_pins(new) == tagged_pins(old) != []  # see the test below
    with_postgres = mirror_cli("fsck", "--data", data, env={"MIRROR_METADATA_DRIVER": "postgres",
                                                            "MIRROR_METADATA_POSTGRES_DSN": dsn})
    assert with_postgres.returncode == 0 and with_postgres.stdout.rstrip().endswith("clean"), with_postgres.stderr
    with_diskcache = mirror_cli("fsck", "--data", data)
    assert with_diskcache.returncode == 2 and "holds the blobs of the index in PostgreSQL" in with_diskcache.stderr


def test_a_preloads_pin_keeps_going_with_its_tag_and_a_copy_that_lost_that_is_mended_by_a_run_again(
    tmp_path: Path, postgres: PostgresServer,
) -> None:
    """A pin made by a preload under a tag goes when the image's last tag goes, and fsck checks what
    it pins: that is part of the pin, copied with it both ways.  A copy made without it (as an older
    version did) differs from its source, and migrating again mends it."""
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 925)
    dsn = postgres.create_database()
    old, new = write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", tmp_path / "new", dsn=dsn)
    migrated(old, new)
    assert tagged_pins(new) == tagged_pins(old) != [] and differences(old, new) == []
    loaded = load_config(new, env={})
    index = open_metadata(loaded.metadata, Layout(tmp_path / "new").index, loaded.storage)
    try:
        (repo, digest), = index.pins()
        index.unpin(repo, digest)
        index.pin(repo, digest, now=records(old)["pins"][repo, digest].pinned_at)
    finally:
        index.close()
    assert differences(old, new) == ["pins: 1 in the source, 1 in the target (values differ)"]
    migrated(old, new)
    assert differences(old, new) == [] and tagged_pins(new) == tagged_pins(old)
    back = write_config(tmp_path / "back.yaml", tmp_path / "back")
    migrated(new, back)
    assert records(back) == records(old) and tagged_pins(back) == tagged_pins(old)


@pytest.mark.parametrize("driver", ["filesystem", "s3"])
def test_a_copy_made_before_the_source_changed_catches_up_and_so_does_the_source_after_a_rollback(
    tmp_path: Path, postgres: PostgresServer, driver: str, request: pytest.FixtureRequest,
) -> None:
    """Copy during a first stop of the old store's server, serve, then copy again at the cutover: a copy
    made by ``mirror migrate`` (it records whose copy it is) takes what the source withdrew since (a tag
    deleted, an image collected) and drops it too, objects included, when asked (``--delete``: what was written to the
    copy meanwhile would be lost).  Back the other way, the store a copy was made of catches up with
    the copy.  An index of another store is still refused, with or without it (the tests above)."""
    data, copy = tmp_path / "data", tmp_path / "copy"
    one = preloaded(tmp_path, data, "one", 927)
    preloaded(tmp_path, data, "two", 928)
    old = write_config(tmp_path / "old.yaml", data)
    bucket = (request.getfixturevalue("seaweedfs"), request.getfixturevalue("s3_bucket")) if driver == "s3" else None
    new = write_config(tmp_path / "new.yaml", copy, s3=bucket, dsn=postgres.create_database())

    def copied() -> dict[str, int]:
        return bucket_objects(*bucket) if bucket else sizes(copy)

    migrated(old, new)
    with opened(new) as index:  # the copy served meanwhile: a name pushed to it, another cached by it
        index.mark_local("team/onlynew", time.time())
        index.link(local_repo("team/onlynew"), [one.digest])
        index.set_tag(local_repo("team/onlynew"), "1", TagRecord(one.digest, one.media_type, time.time()))
        index.link("docker.io/library/onlyhere", [one.digest])
    with opened(old) as index:  # as a DELETE of its tag and a collection do
        assert index.untag("docker.io/library/one", "1") and index.unpin_tagged("docker.io/library/one", one.digest)
    collected = mirror_cli("gc", "--data", data, env={"MIRROR_GC_GRACE": "0s", "MIRROR_CACHE_MAX_SIZE": "1024"})
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert one.layers[0].digest not in sizes(data), collected.stdout + collected.stderr
    three = preloaded(tmp_path, data, "three", 929)
    line = refused(old, new)  # the copy may have been written to since: only when asked
    assert "it is a copy of this store made before: to withdraw from it what the source no longer holds, run again" \
        " with --delete" in line, line
    out = migrated(old, new, "--delete")  # the copy's own names go too: it is the source's again
    assert "records the source no longer holds were withdrawn from the target" in out, out
    assert copied() == sizes(data) and differences(old, new) == [], out
    with opened(new) as index:
        assert not index.is_local("team/onlynew") and "docker.io/library/onlyhere" not in index.repositories()
    assert "3 objects the source no longer holds were deleted from the target" in out, out  # manifest, config, layer

    with opened(new) as index:  # the copy serves and changes; then back to where it came from
        assert index.untag("docker.io/library/three", "1")
    out = migrated(new, old, "--delete")
    assert "1 records the source no longer holds were withdrawn from the target (first: tag docker.io/library/three:1" \
        in out, out
    assert differences(new, old) == [] == differences(old, new)
    assert three.digest in sizes(data)  # no collection ran on the copy: the image is still there


def test_moving_the_index_back_onto_its_older_copy_catches_it_up(tmp_path: Path, postgres: PostgresServer) -> None:
    """Back from PostgreSQL to the data directory's own diskcache index, once a tag was removed since
    (as a client's DELETE does): the older copy, the index the PostgreSQL one was copied from, catches
    up (before, it had to be removed first)."""
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 924)
    old = write_config(tmp_path / "old.yaml", data)
    new = write_config(tmp_path / "new.yaml", data, dsn=postgres.create_database())
    migrated(old, new)
    with opened(new) as index:
        assert index.untag("docker.io/library/one", "1")
    assert "run again with --delete" in refused(new, old)
    out = migrated(new, old, "--delete")
    assert "1 records the source no longer holds were withdrawn from the target (first: tag docker.io/library/one:1" \
        in out, out
    assert f"{data} is now bound to diskcache" in out
    assert differences(new, old) == [] == differences(old, new)


def test_progress_off_a_terminal_is_a_line_per_phase_and_one_every_interval() -> None:
    lines: list[str] = []
    now = [0.0]
    progress = LineProgress("migrate", lines.append, every=10.0, clock=lambda: now[0])
    progress.phase("objects", 3000)
    progress.advance(1000)
    now[0] = 10.0
    progress.advance(1000)
    now[0] = 15.0
    progress.advance(500)
    progress.phase("index records", None)
    assert lines == ["migrate: objects (3000 bytes)", "migrate: objects: 2000 of 3000 bytes", "migrate: index records"]


def test_progress_on_a_terminal_shows_no_bytes_for_a_phase_that_counts_none(capsys: pytest.CaptureFixture[str]) -> None:
    """The terminal's display of a phase of no known size (``index records``, export's ``collecting``)
    shows its time, not ``0.00B``; one that then counts bytes (an upload of unknown size) shows them."""
    progress = TerminalProgress("migrate", enabled=True)
    progress.phase("index records", None)
    progress.close()
    shown = capsys.readouterr().err
    assert "migrate: index records: 00:00" in shown and "B" not in shown.replace("migrate: index records", ""), shown
    progress.phase("uploading", None)
    progress.advance(3 * 1024 * 1024)
    progress._bar.refresh()
    progress.close()
    assert "3.00MB" in capsys.readouterr().err


def test_gc_and_fsck_check_and_collect_a_store_moved_to_s3(
        tmp_path: Path, seaweedfs: SeaweedS3, s3_bucket: str) -> None:
    """The moved store's data directory holds no blobs/: fsck and gc work on the bucket all the same."""
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 923)
    cloud = write_config(tmp_path / "cloud.yaml", tmp_path / "spool", s3=(seaweedfs, s3_bucket))
    migrated(write_config(tmp_path / "old.yaml", data), cloud)
    stored = bucket_objects(seaweedfs, s3_bucket)
    checked = mirror_cli("fsck", "--config", cloud, "--verify-content")
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("clean"), checked.stdout + checked.stderr
    collected = mirror_cli("gc", "--config", cloud)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert bucket_objects(seaweedfs, s3_bucket) == stored  # pinned: nothing to collect


def test_a_config_file_that_does_not_name_the_data_directory_is_refused(tmp_path: Path) -> None:
    """Else the default, ./mirror-data, would be wherever the command runs."""
    data = tmp_path / "data"
    preloaded(tmp_path, data, "one", 925)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    default = PROJECT_ROOT / "mirror-data"  # where the command runs
    there = default.exists()
    line = refused(write_config(tmp_path / "old.yaml", data), empty)
    assert line == f"mirror: migrate: {empty}: storage.path is not set: name the store's data directory", line
    assert default.exists() == there


@pytest.mark.parametrize("text", [
    "storage:\n  s3:\n    secretkey: Sup3rS3cretKey: x\n",
    "metadata:\n  postgres:\n    dsn: \"host=db password=Sup3rS3cretKey\n  x: [\n",
])
def test_a_config_file_that_is_not_yaml_is_refused_in_one_line_that_does_not_quote_it(
        tmp_path: Path, text: str) -> None:
    """The parser's message quotes the offending line, which may hold a secret: only where it is said."""
    bad = tmp_path / "old.yaml"
    bad.write_text(text)
    line = refused(bad, write_config(tmp_path / "new.yaml", tmp_path / "b"))
    assert "Sup3rS3cret" not in line
    assert line.startswith(f"mirror: migrate: {bad}: config file {bad} is not valid YAML at line "), line


def test_a_source_object_that_does_not_match_its_digest_is_not_copied(tmp_path: Path) -> None:
    """Bytes are checked as the target writes them: a layer rotted in the source (same size, other
    bytes) is refused there, reported, and the run exits 1; everything else is copied."""
    data = tmp_path / "data"
    image = preloaded(tmp_path, data, "one", 920)
    layer = stored_objects(data)[image.layers[0].digest]
    rotten = bytearray(layer.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF
    layer.chmod(0o644)
    layer.write_bytes(bytes(rotten))
    done = migrate(write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", tmp_path / "copy"))
    assert done.returncode == 1 and done.stdout.rstrip().endswith("2 problems"), done.stdout + done.stderr
    assert f"source object {layer}: content does not match {image.layers[0].digest}" in done.stdout
    assert set(sizes(tmp_path / "copy")) == set(sizes(data)) - {image.layers[0].digest}


def test_target_objects_damaged_since_they_were_copied_are_copied_again_by_a_run_that_re_hashes(tmp_path: Path) -> None:
    """A run again skips what the target holds at its size; with ``--verify-content`` a layer and a
    manifest rotted in the target since (same size, other bytes) are replaced with the source's, said
    in the summary, and the run ends verified: the source's good copy is what mends them."""
    data = tmp_path / "data"
    image = preloaded(tmp_path, data, "one", 926)
    old, new = write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", tmp_path / "copy")
    migrated(old, new)
    rotted = (image.layers[0].digest, image.digest)
    for digest in rotted:
        path = stored_objects(tmp_path / "copy")[digest]
        rotten = bytearray(path.read_bytes())
        rotten[len(rotten) // 2] ^= 0xFF
        path.chmod(0o644)
        path.write_bytes(bytes(rotten))
    assert "0 copied" in migrated(old, new)  # skipped: at their size
    out = migrated(old, new, "--verify-content")
    assert f"re-hashed, {len(rotted)} of them copied again)" in out, out
    for digest in rotted:
        assert f"did not match its digest in the target, copied again: {digest}" in out, out
        assert stored_objects(tmp_path / "copy")[digest].read_bytes() == stored_objects(data)[digest].read_bytes()
    checked = mirror_cli("fsck", "--data", tmp_path / "copy", "--verify-content")
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("clean"), checked.stdout + checked.stderr


def test_a_signed_schema1_manifest_moves_under_the_digest_registries_give_it(
    upstream: UpstreamRegistry, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    http: httpx.Client, seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path,
) -> None:
    """Named by the hash of its payload, not of its bytes: the target's write checks it that way
    and keeps the bytes as they are (a signed schema 1 image pulled through, as Docker Hub serves one)."""
    layers = [random_layer(tmp_path, 3000, 921), random_layer(tmp_path, 5000, 922)]
    upstream.push_image("library/old-signed", "v2", build_image(tmp_path, layers))
    old = signed_schema1("library/old-signed", "1", layers)
    fault_proxy.add("status", f"/library/old-signed/manifests/(1|{old.digest})$", status=200, body=old.body,
                    headers={"content-type": SCHEMA1_SIGNED, "docker-content-digest": old.digest})
    mirror = mirror_factory(fault_proxy.url, env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"})
    got = http.get(f"{mirror.url}/v2/old-signed/manifests/1", headers={"accept": SCHEMA1_SIGNED})
    assert got.status_code == 200 and got.content == old.body, got.text
    for layer in layers:
        assert http.get(f"{mirror.url}/v2/old-signed/blobs/{layer.digest}").status_code == 200
    mirror.stop()
    assert old.digest in stored_objects(mirror.data_dir) and old.digest != old.bytes_digest

    migrated(write_config(tmp_path / "old.yaml", mirror.data_dir),
             write_config(tmp_path / "new.yaml", tmp_path / "spool", s3=(seaweedfs, s3_bucket)), "--verify-content")
    hex_ = old.digest.removeprefix("sha256:")
    kept = seaweedfs.client().get_object(Bucket=s3_bucket, Key=f"store/blobs/sha256/{hex_[:2]}/{hex_}")
    assert kept["Body"].read() == old.body


# -- a large index -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_large_index_is_copied_and_verified_in_bounded_memory(tmp_path: Path) -> None:
    """50,000 links and access times, 10,000 manifest records and tags (written through the driver):
    checked for strangers, copied and verified while the migration's Python objects never take more
    than a few MiB at once (about 2 MiB; holding every record, twice to compare them, took 83 MiB)."""
    links, manifests, repos = 50_000, 10_000, [f"docker.io/library/r{n}" for n in range(1000)]
    data = tmp_path / "data"
    Layout(data).blobs.mkdir(parents=True)
    index = DiskcacheMetadata(Layout(data).index)
    try:
        for i in range(manifests):
            index.put_manifest(_digest(i), OCI_MANIFEST, 1000 + i)
            index.set_tag(repos[i % len(repos)], f"t{i}", TagRecord(_digest(i), OCI_MANIFEST, 1.5e9 + i))
        for r, repo in enumerate(repos):
            index.link(repo, [_digest(i) for i in range(r, links, len(repos))])
            index.record_access({(repo, _digest(i)): 1.6e9 + i for i in range(r, links, len(repos))})
    finally:
        index.close()
    old, new = write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", tmp_path / "copy")

    tracemalloc.start()
    try:
        report = Migration(load_config(old, env={}), load_config(new, env={})).run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.problems == [], report.problems
    assert report.records == {**report.records, "tags": manifests, "manifests": manifests, "links": links,
                              "access times": links, "repositories": len(repos)}
    assert peak < 8 << 20, f"{peak / (1 << 20):.1f} MiB at the peak"
    with opened(new) as copy:
        assert copy.count_manifests() == manifests and len(copy.access_times()) == links
        assert copy.get_tag(repos[7], "t7") == TagRecord(_digest(7), OCI_MANIFEST, 1.5e9 + 7)
        assert copy.is_linked(repos[-1], _digest(links - 1)) and copy.repositories() == sorted(repos)


@pytest.mark.slow
def test_a_large_store_is_copied_and_verified_in_bounded_memory(tmp_path: Path) -> None:
    """20,000 small objects, a quarter of them in the target already (a run that was interrupted),
    some recorded as manifests, and strays: counted, checked against the target, copied, re-hashed
    and verified while the migration's Python objects never take more than a few MiB at once (about
    7 MiB, 4 of them the copiers' reads of 1 MiB; holding the listing took 20 MiB)."""
    count, data, copy = 20_000, tmp_path / "data", tmp_path / "copy"
    absent = [_digest(n) for n in range(10)]  # manifests the index records that the store lacks
    index = DiskcacheMetadata(Layout(data).index)
    try:
        for n in range(count):
            body = b"object %d" % n
            digest = parse_digest(sha256_digest(body))
            for side in (data, copy) if n % 4 == 0 else (data,):
                Layout(side).blob(digest).parent.mkdir(parents=True, exist_ok=True)
                Layout(side).blob(digest).write_bytes(body)
            if n % 40 == 0:
                index.put_manifest(str(digest), OCI_MANIFEST, len(body))
        for digest in absent:
            index.put_manifest(digest, OCI_MANIFEST, 100)
    finally:
        index.close()
    stored = sizes(data)
    strays = [Layout(data).blobs / "sha256" / "00" / "not-a-digest", Layout(data).blobs / "md5" / "ab" / "ab12"]
    for stray in strays:
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(b"stray")
    old, new = write_config(tmp_path / "old.yaml", data), write_config(tmp_path / "new.yaml", copy)

    tracemalloc.start()
    try:
        report = Migration(load_config(old, env={}), load_config(new, env={}), verify_content=True).run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.problems == [], report.problems
    assert (report.objects, report.bytes, report.strays) == (count, sum(stored.values()), len(strays))
    assert (report.copied, report.present, report.verified) == (count - count // 4, count // 4, count)
    assert f"{len(absent)} manifests the index names were not in the source store either (first: {absent[0]};" \
        in " ".join(report.notes), report.notes
    assert peak < 10 << 20, f"{peak / (1 << 20):.1f} MiB at the peak"
    assert sizes(copy) == stored


def _digest(n: int) -> str:
    return f"sha256:{n:064x}"


def test_a_copy_in_a_bucket_is_not_taken_over_by_a_run_into_another_database(
        tmp_path: Path, seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer) -> None:
    """A copy made into a bucket belongs to the database it went to.  A run again into the same bucket
    with another (fresh) database, a mistyped name at the cutover, was taken: it rebound the bucket,
    and the copy's own database could serve no more.  It is refused, and the bucket stays the copy's."""
    source = write_config(tmp_path / "ours.yaml", tmp_path / "ours")
    preloaded(tmp_path, tmp_path / "ours", "one", 941)
    copy = write_config(tmp_path / "copy.yaml", tmp_path / "spool", s3=(seaweedfs, s3_bucket),
                        dsn=postgres.create_database())
    migrated(source, copy)
    objects = bucket_objects(seaweedfs, s3_bucket)
    mistyped = write_config(tmp_path / "other.yaml", tmp_path / "other-spool", s3=(seaweedfs, s3_bucket),
                            dsn=postgres.create_database())
    line = refused(source, mistyped)
    assert "holds the objects of another index" in line and "name the database that holds it" in line, line
    assert bucket_objects(seaweedfs, s3_bucket) == objects
    assert "verified" in migrated(source, copy)  # the copy's own database still goes on
    # The copy's database not answering at a run again: before, the bucket was said to be another index's.
    unanswered = write_config(tmp_path / "down.yaml", tmp_path / "spool", s3=(seaweedfs, s3_bucket),
                              dsn=f"host=127.0.0.1 port={free_port()} user=postgres dbname=x connect_timeout=3")
    line = refused(source, unanswered)
    assert "target: cannot open the index: PostgreSQL database 'x' at 127.0.0.1:" in line and \
        "check that PostgreSQL runs there" in line and "another index" not in line, line
    checked = mirror_cli("fsck", "--config", copy)
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("clean"), checked.stdout + checked.stderr
