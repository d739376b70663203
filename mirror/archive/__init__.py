"""Image archives: reading tarballs and OCI layouts safely (``members``, ``readers``), preloading
them into the store as cached content (``plan``, ``preload``), exporting stored images as one
OCI archive (``export``), and the command-line side of both (``offline``).

May import: every layer below ``api``.
"""
