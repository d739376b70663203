"""A worker process killed while it fetches a blob: the readers of that fill in the other workers take
it over (one fetch again, which one of them leads), instead of being cut off with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.faults import FaultProxy
from tests.support.mirror import MirrorServer
from tests.support.waiting import wait_for
from tests.test_s3_postgres_e2e import Backends, backends  # noqa: F401 (a fixture)


@contextlib.contextmanager
def client_per_worker(mirror: MirrorServer) -> Iterator[dict[int, httpx.Client]]:
    """One kept-alive connection answered by each worker: worker pid -> its client."""
    found: dict[int, httpx.Client] = {}
    spare: list[httpx.Client] = []
    try:
        for _ in range(60):
            client = httpx.Client(base_url=mirror.url, trust_env=False, timeout=60,
                                  limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
            seen = len(mirror.access_entries())
            assert client.get("/readyz").status_code == 200
            wait_for(lambda seen=seen: len(mirror.access_entries()) > seen, what="the access log")
            pid = mirror.access_entries()[-1]["pid"]
            if pid in found:
                spare.append(client)
            else:
                found[pid] = client
            if len(found) == mirror.workers:
                break
        assert len(found) == mirror.workers, f"only workers {sorted(found)} answered"
        yield found
    finally:
        for client in [*found.values(), *spare]:
            client.close()


class Read:
    """A blob read in a thread through *client*: bytes received so far, their hash, the error if any."""

    def __init__(self, client: httpx.Client, path: str) -> None:
        self.received = 0
        self.error: BaseException | None = None
        self.cache: str | None = None
        self._hash = hashlib.sha256()
        self._thread = threading.Thread(target=self._read, args=(client, path), daemon=True)
        self._thread.start()

    def _read(self, client: httpx.Client, path: str) -> None:
        try:
            with client.stream("GET", path) as answer:
                self.cache = answer.headers.get("x-mirror-cache")
                for data in answer.iter_raw():
                    self._hash.update(data)
                    self.received += len(data)
        except BaseException as exc:  # the connection cut with its worker
            self.error = exc

    def join(self) -> None:
        self._thread.join(120)
        assert not self._thread.is_alive()

    @property
    def digest(self) -> str:
        return f"sha256:{self._hash.hexdigest()}"


@pytest.mark.parametrize("backend", ["filesystem", pytest.param("s3+postgres", marks=pytest.mark.slow)])
def test_the_readers_of_a_fill_whose_worker_is_killed_take_it_over(
    backend: str, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer], images: StandardImages,
    request: pytest.FixtureRequest,
) -> None:
    """Two workers; a client of the first starts a blob's fill, a client of the second follows it; the
    first is killed (``kill -9``: the OOM killer's way) mid-body.  The second client still gets the
    whole blob, verified (the fill fetched again, once), and the blob is stored.  Before, it was cut
    off at the bytes the dead worker had written ("fetch ended at ... bytes")."""
    layer = images.big.layers[1]  # 8 MiB, 256 KiB every 0.1 s: about 3 s a fetch
    path = f"/v2/big/blobs/{layer.digest}"
    env = {"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true"}
    stores: Backends | None = request.getfixturevalue("backends") if backend == "s3+postgres" else None
    mirror = mirror_factory(fault_proxy.url, workers=2, env=stores.env(**env) if stores else env)
    fault_proxy.add("slow", f"/blobs/{layer.digest}$", method="GET", chunk_size=256 * 1024, delay=0.1)
    fault_proxy.clear_counts()
    with client_per_worker(mirror) as clients:
        (leading, first), (_, second) = clients.items()
        killed = Read(first, path)
        wait_for(lambda: killed.received > 1 << 20, timeout=30, what="the fill to be under way")
        follower = Read(second, path)
        wait_for(lambda: follower.received > 1 << 20, timeout=30, what="the follower to get bytes")
        os.kill(leading, signal.SIGKILL)
        killed.join()
        follower.join()
    assert killed.error is not None and killed.received < layer.size
    assert (follower.cache, follower.error, follower.received, follower.digest) == \
        ("COALESCED", None, layer.size, layer.digest)
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 2  # the killed fetch, and the one taking over
    assert "fetching it again for its readers" in mirror.log_tail(200)
    with httpx.Client(base_url=mirror.url, trust_env=False, timeout=60) as http:
        wait_for(lambda: http.head(path).headers.get("x-mirror-cache") == "HIT", what="the blob stored")
        again = http.get(path)
    assert (again.status_code, again.headers["x-mirror-cache"]) == (200, "HIT")
    assert hashlib.sha256(again.content).hexdigest() == layer.digest.removeprefix("sha256:")
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 2
    if stores is not None:  # (its parts may still be going up: a HIT is served from the fill's file meanwhile)
        wait_for(lambda: layer.digest in stores.bucket.objects(), timeout=30, what="the blob in the bucket")
        assert stores.bucket.digest_of(layer.digest) == layer.digest


def test_a_manifest_request_waiting_for_a_killed_workers_lease_asks_the_upstream_itself(
    fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer], images: StandardImages,
) -> None:
    """Two workers; a client of the first asks for a tag whose upstream answer is slow, a client of the
    second asks for it too and waits for the first worker's answer (one upstream request across the
    workers); the first is killed.  Its lease of the manifest is released for the second, which asks
    the upstream itself.  Before, the second waited out the lease's TTL (here two minutes: the client's
    time-out came first)."""
    env = {"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "true", "MIRROR_CLUSTER_LEASE_TTL": "120s"}
    mirror = mirror_factory(fault_proxy.url, workers=2, env=env)
    path = "/v2/small/manifests/1"
    slow = fault_proxy.add("late", "/manifests/1$", method="GET", times=1, delay=300)
    answers: list[httpx.Response] = []

    def ask(client: httpx.Client) -> None:
        with contextlib.suppress(httpx.HTTPError):  # the killed worker's client: its connection cut
            answers.append(client.get(path, timeout=30))

    with client_per_worker(mirror) as clients:
        (leading, first), (_, second) = clients.items()
        threading.Thread(target=ask, args=(first,), daemon=True).start()
        wait_for(lambda: slow.hits == 1, timeout=30, what="the first worker's upstream GET")
        waiting = threading.Thread(target=ask, args=(second,), daemon=True)
        waiting.start()
        time.sleep(0.5)  # waiting for the lease (if not yet, it finds it held by the killed worker)
        os.kill(leading, signal.SIGKILL)
        waiting.join(60)
    assert len(answers) == 1 and answers[0].status_code == 200, answers
    assert answers[0].headers["docker-content-digest"] == images.small.digest
    assert "asking the upstream for it is gone: asked again" in mirror.log_tail(200)
