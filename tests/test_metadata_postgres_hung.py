"""A real mirror whose PostgreSQL hangs (every server process stopped, as a hung host or a network
that drops packets looks to its clients): what needs the index answers ``503 UNAVAILABLE`` within a
bound, queries already in flight included, ``/readyz`` says the database is not answering, nothing
hangs; and once the server answers again the mirror recovers by itself.  On a cluster of the test's
own (frozen by the test), against the session's upstream registry."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from mirror.metadata.pgschema import HEARTBEAT, HEARTBEAT_WAIT
from tests.support.archives import pack
from tests.support.catalog import StandardImages
from tests.support.client import pull_checked
from tests.support.images import MANIFEST_MEDIA_TYPES, Image, write_oci_layout
from tests.support.mirror import PROJECT_ROOT, MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.waiting import eventually

#: Seconds within which every request that needs the frozen database must be answered: the
#: listener's heartbeat finds the server silent within HEARTBEAT + HEARTBEAT_WAIT, plus a margin.
BOUND = HEARTBEAT + HEARTBEAT_WAIT + 3.0
#: Seconds a request may take once the server is known to be silent: it must not wait for it.
FAST = 1.5
ACCEPT = {"accept": ", ".join(MANIFEST_MEDIA_TYPES)}

Answer = tuple[int | str, float, httpx.Response | None]


def _timed(client: httpx.Client, method: str, url: str) -> Answer:
    """(status, seconds, response): status is the exception's name if no answer came (the client's
    timeout is well past the bound, so a hung request shows as a late one or as ``ReadTimeout``)."""
    started = time.monotonic()
    try:
        answer = client.request(method, url, headers=ACCEPT)
    except httpx.HTTPError as exc:
        return type(exc).__name__, time.monotonic() - started, None
    return answer.status_code, time.monotonic() - started, answer


def _unlocked_waiters(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
        return int(row[0]) if row else 0


@pytest.mark.slow
def test_a_mirror_whose_database_hangs_answers_503_within_a_bound_and_recovers(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client,
) -> None:
    with PostgresServer() as own:
        dsn = own.create_database()
        mirror = mirror_factory(env={"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn})
        database = f"PostgreSQL database '{dsn.split('dbname=')[1].split()[0]}' at 127.0.0.1:{own.port}"
        name, tag, item = images.refs["small"]
        assert isinstance(item, Image)
        pull_checked(http, mirror.url, name, tag, item)
        base = f"{mirror.url}/v2"
        in_flight = f"{base}/library/dlist/manifests/1"  # never asked: only the database knows it
        # Another repository, new tags of a pulled one, their HEADs, and /readyz: all need the database.
        needing = [("GET", f"{base}/library/multi/manifests/1"), ("HEAD", f"{base}/library/multi/manifests/1"),
                   *(("GET", f"{base}/{name}/manifests/new-{n}") for n in range(8)),
                   ("HEAD", f"{base}/{name}/manifests/new-0"), ("GET", f"{mirror.url}/readyz")]

        with ThreadPoolExecutor(len(needing) + 1) as pool, psycopg.connect(dsn) as locker, \
                httpx.Client(timeout=BOUND + 20, trust_env=False,
                             limits=httpx.Limits(max_connections=100)) as crowd:
            locker.execute("LOCK TABLE tags IN ACCESS EXCLUSIVE MODE")  # held until the rollback below
            waiting: Future[Answer] = pool.submit(_timed, crowd, "GET", in_flight)
            assert eventually(lambda: _unlocked_waiters(dsn) >= 1, timeout=10), "the request never reached the lock"
            own.freeze()
            frozen = time.monotonic()
            try:
                burst = [pool.submit(_timed, crowd, method, url) for method, url in needing]
                # (a) + (c): the query in flight and every request sent while the server hangs end with
                # 503 UNAVAILABLE, none later than the bound.
                status, took, answer = waiting.result(timeout=BOUND + 30)
                ended = time.monotonic() - frozen
                assert status == 503 and ended < BOUND, f"in flight: {status} {ended:.1f}s after the freeze"
                assert answer is not None and answer.json() == {
                    "errors": [{"code": "UNAVAILABLE", "message": "metadata database unavailable"}]}
                assert answer.headers["retry-after"] == "5"
                for (method, url), future in zip(needing, burst, strict=True):
                    status, took, answer = future.result(timeout=BOUND + 30)
                    assert status == 503 and took < BOUND, f"{method} {url}: {status} after {took:.1f}s"
                    if method == "GET" and "/manifests/" in url:
                        assert answer is not None and answer.json()["errors"][0]["code"] == "UNAVAILABLE"
                # Known silent: each fails at once, without waiting for the server or a connection.
                for method, url in [("GET", in_flight), *needing]:
                    status, took, _ = _timed(crowd, method, url)
                    assert status == 503 and took < FAST, f"{method} {url}: {status} after {took:.1f}s"
                # (b) /readyz names the database and says it does not answer.
                ready = http.get(f"{mirror.url}/readyz", timeout=BOUND)
                assert ready.status_code == 503
                problem = ready.json()["problems"]["index"]
                assert problem.startswith(f"metadata database unavailable: {database}: not answering"), problem
                log = mirror.log_tail(500)
                assert f"GET /v2/library/dlist/manifests/1: metadata database unavailable: {database}" in log, log
            finally:
                own.thaw()
            locker.rollback()

        # Answering again: the same requests are served within seconds, and a pull works.
        started = time.monotonic()
        assert eventually(lambda: http.get(in_flight, headers=ACCEPT, timeout=BOUND).status_code == 200,
                          timeout=10, interval=0.2), mirror.log_tail()
        recovered = time.monotonic() - started
        dlist = images.refs["dlist"][2]
        assert http.get(in_flight, headers=ACCEPT).content == dlist.manifest, f"recovered after {recovered:.1f}s"
        for method, url in needing:
            answer = http.request(method, url, headers=ACCEPT, timeout=BOUND)
            assert answer.status_code == (404 if "/new-" in url else 200), (method, url, answer.text)
        big, big_tag, big_item = images.refs["big"]
        assert isinstance(big_item, Image)
        pull_checked(http, mirror.url, big, big_tag, big_item)
        pull_checked(http, mirror.url, name, tag, item)
        assert "Traceback" not in mirror.log_tail(1000), mirror.log_tail(1000)


@pytest.mark.slow
def test_gc_fsck_and_preload_whose_database_goes_away_midway_say_so_in_one_line(
    images: StandardImages, mirror_factory: Callable[..., MirrorServer], http: httpx.Client, tmp_path: Path,
) -> None:
    """``mirror gc``, ``mirror fsck`` and ``mirror preload --data`` that lose the database while they
    run (here: waiting on a table another session locked, when the server shuts down) stop with one
    line naming the database, exit 1, and leave nothing a later run cannot take up."""
    with PostgresServer() as own:
        dsn = own.create_database()
        env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn}
        mirror = mirror_factory(env=env)
        pull_checked(http, mirror.url, "library/small", "1", images.small)
        mirror.stop()
        write_oci_layout(tmp_path / "layout", images.big, "docker.io/team/big:1")
        archive = pack(tmp_path / "layout", tmp_path / "big.tar")
        for command, extra in (("gc", []), ("fsck", []), ("preload", [str(archive)])):
            locker = psycopg.connect(dsn, autocommit=False)
            locker.execute("LOCK TABLE tags, manifests, links, access, pins IN ACCESS EXCLUSIVE MODE")
            proc = subprocess.Popen([sys.executable, "-m", "mirror", command, "--data", str(mirror.data_dir), *extra],
                                    cwd=PROJECT_ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                with psycopg.connect(dsn, autocommit=True) as watcher:
                    eventually(lambda: watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0] > 0,
                        30)
                own.halt()
                out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                locker.close()
            lines = err.strip().splitlines()
            assert proc.returncode == 1 and "Traceback" not in err and len(lines) == 1, (command, out, err)
            assert lines[0].startswith(f"mirror: {command}: ") and "database" in lines[0], lines
            own.resume()
        done = subprocess.run([sys.executable, "-m", "mirror", "fsck", "--data", str(mirror.data_dir)],
                              cwd=PROJECT_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "clean" in done.stdout, done.stdout + done.stderr
