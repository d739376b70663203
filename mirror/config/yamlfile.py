"""Reading a configuration file's YAML: safe types only, and no key written twice.

PyYAML keeps the last of two equal keys of a mapping; the YAML spec (1.2, section 3.2.1.1) says a
mapping's keys are unique.  A section written twice (a second ``storage:`` block holding only
``path:``) would silently replace the first, and its settings (the S3 bucket) be ignored: here it is
an error, with the line of each.  Keys a merge (``<<: *base``) brings in may be written again: that
is what a merge is for.

May import: the standard library and PyYAML.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml

_MERGE = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Hashable, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class says what is wrong with it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"the key {key} is written twice (first at line {seen[key].line + 1}): write it once",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """The document *text* holds, as ``yaml.safe_load`` reads it; ``yaml.YAMLError`` (a
    ``MarkedYAMLError`` whose problem names the key) if a mapping has a key twice."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
