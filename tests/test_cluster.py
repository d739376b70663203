"""Replicas of one mirror: the cluster's configuration, the signature of requests between replicas,
and the internal endpoint that refuses any request not signed with the cluster's secret.

The replicas' shared fills (one upstream fetch per digest, followers streaming from the owner, a dead
owner's fill taken over) are in test_cluster_fills.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mirror.config.load import load_config, to_environ
from mirror.config.sections import ConfigError
from mirror.registry.peers import MAX_SKEW, sign, verify
from mirror.spec.errors import APIError
from tests.support.client import push_image
from tests.support.images import Image
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.procs import free_port
from tests.support.registry import UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3
from tests.support.security import ALICE_PASSWORD, auth_env, basic, bearer, push
from tests.support.storecheck import mirror_cli
from tests.support.waiting import eventually
from tests.test_s3_serve import Bucket
from tests.test_web_ui_actions import form

SECRET = "c1a5f0e3d2b4a69788776655443322110fedcba9876543210"
DIGEST = "sha256:" + "ab" * 32
PATH = f"/_mirror/cluster/fills/{DIGEST}"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster-secret"
    path.write_text(SECRET + "\n")
    return path


def shared(**extra: str) -> dict[str, str]:
    """The keys that make a valid replica's environment, but for the cluster's."""
    return {"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": "b", "MIRROR_CACHE_MAX_SIZE": "0",
            "MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": "postgresql:///x", **extra}


# -- configuration --


def test_cluster_keys_come_from_the_file_and_the_environment(tmp_path: Path, secret_file: Path) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_text(f"cluster:\n  advertise: http://10.0.0.5:5000\n  secret_file: {secret_file}\n")
    config = load_config(path, env=shared(MIRROR_CLUSTER_LEASE_TTL="2s"))
    assert config.cluster.enabled
    assert config.cluster.advertise == "http://10.0.0.5:5000"
    assert config.cluster.secret_file is not None and config.cluster.secret_file.value == SECRET
    assert config.cluster.lease_ttl == 2.0
    # The environment overrides the file; the secret never shows, and workers read the file again.
    env = shared(MIRROR_CLUSTER_ADVERTISE="http://10.0.0.6:5000")
    assert load_config(path, env=env).cluster.advertise == "http://10.0.0.6:5000"
    assert SECRET not in repr(config)
    exported = to_environ(config)
    assert exported["MIRROR_CLUSTER_SECRET_FILE"] == str(secret_file)
    assert SECRET not in "".join(exported.values())
    assert not load_config(env={}).cluster.enabled


@pytest.mark.parametrize(("env", "message"), [
    ({"MIRROR_CLUSTER_ADVERTISE": "10.0.0.5:5000"}, "bad value for cluster.advertise: "),
    ({"MIRROR_CLUSTER_ADVERTISE": "http://10.0.0.5:5000"}, "cluster.advertise and cluster.secret_file must be set"),
    ({"MIRROR_CLUSTER_SECRET_FILE": "/nonexistent/secret"}, "bad value for cluster.secret_file: "),
    ({"MIRROR_CLUSTER_LEASE_TTL": "soon"}, "bad value for cluster.lease_ttl: "),
    ({"MIRROR_CLUSTER_LEASE_TTL": "100ms"}, "bad value for cluster.lease_ttl: 0.1s: must be at least"),
    ({"MIRROR_CLUSTER_PEERS": "x"}, "unknown configuration key cluster.peers"),
])
def test_bad_cluster_keys_stop_start_up_naming_the_key(env: dict[str, str], message: str,
                                                       secret_file: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(env=shared(**env))
    assert message in str(refused.value)


def test_a_short_secret_is_refused_without_being_shown(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_text("hunter2hunter2")
    with pytest.raises(ConfigError) as refused:
        load_config(env=shared(MIRROR_CLUSTER_ADVERTISE="http://10.0.0.5:5000", MIRROR_CLUSTER_SECRET_FILE=str(path)))
    assert str(refused.value).startswith("bad value for cluster.secret_file: ")
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("backends", [
    {},
    {"MIRROR_STORAGE_DRIVER": "filesystem", "MIRROR_CACHE_MAX_SIZE": "80%"},
    {"MIRROR_METADATA_DRIVER": "diskcache"},
])
def test_a_replica_needs_s3_and_postgres(backends: dict[str, str], secret_file: Path, tmp_path: Path) -> None:
    env = {**(shared(**backends) if backends else {}),
           "MIRROR_CLUSTER_ADVERTISE": "http://10.0.0.5:5000", "MIRROR_CLUSTER_SECRET_FILE": str(secret_file)}
    with pytest.raises(ConfigError) as refused:
        load_config(env=env)
    assert str(refused.value).startswith("cluster.advertise needs storage.driver: s3 and metadata.driver: postgres")
    # The server refuses to start, with that message and nothing else.
    done = mirror_cli("serve", "--data", tmp_path / "data", "--listen", f"127.0.0.1:{free_port()}", env=env, timeout=60)
    assert done.returncode != 0
    assert "cluster.advertise needs storage.driver: s3 and metadata.driver: postgres" in done.stderr + done.stdout
    assert SECRET not in done.stderr + done.stdout


# -- signatures --


def test_a_signed_request_names_its_replica() -> None:
    headers = {k.lower(): v for k, v in sign(SECRET, "GET", PATH, "http://10.0.0.5:5000").items()}
    assert verify(SECRET, "GET", PATH, headers) == "http://10.0.0.5:5000"
    assert SECRET not in "".join(headers.values())


@pytest.mark.parametrize(("change", "status"), [
    (lambda h: h.pop("x-mirror-signature"), 401),
    (lambda h: h.clear(), 401),
    (lambda h: h.update({"x-mirror-signature": "v1=" + "0" * 64}), 403),
    (lambda h: h.update({"x-mirror-replica": "http://10.0.0.9:5000"}), 403),  # signed for another replica
    (lambda h: h.update({"x-mirror-time": str(int(h["x-mirror-time"]) + 1)}), 403),
    (lambda h: h.update({"x-mirror-time": "soon"}), 403),
])
def test_a_request_without_or_with_a_wrong_signature_is_refused(change: Callable[[dict[str, str]], object],
                                                                status: int) -> None:
    headers = {k.lower(): v for k, v in sign(SECRET, "GET", PATH, "http://10.0.0.5:5000").items()}
    change(headers)
    with pytest.raises(APIError) as refused:
        verify(SECRET, "GET", PATH, headers)
    assert refused.value.status == status


def test_a_signature_holds_for_its_method_path_and_secret_only_and_for_a_bounded_time() -> None:
    now = float(int(time.time()))
    headers = {k.lower(): v for k, v in sign(SECRET, "GET", PATH, "r", now=now).items()}
    for method, path, secret in [("HEAD", PATH, SECRET), ("GET", PATH + "x", SECRET), ("GET", PATH, SECRET + "x")]:
        with pytest.raises(APIError) as refused:
            verify(secret, method, path, headers, now=now)
        assert refused.value.status == 403
    assert verify(SECRET, "GET", PATH, headers, now=now + MAX_SKEW) == "r"
    assert verify(SECRET, "GET", PATH, headers, now=now - MAX_SKEW + 1) == "r"
    for skewed in (now + MAX_SKEW + 2, now - MAX_SKEW - 2):  # replayed later, or from a clock far ahead
        with pytest.raises(APIError) as refused:
            verify(SECRET, "GET", PATH, headers, now=skewed)
        assert refused.value.status == 403 and "off" in refused.value.message


# -- the internal endpoint --


def replica_env(bucket: Bucket, dsn: str, secret_file: Path, port: int, **extra: str) -> dict[str, str]:
    return bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=dsn,
                      MIRROR_CLUSTER_ADVERTISE=f"http://127.0.0.1:{port}", MIRROR_CLUSTER_SECRET_FILE=str(secret_file),
                      **extra)


def test_the_fills_endpoint_answers_only_signed_requests(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, secret_file: Path,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    port = free_port()
    mirror = mirror_factory(port=port, env=replica_env(Bucket(seaweedfs, s3_bucket), postgres.create_database(),
                                                        secret_file, port))
    url = mirror.url + PATH
    with httpx.Client(trust_env=False, timeout=30) as http:
        unsigned = http.get(url)
        assert unsigned.status_code == 401
        assert unsigned.json()["errors"][0]["code"] == "UNAUTHORIZED"
        signed = sign(SECRET, "GET", PATH, "http://127.0.0.1:1")
        forged = http.get(url, headers={**signed, "X-Mirror-Signature": "v1=" + "0" * 64})
        assert forged.status_code == 403 and forged.json()["errors"][0]["code"] == "DENIED"
        wrong_secret = http.get(url, headers=sign(SECRET[::-1], "GET", PATH, "http://127.0.0.1:1"))
        assert wrong_secret.status_code == 403 and wrong_secret.json()["errors"][0]["code"] == "DENIED"
        stale = http.get(url, headers=sign(SECRET, "GET", PATH, "http://127.0.0.1:1", now=time.time() - 600))
        assert stale.status_code == 403 and stale.json()["errors"][0]["code"] == "DENIED"
        # Signed: let in, and told this replica has no fill of that blob (nothing is fetched for it).
        known = http.get(url, headers=signed)
        assert known.status_code == 404 and known.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        bad = f"/_mirror/cluster/fills/sha256:{'zz' * 32}"
        invalid = http.get(mirror.url + bad, headers=sign(SECRET, "GET", bad, "http://127.0.0.1:1"))
        assert invalid.status_code == 400 and invalid.json()["errors"][0]["code"] == "DIGEST_INVALID"
        metrics = http.get(f"{mirror.url}/metrics").text
    assert SECRET not in metrics
    assert SECRET not in mirror.log_path.read_text()


def test_the_fills_endpoint_is_off_without_a_cluster(mirror: MirrorServer) -> None:
    with httpx.Client(trust_env=False, timeout=30) as http:
        answer = http.get(mirror.url + PATH, headers=sign(SECRET, "GET", PATH, "http://127.0.0.1:1"))
    assert answer.status_code == 404 and answer.json()["errors"][0]["code"] == "NAME_UNKNOWN"


# -- logins across replicas --


def test_a_token_or_a_web_ui_form_one_replica_issued_is_taken_by_the_others(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, secret_file: Path, htpasswd: Path,
    tiny: Image, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """Behind a load balancer without stickiness, ``docker login``'s token and the requests that carry
    it reach any replica, as does a web UI form and its POST: the keys that sign them are the cluster's
    (derived from ``cluster.secret_file``), not each replica's own data directory's."""
    dsn, bucket = postgres.create_database(), Bucket(seaweedfs, s3_bucket)
    ports = [free_port(), free_port()]
    first, second = (mirror_factory(port=port, env=replica_env(bucket, dsn, secret_file, port,
                                                                **auth_env(htpasswd, anonymous_pull=True)))
                     for port in ports)
    scope = {"service": "Test Registry", "scope": "repository:team/app:pull,push"}
    with httpx.Client(trust_env=False, timeout=30) as http:
        issued = http.get(f"{first.url}/auth/token", params=scope, headers=basic("alice", ALICE_PASSWORD))
        assert issued.status_code == 200, issued.text
        token = issued.json()["token"]
        started = http.post(f"{second.url}/v2/team/app/blobs/uploads/", headers=bearer(token))
        assert started.status_code == 202, started.text
        anonymous = http.get(f"{first.url}/auth/token", params={"service": "Test Registry"}).json()["token"]
        assert http.get(f"{second.url}/v2/", headers=bearer(anonymous)).status_code == 200
        push(second, "team/app", "1", tiny, bearer(token))
        fields = form(http.get(f"{first.url}/ui/actions/delete", params={"name": "team/app", "reference": "1"},
                               headers=basic("alice", ALICE_PASSWORD)))
        done = http.post(f"{second.url}/ui/actions/delete", data=fields, headers=basic("alice", ALICE_PASSWORD))
        assert done.status_code == 200 and "Deleted" in done.text, done.text
        gone = http.get(f"{first.url}/v2/team/app/manifests/1", headers={**bearer(token), "accept": tiny.media_type})
        assert gone.status_code == 404, gone.text
        # The web UI's cache page says whose answers it counts (each replica its own).
        cache = http.get(f"{second.url}/ui/cache", headers=basic("alice", ALICE_PASSWORD))
        assert cache.status_code == 200 and f"The answers and bytes of the replica at {second.url}" in cache.text


def test_a_tag_moved_through_one_replica_is_read_moved_through_another_at_once(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, secret_file: Path, tiny: Image,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A CI job pushes ``:latest`` through one replica and, once answered 201, pulls it through another
    (a load balancer without stickiness): it gets what it pushed, never the tag's previous manifest
    that replica had remembered (its memo learnt of the move only when the NOTIFY arrived)."""
    dsn, bucket = postgres.create_database(), Bucket(seaweedfs, s3_bucket)
    ports = [free_port(), free_port()]
    writer, reader = (mirror_factory(port=port, env=replica_env(bucket, dsn, secret_file, port)) for port in ports)
    stop = threading.Event()

    def busy() -> None:  # the reader serving others meanwhile, as a replica does: its listener waits its turn
        with httpx.Client(trust_env=False, timeout=30) as other:
            while not stop.is_set():
                other.get(f"{reader.url}/v2/team/memo/manifests/{tiny.digest}", headers={"accept": tiny.media_type})

    with httpx.Client(trust_env=False, timeout=30) as http:
        push_image(writer.url, "team/memo", "latest", tiny, client=http)
        document = json.loads(tiny.manifest)
        stale: list[int] = []
        others = [threading.Thread(target=busy, daemon=True) for _ in range(4)]
        for thread in others:
            thread.start()
        for round_ in range(80):
            reader_sees = http.get(f"{reader.url}/v2/team/memo/manifests/latest", headers={"accept": tiny.media_type})
            assert reader_sees.status_code == 200  # remembered there now, by tag
            body = json.dumps({**document, "annotations": {"round": str(round_)}}).encode()
            moved = http.put(f"{writer.url}/v2/team/memo/manifests/latest", content=body,
                             headers={"content-type": tiny.media_type})
            assert moved.status_code == 201, moved.text
            for method in ("HEAD", "GET"):
                seen = http.request(method, f"{reader.url}/v2/team/memo/manifests/latest",
                                    headers={"accept": tiny.media_type})
                if seen.headers.get("docker-content-digest") != moved.headers["docker-content-digest"]:
                    stale.append(round_)
        stop.set()
        for thread in others:
            thread.join()
    assert not stale, f"the reader answered the previous manifest after the move's 201 in rounds {stale}"


def test_a_replica_started_with_other_upstreams_than_the_one_before_it_says_so(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, secret_file: Path, upstream: UpstreamRegistry,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """Replicas share each registry's tags and manifests: one started with another upstream for docker.io
    (a rolling change, or a config gone astray) warns, naming both; one like its predecessor does not.
    Before, nothing said so, and a pull could get one upstream's manifest and a 404 for its layer."""
    dsn, bucket = postgres.create_database(), Bucket(seaweedfs, s3_bucket)
    ports = [free_port() for _ in range(3)]
    mirror_factory(port=ports[0], env=replica_env(bucket, dsn, secret_file, ports[0]))
    elsewhere = "http://127.0.0.1:9"
    second = mirror_factory(elsewhere, port=ports[1], env=replica_env(bucket, dsn, secret_file, ports[1]))
    warned = [line for line in second.log_path.read_text().splitlines() if "started before this one" in line]
    assert len(warned) == 1 and "WARNING" in warned[0], warned
    assert f"fetched docker.io from {upstream.url}; this one fetches docker.io from {elsewhere}" in warned[0]
    third = mirror_factory(elsewhere, port=ports[2], env=replica_env(bucket, dsn, secret_file, ports[2]))
    assert "started before this one" not in third.log_path.read_text()


def test_a_replica_with_another_secret_does_not_start_and_a_changed_secret_starts_once_all_stopped(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, secret_file: Path, tmp_path: Path,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """Before, it started and reported itself ready, and whenever another replica fetched what its
    clients asked for they got ``503`` (each side refusing the other's signature)."""
    dsn, bucket = postgres.create_database(), Bucket(seaweedfs, s3_bucket)
    # Short enough to wait out, long enough that a replica renewing its claim every third of it keeps it
    # on a loaded machine (at 2 s, a stall of 1.3 s let the claim lapse and the mirror alone start).
    ttl = {"MIRROR_CLUSTER_LEASE_TTL": "5s"}
    port = free_port()
    running = mirror_factory(port=port, env=replica_env(bucket, dsn, secret_file, port, **ttl))
    other_secret = tmp_path / "other-secret"
    other_secret.write_text(SECRET[::-1] + "\n")
    other = free_port()
    env = replica_env(bucket, dsn, other_secret, other, **ttl)
    refused = mirror_cli("serve", "--data", tmp_path / "other", "--listen", f"127.0.0.1:{other}", env=env, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(f"mirror: cluster.secret_file {other_secret}: the replicas running on this "
                                     "database use another secret"), refused.stderr
    assert SECRET not in refused.stderr + refused.stdout and SECRET[::-1] not in refused.stderr
    # Nor does a mirror without cluster settings on the cluster's bucket and database (an entrypoint that
    # lost MIRROR_CLUSTER_ADVERTISE): it would fetch again what they fetch, its reads unmarked.
    alone = {k: v for k, v in env.items() if not k.startswith("MIRROR_CLUSTER_")}
    lone = mirror_cli("serve", "--data", tmp_path / "alone", "--listen", f"127.0.0.1:{free_port()}", env=alone,
                      timeout=60)
    assert lone.returncode == 2, lone.stderr
    assert lone.stderr.startswith("mirror: the replicas of a cluster run on this database: a mirror beside them "
                                  "needs cluster.advertise"), lone.stderr
    assert re.search(r"their claim lapses in [0-5]s\)$", lone.stderr.strip()), lone.stderr
    # The same secret joins; a new secret starts once every replica of the old one is stopped.
    same = free_port()
    mirror_factory(port=same, env=replica_env(bucket, dsn, secret_file, same, **ttl)).stop()
    running.stop()
    time.sleep(5.5)
    changed = mirror_factory(port=other, env=env)
    assert httpx.get(f"{changed.url}/readyz", trust_env=False).status_code == 200
    changed.stop()  # a replica stopping gives its claim up: a mirror alone may use the database at once
    assert httpx.get(f"{mirror_factory(env=alone).url}/readyz", trust_env=False).status_code == 200


def test_two_mirrors_without_cluster_settings_on_one_database_are_said_once_it_lasts(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, secret_file: Path,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """Two mirrors without ``cluster`` settings on one bucket and database start (a rollout's surge pod
    runs beside the pod it replaces while that drains), but one that lasts (eight lease TTLs here, and
    more than the drain) is said as a warning, once, by the mirror that does not hold the claim; the
    workers of one mirror are one holder.  A cluster's replicas started beside one are said too, by it
    and by them.
    Before, nothing said so, and each one's collector could evict what the other served."""
    said = "another mirror without cluster settings ("
    dsn, bucket = postgres.create_database(), Bucket(seaweedfs, s3_bucket)
    env = bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_CLUSTER_LEASE_TTL="2s", MIRROR_HTTP_DRAINTIMEOUT="1s",
                     MIRROR_METADATA_POSTGRES_DSN=dsn)
    first = mirror_factory(workers=2, env=env)
    second = mirror_factory(env=env)
    time.sleep(4)
    assert said not in first.log_tail(400) + second.log_tail(400), "not at once"
    assert eventually(lambda: said in second.log_tail(400), timeout=40), second.log_tail(40)
    time.sleep(2)
    warned = [line for line in second.log_path.read_text().splitlines() if said in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and "has run on this database for" in warned[0], warned
    assert said not in first.log_path.read_text(), "its two workers are one mirror"

    second.stop()
    port = free_port()
    replica = mirror_factory(port=port, env=replica_env(bucket, dsn, secret_file, port, MIRROR_CLUSTER_LEASE_TTL="2s"))
    assert eventually(lambda: "the replicas of a cluster has run on this database" in first.log_tail(400),
                      timeout=40), first.log_tail(40)
    time.sleep(3)  # each of its two workers has seen them as long by now
    warned = [line for line in first.log_path.read_text().splitlines() if "the replicas of a cluster has" in line]
    assert len(warned) == 1, warned  # said by one worker of the two
    assert eventually(lambda: "a mirror without cluster settings (" in replica.log_tail(400), timeout=20), \
        replica.log_tail(40)  # the replica says so too: before, the other mirror's claim lapsed beside a cluster


def test_a_replica_advertising_the_address_of_a_running_one_does_not_start(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, secret_file: Path, tmp_path: Path,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A configuration copied with ``cluster.advertise`` unchanged: before, the copy started and the
    other replicas asked the first one for the copy's fills (its clients then waited for the whole
    blob to be stored, not streamed).  A replica stopped, or killed, gives its address up (at once,
    or after ``cluster.lease_ttl``)."""
    dsn, bucket = postgres.create_database(), Bucket(seaweedfs, s3_bucket)
    ttl = {"MIRROR_CLUSTER_LEASE_TTL": "5s"}  # kept by the running replica on a loaded machine, too
    port = free_port()
    running = mirror_factory(port=port, env=replica_env(bucket, dsn, secret_file, port, **ttl))
    copied = replica_env(bucket, dsn, secret_file, port, **ttl)  # advertises the running replica's URL
    started = time.monotonic()
    refused = mirror_cli("serve", "--data", tmp_path / "copy", "--listen", f"127.0.0.1:{free_port()}", env=copied,
                         timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(
        f"mirror: cluster.advertise http://127.0.0.1:{port}: another replica running on this database advertises "
        "the same address"), refused.stderr
    assert f"cluster.advertise http://127.0.0.1:{port} is held by" in refused.stderr, refused.stderr  # its wait
    assert time.monotonic() - started > 5.0  # it waited for the lease to lapse: it did not
    running.stop()  # gives it up: a replica at that address starts at once
    again = mirror_factory(port=port, env=replica_env(bucket, dsn, secret_file, port, **ttl))
    assert httpx.get(f"{again.url}/readyz", trust_env=False).status_code == 200
    again.kill9()  # a replica killed: its successor at the address waits for the lease to lapse, then starts
    successor = mirror_factory(port=port, env=replica_env(bucket, dsn, secret_file, port, **ttl))
    assert httpx.get(f"{successor.url}/readyz", trust_env=False).status_code == 200
    assert f"cluster.advertise http://127.0.0.1:{port} is held by" in successor.log_tail(400), \
        successor.log_tail(40)  # its wait is said (before: nothing for the lease's TTL)


def test_a_replica_with_other_access_settings_than_the_running_ones_does_not_start(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, secret_file: Path, tmp_path: Path,
    htpasswd: Path, mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tiny: Image,
) -> None:
    """Before, a replica started with ``auth`` beside replicas without it (or the reverse) started, and
    behind a round-robin load balancer anonymous pushes were taken by some replicas and refused by
    others.  Every replica stopped, they start again with the new settings."""
    dsn, bucket = postgres.create_database(), Bucket(seaweedfs, s3_bucket)
    first_port, second_port = free_port(), free_port()
    first = mirror_factory(port=first_port, env=replica_env(bucket, dsn, secret_file, first_port))
    guarded = {**replica_env(bucket, dsn, secret_file, second_port), **auth_env(htpasswd, anonymous_pull=False)}
    refused = mirror_cli("serve", "--data", tmp_path / "second", "--listen", f"127.0.0.1:{second_port}",
                         env=guarded, timeout=60)
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("mirror: the replicas running on this database have other access settings ("
                           'auth.anonymous_pull true there, false here; auth.htpasswd.path "not set" there, "set" '
                           "here"), line
    assert "stop every replica, wait cluster.lease_ttl" in line and str(htpasswd) not in line, line
    push_image(first.url, "team/app", "1", tiny, client=http)  # the running replica is untouched
    first.stop()  # the last one running: the settings may change
    second = mirror_factory(port=second_port, env=guarded)
    assert http.get(f"{second.url}/v2/").status_code == 401
    assert http.get(f"{second.url}/v2/", headers=basic("alice", ALICE_PASSWORD)).status_code == 200


def test_a_replica_with_other_cache_gc_push_or_admin_settings_says_so_once_and_starts(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, secret_file: Path, tmp_path: Path,
    mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    """Each replica's collector, eviction and upload expiry act on the whole shared store: one started
    with another ``push.upload_ttl``, cache budget or admin token than the running ones says so in one
    error naming them (not the token), and still starts (a rolling change of them); one with the same
    settings says nothing.  Before, nothing compared them."""
    dsn, bucket = postgres.create_database(), Bucket(seaweedfs, s3_bucket)
    token, other_token = tmp_path / "token", tmp_path / "other-token"
    token.write_text("admin-token-one-0123456789abcdef\n")
    other_token.write_text("admin-token-two-0123456789abcdef\n")
    ports = [free_port() for _ in range(3)]
    settings = {"MIRROR_PUSH_UPLOAD_TTL": "1h", "MIRROR_CACHE_MAX_SIZE": "10GiB",
                "MIRROR_ADMIN_TOKEN_FILE": str(token)}
    mirror_factory(port=ports[0], env=replica_env(bucket, dsn, secret_file, ports[0], **settings))
    same = mirror_factory(port=ports[1], env=replica_env(bucket, dsn, secret_file, ports[1], **settings))
    other = mirror_factory(port=ports[2], env=replica_env(
        bucket, dsn, secret_file, ports[2],
        **{**settings, "MIRROR_PUSH_UPLOAD_TTL": "2h", "MIRROR_ADMIN_TOKEN_FILE": str(other_token)}))
    assert http.get(f"{other.url}/readyz").status_code == 200  # said, not refused
    said = "the replicas running on this database have other cache, gc, push or admin settings ("
    lines = [line for line in other.log_path.read_text().splitlines() if said in line]
    assert len(lines) == 1 and "ERROR" in lines[0], lines
    assert "admin.token_file another token there; push.upload_ttl 3600.0 there, 7200.0 here)" in lines[0], lines[0]
    assert "cache.max_size" not in lines[0] and "every replica needs the same" in lines[0], lines[0]
    time.sleep(2)  # its loop holds the settings' lease, saying nothing more
    log = other.log_path.read_text()
    assert len([line for line in log.splitlines() if said in line]) == 1
    assert "admin-token-" not in log and str(other_token) not in log
    assert said not in same.log_path.read_text()


def test_generation_reads_asked_at_once_are_one_and_each_starts_after_its_asker_came() -> None:
    """``server/front.py``'s ``Coalesced``: the database read a tag read waits for (above) is shared by
    every request that came before it started, and a request that comes while one runs waits for the
    next, which starts after it came; one that fails releases its waiters."""
    from mirror.server.front import Coalesced

    async def scenario() -> tuple[int, list[tuple[float, float]], bool]:
        loop = asyncio.get_running_loop()
        started: list[float] = []

        async def read() -> None:
            started.append(loop.time())
            await asyncio.sleep(0.02)

        shared = Coalesced(read)
        await asyncio.gather(*(shared() for _ in range(100)))
        at_once = len(started)

        async def asker(delay: float) -> tuple[float, float]:
            await asyncio.sleep(delay)
            came = loop.time()
            await shared()
            return came, max(started)  # the last read started before this one was answered

        seen = await asyncio.gather(*(asker(delay) for delay in (0.0, 0.005, 0.01, 0.03)))

        async def broken() -> None:
            raise RuntimeError("the database went away")

        failing = Coalesced(broken)
        await asyncio.wait_for(asyncio.gather(failing(), failing()), 2)
        return at_once, list(seen), True

    at_once, seen, released = asyncio.run(scenario())
    assert at_once == 1
    assert all(last >= came for came, last in seen), seen
    assert released
