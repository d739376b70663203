"""Whom a replica's requests to the other replicas trust over HTTPS (``registry/replica.py``,
``PeerTrust``): the one certificate it serves itself, renewed without a restart, by real TLS
handshakes on loopback with certificates openssl made.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import threading
from pathlib import Path

import pytest

from mirror.registry.replica import PeerTrust
from tests.support.security import make_ca, sign

SERVING = "subjectAltName=DNS:mirror.cluster.internal\nextendedKeyUsage=serverAuth,clientAuth\n"


def handshake(trust: PeerTrust, certificate: Path, key: Path) -> str | None:
    """A TLS handshake of *trust*'s client context with a loopback server presenting *certificate*:
    None when it succeeds, else the client's error."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certificate, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                with connection, server.wrap_socket(connection, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass  # the client refused the certificate

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    trust.context.wrap_socket(raw):
                return None
        except ssl.SSLError as exc:
            return exc.reason or str(exc)
        finally:
            thread.join(10)


def test_a_replica_trusts_the_certificate_it_serves_then_its_renewal_beside_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The served certificate is trusted (whatever the address: it names none), another leaf of its
    own CA is not; a renewed pair is trusted beside the old one once read; a pair caught halfway
    through being copied is refused and said once, however often it is looked at again.  Before,
    each look at a half-copied pair (every 10 s) logged a warning."""
    ca = make_ca(tmp_path, "ca")
    served = sign(tmp_path, "served", ca, SERVING)
    other = sign(tmp_path, "other", ca, SERVING)
    renewed = sign(tmp_path, "renewed", ca, SERVING)
    live = tmp_path / "live"
    live.mkdir()
    certificate, key = live / "tls.crt", live / "tls.key"
    shutil.copy(served[0], certificate)
    shutil.copy(served[1], key)

    trust = PeerTrust(certificate, key)
    assert handshake(trust, *served) is None
    assert handshake(trust, *other) == "CERTIFICATE_VERIFY_FAILED"
    assert handshake(trust, *renewed) == "CERTIFICATE_VERIFY_FAILED"

    with caplog.at_level(logging.INFO, logger="mirror.cluster"):
        shutil.copy(renewed[0], certificate)  # halfway: the new certificate beside the old key
        for _ in range(3):
            trust.pair.soon()
            trust.refresh()
        assert handshake(trust, *renewed) == "CERTIFICATE_VERIFY_FAILED"
        refusals = [r for r in caplog.records if "for requests to the other replicas" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR, caplog.text

        shutil.copy(renewed[1], key)
        trust.pair.soon()
        trust.refresh()
        assert "trusted with the renewed certificate" in caplog.text
    assert handshake(trust, *renewed) is None
    assert handshake(trust, *served) is None  # a replica not yet given the renewal
    assert handshake(trust, *other) == "CERTIFICATE_VERIFY_FAILED"
