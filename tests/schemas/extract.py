"""Extracts schemas from the official OpenAI OpenAPI spec into a JSON Schema `$defs` file.

    python tests/schemas/extract.py SPEC.yaml OUT.json Name [Name ...]

Takes each named component schema and everything it references, drops descriptions and
examples, and rewrites OpenAPI's `nullable: true` as JSON Schema (`type` or `anyOf` with null).
How tests/schemas/openai_responses.json was made (the spec is read by hand, never by the suite).
"""

import json
import sys
from pathlib import Path
from typing import Any

import yaml

_DROP = {"description", "example", "examples", "title", "x-stainless-const", "x-oaiMeta", "deprecated"}
_REF = "#/components/schemas/"


def _clean(node: Any, found: set[str], owner: str) -> Any:
    if isinstance(node, list):
        return [_clean(item, found, owner) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key.startswith("x-"):
            continue
        if key == "$recursiveAnchor":  # draft 2019-09; its one use refers to the schema itself
            continue
        if key == "$recursiveRef":
            out["$ref"] = f"#/$defs/{owner}"
        elif key == "$ref":
            name = value.removeprefix(_REF)
            found.add(name)
            out["$ref"] = f"#/$defs/{name}"
        elif key == "properties":  # property names are data, not keywords
            out[key] = {name: _clean(schema, found, owner) for name, schema in value.items()}
        else:
            out[key] = _clean(value, found, owner)
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str) and "enum" not in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def main() -> None:
    spec_path, out_path, *names = sys.argv[1:]
    spec = yaml.load(Path(spec_path).read_text(), Loader=yaml.CSafeLoader)
    schemas = spec["components"]["schemas"]
    defs: dict[str, Any] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in defs:
            continue
        found: set[str] = set()
        defs[name] = _clean(schemas[name], found, name)
        todo.extend(found - defs.keys())
    version = spec["info"]["version"]
    document = {
        "$comment": f"Extracted from the official OpenAI OpenAPI spec {version} by tests/schemas/extract.py: "
        + ", ".join(names)
        + " and what they reference, descriptions dropped, `nullable` rewritten as JSON Schema.",
        "$defs": dict(sorted(defs.items())),
    }
    Path(out_path).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
