"""Replicas of one mirror on one SeaweedFS bucket and one PostgreSQL database, each with its own data
directory: one upstream fetch per digest among them, followed by every replica's clients as it runs,
and taken over when the replica fetching it dies.

The upstream is a real registry behind the fault proxy, which sends the 64 MiB layer slowly (the
fill lasts seconds) and counts what it served.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from mirror.registry.sharedsecret import LEASE as SECRET_LEASE
from mirror.storage.s3client import SMALL
from tests.support.catalog import StandardImages
from tests.support.faults import FaultProxy
from tests.support.images import MANIFEST_MEDIA_TYPES, Image, Layer, build_image, random_layer
from tests.support.metrics import parse, scrape, value
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.procs import free_port
from tests.support.registry import UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3
from tests.support.tls import server_certificate
from tests.support.waiting import wait_for
from tests.test_cluster import SECRET, replica_env
from tests.test_s3_serve import Bucket

pytestmark = pytest.mark.slow
MIB = 1 << 20


@dataclass
class Cluster:
    bucket: Bucket
    dsn: str
    secret_file: Path
    replicas: list[MirrorServer] = field(default_factory=list)

    def leases(self) -> list[tuple[str, str, bool]]:
        """``(name, holder, unexpired)`` of every fill lease row."""
        with psycopg.connect(self.dsn) as conn:
            return conn.execute("SELECT name, holder, expires > extract(epoch from statement_timestamp())"
                                " FROM leases WHERE name LIKE 'fill:%'").fetchall()

    def in_use(self) -> set[str]:
        """Digests some replica marks in use (serving or filling them) now."""
        with psycopg.connect(self.dsn) as conn:
            return {d for (d,) in conn.execute("SELECT digest FROM in_use"
                                               " WHERE expires > extract(epoch from statement_timestamp())")}


@pytest.fixture
def big_image(tmp_path: Path, upstream: UpstreamRegistry) -> Image:
    image = build_image(tmp_path / "big", [random_layer(tmp_path / "big", 64 * MIB, seed=901, compressed=False)])
    upstream.push_image("library/cluster-big", "1", image)
    return image


@pytest.fixture
def cluster(seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, tmp_path: Path) -> Cluster:
    secret = tmp_path / "cluster-secret"
    secret.write_text(SECRET)
    return Cluster(Bucket(seaweedfs, s3_bucket), postgres.create_database(), secret)


def start_replicas(cluster: Cluster, count: int, upstream_url: str, factory: Callable[..., MirrorServer],
                   workers: int = 1, **extra: str) -> list[MirrorServer]:
    for _ in range(count):
        port = free_port()
        cluster.replicas.append(factory(upstream_url, port=port, workers=workers,
                                        env=replica_env(cluster.bucket, cluster.dsn, cluster.secret_file, port,
                                                        **extra)))
    return cluster.replicas


@dataclass
class Pull:
    """One client's GET of the blob: when its first byte and its end came, what it got."""

    replica: MirrorServer
    started: float = 0.0
    first_byte: float | None = None
    done: float | None = None
    size: int = 0
    sha256: str = ""
    error: str | None = None


def pull_blob(pull: Pull, digest: str) -> None:
    hasher = hashlib.sha256()
    pull.started = time.monotonic()
    try:
        with httpx.Client(trust_env=False, timeout=120, verify=pull.replica.verify) as http, \
                http.stream("GET", f"{pull.replica.url}/v2/library/cluster-big/blobs/{digest}") as answer:
            if answer.status_code != 200:
                answer.read()
                pull.error = f"{answer.status_code} {answer.text[:200]}"
                return
            for chunk in answer.iter_bytes():
                if pull.first_byte is None:
                    pull.first_byte = time.monotonic()
                hasher.update(chunk)
                pull.size += len(chunk)
    except httpx.HTTPError as exc:
        pull.error = repr(exc)
        return
    pull.done = time.monotonic()
    pull.sha256 = "sha256:" + hasher.hexdigest()


def start_slow_fill(owner: MirrorServer, fault_proxy: FaultProxy, layer: Layer,
                    delay: float = 0.01) -> tuple[str, Pull, threading.Thread]:
    """A client of *owner* starts its fill of *layer*, which the upstream sends 64 KiB every *delay*
    seconds; once 4 MiB are in: the blob's path, that client's :class:`Pull` and its thread."""
    blob_path = f"/v2/library/cluster-big/blobs/{layer.digest}"
    rule = fault_proxy.add("slow", blob_path, method="GET", chunk_size=64 << 10, delay=delay)
    first = Pull(owner)
    thread = threading.Thread(target=pull_blob, args=(first, layer.digest))
    thread.start()
    wait_for(lambda: rule.sent >= 4 * MIB, timeout=60, what="the owner's fill under way")
    return blob_path, first, thread


def run_pulls(pulls: list[Pull], digest: str) -> list[threading.Thread]:
    threads = [threading.Thread(target=pull_blob, args=(p, digest)) for p in pulls]
    for thread in threads:
        thread.start()
    return threads


#: The cluster's figures on a replica's /metrics: ``(name, labels)``, and the short names tests compare.
FIGURES = [("mirror_cluster_fills_total", {"role": "owner"}), ("mirror_cluster_fills_total", {"role": "follower"}),
           ("mirror_cluster_fills_total", {"role": "takeover"}), ("mirror_cluster_fills_fenced_total", {}),
           ("mirror_cluster_peer_stream_errors_total", {}), ("mirror_cluster_peer_received_bytes_total", {})]
FIGURE_NAMES = ("owner", "follower", "takeover", "fenced", "stream errors", "peer bytes")


def cluster_figures(replica: MirrorServer) -> dict[str, float]:
    """The cluster's figures of *replica* (its /metrics), by short name."""
    samples = scrape(f"{replica.url}/metrics")
    return {short: value(samples, name, **labels) for short, (name, labels) in zip(FIGURE_NAMES, FIGURES, strict=True)}


def fills_requests(replica: MirrorServer) -> int:
    """Requests this replica answered on the fills endpoint (from its access log)."""
    return sum(1 for e in replica.access_entries() if str(e.get("path", "")).startswith("/_mirror/cluster/fills/"))


def test_eight_clients_on_three_replicas_get_a_64mib_blob_from_one_upstream_fetch(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    layer = big_image.layers[0]
    # Two worker processes each: a replica's clients share one stream whichever worker answers them.
    replicas = start_replicas(cluster, 3, fault_proxy.url, mirror_factory, workers=2)
    fault_proxy.clear_counts()
    blob_path = f"/v2/library/cluster-big/blobs/{layer.digest}"
    # Some seconds for the whole layer (a pause before each piece of at most 64 KiB): every
    # replica's clients arrive while the fill runs.
    fault_proxy.add("slow", blob_path, method="GET", chunk_size=64 << 10, delay=0.006)
    pulls = [Pull(replicas[n % 3]) for n in range(8)]
    for thread in run_pulls(pulls, layer.digest):
        thread.join(180)

    assert [p.error for p in pulls] == [None] * 8
    assert [(p.size, p.sha256) for p in pulls] == [(layer.size, layer.digest)] * 8
    # The upstream served the blob exactly once, to one replica.
    assert fault_proxy.count("GET", blob_path) == 1
    # Every client's first bytes came while the fill was still running: followed, not waited for.
    assert max(p.first_byte or 0 for p in pulls) < min(p.done or 0 for p in pulls)
    # One stream per other replica from the one that fetched (the others' clients fanned out locally);
    # access lines are written just after their answers.
    wait_for(lambda: sum(fills_requests(r) for r in replicas) >= 2, timeout=10, what="the fills requests logged")
    answered = [fills_requests(r) for r in replicas]
    assert sorted(answered) == [0, 0, 2], answered
    # Each replica's /metrics says its part: one owner, two followers that streamed the whole blob from it.
    figures = [cluster_figures(r) for r in replicas]
    owner = answered.index(2)
    assert figures[owner] == {**dict.fromkeys(FIGURE_NAMES, 0.0), "owner": 1.0}, figures
    for n in {0, 1, 2} - {owner}:
        assert figures[n] == {**dict.fromkeys(FIGURE_NAMES, 0.0), "follower": 1.0, "peer bytes": layer.size}, figures
    # The object is in the bucket, whole; no upload left open; the lease was given up.
    wait_for(lambda: layer.digest in cluster.bucket.objects(), timeout=30, what="the layer in the bucket")
    assert cluster.bucket.digest_of(layer.digest) == layer.digest
    assert cluster.bucket.uploads() == []
    wait_for(lambda: all(not live for (_, _, live) in cluster.leases()), timeout=30, what="the lease given up")
    # Now every replica serves it from the bucket, without the upstream.
    again = [Pull(r) for r in replicas]
    for thread in run_pulls(again, layer.digest):
        thread.join(120)
    assert [(p.error, p.sha256) for p in again] == [(None, layer.digest)] * 3
    assert fault_proxy.count("GET", blob_path) == 1


def test_when_the_replica_fetching_dies_another_takes_the_fill_over_and_its_clients_only_pause(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    layer = big_image.layers[0]
    owner, *others = start_replicas(cluster, 3, fault_proxy.url, mirror_factory, MIRROR_CLUSTER_LEASE_TTL="2s")
    fault_proxy.clear_counts()
    blob_path, first, first_thread = start_slow_fill(owner, fault_proxy, layer)
    pulls = [Pull(others[n % 2]) for n in range(6)]
    threads = run_pulls(pulls, layer.digest)
    wait_for(lambda: all(p.size >= 8 * MIB for p in pulls), timeout=60, what="the followers' clients under way")

    owner.kill9()  # mid-fill: its lease stays until it expires
    for thread in [*threads, first_thread]:
        thread.join(180)

    assert first.error is not None  # the dead replica's own client was cut off
    assert [p.error for p in pulls] == [None] * 6
    assert [(p.size, p.sha256) for p in pulls] == [(layer.size, layer.digest)] * 6
    # Fetched again once, by the replica that took the fill over: the rest from the byte reached, one
    # Range request (before, a whole answer was opened and closed at once first, and the rest was
    # logged as a body that broke off).
    gets = [r.status for r in fault_proxy.requests() if r.method == "GET" and r.path == blob_path]
    assert gets == [200, 206], gets
    logs = {r.url: r.log_path.read_text() for r in others}
    taker = [url for url, text in logs.items() if "took over the fill at byte" in text]
    assert len(taker) == 1, logs
    reached = int(re.findall(r"took over the fill at byte (\d+); fetching the rest from byte \1 from the upstream",
                             logs[taker[0]])[0])
    assert not any("broke off" in text for text in logs.values()), logs
    received = sum(value(scrape(f"{r.url}/metrics"), "mirror_upstream_received_bytes_total", kind="blob")
                   for r in others)
    assert 4 * MIB <= reached and received == layer.size - reached, (received, reached, layer.size)
    wait_for(lambda: layer.digest in cluster.bucket.objects(), timeout=30, what="the layer in the bucket")
    assert cluster.bucket.digest_of(layer.digest) == layer.digest
    holders = {holder for (_, holder, _) in cluster.leases()}
    assert holders <= {r.url for r in others}, holders  # the lease row now names the replica that took over


def test_a_replica_whose_bucket_answers_slowly_follows_a_fill_in_progress_without_waiting_for_its_look(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, seaweedfs: SeaweedS3,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A replica whose looks in the bucket (HEAD) each take 3 s: while another replica fetches a blob, its
    client's first byte does not wait for such a look.  The fill's lease in the index says the blob is
    being fetched, so the replica follows that fetch at once (``ClusterFills.stored``)."""
    layer = big_image.layers[0]
    (owner,) = start_replicas(cluster, 1, fault_proxy.url, mirror_factory)
    slow_bucket = FaultProxy(seaweedfs.endpoint).start()
    slow_bucket.add("late", r"/blobs/sha256/", method="HEAD", delay=3)
    try:
        follower = start_replicas(cluster, 1, fault_proxy.url, mirror_factory,
                                  MIRROR_STORAGE_S3_REGIONENDPOINT=slow_bucket.url)[-1]
        blob_path, first, first_thread = start_slow_fill(owner, fault_proxy, layer)

        def linked() -> bool:  # the owner records the repository's link beside its first answer
            with psycopg.connect(cluster.dsn) as conn:
                return conn.execute("SELECT 1 FROM links WHERE digest = %s", (layer.digest,)).fetchone() is not None

        wait_for(linked, timeout=30, what="the blob linked to its repository in the index")
        pull = Pull(follower)
        for thread in [*run_pulls([pull], layer.digest), first_thread]:
            thread.join(180)
        looks = slow_bucket.count("HEAD", "/blobs/sha256/")
    finally:
        slow_bucket.stop()

    assert (first.error, first.sha256, pull.error, pull.sha256) == (None, layer.digest, None, layer.digest)
    assert looks >= 1  # the replica did look in the bucket (and was answered late)
    assert pull.first_byte is not None and pull.first_byte - pull.started < 1.5, \
        f"first byte after {pull.first_byte and pull.first_byte - pull.started:.2f} s: it waited for the look"
    assert fault_proxy.count("GET", blob_path) == 1


def test_replicas_whose_bucket_does_not_answer_still_share_one_upstream_fetch_of_a_blob(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, seaweedfs: SeaweedS3,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """The bucket down: a replica's look for the blob fails, and so did the fetch under its fill lease,
    which looked again (``ClusterFetch._lead``), so that its clients were answered 503.  The blob is
    fetched as if missing: clients of both replicas get it whole from one upstream fetch, nothing stored."""
    layer = big_image.layers[0]
    bucket_proxy = FaultProxy(seaweedfs.endpoint).start()
    try:
        owner, other = start_replicas(cluster, 2, fault_proxy.url, mirror_factory,
                                      MIRROR_STORAGE_S3_REGIONENDPOINT=bucket_proxy.url)
        fault_proxy.clear_counts()
        bucket_proxy.add("refuse", "")  # nothing answers
        blob_path, first, first_thread = start_slow_fill(owner, fault_proxy, layer, delay=0.004)
        pulls = [Pull(owner), Pull(other), Pull(other)]
        for thread in [*run_pulls(pulls, layer.digest), first_thread]:
            thread.join(180)
    finally:
        bucket_proxy.stop()
    assert [(p.error, p.sha256) for p in [first, *pulls]] == [(None, layer.digest)] * 4
    assert fault_proxy.count("GET", blob_path) == 1
    assert cluster.bucket.objects() == {}
    assert "Traceback" not in owner.log_tail(400) + other.log_tail(400)


def test_a_replica_whose_bucket_hangs_looks_for_a_blob_in_it_once_before_fetching_it(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, seaweedfs: SeaweedS3,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """The bucket accepts connections and answers nothing: a look in it waits out the small requests'
    timeouts (``SMALL``: two attempts).  The fetch under the fill lease looked in the bucket again after
    the request's own look had found it down (``ClusterFetch._lead``), so that the client's first byte
    came after two such waits; now after one, and the blob is served whole from one upstream fetch."""
    layer = big_image.layers[0]
    bucket_proxy = FaultProxy(seaweedfs.endpoint).start()
    try:
        (replica,) = start_replicas(cluster, 1, fault_proxy.url, mirror_factory,
                                    MIRROR_STORAGE_S3_REGIONENDPOINT=bucket_proxy.url)
        fault_proxy.clear_counts()
        bucket_proxy.add("late", "", delay=120)  # every request to the bucket hangs
        pull = Pull(replica)
        pull_blob(pull, layer.digest)
    finally:
        bucket_proxy.stop()
    assert (pull.error, pull.sha256) == (None, layer.digest)
    assert pull.first_byte is not None
    one_look = SMALL.attempts * SMALL.read
    assert one_look <= pull.first_byte - pull.started < 2 * one_look, (pull.first_byte - pull.started, one_look)
    assert fault_proxy.count("GET", f"/v2/library/cluster-big/blobs/{layer.digest}") == 1
    assert "Traceback" not in replica.log_tail(400)


def test_replicas_serving_https_follow_each_others_fills_trusting_the_one_certificate_they_serve(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    tmp_path: Path,
) -> None:
    """Replicas serving HTTPS with one certificate (one Secret in every pod), from a CA no trust store
    holds, naming none of the addresses they advertise (as cert-manager's, reached at ``$(POD_IP)``):
    a client of a replica streams the fill another replica fetches.  Before, each request to the other
    replica failed certificate verification, and the client waited for the whole blob to be stored."""
    certificate = server_certificate(tmp_path / "tls", ("mirror.cluster.internal",), local=False)
    trusting = ssl.create_default_context(cafile=certificate.ca)
    trusting.check_hostname = False  # the tests' own client: the certificate names no address
    replicas = []
    for _ in range(2):
        port = free_port()
        env = replica_env(cluster.bucket, cluster.dsn, cluster.secret_file, port,
                          MIRROR_HTTP_TLS_CERTIFICATE=str(certificate.certificate),
                          MIRROR_HTTP_TLS_KEY=str(certificate.key))
        env["MIRROR_CLUSTER_ADVERTISE"] = f"https://127.0.0.1:{port}"
        replicas.append(mirror_factory(fault_proxy.url, port=port, env=env, scheme="https", verify=trusting))
    owner, follower = replicas
    layer = big_image.layers[0]
    blob_path, first, first_thread = start_slow_fill(owner, fault_proxy, layer)
    pull = Pull(follower)
    for thread in [*run_pulls([pull], layer.digest), first_thread]:
        thread.join(180)
    assert (first.error, first.sha256, pull.error, pull.sha256) == (None, layer.digest, None, layer.digest)
    assert fault_proxy.count("GET", blob_path) == 1
    with httpx.Client(trust_env=False, timeout=30, verify=trusting) as http:
        samples = parse(http.get(f"{follower.url}/metrics").text)
    assert value(samples, "mirror_cluster_fills_total", role="follower") == 1
    assert value(samples, "mirror_cluster_peer_received_bytes_total") > 0
    assert fills_requests(owner) >= 1
    assert "does not answer" not in follower.log_path.read_text()


def test_a_replica_whose_advertised_address_does_not_reach_it_is_named_in_a_warning_and_its_blob_still_served(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A replica whose ``cluster.advertise`` leads nowhere fetches a blob: another replica cannot follow
    that fill, says so once in a warning naming the address, and serves the blob once it is stored."""
    layer = big_image.layers[0]
    port, nowhere = free_port(), f"http://127.0.0.1:{free_port()}"
    env = replica_env(cluster.bucket, cluster.dsn, cluster.secret_file, port)
    env["MIRROR_CLUSTER_ADVERTISE"] = nowhere
    owner = mirror_factory(fault_proxy.url, port=port, env=env)
    (other,) = start_replicas(cluster, 1, fault_proxy.url, mirror_factory)
    warning = followed_without_answers(owner, other, fault_proxy, layer)
    assert "WARNING" in warning and nowhere in warning
    assert "if it still runs, is its cluster.advertise reachable from here?" in warning


def followed_without_answers(owner: MirrorServer, other: MirrorServer, fault_proxy: FaultProxy, layer: Layer) -> str:
    """*owner* fills *layer* while a client of *other*, which *owner* does not answer, asks for it too:
    both get it, from one upstream fetch; the one warning *other* logged of it."""
    fault_proxy.clear_counts()
    blob_path, first, first_thread = start_slow_fill(owner, fault_proxy, layer, delay=0.004)
    pull = Pull(other)
    for thread in [*run_pulls([pull], layer.digest), first_thread]:
        thread.join(180)
    assert (first.error, first.sha256, pull.error, pull.sha256) == (None, layer.digest, None, layer.digest)
    assert fault_proxy.count("GET", blob_path) == 1
    warnings = [line for line in other.log_path.read_text().splitlines() if "does not answer" in line]
    assert len(warnings) == 1, warnings
    return warnings[0]


def test_a_replica_whose_clock_is_far_off_is_warned_of_and_the_others_wait_for_its_fill(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """A replica 45 s ahead (a VM without NTP) fetches a blob: its ``/readyz`` and its log warn that its
    clock is off the database's, and another replica, whose requests it refuses as too far off in time,
    says so and serves the blob once it is stored.  Before, that replica answered its client ``503`` at
    once, blaming the secret, and nothing said the clock was off.  (Still ready: the database's clock may
    be the one off, and every replica would then be.)"""
    layer = big_image.layers[0]
    port = free_port()
    env = {**replica_env(cluster.bucket, cluster.dsn, cluster.secret_file, port), "SKEWED_CLOCK_SECONDS": "45"}
    owner = mirror_factory(fault_proxy.url, port=port, env=env, module="tests.support.skewed_clock")
    (other,) = start_replicas(cluster, 1, fault_proxy.url, mirror_factory)
    ready = httpx.get(f"{owner.url}/readyz", trust_env=False, timeout=30)
    assert ready.status_code == 200 and "clock is +45s off the database's" in ready.json()["warnings"]["clock"], \
        ready.text
    assert "clock is +45s off the database's" in owner.log_tail(50)
    assert httpx.get(f"{other.url}/readyz", trust_env=False, timeout=30).json() == {"status": "ready"}
    warning = followed_without_answers(owner, other, fault_proxy, layer)
    assert "off its clock" in warning and "(NTP)" in warning, warning
    assert "cluster.secret_file" not in other.log_path.read_text()


def test_bytes_the_upstream_corrupted_are_never_answered_whole_by_any_replica(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    layer = big_image.layers[0]
    replicas = start_replicas(cluster, 3, fault_proxy.url, mirror_factory, MIRROR_CLUSTER_LEASE_TTL="2s")
    fault_proxy.clear_counts()
    blob_path = f"/v2/library/cluster-big/blobs/{layer.digest}"
    fault_proxy.add("corrupt", blob_path, method="GET", times=1, after_bytes=MIB)
    fault_proxy.add("slow", blob_path, method="GET", chunk_size=64 << 10, delay=0.004)
    pulls = [Pull(replicas[n % 3]) for n in range(6)]
    for thread in run_pulls(pulls, layer.digest):
        thread.join(180)

    # A client got the blob's bytes, or a transfer cut short: never a whole answer with wrong bytes.
    assert all(p.error is not None or p.sha256 == layer.digest for p in pulls), [(p.error, p.sha256) for p in pulls]
    assert any(p.error is not None for p in pulls)  # the corrupted fetch was followed, and failed, somewhere
    wait_for(lambda: all(not live for (_, _, live) in cluster.leases()), timeout=30, what="the leases given up")
    assert layer.digest not in cluster.bucket.objects() or cluster.bucket.digest_of(layer.digest) == layer.digest
    # Asked again, every replica serves the right bytes.
    again = [Pull(r) for r in replicas]
    for thread in run_pulls(again, layer.digest):
        thread.join(180)
    assert [(p.error, p.sha256) for p in again] == [(None, layer.digest)] * 3
    wait_for(lambda: layer.digest in cluster.bucket.objects(), timeout=30, what="the layer in the bucket")
    assert cluster.bucket.digest_of(layer.digest) == layer.digest


def test_a_body_the_upstream_breaks_off_is_resumed_by_the_replica_fetching_it_for_every_replica(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """The upstream resets its first two answers after 16 MiB: the replica fetching the blob asks for
    the rest with ``Range`` each time, and the clients of all three replicas get the whole blob from
    that one fill, no byte fetched twice.  Before, the first reset cut every client off."""
    layer = big_image.layers[0]
    replicas = start_replicas(cluster, 3, fault_proxy.url, mirror_factory)
    fault_proxy.clear_counts()
    blob_path = f"/v2/library/cluster-big/blobs/{layer.digest}"
    fault_proxy.add("reset", blob_path, method="GET", times=2, after_bytes=16 * MIB)
    pulls = [Pull(replicas[n % 3]) for n in range(6)]
    for thread in run_pulls(pulls, layer.digest):
        thread.join(180)

    assert [(p.error, p.sha256) for p in pulls] == [(None, layer.digest)] * 6
    gets = [r.status for r in fault_proxy.requests() if r.method == "GET" and r.path == blob_path]
    assert gets == [200, 206, 206], gets
    received = sum(value(scrape(f"{r.url}/metrics"), "mirror_upstream_received_bytes_total", kind="blob")
                   for r in replicas)
    assert received == layer.size
    wait_for(lambda: layer.digest in cluster.bucket.objects(), timeout=30, what="the layer in the bucket")
    assert cluster.bucket.digest_of(layer.digest) == layer.digest


def test_a_replica_whose_lease_was_taken_over_stops_its_fetch_and_stores_nothing(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    layer = big_image.layers[0]
    owner, *others = start_replicas(cluster, 3, fault_proxy.url, mirror_factory, MIRROR_CLUSTER_LEASE_TTL="2s")
    fault_proxy.clear_counts()
    blob_path, first, first_thread = start_slow_fill(owner, fault_proxy, layer)
    pulls = [Pull(others[n % 2]) for n in range(4)]
    threads = run_pulls(pulls, layer.digest)
    wait_for(lambda: all(p.size >= 8 * MIB for p in pulls), timeout=60, what="the followers' clients under way")

    # As if the owner had stalled past its lease and a replica elsewhere (that then vanished) took it:
    # a later grant, with a larger fencing token.
    with psycopg.connect(cluster.dsn) as conn:
        taken = conn.execute("UPDATE leases SET holder = 'http://127.0.0.1:9', token = nextval('lease_tokens'),"
                             " expires = extract(epoch from statement_timestamp()) + 3 WHERE holder = %s",
                             (owner.url,)).rowcount
    assert taken == 1
    for thread in [*threads, first_thread]:
        thread.join(180)

    assert first.error is not None  # the fenced-off replica gave its fetch up: its client was cut off
    assert "the fill lease expired or was taken over" in owner.log_path.read_text()
    assert [p.error for p in pulls] == [None] * 4
    assert [(p.size, p.sha256) for p in pulls] == [(layer.size, layer.digest)] * 4
    # Fetched again, once, after the usurper's lease expired: the rest only (one Range request).
    gets = [r.status for r in fault_proxy.requests() if r.method == "GET" and r.path == blob_path]
    assert gets == [200, 206], gets
    wait_for(lambda: layer.digest in cluster.bucket.objects(), timeout=30, what="the layer in the bucket")
    assert cluster.bucket.digest_of(layer.digest) == layer.digest
    assert {holder for (_, holder, _) in cluster.leases()} <= {r.url for r in others}


def test_a_blob_another_replica_fetches_for_one_repository_needs_the_upstreams_consent_in_another(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    layer = big_image.layers[0]
    owner, other = start_replicas(cluster, 2, fault_proxy.url, mirror_factory)
    _, first, first_thread = start_slow_fill(owner, fault_proxy, layer, delay=0.006)
    with httpx.Client(trust_env=False, timeout=120) as http:
        # The upstream has no such blob in library/elsewhere: the fill of library/cluster-big is not its answer.
        answer = http.get(f"{other.url}/v2/library/elsewhere/blobs/{layer.digest}")
    first_thread.join(180)
    assert answer.status_code == 404 and answer.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert (first.error, first.sha256) == (None, layer.digest)


def test_a_replica_with_another_secret_is_refused_by_the_one_fetching_and_fetches_nothing(
    cluster: Cluster, big_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    tmp_path: Path,
) -> None:
    layer = big_image.layers[0]
    """A replica of another secret is refused at start-up (``registry/sharedsecret.py``); one that
    started all the same (the running replicas' claim lapsed, here taken away) is refused every
    signed request, and says so."""
    owner = start_replicas(cluster, 1, fault_proxy.url, mirror_factory)[-1]
    cluster.secret_file = tmp_path / "another-secret"
    cluster.secret_file.write_text(SECRET[::-1])
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM leases WHERE name = %s", (SECRET_LEASE,))
    stranger = start_replicas(cluster, 1, fault_proxy.url, mirror_factory)[-1]
    fault_proxy.clear_counts()
    blob_path, first, first_thread = start_slow_fill(owner, fault_proxy, layer, delay=0.006)
    with httpx.Client(trust_env=False, timeout=120) as http:
        answer = http.get(f"{stranger.url}{blob_path}")
    first_thread.join(180)
    assert answer.status_code == 503 and answer.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert "refused" in answer.json()["errors"][0]["message"]
    assert "is cluster.secret_file the same on every replica?" in stranger.log_path.read_text()
    assert (first.error, first.sha256) == (None, layer.digest)
    assert fault_proxy.count("GET", blob_path) == 1
    assert SECRET not in stranger.log_path.read_text() + owner.log_path.read_text()


def test_one_upstream_request_per_manifest_across_replicas_by_tag_by_digest_and_on_revalidation(
    cluster: Cluster, images: StandardImages, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
) -> None:
    """Docker Hub counts manifest GETs as pulls: clients of every replica asking for one manifest at
    once cost one upstream request, not one per replica; so does the revalidation of a stale tag."""
    replicas = start_replicas(cluster, 3, fault_proxy.url, mirror_factory, MIRROR_CACHE_TAG_TTL="3s")
    accept = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}
    fault_proxy.add("slow", "/manifests/", chunk_size=64, delay=0.05)  # each answer takes about half a second

    def together(path: str) -> list[httpx.Response]:
        answers: list[httpx.Response] = []

        def ask(mirror: MirrorServer) -> None:
            with httpx.Client(timeout=60.0, trust_env=False) as http:
                answers.append(http.get(f"{mirror.url}{path}", headers=accept))

        threads = [threading.Thread(target=ask, args=(replicas[n % 3],)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return answers

    fault_proxy.clear_counts()
    for answer in together("/v2/library/small/manifests/1"):
        assert answer.status_code == 200 and answer.content == images.small.manifest
    assert fault_proxy.count("GET", "/v2/library/small/manifests/1") == 1

    for answer in together(f"/v2/library/big/manifests/{images.big.digest}"):
        assert answer.status_code == 200 and answer.content == images.big.manifest
    assert fault_proxy.count("GET", f"/v2/library/big/manifests/{images.big.digest}") == 1

    time.sleep(3.5)  # the tag is stale on every replica: one of them revalidates it
    fault_proxy.clear_counts()
    for answer in together("/v2/library/small/manifests/1"):
        assert answer.status_code == 200 and answer.content == images.small.manifest
    assert fault_proxy.count(None, "/v2/library/small/manifests/1") == 1


def test_a_database_outage_longer_than_the_lease_does_not_end_the_fetch_no_replica_took_over(
    seaweedfs: SeaweedS3, s3_bucket: str, tmp_path: Path, big_image: Image, fault_proxy: FaultProxy,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """PostgreSQL stops for four times ``cluster.lease_ttl`` (a failover) while a replica fetches a blob
    that a client of another replica follows: the lease expired meanwhile, but no replica could take
    it, so the fetching replica is granted it again and goes on.  Both clients get the whole blob, from
    the upstream's one answer."""
    layer = big_image.layers[0]
    secret = tmp_path / "cluster-secret"
    secret.write_text(SECRET)
    with PostgresServer() as own:
        cluster = Cluster(Bucket(seaweedfs, s3_bucket), own.create_database(), secret)
        owner, other = start_replicas(cluster, 2, fault_proxy.url, mirror_factory, MIRROR_CLUSTER_LEASE_TTL="2s")
        fault_proxy.clear_counts()
        blob_path, first, first_thread = start_slow_fill(owner, fault_proxy, layer, delay=0.02)
        follower = Pull(other)
        (thread,) = run_pulls([follower], layer.digest)
        wait_for(lambda: follower.size >= MIB, timeout=60, what="the other replica's client under way")
        own.halt()
        time.sleep(8)
        own.resume()
        for each in (thread, first_thread):
            each.join(180)
        assert [(p.error, p.size, p.sha256) for p in (first, follower)] == [(None, layer.size, layer.digest)] * 2
        assert fault_proxy.count("GET", blob_path) == 1
        assert "granted again" in owner.log_path.read_text()
        wait_for(lambda: layer.digest in cluster.bucket.objects(), timeout=30, what="the layer in the bucket")
        for replica in (owner, other):
            replica.stop()
