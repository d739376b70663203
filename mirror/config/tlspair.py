"""A TLS certificate and key pair of the configuration (``http.tls.certificate``, ``http.tls.key``),
looked at again so that a renewed pair is taken without a restart.

cert-manager, certbot and the like replace the two files on disk before the old certificate
expires; a process that read them once at start-up goes on using the old one until it expires and
every peer fails.  A :class:`WatchedPair` looks at the two files (their modification time, size and
inode: a change of the symbolic links a Kubernetes Secret volume swaps counts) at most every
:data:`CHECK_INTERVAL` seconds, or at the next look after :meth:`WatchedPair.soon` (``SIGHUP``).  A
changed pair is copied once (one read of each file) into a scratch directory, and the caller loads
that copy: what it checked is what it uses, even while the files are being replaced.  A pair that
does not load (the key of another certificate: caught halfway through being copied), or is missing,
is logged once per change and tried again at the next look; the caller keeps what it had.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

#: Seconds between two looks at the certificate and key files.
CHECK_INTERVAL = 10.0

Stamp = tuple[tuple[int, int, int], ...]


class WatchedPair:
    """One certificate and key pair, loaded again by :meth:`look` when the files change."""

    def __init__(self, certificate: Path, key: Path, log: logging.Logger, failure: str, renewal: str) -> None:
        """*failure* (an error) and *renewal* (an info line, for each load but the first): the log lines'
        texts, formats with the named fields ``certificate``, ``key``, ``error`` and ``interval``."""
        self.certificate, self.key = certificate, key
        self._log, self._failure, self._renewal = log, failure, renewal
        self._next = 0.0
        self._loaded: Stamp | None = None  # as the process loaded them: unknown
        self._complained: Stamp | None = None

    def soon(self) -> None:
        """Look at the next :meth:`look` whatever the interval (``SIGHUP``)."""
        self._next = 0.0

    def look(self, load: Callable[[Path, Path], None]) -> bool:
        """Call ``load(certificate, key)`` with a copy of the pair if it is due for a look and changed
        since it last loaded.  *load* raises :class:`ssl.SSLError`, :class:`OSError` or
        :class:`ValueError` to refuse it.  True when a changed pair was loaded."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + CHECK_INTERVAL
        stamp = self._stamp()
        if stamp == self._loaded:
            return False
        try:
            if stamp is None:
                raise FileNotFoundError("one of them is missing")
            with tempfile.TemporaryDirectory(prefix="mirror-tls-") as scratch:
                certificate, key = Path(scratch, "certificate.pem"), Path(scratch, "key.pem")
                certificate.write_bytes(self.certificate.read_bytes())
                key.touch(mode=0o600)
                key.write_bytes(self.key.read_bytes())
                load(certificate, key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            if stamp != self._complained:
                self._complained = stamp
                self._log.error(self._text(self._failure, exc))
            return False
        if self._loaded is not None:
            self._log.info(self._text(self._renewal, None))
        self._loaded = stamp
        return True

    def _text(self, text: str, error: BaseException | None) -> str:
        return text.format(certificate=self.certificate, key=self.key, error=error, interval=CHECK_INTERVAL)

    def _stamp(self) -> Stamp | None:
        try:
            return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in map(os.stat, (self.certificate, self.key)))
        except OSError:
            return None
