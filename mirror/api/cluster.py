"""The endpoint replicas of one mirror call each other on: ``GET /_mirror/cluster/fills/<digest>``.

Answered only to a request signed with the cluster's secret (``registry/peers.py``: ``401
UNAUTHORIZED`` without a signature, ``403 DENIED`` with a wrong one), and ``404`` on a mirror that
is no replica (no ``cluster.advertise``).  It gives this replica's fill of the digest as its own
clients get it (``storage/growing.py``: first bytes at once, the last one held back until the
digest is verified), or the stored object once the fill is done; ``Range: bytes=<offset>-`` goes on
from the byte the asking replica has (``206`` with ``Content-Range``).  ``404 BLOB_UNKNOWN`` when
this replica neither fills nor stores the digest: nothing is ever fetched for the asker.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..config.sections import Config
from ..registry.peers import verify
from ..spec.errors import APIError
from ..spec.reference import InvalidRange, ParseError, UnsupportedDigest, parse_digest, parse_range
from ..storage.fill import Fills
from .responses import BlobResponse


async def fill(request: Request) -> Response:
    config: Config = request.state.config
    if config.cluster.secret_file is None:
        raise APIError("NAME_UNKNOWN", "this mirror is no replica of a cluster (cluster.advertise)", status=404)
    verify(config.cluster.secret_file.value, request.method, request.url.path, request.headers)
    try:
        digest = parse_digest(request.path_params["digest"])
    except (ParseError, UnsupportedDigest) as exc:
        raise APIError("DIGEST_INVALID", detail=str(exc), status=400) from exc
    fills: Fills = request.state.fills
    source = await fills.join(digest)
    if source is None:
        raise APIError("BLOB_UNKNOWN", "this replica neither fetches nor stores the blob",
                       detail={"digest": str(digest)})
    byte_range = None
    if (header := request.headers.get("range")) and source.size is not None:
        try:
            byte_range = parse_range(header, source.size)
        except InvalidRange as exc:
            source.close()
            raise APIError("RANGE_INVALID", detail=str(exc),
                           headers={"Content-Range": f"bytes */{source.size}"}) from exc
    return BlobResponse(source, {"Docker-Content-Digest": str(digest)}, byte_range=byte_range)  # type: ignore[return-value]


routes = [Route("/_mirror/cluster/fills/{digest}", fill, methods=["GET"])]
