"""Keeping the store healthy while it serves: online garbage collection and LRU eviction within
the disk budget (``gc``), access times and the server's upkeep task that runs the collector
(``upkeep``), the marks in the index of objects this process serves or fills, for the collectors
of other hosts (``inuse``), the store's figures for ``/metrics`` (``figures``), ``mirror fsck``
(``fsck``), and ``mirror migrate``, which copies a store to other drivers (``migrate``; the
objects' passes in ``objectcopy``).

May import: ``spec``, ``config``, ``observe``, ``storage``, ``metadata``, ``upstream``.
"""
