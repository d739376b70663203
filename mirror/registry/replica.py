"""This replica's side of a cluster of replicas (``registry/cluster.py``): its name, its lease TTL,
its signed client for the other replicas, and the limits of following another replica's fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from ..config.sections import ClusterConfig
from ..config.tlspair import WatchedPair
from ..maintenance.inuse import IndexMarks
from ..metadata.driver import Metadata
from ..spec.reference import Digest
from ..storage.driver import BlobReader, BlobStore, StoreUnavailable
from .peers import sign

log = logging.getLogger("mirror.cluster")

#: Seconds between two looks for a fill's source while none answers (the holder's lease not yet expired).
RETRY_INTERVAL = 0.2
#: Seconds a client is told to wait (``Retry-After``) when the replica fetching a blob cannot be followed.
RETRY_AFTER = 5
#: Seconds a look at the store for a blob may take before the blob's fill lease is looked at too.
HEDGE_AFTER = 0.005
#: Holders of fill leases remembered per process at most, from a look to the fill that follows it.
HINTS = 4096
#: Seconds between two warnings that one replica does not answer for its fills.
WARN_INTERVAL = 60.0
#: The path of a replica's fill of a digest, for the others.
FILLS_PATH = "/_mirror/cluster/fills/"


def lease_name(digest: Digest) -> str:
    """The lease that makes one replica the fetcher of *digest*."""
    return f"fill:{digest}"


def stall_limit(ttl: float) -> float:
    """Seconds a follower waits without a byte while another replica holds the fill's lease."""
    return 4 * ttl + 30


def read_limit(ttl: float) -> float:
    """Seconds a follower waits for the next byte of another replica's fill stream (or its answer)
    before it gives the stream up and looks at the lease again: twice the TTL, at least 10 s.  A
    holder that hangs (``SIGSTOP``, a stuck host: its connections open and silent) renews nothing
    meanwhile, so by then its lease has expired and is taken over."""
    return max(2 * ttl, 10.0)


class PeerTrust:
    """Whom this replica's requests to the others trust over HTTPS: the certificate it serves itself.

    Replicas serve one certificate (one Secret mounted in every pod) and reach each other by
    address (``$(POD_IP)``), which a certificate from cert-manager or a public CA does not name, from
    a CA the default trust store may not hold.  So the certificate this replica serves (the first of
    ``http.tls.certificate``, trusted alone: ``VERIFY_X509_PARTIAL_CHAIN``, not its issuer's other
    certificates) is the one a peer must present, whatever its address; it is also sent as the client
    certificate, for a peer with ``http.tls.client_ca`` (which must then have signed it, for client
    authentication too).  The files are looked at again as the listener's are (``config/tlspair.py``):
    a renewed certificate is trusted beside the previous ones (until a restart), so a replica that has
    it trusts those that do not yet; one that does not yet have it refuses those that do, and its
    clients wait for stored blobs meanwhile."""

    def __init__(self, certificate: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False  # (before CERT_REQUIRED, which PROTOCOL_TLS_CLIENT sets)
        self.context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        self.pair = WatchedPair(
            certificate, key, log,
            failure="cannot load {certificate} / {key} for requests to the other replicas ({error}): "
                    "tried again every {interval:.0f} s",
            renewal="the other replicas are trusted with the renewed certificate {certificate} too")
        self.refresh()

    def refresh(self) -> None:
        self.pair.look(self._load)

    def _load(self, certificate: Path, key: Path) -> None:
        text = certificate.read_text()
        start, end = text.find(PEM_BEGIN), text.find(PEM_END)
        if start < 0 or end < start:
            raise ValueError("it holds no PEM certificate")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(certificate, key)  # the key is the certificate's
        self.context.load_verify_locations(cadata=text[start:end + len(PEM_END)])
        self.context.load_cert_chain(certificate, key)


PEM_BEGIN, PEM_END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"


class Cluster:
    """This replica's side of the cluster: built once per process in the app's lifespan."""

    def __init__(self, config: ClusterConfig, metadata: Metadata, store: BlobStore,
                 marks: IndexMarks | None = None, tls: tuple[Path, Path] | None = None) -> None:
        """*tls*: this replica's certificate and key files (``http.tls.*``), when it serves HTTPS:
        see :class:`PeerTrust`."""
        assert config.advertise is not None and config.secret_file is not None
        self.replica = config.advertise
        self.ttl = config.lease_ttl
        self.metadata = metadata
        self.store = store
        #: This process's marks in the index of the objects it serves or fills (None: none are kept).
        self.marks = marks
        self._secret = config.secret_file.value
        self.trust = PeerTrust(*tls) if tls is not None else None
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(read_limit(self.ttl), connect=5.0), trust_env=False,
                                         verify=self.trust.context if self.trust else True)
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: dict[str, float] = {}  # replica -> when it was last said not to answer

    @property
    def client(self) -> httpx.AsyncClient:
        """The client for requests to the other replicas (trusting a renewed certificate once read)."""
        if self.trust is not None:
            self.trust.refresh()
        return self._client

    def stored(self, digest: Digest) -> BlobReader | None:
        """The stored blob (``BlobStore.open``), or None: not stored, or the store does not answer (its
        fill then goes on, served unstored: ``storage/fill.py``).  Blocking."""
        try:
            return self.store.open(digest)
        except StoreUnavailable:
            return None

    def signed(self, method: str, path: str) -> dict[str, str]:
        return sign(self._secret, method, path, self.replica)

    def unanswered(self, holder: str, digest: Digest, why: str,
                   hint: str = "if it still runs, is its cluster.advertise reachable from here?") -> None:
        """Say (a warning, at most every :data:`WARN_INTERVAL` seconds per replica) that *holder*, which
        holds *digest*'s fill lease, did not answer: it died (its lease then expires), or its
        ``cluster.advertise`` does not reach it from here (else *hint*), and this replica's clients wait
        meanwhile."""
        now = time.monotonic()
        if now - self._warned.get(holder, -WARN_INTERVAL) < WARN_INTERVAL:
            log.debug("%s: %s does not answer its fill: %s", digest, holder, why)
            return
        self._warned[holder] = now
        log.warning("%s: %s, which fetches it, does not answer (%s): this replica's clients wait until it "
                    "stores the blob or its lease expires; %s", digest, holder, why, hint)

    def track(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._client.aclose()


def reason(exc: BaseException) -> str:
    """What went wrong, for a log line: the exception's text, or its type when it has none (timeouts)."""
    return str(exc) or type(exc).__name__
