"""The HTTP edge: the ``/v2/`` routes (parse, call a repository, render; ``routes``), blob
responses and the ASGI extensions they may use (``responses``, ``extensions``), who may do what
(``auth``, ``htpasswd``), manifests answered from memory (``memo``), the observability endpoints
and access logs (``observability``), the operator endpoints under ``/_mirror/`` (``admin``), and the
endpoint replicas call each other on (``cluster``).

May import: every layer below it; never ``server``.
"""
