"""Blob storage: the content-addressed store and the way content gets into it.

Owns the blob-store driver interface (``driver``), its filesystem driver (``filesystem``) and its S3
driver (``s3``, with ``s3objects``: one object's reader and writer, ``s3reads``: a GET's body read
ahead in a thread, and ``s3fill``: a fill sent to
the bucket as it grows; ``s3damage``: objects found damaged in the bucket; ``s3notes``: the uploads
a dead writer left, for the start-up sweep; ``s3uploads``: push uploads sent in parts as they run),
the checks every driver makes before content is visible under a digest (``verify``), the one place
that opens the configured driver (``opening``), the one description of the data directory's layout
(``layout``), reads of stored files (``reads``), the marks of objects being read (``marks``), fills
that several readers follow while one fetch writes (``fill``, ``batches``, ``growing``, ``bypass`` when the store
has no room), staging files (``staging``), and the record of writes the filesystem refused and the
probe of writes (``refusals``).
Knows nothing of HTTP, repositories or tags.

May import: ``spec``, ``config``, ``observe``.
"""
