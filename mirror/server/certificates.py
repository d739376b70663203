"""A renewed TLS certificate is taken without a restart.

cert-manager, certbot and the like replace ``http.tls.certificate`` and ``http.tls.key`` on disk
before the old certificate expires; a server that read them once at start-up goes on presenting
the old one until it expires and every client fails.  Each worker therefore looks at the two files
(their modification time, size and inode: a change of the symbolic links a Kubernetes Secret
volume swaps counts) at most every :data:`CHECK_INTERVAL` seconds, when a TLS connection opens, and
on ``SIGHUP`` at the next one (a single process's; with several workers ``SIGHUP`` goes to uvicorn's
supervisor, which replaces the workers one at a time, each loading the files anew).  A changed pair
is read once and first loaded into a scratch context; only if that works (the key belongs to the
certificate: a pair caught halfway through being copied does not) is the same copy loaded into the
listener's own, which OpenSSL applies to the handshakes that follow
(``SSL_CTX_use_certificate_chain_file``; a failed load there would leave the new certificate with
the old key).  A pair that does not load, or is missing, is logged once and tried again at the next
check; the previous certificate is served meanwhile.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import time
from pathlib import Path

log = logging.getLogger("mirror.server")

#: Seconds between two looks at the certificate and key files (and after a SIGHUP: the next connection).
CHECK_INTERVAL = 10.0


class Rotation:
    """Watches one certificate and key pair for the TLS listener of this process."""

    def __init__(self, certificate: Path, key: Path) -> None:
        self.certificate = certificate
        self.key = key
        self._next = 0.0
        self._loaded: tuple[tuple[int, int, int], ...] | None = None  # as the server loaded them: unknown
        self._complained: tuple[tuple[int, int, int], ...] | None = None

    def soon(self) -> None:
        """Look at the next connection (``SIGHUP``)."""
        self._next = 0.0

    def check(self, context: ssl.SSLContext) -> None:
        """Load the pair into *context* if it changed since last loaded (see the module docstring)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + CHECK_INTERVAL
        stamp = self._stamp()
        if stamp == self._loaded:
            return
        try:
            if stamp is None:
                raise FileNotFoundError("one of them is missing")
            # One read of each file: what the scratch context took is what the listener's takes (a
            # failed load there would leave it the new certificate with the old key).
            with tempfile.TemporaryDirectory(prefix="mirror-tls-") as scratch:
                certificate, key = Path(scratch, "certificate.pem"), Path(scratch, "key.pem")
                certificate.write_bytes(self.certificate.read_bytes())
                key.touch(mode=0o600)
                key.write_bytes(self.key.read_bytes())
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certificate, key, password=lambda: b"")
                context.load_cert_chain(certificate, key, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            if stamp != self._complained:
                self._complained = stamp
                log.error("http.tls.certificate %s / http.tls.key %s changed but do not load (%s): the previous "
                          "certificate is still served; tried again every %.0f s", self.certificate, self.key,
                          exc, CHECK_INTERVAL)
            return
        if self._loaded is not None:
            log.info("loaded the renewed certificate %s", self.certificate)
        self._loaded = stamp

    def _stamp(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in map(os.stat, (self.certificate, self.key)))
        except OSError:
            return None


#: This process's, when it serves TLS (set by ``server/app.py``).
rotation: Rotation | None = None
