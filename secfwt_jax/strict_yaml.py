"""YAML and JSON that refuse a key given twice in one mapping.

PyYAML and `json` keep the last of two equal keys, so a second `tuning:` section silently
replaces the first one whole. Run specs and cluster files are read here instead, and a
repeated key is one line naming the key and both places.
"""

from __future__ import annotations

import json
from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    """A mapping names one key twice (the message names the key and both lines)."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise DuplicateKeyError(
                    f"key {key!r} given twice (lines {first_line[key]} and {line}); "
                    "YAML would keep only the second"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping
)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, but a key repeated in one mapping raises `DuplicateKeyError`."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _pairs_without_repeats(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(f"key {key!r} given twice in one object; JSON would keep only the second")  # fmt: skip
        seen[key] = value
    return seen


def load_json(text: str) -> Any:
    """`json.loads`, but a key repeated in one object raises `DuplicateKeyError`."""
    return json.loads(text, object_pairs_hook=_pairs_without_repeats)
