"""Hostile and slow clients: ``nosniff`` and JSON errors on every answer, request heads and bodies
that trickle or grow too large are cut off, and blob readers that stall or vanish hold no one up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from tests.support.catalog import StandardImages
from tests.support.images import sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.security import (
    NOSNIFF,
    assert_spec_error,
    raw_connection,
    read_all,
    request,
)


def test_every_answer_carries_nosniff_and_errors_are_json(
    mirror_factory: Callable[..., MirrorServer], images: StandardImages,
) -> None:
    mirror = mirror_factory()
    small = images.small
    for method, path, status in [
        ("GET", "/v2/", 200), ("GET", "/v2/library/small/manifests/1", 200),
        ("GET", f"/v2/library/small/blobs/{small.layers[0].digest}", 200),
        ("GET", "/v2/library/nope/manifests/1", 404), ("GET", "/v2/UPPER/manifests/1", 400),
        ("POST", "/v2", 405), ("GET", "/v2/a%0Ab/manifests/1", 404), ("GET", "/v2/_catalog?n=%C2%B2", 400),
        ("GET", "/v2/library/small/tags/list?last=..%2F..", 400), ("GET", "/healthz", 200),
    ]:
        answer = request(mirror, method, path)
        assert answer.status_code == status, (path, answer.text)
        assert (NOSNIFF[0], answer.headers.get(NOSNIFF[0])) == NOSNIFF, path
        if status >= 400:
            assert "Traceback" not in answer.text and answer.json()["errors"][0]["code"], answer.text
    big = request(mirror, "PUT", "/v2/mine/manifests/1", content=b"{" + b" " * (4 << 20) + b"}",
                  headers={"content-type": "application/vnd.oci.image.manifest.v1+json"})
    assert_spec_error(big, 413, "MANIFEST_INVALID")


def test_slow_and_oversized_clients_are_cut_off(mirror_factory: Callable[..., MirrorServer]) -> None:
    mirror = mirror_factory(env={"MIRROR_HTTP_IDLE_TIMEOUT": "2s"})
    # Slowloris: a request head that never ends is closed after the idle timeout.
    with raw_connection(mirror) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        for _ in range(20):
            time.sleep(0.25)
            try:
                sock.sendall(b"a")
            except OSError:
                break
        assert read_all(sock) == b"" and 1.5 < time.monotonic() - started < 8
    # A connection that never sends a byte is closed too.
    with raw_connection(mirror) as sock:
        started = time.monotonic()
        assert read_all(sock) == b"" and 1.5 < time.monotonic() - started < 8
    # A body that stops half-way: 408 in the spec's format, and the connection is closed.
    uuid = request(mirror, "POST", "/v2/slow/blobs/uploads/").headers["docker-upload-uuid"]
    with raw_connection(mirror) as sock:
        sock.sendall(f"PATCH /v2/slow/blobs/uploads/{uuid} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + b"x" * 1000)
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in head.lower() and b"x-content-type-options: nosniff" in head.lower()
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    # A request head above 64 KiB is refused.
    with raw_connection(mirror) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400")
    assert request(mirror, "GET", "/v2/").status_code == 200


def test_blob_readers_that_stall_or_vanish_are_cut_off_and_hold_no_one_up(
    mirror_factory: Callable[..., MirrorServer], images: StandardImages,
) -> None:
    mirror = mirror_factory(env={"MIRROR_HTTP_IDLE_TIMEOUT": "5s"})
    layer = images.big.layers[2]  # 64 MiB: far more than the socket buffers hold
    path = f"/v2/library/big/blobs/{layer.digest}"
    assert request(mirror, "GET", "/v2/library/big/manifests/1").status_code == 200
    assert request(mirror, "GET", path).status_code == 200  # now stored: sent with sendfile(2)
    get = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    # Clients that hang up early.
    for _ in range(5):
        with raw_connection(mirror) as sock:
            sock.sendall(get)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    # More clients that stop reading than there are sending threads: the others are still served.
    stalled = [raw_connection(mirror) for _ in range(70)]
    try:
        for sock in stalled:
            sock.sendall(get)
        time.sleep(1)
        started = time.monotonic()
        answer = request(mirror, "GET", path)
        assert answer.status_code == 200 and sha256(answer.content) == layer.digest
        assert time.monotonic() - started < 4, "a reader waited for a stalled one"
        # After the idle timeout each stalled connection is closed, short of the blob.
        time.sleep(9)  # past the idle timeout of every transfer (each starts at once, thread or not)
        for sock in stalled:
            sock.settimeout(30)
            assert 0 < len(read_all(sock)) < layer.size
    finally:
        for sock in stalled:
            sock.close()
    answer = request(mirror, "GET", path, headers={"range": "bytes=1000-1999999"})
    assert answer.status_code == 206 and answer.content == layer.path.read_bytes()[1000:2000000]
    # The access log counts what went out, not what was meant to.
    cut_short = [e for e in mirror.access_entries() if e["path"] == path and "user_agent" not in e]
    assert len(cut_short) == 75 and all(0 < int(e["bytes"]) < layer.size for e in cut_short), cut_short
    log = mirror.log_tail(2000)
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
