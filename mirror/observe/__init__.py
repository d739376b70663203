"""Instrumentation every layer records into: the process's Prometheus metrics on its own
registry and their exposition across workers (``metrics``) and those of the replicas' shared fills
(``cluster``), and the progress protocol of long commands (``progress``).

May import: ``spec``, ``config``.  Collectors that read the store or the index live with what
they read (``maintenance/figures.py``); the HTTP endpoints that expose them live in ``api``.
"""
