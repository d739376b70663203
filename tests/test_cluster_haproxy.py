"""Replicas behind the shipped HAProxy configuration (``deploy/haproxy/haproxy.cfg``): several mirror
processes on one SeaweedFS bucket and one PostgreSQL database, each with a data directory of its own
(in cluster mode where they fetch together), and HAProxy from Debian in front of them with no stickiness.

- ``haproxy -c`` accepts the shipped file as it is, and as the tests adapt it to loopback.
- dockerd pulls and runs an image through HAProxy; 8 looping pullers see no failure while every replica
  is stopped and started again, one after the other; every replica answered some of them; dockerd then
  pushes through HAProxy, each upload's requests spread over the replicas (no stickiness), and every
  replica serves the pushed image.
- A replica whose ``/readyz`` fails (its database is gone) leaves HAProxy's rotation; the others serve;
  the dashboard's replica panels, queried in a real Prometheus scraping every replica, show it.
"""

from __future__ import annotations

import collections
import http.server
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.client import pull_checked
from tests.support.dockerd import Dockerd, pull, run
from tests.support.haproxy import SHIPPED, HAProxy, loopback_config
from tests.support.images import MANIFEST_MEDIA_TYPES, sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.procs import free_port, require_tool, run_checked
from tests.support.prometheus import Prometheus, panel_queries
from tests.support.seaweedfs import SeaweedS3
from tests.support.waiting import wait_for
from tests.test_cluster import SECRET, replica_env
from tests.test_push_clients import config_digest, docker_push, layer_digests, local_manifest
from tests.test_s3_serve import Bucket

REPLICAS = 3
DASHBOARD = Path(__file__).resolve().parents[1] / "grafana" / "mirror.json"


def test_the_shipped_haproxy_configuration_is_valid_as_shipped_and_on_loopback(tmp_path: Path) -> None:
    haproxy = require_tool("/usr/sbin/haproxy", "haproxy")
    run_checked([haproxy, "-c", "-f", str(SHIPPED)])
    adapted = tmp_path / "haproxy.cfg"
    adapted.write_text(loopback_config(SHIPPED.read_text(), 5000, ["127.0.0.1:5001", "127.0.0.1:5002"],
                                       tmp_path / "admin.sock"))
    run_checked([haproxy, "-c", "-f", str(adapted)])


class Dropping(http.server.BaseHTTPRequestHandler):
    """A replica killed while it handles each request: it reads the request, counts it and closes the
    connection unanswered (``drop``), or answers ``200`` (a replica alive)."""

    drop = False
    seen: collections.Counter[tuple[int, str]]

    def handle_one_request(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline or not self.parse_request():
            self.close_connection = True
            return
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path != "/healthz":  # (HAProxy's checks: answered by both)
            self.seen[(self.server.server_address[1], self.command)] += 1
            if self.drop:
                self.close_connection = True  # applied, and the answer lost
                return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_shipped_haproxy_sends_a_dropped_read_to_another_replica_but_never_a_write(tmp_path: Path) -> None:
    """A replica that drops requests unanswered (killed at the wrong moment): HAProxy sends a ``GET`` or
    ``HEAD`` on to the other replica, and answers a ``PATCH``, ``PUT``, ``POST`` or ``DELETE`` with ``502``,
    sending it nowhere else.  Before, it sent those on too: a chunk appended twice made the upload's
    ``PUT ?digest=`` fail with ``DIGEST_INVALID``."""
    require_tool("/usr/sbin/haproxy", "haproxy")
    seen: collections.Counter[tuple[int, str]] = collections.Counter()
    servers = []
    for drop in (True, False):
        handler = type("Replica", (Dropping,), {"drop": drop, "seen": seen})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    dying, alive = (s.server_address[1] for s in servers)
    balancer = HAProxy(tmp_path / "haproxy", [f"127.0.0.1:{dying}", f"127.0.0.1:{alive}"], check="/healthz")
    try:
        balancer.start()
        wait_for(lambda: all_up(balancer, 2), timeout=20, what="both stand-ins up")
        seen.clear()
        answers: collections.Counter[tuple[str, int]] = collections.Counter()
        with httpx.Client(trust_env=False, timeout=30) as client:
            for method in ("GET", "HEAD", "PATCH", "PUT", "POST", "DELETE"):
                for _ in range(4):  # round robin: two reach the dying one first
                    answers[(method, client.request(method, f"{balancer.url}/v2/x", content=b"chunk" * (
                        method in ("PATCH", "PUT", "POST"))).status_code)] += 1
    finally:
        balancer.stop()
        for server in servers:
            server.shutdown()
            server.server_close()
    for method in ("GET", "HEAD"):  # each dropped one sent on, and answered
        assert answers[(method, 200)] == 4 and seen[(alive, method)] == 4 and seen[(dying, method)] >= 1, \
            (answers, seen)
    for method in ("PATCH", "PUT", "POST", "DELETE"):  # each sent once: a dropped one is answered 502
        assert seen[(alive, method)] + seen[(dying, method)] == 4 and seen[(dying, method)] >= 1, seen
        assert (answers[(method, 200)], answers[(method, 502)]) == (seen[(alive, method)], seen[(dying, method)]), \
            (answers, seen)


def test_the_shipped_haproxy_answers_the_registry_apis_json_503_when_no_replica_is_ready(tmp_path: Path) -> None:
    """Every replica out of the rotation (their database down): a client gets the spec's JSON error with
    a ``Retry-After``, which docker and skopeo show, not HAProxy's HTML page."""
    require_tool("/usr/sbin/haproxy", "haproxy")
    ready = threading.Event()
    ready.set()

    class Replica(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if ready.is_set() else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replica) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    balancer = HAProxy(tmp_path / "haproxy", [f"127.0.0.1:{s.server_address[1]}" for s in servers])
    try:
        balancer.start()
        ready.clear()  # /readyz answers 503 on both
        wait_for(lambda: set(balancer.states().values()) == {"DOWN"}, timeout=20, what="both replicas out")
        with httpx.Client(trust_env=False, timeout=30) as client:
            answer = client.get(f"{balancer.url}/v2/library/alpine/manifests/3.20")
    finally:
        balancer.stop()
        for server in servers:
            server.shutdown()
            server.server_close()
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/json", answer.text
    assert answer.headers["retry-after"] == "10"
    assert answer.json()["errors"][0]["code"] == "UNAVAILABLE", answer.text


def all_up(balancer: HAProxy, count: int = REPLICAS) -> bool:
    states = balancer.states()
    return len(states) == count and all(state == "UP" for state in states.values())


def start_replicas(mirror_factory: Callable[..., MirrorServer], bucket: Bucket, dsn: str,
                   secret_file: Path) -> list[MirrorServer]:
    """Replicas in cluster mode (``cluster.advertise`` and ``secret_file``), each on a port of its own."""
    secret_file.write_text(SECRET + "\n")
    ports = [free_port() for _ in range(REPLICAS)]
    return [mirror_factory(port=port, env=replica_env(bucket, dsn, secret_file, port)) for port in ports]


@pytest.mark.slow
def test_dockerd_pulls_through_haproxy_and_looping_pullers_see_no_failure_while_replicas_restart(
    seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, images: StandardImages, tmp_path: Path,
    mirror_factory: Callable[..., MirrorServer], dockerd_factory: Callable[..., Dockerd],
) -> None:
    replicas = start_replicas(mirror_factory, Bucket(seaweedfs, s3_bucket), postgres.create_database(),
                              tmp_path / "cluster-secret")
    with HAProxy(tmp_path / "haproxy", [mirror.address for mirror in replicas]) as balancer:
        wait_for(lambda: all_up(balancer), timeout=15, what=f"every replica UP in HAProxy: {balancer.states()}")
        daemon = dockerd_factory(registry_mirror=balancer.url, insecure_registries=[balancer.address])
        pull(daemon, "small:1")
        assert run(daemon, "small:1", "cat", "/etc/image-marker") == "small"

        pulled = {"small": images.small, "big": images.big}
        stop, failures, done = threading.Event(), list[str](), [0]

        def puller(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(timeout=60.0, trust_env=False) as http:
                while not stop.is_set():
                    name = rng.choice(sorted(pulled))
                    try:
                        pull_checked(http, balancer.url, f"library/{name}", "1", pulled[name])
                        done[0] += 1
                    except (AssertionError, httpx.HTTPError) as exc:
                        failures.append(f"{name}: {exc!r}")

        threads = [threading.Thread(target=puller, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2)
            for mirror in replicas:  # a rolling restart: one replica at a time leaves and comes back
                wanted = done[0] + 8
                mirror.stop()
                wait_for(lambda: done[0] >= wanted, timeout=30, what="pulls while a replica is down")  # noqa: B023
                mirror.start()
                wait_for(lambda: all_up(balancer), timeout=15, what=f"the replica back in: {balancer.states()}")
            time.sleep(2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
        assert not failures, failures[:5]
        assert done[0] >= 40, done[0]
        served = [sum(1 for entry in mirror.access_entries() if entry.get("route") == "blob") for mirror in replicas]
        assert all(count > 0 for count in served), served

        daemon.docker("rmi", "small:1")
        pull(daemon, "small:1")  # after every replica restarted
        assert run(daemon, "small:1", "cat", "/etc/image-marker") == "small"

        # A push through HAProxy, round-robin (an upload's requests reach any replica), then the
        # image pulled back from every replica directly: the same manifest and blobs everywhere.
        ref = f"{balancer.address}/haproxy/pushed:1"  # a name the session's upstream has no repository of
        daemon.docker("tag", "small:1", ref)
        pushed, out = docker_push(daemon, ref)
        assert "Pushed" in out, out
        answered: dict[str, set[int]] = {}  # upload uuid -> the replicas that answered its PATCHes and PUT
        for n, mirror in enumerate(replicas):
            for entry in mirror.access_entries():
                path = str(entry.get("path", ""))
                if entry.get("route") == "upload" and path.startswith("/v2/haproxy/pushed/blobs/uploads/") \
                        and entry.get("method") in ("PATCH", "PUT"):
                    answered.setdefault(path.rsplit("/", 1)[-1], set()).add(n)
        assert answered and any(len(each) > 1 for each in answered.values()), answered
        manifests = [local_manifest(mirror, "haproxy/pushed", "1").content for mirror in replicas]
        assert all(manifest == manifests[0] for manifest in manifests)
        with httpx.Client(timeout=60.0, trust_env=False) as http:
            for mirror in replicas:
                for digest in (config_digest(manifests[0]), *layer_digests(manifests[0])):
                    blob = http.get(f"{mirror.url}/v2/haproxy/pushed/blobs/{digest}")
                    assert blob.status_code == 200 and sha256(blob.content) == digest, (mirror, digest)
                by_digest = http.get(f"{mirror.url}/v2/haproxy/pushed/manifests/{pushed}",
                                     headers={"accept": ", ".join(MANIFEST_MEDIA_TYPES)})
                assert by_digest.status_code == 200 and by_digest.content == manifests[0]
        assert "Traceback" not in "".join(mirror.log_tail(400) for mirror in replicas)


@pytest.mark.slow
def test_a_replica_that_loses_its_database_leaves_the_rotation_and_the_others_serve(
    seaweedfs: SeaweedS3, s3_bucket: str, images: StandardImages, tmp_path: Path,
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """Two replicas on one database, a third on a database of its own that stops: HAProxy's check of
    ``/readyz`` takes the third out, and no client sees its 503."""
    bucket, own_bucket = Bucket(seaweedfs, s3_bucket), seaweedfs.new_bucket()
    try:
        with PostgresServer() as shared, PostgresServer() as lonely, \
                httpx.Client(timeout=60.0, trust_env=False) as http:
            env = bucket.env(MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=shared.create_database())
            replicas = [mirror_factory(env=env) for _ in range(2)]
            odd = mirror_factory(env=Bucket(seaweedfs, own_bucket).env(
                MIRROR_METADATA_DRIVER="postgres", MIRROR_METADATA_POSTGRES_DSN=lonely.create_database()))
            members = [m.address for m in (*replicas, odd)]
            with HAProxy(tmp_path / "haproxy", members) as balancer, \
                    Prometheus(tmp_path / "prometheus", members, interval=3) as prometheus:  # a scrape
                # of a replica whose database is down waits for it up to metadata's POOL_WAIT (2 s)
                wait_for(lambda: all_up(balancer), timeout=15, what=f"every replica UP: {balancer.states()}")
                for _ in range(6):
                    pull_checked(http, balancer.url, "library/small", "1", images.small)
                lonely.halt()
                wait_for(lambda: balancer.states()["mirror3"].startswith("DOWN"), timeout=15,
                         what=f"the replica without its database out of the rotation: {balancer.states()}")
                odd.access.clear()
                for _ in range(6):
                    pull_checked(http, balancer.url, "library/small", "1", images.small)
                assert odd.access.count(None, "/v2/") == 0

                # The dashboard's replica panels: one series per replica, the lost index shown.
                panels = {(q.panel, q.ref_id): q.expr for q in panel_queries(json.loads(DASHBOARD.read_text()))}

                def per_replica(title: str, ref: str = "A") -> dict[str, float]:
                    return {r["metric"]["instance"]: float(r["value"][1]) for r in prometheus.query(panels[title, ref])}

                up = "Index and store up per replica"
                wait_for(lambda: per_replica(up) == {members[0]: 1, members[1]: 1, members[2]: 0},
                         timeout=20, what="the index of the third replica down in Prometheus")
                assert per_replica(up, "B") == dict.fromkeys(members, 1)  # every bucket answers
                wait_for(lambda: all(per_replica("Requests per replica").get(m, 0) > 0 for m in members[:2]),
                         timeout=20, what="the requests of each serving replica in Prometheus")
                for _ in range(4):  # two serving replicas fetch it at most once each: at most half of it is fetched
                    pull_checked(http, balancer.url, "library/big", "1", images.big)
                ratio = panels["Cluster: upstream bytes per byte served", "A"]
                wait_for(lambda: 0 < (prometheus.value(ratio) or 0) <= 0.6, timeout=20,
                         what="the cluster's upstream bytes per byte served in Prometheus")
                lonely.resume()
                wait_for(lambda: all_up(balancer), timeout=20, what=f"the replica back: {balancer.states()}")
    finally:
        seaweedfs.drop_bucket(own_bucket)
