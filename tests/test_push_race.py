"""The first requests of a push to a new name, arriving at once at several replicas (dockerd uploads
layers in parallel, and behind a load balancer each may reach another replica): every one is taken,
none refused as a push "to a cache of the upstream" because another replica made the name local
between its two looks at the index."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import pytest

from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.test_cluster_fills import Cluster, cluster, start_replicas  # noqa: F401 (cluster: a fixture)


@pytest.mark.slow
def test_concurrent_first_uploads_of_a_new_repository_on_three_replicas_are_all_taken(
    cluster: Cluster, upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorServer],  # noqa: F811
) -> None:
    replicas = start_replicas(cluster, 3, upstream.url, mirror_factory)
    answers: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    def start(name: str, replica: MirrorServer, barrier: threading.Barrier) -> None:
        with httpx.Client(timeout=30.0, trust_env=False) as http:
            barrier.wait()
            answer = http.post(f"{replica.url}/v2/{name}/blobs/uploads/")
            with lock:
                answers.append((name, answer.status_code, answer.text[:200]))

    for round_ in range(30):
        name = f"race/pushed{round_}"
        barrier = threading.Barrier(6)
        threads = [threading.Thread(target=start, args=(name, replicas[n % 3], barrier)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    refused = [answer for answer in answers if answer[1] != 202]
    assert len(answers) == 30 * 6 and not refused, refused[:5]
