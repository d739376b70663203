"""The web UI under ``/ui/``: server-rendered pages of the repositories (``listing``), their tags
and images (``images``; a cached repository's tags that only its upstream lists: ``listed``), and
the cache's figures (``figures``) with a chart of the last hours (``history``, ``chart``), from the
same objects the API and ``/metrics`` use, with Jinja2 templates and a small stylesheet and script
shipped in the package (``pages``; nothing is loaded from another host).  Who may see what is the API's rule
(:meth:`~mirror.config.sections.AuthConfig.may_pull`, the user from ``api/auth.py``); users who may
write (:meth:`~mirror.config.sections.AuthConfig.may_write`) also delete, pin and prefetch
(``actions``, ``prefetch``).

May import: every layer below it, ``api`` included; never ``server``.
"""
