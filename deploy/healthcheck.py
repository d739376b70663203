"""The container's HEALTHCHECK: ``GET /healthz`` on the mirror's own listener; exit 0 on a 200.

The URL is ``HEALTHCHECK_URL`` if set, else built from ``MIRROR_HTTP_LISTEN`` (its port) and
``MIRROR_HTTP_TLS_CERTIFICATE`` (https when set).  The certificate is not verified: this checks
that the process on loopback answers, not who it is.  No proxy is used.
"""

import os
import ssl
import sys
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
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(target, timeout=4) as answer:
            return 0 if answer.status == 200 else 1
    except Exception as exc:  # any failure is "unhealthy"; say why in `docker inspect`
        print(f"unhealthy: {target}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
