"""A renewed TLS certificate is taken without a restart (see ``config/tlspair.py``).

Each worker looks at ``http.tls.certificate`` and ``http.tls.key`` when a TLS connection opens (at
most every :data:`~mirror.config.tlspair.CHECK_INTERVAL` seconds), and on ``SIGHUP`` at the next
one (a single process's; with several workers ``SIGHUP`` goes to uvicorn's supervisor, which
replaces the workers one at a time, each loading the files anew).  A changed pair is first loaded
into a scratch context; only if that works (the key belongs to the certificate) is the same copy
loaded into the listener's own, which OpenSSL applies to the handshakes that follow
(``SSL_CTX_use_certificate_chain_file``; a failed load there would leave the new certificate with
the old key).  The previous certificate is served meanwhile.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from ..config.tlspair import WatchedPair

log = logging.getLogger("mirror.server")


class Rotation:
    """Watches one certificate and key pair for the TLS listener of this process."""

    def __init__(self, certificate: Path, key: Path) -> None:
        self.pair = WatchedPair(
            certificate, key, log,
            failure="http.tls.certificate {certificate} / http.tls.key {key} changed but do not load ({error}): "
                    "the previous certificate is still served; tried again every {interval:.0f} s",
            renewal="loaded the renewed certificate {certificate}")

    def soon(self) -> None:
        """Look at the next connection (``SIGHUP``)."""
        self.pair.soon()

    def check(self, context: ssl.SSLContext) -> None:
        """Load the pair into *context* if it changed since last loaded (see the module docstring)."""
        def load(certificate: Path, key: Path) -> None:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certificate, key, password=lambda: b"")
            context.load_cert_chain(certificate, key, password=lambda: b"")
        self.pair.look(load)


#: This process's, when it serves TLS (set by ``server/app.py``).
rotation: Rotation | None = None
