"""The container's HEALTHCHECK: ``GET /healthz`` on the mirror's own listener; exit 0 on a 200.

The URL is ``HEALTHCHECK_URL`` if set, else built from ``MIRROR_HTTP_LISTEN`` (its port) and
``MIRROR_HTTP_TLS_CERTIFICATE`` (https when set).  The certificate is not verified: this checks
that the process on loopback answers, not who it is.  No proxy is used.

With mutual TLS (``MIRROR_HTTP_TLS_CLIENT_CA``) the client certificate and key named by
``HEALTHCHECK_CLIENT_CERTIFICATE`` and ``HEALTHCHECK_CLIENT_KEY`` are sent, and then ``/healthz``
must answer 200.  Without them, a TLS 1.3 handshake the mirror completes is healthy: the server's
side ends with its ``Finished`` before it checks the client's certificate (RFC 8446 section 2), so
its listener answered, which is what a liveness check can learn without a certificate.
"""

import os
import socket
import ssl
import sys
import urllib.parse
import urllib.request


def url() -> str:
    if os.environ.get("HEALTHCHECK_URL"):
        return os.environ["HEALTHCHECK_URL"]
    port = os.environ.get("MIRROR_HTTP_LISTEN", "0.0.0.0:5000").rpartition(":")[2] or "5000"
    scheme = "https" if os.environ.get("MIRROR_HTTP_TLS_CERTIFICATE") else "http"
    return f"{scheme}://127.0.0.1:{port}/healthz"


def main() -> int:
    target = url()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if os.environ.get("HEALTHCHECK_CLIENT_CERTIFICATE"):
        context.load_cert_chain(os.environ["HEALTHCHECK_CLIENT_CERTIFICATE"], os.environ.get("HEALTHCHECK_CLIENT_KEY"))
    elif os.environ.get("MIRROR_HTTP_TLS_CLIENT_CA") and target.startswith("https://"):
        return handshake(target, context)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(target, timeout=4) as answer:
            return 0 if answer.status == 200 else 1
    except Exception as exc:  # any failure is "unhealthy"; say why in `docker inspect`
        print(f"unhealthy: {target}: {exc}", file=sys.stderr)
        return 1


def handshake(target: str, context: ssl.SSLContext) -> int:
    """0 if a TLS 1.3 handshake with *target*'s host and port completes (mutual TLS, no certificate here)."""
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    where = urllib.parse.urlsplit(target)
    try:
        with socket.create_connection((where.hostname, where.port or 443), timeout=4) as raw:
            with context.wrap_socket(raw, server_hostname=where.hostname):
                return 0
    except Exception as exc:
        print(f"unhealthy: {target}: TLS handshake: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
