"""What a ``POST /v1/responses`` request can ask for, read from OpenAI's ``CreateResponse``, and its table.

Every thing a client can set is one key of ``gateway.responses.fields.FIELDS``, which decides it
(honoured, ignored or refused). This module derives the keys from the vendored spec
(``tests/schemas/openai.json``), so a newer spec's new field is a failing test
(``tests/unit/test_responses_fields.py``), not a field silently dropped, and renders the
decisions as ``openapi/responses-fields.md``::

    python -m tests.responses_fields           # exit 1 if the checked-in table is stale
    python -m tests.responses_fields --write   # write openapi/responses-fields.md

The keys, by what they decide:

* ``model``: a top-level property, as a whole;
* ``background=true``: one value of a top-level property that is a boolean or an enum (the
  property itself is then decided value by value, not as a whole);
* ``reasoning.effort``: a field of an object-valued top-level property (of its items, for an
  array of objects: ``context_management.type``);
* ``tools[type=web_search]``, ``tool_choice[type=function]``, ``input[type=reasoning]``,
  ``text.format[type=json_schema]``: one member of a union, by its ``type``;
  ``tool_choice=auto``: a union's plain string member; ``include=reasoning.encrypted_content``:
  one value of an array of enums;
* ``input.content[type=input_image]``: a content part of an input message;
  ``input.output[type=input_text]``: a part of a function call's output;
* ``tools[type=function].strict``: a field of one of the members the gateway honours
  (``VARIANT_FIELDS``): a client that sets it expects it to mean something.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.responses.fields import FIELDS, Outcome

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "tests" / "schemas"
CHECKED_IN = ROOT / "openapi" / "responses-fields.md"
REGENERATE = "python -m tests.responses_fields --write"
REQUEST = "CreateResponse"

#: The members whose own fields are decided one by one: those the gateway honours.
VARIANT_FIELDS = ("tools[type=function]", "input[type=message]", "input[type=function_call]",
                  "input[type=function_call_output]", "input.content[type=input_text]",
                  "input.content[type=input_image]")
#: The property of an input item that holds its parts: a message's content, a function call's output.
PARTS = {"message": "content", "function_call_output": "output"}

# Groups of the table, in its order (by the first thing of each key).
TOP, VALUE, NESTED, TOOL, CHOICE, ITEM, PART, INCLUDE, FORMAT = (
    "Top-level properties", "Values of top-level properties", "Fields of object-valued properties",
    "Tools, by type", "tool_choice", "Input items, by type", "Content parts, by type", "include values",
    "text.format, by type")
GROUPS = (TOP, VALUE, NESTED, FORMAT, TOOL, CHOICE, INCLUDE, ITEM, PART)

Schema = dict[str, Any]


@functools.cache
def _defs() -> dict[str, Schema]:
    defs: dict[str, Schema] = json.loads((SCHEMAS / "openai.json").read_text())["$defs"]
    return defs


def spec_commit() -> str:
    """The first line of ``tests/schemas/SOURCE``: the upstream repository, file and commit."""
    return (SCHEMAS / "SOURCE").read_text().splitlines()[0]


def _resolve(schema: Schema) -> Schema:
    while "$ref" in schema:
        schema = _defs()[schema["$ref"].removeprefix("#/$defs/")]
    return schema


def _alternatives(schema: Schema) -> list[Schema]:
    """A schema's non-null alternatives, resolved, unions flattened (an object's own ``oneOf`` too)."""
    schema = _resolve(schema)
    union = schema.get("anyOf", schema.get("oneOf"))
    if union is None:
        return [] if schema.get("type") == "null" else [schema]
    out = [alt for branch in union for alt in _alternatives(branch)]
    return out if "properties" not in schema else [schema, *out]


def _properties(schema: Schema) -> dict[str, Schema]:
    """An object schema's properties, its ``allOf`` parts' merged in."""
    schema = _resolve(schema)
    out: dict[str, Schema] = {}
    for part in schema.get("allOf", ()):
        out.update(_properties(part))
    out.update(schema.get("properties", {}))
    return out


def _enum(schema: Schema) -> list[Any]:
    """The values an enum-or-null schema allows (empty if it allows a free string too)."""
    alts = _alternatives(schema)
    if any("enum" not in alt for alt in alts):
        return []
    return [value for alt in alts for value in alt["enum"]]


def _items(schema: Schema) -> list[Schema]:
    """What the arrays among a schema's alternatives hold, flattened."""
    return [item for alt in _alternatives(schema) if alt.get("type") == "array" for item in _alternatives(alt["items"])]


def _members(schema: Schema) -> Iterator[tuple[str, Schema]]:
    """A union's object members by their ``type`` value (one member may list several)."""
    for alt in _alternatives(schema):
        kind = _properties(alt).get("type")
        if kind is not None:
            for value in _enum(kind):
                yield value, alt


def things() -> dict[str, str]:
    """Every decidable thing of ``CreateResponse``, each with its group, in the spec's order."""
    out: dict[str, str] = {}
    variants: dict[str, list[Schema]] = {}

    def variant(key: str, group: str, schema: Schema) -> None:
        out[key] = group
        variants.setdefault(key, []).append(schema)

    request = _properties(_defs()[REQUEST])
    for name, schema in request.items():
        alts = _alternatives(schema)
        if [alt.get("type") for alt in alts] == ["boolean"]:
            out.update({f"{name}=true": VALUE, f"{name}=false": VALUE})
        elif (values := _enum(schema)) and name != "include":
            out.update({f"{name}={value}": VALUE for value in values})
        else:
            out[name] = TOP
        if name in {"input", "tools", "tool_choice"}:
            continue
        objects = [alt for alt in [*alts, *_items(schema)] if _properties(alt)]
        if len(objects) == 1:
            out.update({f"{name}.{field}": NESTED for field in _properties(objects[0])})
    for kind, schema in _members(_properties(request["text"])["format"]):
        variant(f"text.format[type={kind}]", FORMAT, schema)
    for kind, schema in _members({"anyOf": _items(request["tools"])}):
        variant(f"tools[type={kind}]", TOOL, schema)
    for alt in _alternatives(request["tool_choice"]):
        out.update({f"tool_choice={value}": CHOICE for value in alt.get("enum", ())})
    for kind, schema in _members(request["tool_choice"]):
        variant(f"tool_choice[type={kind}]", CHOICE, schema)
    out.update({f"include={value}": INCLUDE for item in _items(request["include"]) for value in item["enum"]})
    for kind, schema in _members({"anyOf": _items(request["input"])}):
        variant(f"input[type={kind}]", ITEM, schema)
        if kind in PARTS and PARTS[kind] in _properties(schema):
            parts = _properties(schema)[PARTS[kind]]
            for part, part_schema in _members({"anyOf": _items(parts)}):
                variant(f"input.{PARTS[kind]}[type={part}]", PART, part_schema)
    ordered: dict[str, str] = {}
    for key, group in out.items():  # a member's fields right after it
        ordered[key] = group
        if key in VARIANT_FIELDS:
            for schema in variants[key]:
                ordered.update({f"{key}.{field}": group for field in _properties(schema) if field != "type"})
    return ordered


def undecided(fields: dict[str, Any]) -> list[str]:
    """What the spec lets a client ask for that ``fields`` does not decide."""
    return [thing for thing in things() if thing not in fields]


def unknown(fields: dict[str, Any]) -> list[str]:
    """What ``fields`` decides that the spec does not have (a typo, or a field OpenAI dropped)."""
    spec = things()
    return [thing for thing in fields if thing not in spec]


def render(fields: dict[str, tuple[Outcome, str]] = FIELDS) -> str:
    """``openapi/responses-fields.md``: the decisions, grouped, in the spec's order."""
    lines = [
        "# `POST /v1/responses`: what each request field does",
        "",
        f"Generated by `{REGENERATE}` from `gateway/responses/fields.py` and OpenAI's `{REQUEST}`",
        f"({spec_commit()}); do not edit by hand.",
        "",
        "- **honoured**: done as OpenAI documents it;",
        "- **ignored**: accepted, and nothing is done with it (the reason says why that is harmless);",
        "- **refused**: a 400 `invalid_request_error` whose `param` names it.",
        "",
        "A `null` is the same as leaving a field out.",
    ]
    found = things()
    for group in GROUPS:
        rows = [thing for thing, where in found.items() if where == group]
        if not rows:
            continue
        lines += ["", f"## {group}", "", "| thing | outcome | what happens |", "|---|---|---|"]
        for thing in rows:
            outcome, reason = fields.get(thing, (None, "(not decided)"))
            lines.append(f"| `{thing}` | {outcome or '**undecided**'} | {reason.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write openapi/responses-fields.md")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        CHECKED_IN.write_text(text)
        print(f"wrote {CHECKED_IN}", file=sys.stderr)
        return 0
    if not CHECKED_IN.exists() or CHECKED_IN.read_text() != text:
        print(f"{CHECKED_IN} is stale; regenerate it: {REGENERATE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
