"""The upstream registry client: the ``/v2/`` read API over httpx (``client``), registry token
auth (``auth``), content codings (``codings``), paging (``paging``), its answers and its error
tree (``answers``, ``errors``).  Knows nothing of the cache.

May import: ``spec``, ``config``, ``observe``.
"""
