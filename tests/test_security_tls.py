"""TLS and mutual TLS: the mirror serves HTTPS with its certificate, cuts off stalled readers through
TLS too, and with a client CA accepts only clients whose certificate it signed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx
import pytest

from mirror.server.protocol import FALLBACK_GRACE
from tests.support.catalog import StandardImages
from tests.support.images import sha256_digest as sha256
from tests.support.mirror import MirrorServer
from tests.support.security import (
    Pki,
    request,
    sign,
    tls_env,
)
from tests.support.waiting import wait_for
from tests.test_worker_takeover import client_per_worker


def test_tls_serves_https_with_the_configured_certificate(
    mirror_factory: Callable[..., MirrorServer], pki: Pki, images: StandardImages,
) -> None:
    trusted = pki.context()
    mirror = mirror_factory(env=tls_env(pki), scheme="https", verify=trusted)
    assert mirror.url.startswith("https://127.0.0.1:")
    answer = request(mirror, "GET", "/v2/library/small/manifests/1", verify=trusted)
    assert answer.status_code == 200 and answer.http_version == "HTTP/1.1"
    assert answer.headers["docker-content-digest"] == images.small.digest
    for layer in images.small.layers:  # no sendfile(2) through TLS: the bytes take the ordinary way
        blob = request(mirror, "GET", f"/v2/library/small/blobs/{layer.digest}", verify=trusted)
        assert blob.status_code == 200 and sha256(blob.content) == layer.digest
        assert request(mirror, "GET", f"/v2/library/small/blobs/{layer.digest}", verify=trusted).content \
            == blob.content  # and again from the store
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        request(mirror, "GET", "/v2/", verify=pki.context(ca=pki.other_ca))
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
        httpx.get(f"http://127.0.0.1:{mirror.port}/v2/", trust_env=False, timeout=5)


def test_tls_takes_only_forward_secret_aead_suites_whatever_the_systems_policy(
    mirror_factory: Callable[..., MirrorServer], pki: Pki,
) -> None:
    """A TLS 1.2 client offering only CBC suites (all TLS 1.0 and 1.1 have) is refused; one offering
    an AEAD suite, and TLS 1.3, get through.  Before, uvicorn's ``TLSv1`` cipher string took CBC."""
    trusted = pki.context()
    mirror = mirror_factory(env=tls_env(pki), scheme="https", verify=trusted)

    def handshake(ciphers: str | None, version: ssl.TLSVersion) -> str:
        context = pki.context()
        context.maximum_version = version
        if ciphers:
            context.set_ciphers(ciphers)
        with context.wrap_socket(socket.create_connection(("127.0.0.1", mirror.port), timeout=10),
                                 server_hostname="127.0.0.1") as sock:
            return str(sock.version())

    with pytest.raises(ssl.SSLError):
        handshake("ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:AES128-SHA256:AES128-SHA", ssl.TLSVersion.TLSv1_2)
    assert handshake("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256", ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert handshake(None, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_a_blob_reader_that_stalls_over_tls_is_cut_off(
    mirror_factory: Callable[..., MirrorServer], pki: Pki, images: StandardImages,
) -> None:
    trusted = pki.context()
    mirror = mirror_factory(env={**tls_env(pki), "MIRROR_HTTP_IDLE_TIMEOUT": "2s"}, scheme="https", verify=trusted)
    layer = images.big.layers[2]  # 64 MiB: far more than the socket buffers hold
    path = f"/v2/library/big/blobs/{layer.digest}"
    assert request(mirror, "GET", "/v2/library/big/manifests/1", verify=trusted).status_code == 200
    assert request(mirror, "GET", path, verify=trusted).status_code == 200  # stored: read and written, no sendfile
    with trusted.wrap_socket(socket.create_connection(("127.0.0.1", mirror.port), timeout=30),
                             server_hostname="127.0.0.1") as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(6)  # reads nothing for three idle timeouts
        received = 0
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
    assert 0 < received < layer.size
    log = mirror.log_tail(400)
    assert "Traceback" not in log and "without completing response" not in log, log


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    mirror_factory: Callable[..., MirrorServer], pki: Pki,
) -> None:
    with_cert = pki.context(client_cert=True)
    mirror = mirror_factory(env=tls_env(pki, client_ca=True), scheme="https", verify=with_cert)
    assert request(mirror, "GET", "/v2/", verify=with_cert).status_code == 200
    with pytest.raises(httpx.TransportError):
        request(mirror, "GET", "/v2/", verify=pki.context())


def test_a_client_that_speaks_tls_to_the_plain_http_port_is_told_so(
    mirror: MirrorServer, skopeo: str,
) -> None:
    """skopeo with ``--tls-verify=true`` (what dockerd and containerd do first for a registry not
    marked insecure) starts a TLS handshake on the plain-HTTP port: it gets a plain-HTTP 400, which Go
    clients report as "server gave HTTP response to HTTPS client" (and use to fall back to http://
    where allowed), and the mirror's log names the client and what to change, once per host."""
    target = f"docker://127.0.0.1:{mirror.port}/library/small:1"
    for _ in range(3):
        done = subprocess.run([skopeo, "inspect", "--tls-verify=true", "--retry-times=0", target],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode != 0 and "server gave HTTP response to HTTPS client" in done.stderr, done.stderr
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    # Warned of once no plain-HTTP request came from that host for a while after the handshake.
    wait_for(lambda: "began a TLS handshake" in mirror.log_tail(400), timeout=10, what="the warning")
    log = mirror.log_tail(400)
    assert log.count("began a TLS handshake on this plain-HTTP port") == 1, log
    assert re.search(r"127\.0\.0\.1:\d+ began a TLS handshake on this plain-HTTP port: it expects HTTPS\. "
                     r"Either tell it the registry is plain HTTP \(dockerd: insecure-registries;", log), log
    assert "Invalid HTTP request received" not in log, log
    assert request(mirror, "GET", "/v2/").status_code == 200  # plain HTTP still served


def test_a_client_told_the_registry_is_plain_http_that_tries_tls_first_is_not_warned_of(
    mirror: MirrorServer, skopeo: str, images: StandardImages,
) -> None:
    """skopeo ``--tls-verify=false`` (as dockerd and podman for an insecure registry) begins with a TLS
    handshake and falls back to http:// when answered in plain HTTP: configured right, nothing to warn of."""
    for _ in range(2):
        done = subprocess.run([skopeo, "inspect", "--tls-verify=false", "--retry-times=0", "--raw",
                               f"docker://127.0.0.1:{mirror.port}/library/small:1"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    time.sleep(FALLBACK_GRACE + 1.0)
    log = mirror.log_tail(400)
    assert "began a TLS handshake" not in log, log
    assert "/v2/library/small/manifests/1" in log  # it did come back in plain HTTP


def test_with_workers_a_client_that_comes_back_to_another_worker_is_not_warned_of(
    mirror_factory: Callable[..., MirrorServer],
) -> None:
    """With ``--workers 2``, a client's TLS handshake and the plain-HTTP request it comes back with
    may reach different workers: the one that saw the handshake knows of the other's request, either
    way round.  A client that only tries TLS is still warned of, once for both workers."""
    mirror = mirror_factory(workers=2)
    with client_per_worker(mirror) as clients:
        first, second = sorted(clients)
        for handshake, plain in [(first, second), (second, first), (first, second)]:
            refused_handshake(mirror, handshake, clients)
            assert clients[plain].get("/v2/").status_code == 200
            wait_for(lambda plain=plain: mirror.access_entries()[-1]["pid"] == plain, what="the plain request")
        time.sleep(FALLBACK_GRACE + 1.0)
        log = mirror.log_tail(400)
        assert "began a TLS handshake" not in log, log
        # A client that expects HTTPS: no way back, whichever worker it reaches.
        refused_handshake(mirror, second, clients)
        time.sleep(0.2)
        refused_handshake(mirror, first, clients)
    wait_for(lambda: "began a TLS handshake" in mirror.log_tail(400), timeout=10, what="the warning")
    time.sleep(1.0)
    log = mirror.log_tail(400)
    assert log.count("began a TLS handshake on this plain-HTTP port: it expects HTTPS") == 1, log


def refused_handshake(mirror: MirrorServer, worker: int, workers: Iterable[int]) -> None:
    """A TLS handshake, answered in plain HTTP, on a new connection to *mirror* that its *worker*
    accepted (of its *workers*; the connections another accepts are closed unused)."""
    for _ in range(100):
        with socket.create_connection(("127.0.0.1", mirror.port), timeout=5) as raw:
            wait_for(lambda raw=raw: accepted_by(raw, workers) is not None, what="a worker's accept")
            if accepted_by(raw, workers) != worker:
                continue
            with pytest.raises(ssl.SSLError):
                ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
            return
    raise AssertionError(f"worker {worker} accepted none of 100 connections")


def accepted_by(connection: socket.socket, workers: Iterable[int]) -> int | None:
    """The pid (of *workers*) holding the server's end of the loopback TCP *connection*, by its inode
    in ``/proc/net/tcp``; None while the connection waits to be accepted (inode 0)."""
    ends = [f"0100007F:{end[1]:04X}" for end in (connection.getpeername(), connection.getsockname())]
    inode = next((fields[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                  if (fields := line.split())[1:3] == ends), "0")
    for pid in workers if inode != "0" else ():
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
    return None


def served_certificate(port: int, pki: Pki) -> bytes:
    """The DER certificate the server on *port* presents to a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pki.context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_a_renewed_certificate_is_served_without_a_restart(
    mirror_factory: Callable[..., MirrorServer], pki: Pki, tmp_path: Path,
) -> None:
    """cert-manager or certbot replace the files before the old certificate expires: the next
    connections get the new one (SIGHUP: at once; else within CHECK_INTERVAL), a pair caught halfway
    through being copied is not taken (the old one is served, and the error said once), and SIGHUP
    no longer ends the server.  Before, the old certificate was served until a restart, and SIGHUP
    killed the process."""
    live = tmp_path / "live"
    live.mkdir()
    certificate, key = live / "tls.crt", live / "tls.key"
    shutil.copy(pki.server_cert, certificate)
    shutil.copy(pki.server_key, key)
    trusted = pki.context()
    mirror = mirror_factory(env={"MIRROR_HTTP_TLS_CERTIFICATE": str(certificate), "MIRROR_HTTP_TLS_KEY": str(key)},
                            scheme="https", verify=trusted)
    first = served_certificate(mirror.port, pki)
    renewed = sign(tmp_path, "renewed", (pki.ca, pki.ca.with_suffix(".key")),
                   "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    assert renewed[0].read_bytes() != pki.server_cert.read_bytes()

    # Halfway: the new certificate beside the old key.
    shutil.copy(renewed[0], certificate)
    assert mirror.pid is not None
    os.kill(mirror.pid, signal.SIGHUP)
    for _ in range(3):
        assert served_certificate(mirror.port, pki) == first
    assert request(mirror, "GET", "/v2/", verify=trusted).status_code == 200
    wait_for(lambda: "changed but do not load" in mirror.log_tail(200), timeout=10, what="the error")

    # The key too: the next connection takes the pair, the one after it presents it.
    shutil.copy(renewed[1], key)
    os.kill(mirror.pid, signal.SIGHUP)
    served_certificate(mirror.port, pki)
    now = served_certificate(mirror.port, pki)
    assert now != first and now == ssl.PEM_cert_to_DER_cert(renewed[0].read_text())
    assert request(mirror, "GET", "/v2/", verify=trusted).status_code == 200
    log = mirror.log_tail(400)
    assert log.count("changed but do not load") == 1 and "loaded the renewed certificate" in log, log

    # Files gone (a volume unmounted): the certificate loaded goes on being served, and that is said once.
    key.unlink()
    os.kill(mirror.pid, signal.SIGHUP)
    for _ in range(3):
        assert served_certificate(mirror.port, pki) == now
    wait_for(lambda: "one of them is missing" in mirror.log_tail(200), timeout=10, what="the error")
    assert mirror.log_tail(400).count("one of them is missing") == 1
