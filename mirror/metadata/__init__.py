"""The index: what the stored bytes mean (tags, links, manifests, referrers, uploads, pins,
access times, usage, leases, the generation that invalidates memos).

Owns the metadata driver interface (``driver``) and its drivers: ``diskcache``, and ``postgres``
(with its schema, ``pgschema``, and its memory of answers, ``pgremembered``), each listing every record a
page at a time through ``scans`` (the kinds of record: ``records``); the one place that opens the
configured driver (``opening``); copying one index into another (``transfer``); and which running
mirror holds an upload record's local file (``holders``).

May import: ``spec``, ``config``, ``observe``, ``storage`` (for the layout of the data directory).
"""
