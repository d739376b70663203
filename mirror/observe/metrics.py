"""Prometheus metrics of a mirror process, and their exposition for every worker at once.

Names start with ``mirror_`` and carry their unit (``_seconds``, ``_bytes``); counters end in
``_total``.  Labels are bounded: a route is a template (``manifest``, ``blob``, ...), never a path.

Every metric lives on a :class:`Metrics` built once per process with a registry of its own
(never prometheus-client's global one).  Code records through its methods; ``Metrics(enabled=False)``
records nothing, for the tools that run the same code outside the server (``mirror export``).

Several worker processes: ``mirror serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before
prometheus-client is first imported (it picks its value class at import). Each process then keeps its samples in
memory-mapped files there, and whoever answers a scrape -- any worker, or the parent's ``metrics.listen`` server --
merges them all (:func:`exposition_registry`). Gauges say how they merge: ``livesum`` for what live workers hold right
now (a worker drops its own as it exits; one killed is dropped by the next worker to start,
:func:`forget_dead_processes`), ``mostrecent`` for what the upstream said last. The store's figures (size, budget,
object counts) belong to no process: :class:`StoreCollector` reads them when scraped, in the process that answers, so
they are counted once.

==========================================  =============================================================
``mirror_http_requests_total``               route, method, status
``mirror_http_request_duration_seconds``     route, method (histogram, to the last body byte)
``mirror_http_response_bytes_total``         route: body bytes sent
``mirror_http_sendfile_bytes_total``         of those, the ones the kernel sent with ``sendfile(2)``
``mirror_http_requests_in_flight``           requests being answered
``mirror_cache_requests_total``              kind (manifest, blob), outcome (hit, miss, stale, coalesced, bypass, local)
``mirror_cache_served_bytes_total``          kind, outcome: body bytes sent, by where they came from (and the
                                             size of a stored blob handed out by a redirect to the bucket)
``mirror_coalesced_waiters``                 requests following a fetch another request leads
``mirror_upstream_requests_total``           upstream, method, status (``error``: no answer)
``mirror_upstream_request_duration_seconds`` upstream, method (histogram, to the response headers)
``mirror_upstream_errors_total``             upstream, reason (unreachable, server_error, rate_limited, ...)
``mirror_upstream_received_bytes_total``     upstream, kind (manifest, blob)
``mirror_upstream_ratelimit_*``              upstream: Docker Hub's ``ratelimit-limit``/``-remaining``
``mirror_upstream_last_*_timestamp_seconds`` upstream (and reason): when it last answered, last failed
``mirror_gc_*``, ``mirror_evicted_images_total``  collector runs, durations, objects and bytes freed
``mirror_upload*_total``, ``mirror_preload*_total``  pushed blobs and preloaded archives
``mirror_store_*``                           size, budget and watermarks, objects, manifests, filesystem
``mirror_store_over_budget``                 reason (in_use, recent, pinned, grace): eviction could not get under
``mirror_index_up``, ``mirror_store_up``     1 while the index / the store answers a scrape; 0 leaves their figures out
``mirror_cluster_*``                         replicas' shared fills: by role, fenced, peer streams (``cluster.py``)
==========================================  =============================================================
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import time
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.registry import Collector

from . import labels
from .serverdir import server_directory

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "exposition_registry", "render"]

_LEADING_INT = re.compile(r"\s*(\d+)")
#: prometheus-client's sample file of a process's live gauges: ``gauge_livesum_<pid>.db``.
_LIVE_FILE = re.compile(r"gauge_live[a-z]*_(\d+)\.db")


class _Pending:
    """Requests of one route, method, status and cache outcome not yet written to the samples."""

    __slots__ = ("buckets", "count", "seconds", "sendfile", "sent")

    def __init__(self) -> None:
        self.count = self.sent = self.sendfile = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(labels.HTTP_BUCKETS) + 1)


def multiprocess_mode() -> bool:
    """True when samples go to ``PROMETHEUS_MULTIPROC_DIR`` (decided when prometheus-client was imported)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def forget_dead_processes() -> list[int]:
    """Drop the live gauges (``livesum``) of worker processes that are gone; return their pids.

    A worker that exits cleanly drops its own (:meth:`Metrics.close`); one killed (SIGKILL, the OOM
    killer) cannot, and its last in-flight count would be summed forever.  Called as a worker starts,
    i.e. when uvicorn has replaced a dead one; this process's pid counts as gone (a file with it is a
    dead predecessor's).
    """
    directory = server_directory()
    if directory is None:
        return []
    pids = set()
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if m := _LIVE_FILE.fullmatch(entry):
                pids.add(int(m.group(1)))
    dead = sorted(pid for pid in pids if pid == os.getpid() or not _alive(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Metrics:
    """The metrics one process records (see the module docstring for the list)."""

    def __init__(self, enabled: bool = True, *, upstreams: Iterable[str] = ()) -> None:
        """*upstreams*: the configured registries' names, whose series start at 0 with the others."""
        self.enabled = enabled
        self.registry = CollectorRegistry()
        # Requests are counted here and written to the (shared, memory-mapped) samples in batches.
        self._in_flight = 0
        self._pending: dict[tuple[str, str, int, str | None], _Pending] = {}
        if not enabled:
            return
        if multiprocess_mode():
            forget_dead_processes()
        r = self.registry
        self.http_requests = Counter(
            "mirror_http_requests", "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"], registry=r)
        self.http_duration = Histogram(
            "mirror_http_request_duration_seconds", "Time from request to the last body byte sent.",
            ["route", "method"], buckets=labels.HTTP_BUCKETS, registry=r)
        self.http_bytes = Counter(
            "mirror_http_response_bytes", "Response body bytes sent, by route template.", ["route"], registry=r)
        self.http_sendfile_bytes = Counter(
            "mirror_http_sendfile_bytes", "Response body bytes the kernel copied from the store to the socket "
            "with sendfile(2) (zero-copy; part of mirror_http_response_bytes_total).", registry=r)
        self.http_in_flight = Gauge(
            "mirror_http_requests_in_flight", "Requests being answered.", registry=r, multiprocess_mode="livesum")
        self.cache_requests = Counter(
            "mirror_cache_requests", "Manifest and blob requests by cache outcome "
            "(hit: store, miss: fetched, stale: store while the upstream failed, coalesced: joined a fetch "
            "in progress, bypass: fetched but the store took no writes, local: pushed content).",
            ["kind", "outcome"], registry=r)
        self.cache_bytes = Counter(
            "mirror_cache_served_bytes", "Manifest and blob body bytes sent, by cache outcome.",
            ["kind", "outcome"], registry=r)
        self.coalesced_waiters = Gauge(
            "mirror_coalesced_waiters", "Requests following an upstream fetch that another request leads.",
            registry=r, multiprocess_mode="livesum")
        self.upstream_requests = Counter(
            "mirror_upstream_requests", "Requests sent to an upstream registry, by status (error: no answer).",
            ["upstream", "method", "status"], registry=r)
        self.upstream_duration = Histogram(
            "mirror_upstream_request_duration_seconds", "Time until an upstream's response headers arrived.",
            ["upstream", "method"], buckets=labels.UPSTREAM_BUCKETS, registry=r)
        self.upstream_errors = Counter(
            "mirror_upstream_errors", "Upstream requests that failed after retries, by reason "
            "(unreachable, server_error, rate_limited, denied, invalid: not what was asked, interrupted).",
            ["upstream", "reason"], registry=r)
        self.upstream_bytes = Counter(
            "mirror_upstream_received_bytes", "Manifest and blob body bytes received from an upstream.",
            ["upstream", "kind"], registry=r)
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining", "Pulls left in the window, as the upstream last said "
            "(Docker Hub's ratelimit-remaining header).", ["upstream"], registry=r, multiprocess_mode="mostrecent")
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit", "Pulls allowed per window, as the upstream last said "
            "(Docker Hub's ratelimit-limit header).", ["upstream"], registry=r, multiprocess_mode="mostrecent")
        self.upstream_last_answer = Gauge(
            "mirror_upstream_last_answer_timestamp_seconds", "When an upstream last answered (not with a 5xx "
            "or 429), Unix time.", ["upstream"], registry=r, multiprocess_mode="max")
        self.upstream_last_error = Gauge(
            "mirror_upstream_last_error_timestamp_seconds", "When a request to an upstream last failed, by "
            "reason, Unix time.", ["upstream", "reason"], registry=r, multiprocess_mode="max")
        self.gc_runs = Counter(
            "mirror_gc_runs", "Collector runs (eviction and garbage collection), by result.", ["result"], registry=r)
        self.gc_duration = Histogram(
            "mirror_gc_duration_seconds", "Duration of a collector run.", buckets=labels.GC_BUCKETS, registry=r)
        self.gc_freed_bytes = Counter(
            "mirror_gc_freed_bytes", "Bytes of objects the collector removed.", registry=r)
        self.gc_removed_objects = Counter(
            "mirror_gc_removed_objects", "Objects the collector removed.", registry=r)
        self.evicted_images = Counter(
            "mirror_evicted_images", "Cached images evicted (least recently used, or unused too long).", registry=r)
        self.gc_last_run = Gauge(
            "mirror_gc_last_run_timestamp_seconds", "When the last collector run finished (Unix time).",
            registry=r, multiprocess_mode="max")
        self.uploads = Counter("mirror_uploads", "Blob uploads completed (pushed blobs stored).", registry=r)
        self.upload_bytes = Counter("mirror_upload_bytes", "Bytes of blob uploads completed.", registry=r)
        self.upload_failures = Counter(
            "mirror_upload_failures", "Blob uploads refused at the end (digest mismatch).", registry=r)
        self.mounts = Counter("mirror_upload_mounts", "Blobs mounted from another repository.", registry=r)
        self.preloads = Counter("mirror_preloads", "Image archives preloaded through the server.", registry=r)
        self.preload_failures = Counter("mirror_preload_failures", "Image archives refused.", registry=r)
        self.preload_images = Counter("mirror_preload_images", "Images in the archives preloaded.", registry=r)
        self.preload_bytes = Counter("mirror_preload_bytes", "New bytes stored by preloads.", registry=r)
        self.corrupt_objects = Counter(
            "mirror_store_corrupt_objects", "Objects read from the object store that did not match their digest "
            "(replaced or damaged there): removed, never served.", registry=r)
        self._start_at_zero(tuple(upstreams))

    def _start_at_zero(self, upstreams: tuple[str, ...]) -> None:
        """Create every known label combination now, at 0.

        A series that appears with its first event at 1 has no earlier sample, so ``rate()`` and
        ``increase()`` never see that event: a first stale serve or 429 would not show on the
        dashboard.  In multi-process mode each worker writes its zeros to its own file, and the
        scrape sums them, so the totals are unchanged.
        """
        for kind in labels.CACHE_KINDS:
            for outcome in labels.CACHE_OUTCOMES:
                self.cache_requests.labels(kind, outcome)
                self.cache_bytes.labels(kind, outcome)
        for route in labels.TRAFFIC_ROUTES:
            self.http_bytes.labels(route)
            for method in labels.READ_METHODS:
                self.http_duration.labels(route, method)
                for status in labels.HTTP_STATUSES:
                    self.http_requests.labels(route, method, status)
        for upstream in upstreams:
            for reason in labels.UPSTREAM_ERROR_REASONS:
                self.upstream_errors.labels(upstream, reason)
            for kind in labels.CACHE_KINDS:
                self.upstream_bytes.labels(upstream, kind)
            for method in labels.READ_METHODS:
                self.upstream_duration.labels(upstream, method)
                for status in labels.UPSTREAM_STATUSES:
                    self.upstream_requests.labels(upstream, method, status)
        for result in labels.GC_RESULTS:
            self.gc_runs.labels(result)

    def close(self) -> None:
        """This process is ending: its live gauges (in-flight requests, waiters) stop counting."""
        self.flush_requests()
        if self.enabled and multiprocess_mode():
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    # -- HTTP --

    # Recording a request costs a dict update; :meth:`flush_requests` writes the totals to the
    # samples (eight memory-mapped writes per request would cost more than a cached manifest GET).
    # The HTTP edge calls it once per event-loop turn, before anyone can scrape.

    def request_started(self) -> None:
        self._in_flight += 1

    def request_done(self, route: str, method: str, status: int, seconds: float, sent: int,
                     cache: str | None, sendfile: int = 0) -> None:
        """A request was answered: *sent* body bytes in all, *sendfile* of them by ``sendfile(2)``."""
        self._in_flight -= 1
        key = (route, method, status, cache)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
        pending.count += 1
        pending.sent += sent
        pending.sendfile += sendfile
        pending.seconds += seconds
        pending.buckets[bisect.bisect_left(labels.HTTP_BUCKETS, seconds)] += 1

    def flush_requests(self) -> None:
        """Write the requests recorded since the last call to the samples."""
        batch, self._pending = self._pending, {}
        if not self.enabled:
            return
        self.http_in_flight.set(self._in_flight)
        for (route, method, status, cache), pending in batch.items():
            method = method if method in labels.METHODS else "other"
            self.http_requests.labels(route, method, str(status)).inc(pending.count)
            duration = self.http_duration.labels(route, method)
            # Histogram.observe takes one value; these are its sum and buckets (+Inf last), added in bulk.
            duration._sum.inc(pending.seconds)
            for bucket, count in zip(duration._buckets, pending.buckets, strict=True):
                if count:
                    bucket.inc(count)
            if pending.sent:
                self.http_bytes.labels(route).inc(pending.sent)
            if pending.sendfile:
                self.http_sendfile_bytes.inc(pending.sendfile)
            if cache is not None and route in ("manifest", "blob"):
                outcome = cache.lower()
                self.cache_requests.labels(route, outcome).inc(pending.count)
                if pending.sent:
                    self.cache_bytes.labels(route, outcome).inc(pending.sent)

    def handed_out(self, outcome: str, size: int) -> None:
        """A stored blob of *size* bytes answered ``307`` to the bucket (``storage.s3.redirect``): served, unsent."""
        if self.enabled and size:
            self.cache_bytes.labels("blob", outcome.lower()).inc(size)

    def waiting(self, delta: int) -> None:
        """A request started (+1) or stopped (-1) following another request's fetch."""
        if self.enabled:
            self.coalesced_waiters.inc(delta)

    # -- upstream --

    def upstream_response(self, upstream: str, method: str, status: int | None, seconds: float,
                          headers: Mapping[str, str] | None = None) -> None:
        """One answer (or, with status None, none) from an upstream."""
        if not self.enabled:
            return
        self.upstream_requests.labels(upstream, method, str(status) if status else "error").inc()
        if status is None:
            return
        if status < 500 and status != 429:
            self.upstream_last_answer.labels(upstream).set(time.time())
        self.upstream_duration.labels(upstream, method).observe(seconds)
        if headers is not None:
            for header, gauge in (("ratelimit-remaining", self.ratelimit_remaining),
                                  ("ratelimit-limit", self.ratelimit_limit)):
                value = headers.get(header)  # e.g. "76;w=21600"
                if value and (m := _LEADING_INT.match(value)):
                    gauge.labels(upstream).set(int(m.group(1)))

    def upstream_error(self, upstream: str, reason: str) -> None:
        if self.enabled:
            self.upstream_errors.labels(upstream, reason).inc()
            self.upstream_last_error.labels(upstream, reason).set(time.time())

    def received(self, upstream: str, kind: str, size: int) -> None:
        if self.enabled and size:
            self.upstream_bytes.labels(upstream, kind).inc(size)

    # -- maintenance, uploads, preloads --

    def corrupt_object(self, _digest: object = None) -> None:
        """An object read from the store did not match its digest (and was removed)."""
        if self.enabled:
            self.corrupt_objects.inc()

    def gc_finished(self, *, seconds: float, bytes_freed: int, objects_removed: int, images_evicted: int) -> None:
        if not self.enabled:
            return
        self.gc_runs.labels("ok").inc()
        self.gc_duration.observe(seconds)
        self.gc_freed_bytes.inc(bytes_freed)
        self.gc_removed_objects.inc(objects_removed)
        self.evicted_images.inc(images_evicted)
        self.gc_last_run.set(time.time())

    def gc_failed(self) -> None:
        if self.enabled:
            self.gc_runs.labels("failed").inc()

    def upload_finished(self, size: int) -> None:
        if self.enabled:
            self.uploads.inc()
            self.upload_bytes.inc(size)

    def upload_failed(self) -> None:
        if self.enabled:
            self.upload_failures.inc()

    def mounted(self) -> None:
        if self.enabled:
            self.mounts.inc()

    def preload_finished(self, images: int, new_bytes: int) -> None:
        if self.enabled:
            self.preloads.inc()
            self.preload_images.inc(images)
            self.preload_bytes.inc(new_bytes)

    def preload_failed(self) -> None:
        if self.enabled:
            self.preload_failures.inc()


def exposition_registry(metrics: Metrics, extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """What a scrape reports: this process's metrics, or every worker's in multi-process mode, plus *extra*."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_mode():
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(metrics.registry)
    for collector in extra:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format (blocking: reads the workers' files; call from a thread)."""
    return generate_latest(registry)
