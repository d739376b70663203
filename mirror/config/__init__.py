"""Configuration: the typed sections (``sections``), how a YAML file, ``MIRROR_*`` environment
variables and CLI flags become them (``load``), and the value parsers both use (``values``).

Validated once at start-up; every error names the key and the value.

May import: ``spec``.
"""
