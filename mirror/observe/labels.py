"""The metrics' label values and histogram buckets (``observe/metrics.py``).

Labels are bounded: every value a label takes is listed here, or is a route template, an upstream's
registry name or a status code.  Each combination of the known values starts at 0 (see
``Metrics._start_at_zero``): a series that appears with its first event already counted has no
earlier sample, so Prometheus's ``rate()`` and ``increase()`` never see that event.
"""

from __future__ import annotations

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GC_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The known label values; each combination starts at 0.
CACHE_KINDS = ("manifest", "blob")
CACHE_OUTCOMES = ("hit", "miss", "stale", "coalesced", "bypass", "local")  # X-Mirror-Cache, lower-cased
UPSTREAM_ERROR_REASONS = ("unreachable", "server_error", "rate_limited", "denied", "invalid", "interrupted")
#: The methods that read (the traffic's, and the upstream's): their series start at 0.
READ_METHODS = ("GET", "HEAD")
GC_RESULTS = ("ok", "failed")
#: Why the collector could not evict content (``mirror_store_over_budget``'s reasons).
HELD_REASONS = {"in_use": "in open transfers", "recent": "used within cache.keep_recent", "pinned": "pinned or pushed",
                "grace": "not referenced yet, younger than gc.grace"}
#: The routes whose requests are the traffic (the others: a few, from operators and browsers): their
#: requests by GET and HEAD, and those answers' usual statuses, start at 0.
TRAFFIC_ROUTES = CACHE_KINDS
HTTP_STATUSES = ("200", "206", "304", "307", "404", "429", "500", "503")
#: The usual statuses of an upstream's answers ("error": none came), which start at 0.
UPSTREAM_STATUSES = ("error", "200", "206", "401", "404", "429", "500", "502", "503")
