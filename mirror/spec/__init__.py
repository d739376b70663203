"""What the specifications define: the rules every other layer reads, with no state of its own.

Owns the OCI distribution-spec grammars (names, tags, digests, ranges; ``reference``), the
``/v2/`` endpoint grammar (``endpoints``), the spec's error codes (``errors``), manifest media
types and what a pushed manifest must be (``manifest``, ``pushed``, ``schema1``), image names as
Docker normalises them (``names``) and image platforms (``platforms``).

May import: the standard library and nothing else from ``mirror``.
"""
