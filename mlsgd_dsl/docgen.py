"""The key reference of hierarchy files, generated from the pydantic schema.

``docs/hierarchy-file.md`` embeds :func:`reference_markdown` (the core keys) and
:func:`builtin_options_markdown` (the options of every built-in family, rule, strategy, data
source and coarsening) between marker comments; ``mlsgd-dsl schema --markdown`` prints both
and a test fails when the page and the models disagree, so the page cannot drift.
``mlsgd-dsl plugins --verbose`` prints the same tables, as text, for every installed plugin
(:func:`options_text`).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from .schema import Hierarchy

BEGIN = "<!-- BEGIN GENERATED KEY REFERENCE (mlsgd-dsl schema --markdown) -->"
END = "<!-- END GENERATED KEY REFERENCE -->"
OPTIONS_BEGIN = "<!-- BEGIN GENERATED BUILT-IN OPTIONS (mlsgd-dsl schema --markdown) -->"
OPTIONS_END = "<!-- END GENERATED BUILT-IN OPTIONS -->"

#: registry kind -> (heading, the key of the file that names the record)
KIND_KEYS = {
    "architectures": ("Architecture families", "model.family"),
    "transfer rules": ("Transfer rules", "rule"),
    "corrections": ("Correction strategies", "mlsgd.correction.strategy"),
    "data sources": ("Data sources", "data.source (options in data.options)"),
    "coarsenings": ("Data coarsenings", "levels.NAME.data.coarsen[].method"),
}


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


def _replace_between(page: str, begin: str, end: str, body: str) -> str:
    start, stop = page.index(begin) + len(begin), page.index(end)
    return page[:start] + "\n\n" + body + "\n" + page[stop:]


def embed(page: str) -> str:
    """Return ``page`` with the generated reference(s) between the markers replaced."""
    page = _replace_between(page, BEGIN, END, reference_markdown())
    if OPTIONS_BEGIN in page:
        page = _replace_between(page, OPTIONS_BEGIN, OPTIONS_END, builtin_options_markdown())
    return page


def _option_rows(model: type[BaseModel]) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, constraints, description) of each option of a plugin model."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    return [(key, _type(prop, defs), _default(prop, key in required), _bounds(prop),
             " ".join(prop.get("description", "").split()))
            for key, prop in schema.get("properties", {}).items()]


def builtin_options_markdown() -> str:
    """Every built-in record's options, one table per name, grouped by kind."""
    from .registry import build_registry

    reg = build_registry(autoload=False)
    lines: list[str] = []
    for kind, (heading, key) in KIND_KEYS.items():
        lines += [f"### {heading} (`{key}`)", ""]
        for name in reg.names(kind):
            record = reg.items[kind][name].record
            lines += [f"#### `{name}`", ""]
            if record.description:
                lines += [" ".join(record.description.split()), ""]
            rows = _option_rows(record.options)
            if not rows:
                lines += ["No options.", ""]
                continue
            lines += ["| option | type | default | constraints | description |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [f"| `{k}` | {t} | {d} | {b} | {desc.replace('|', chr(92) + '|')} |"
                      for k, t, d, b, desc in rows]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def options_text(record: object, indent: str = "") -> str:
    """A record's description and options as plain text (``mlsgd-dsl plugins --verbose``)."""
    name = getattr(record, "name", "?")
    description = " ".join(str(getattr(record, "description", "") or "").split())
    lines = [f"{indent}{name}" + (f": {description}" if description else "")]
    model = getattr(record, "options", None)
    rows = _option_rows(model) if isinstance(model, type) and issubclass(model, BaseModel) \
        else []
    if not rows and model is not None:
        lines.append(f"{indent}    (no options)")
    for key, kind, default, bounds, desc in rows:
        kind = kind.replace("\\|", "|")
        default = default.strip("`")
        facts = ", ".join(x for x in (kind, f"default {default}" if default not in
                                      ("required", "empty") else default, bounds) if x)
        lines.append(f"{indent}    {key} ({facts})" + (f": {desc}" if desc else ""))
    return "\n".join(lines) + "\n"
