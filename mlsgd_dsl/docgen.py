"""The key reference of hierarchy files, generated from the pydantic schema.

``docs/hierarchy-file.md`` embeds :func:`reference_markdown` between two marker comments;
``mlsgd-dsl schema --markdown`` prints it and a test fails when the page and the schema
disagree, so the page cannot drift.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from .schema import Hierarchy

BEGIN = "<!-- BEGIN GENERATED KEY REFERENCE (mlsgd-dsl schema --markdown) -->"
END = "<!-- END GENERATED KEY REFERENCE -->"


def _type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in prop:
        return "table"
    if "anyOf" in prop:
        kinds = [_type(p, defs) for p in prop["anyOf"]]
        return " or ".join(dict.fromkeys(k for k in kinds if k != "null")) + (
            " or null" if "null" in kinds else "")
    kind = prop.get("type")
    if "enum" in prop:
        return " \\| ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if kind == "array":
        items = prop.get("items") or {}
        if "prefixItems" in prop:
            return "array"
        return f"array of {_type(items, defs)}" if items else "array"
    if kind == "object":
        extra = prop.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            return f"table of {_type(extra, defs)}"
        return "table"
    return {"integer": "integer", "number": "number", "string": "string",
            "boolean": "boolean", "null": "null"}.get(kind, "any")


def _bounds(prop: dict[str, Any]) -> str:
    parts = []
    for key, sym in (("exclusiveMinimum", ">"), ("minimum", ">="), ("exclusiveMaximum", "<"),
                     ("maximum", "<=")):
        if key in prop:
            parts.append(f"{sym} {prop[key]:g}" if isinstance(prop[key], float)
                         else f"{sym} {prop[key]}")
    if "pattern" in prop:
        parts.append(f"matches `{prop['pattern']}`")
    for alt in prop.get("anyOf", []):
        sub = _bounds(alt)
        if sub and sub not in parts:
            parts.append(sub)
    return ", ".join(parts)


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in prop:
        return "see below" if _refs(prop) else "empty"
    return f"`{json.dumps(prop['default'])}`"


def _refs(prop: dict[str, Any]) -> list[str]:
    out = []
    if "$ref" in prop:
        out.append(prop["$ref"].rsplit("/", 1)[-1])
    for key in ("anyOf", "oneOf", "allOf"):
        for alt in prop.get(key, []):
            out.extend(_refs(alt))
    for key in ("items", "additionalProperties"):
        if isinstance(prop.get(key), dict):
            out.extend(_refs(prop[key]))
    return out


def _table(title: str, schema: dict[str, Any], defs: dict[str, Any],
           queue: list[tuple[str, str]]) -> list[str]:
    lines = [f"### `{title}`", ""]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    if schema.get("additionalProperties") is True:
        lines += ["Keys other than those below are the named plugin's options (validated by "
                  "the plugin's own model; `mlsgd-dsl plugins` lists what is installed).", ""]
    lines += ["| key | type | default | constraints | description |",
              "| --- | --- | --- | --- | --- |"]
    required = set(schema.get("required", []))
    for key, prop in schema.get("properties", {}).items():
        desc = " ".join(prop.get("description", "").split()).replace("|", "\\|")
        lines.append(f"| `{key}` | {_type(prop, defs)} | {_default(prop, key in required)} | "
                     f"{_bounds(prop)} | {desc} |")
        for ref in _refs(prop):
            suffix = "[level]" if key == "levels" else ("[]" if key in ("edges", "coarsen")
                                                         else "")
            suffix = "[pattern]" if key == "rules" else suffix
            queue.append((f"{title}.{key}{suffix}" if title != "(top level)" else
                          f"{key}{suffix}", ref))
    return lines + [""]


def reference_markdown() -> str:
    schema = Hierarchy.model_json_schema()
    defs = schema.get("$defs", {})
    queue: list[tuple[str, str]] = []
    lines = _table("(top level)", schema, defs, queue)
    seen: set[str] = set()
    while queue:
        title, ref = queue.pop(0)
        if ref in seen:
            continue
        seen.add(ref)
        lines += _table(title, defs[ref], defs, queue)
    return "\n".join(lines).rstrip() + "\n"


def embed(page: str) -> str:
    """Return ``page`` with the generated reference between the markers replaced."""
    start, end = page.index(BEGIN) + len(BEGIN), page.index(END)
    return page[:start] + "\n\n" + reference_markdown() + "\n" + page[end:]


def options_markdown(models: dict[str, type[BaseModel]]) -> str:
    """Option tables of plugin records (architectures, rules, ...) by name."""
    lines: list[str] = []
    for name, model in sorted(models.items()):
        schema = model.model_json_schema()
        lines += _table(name, schema, schema.get("$defs", {}), [])
    return "\n".join(lines)
