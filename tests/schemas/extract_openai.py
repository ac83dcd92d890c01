"""Vendor the subset of OpenAI's OpenAPI spec the tests compare Conduit with.

The response schemas validate Conduit's answers (``tests/openai_schema.py``); the request
schemas are compared with Conduit's own OpenAPI document (``tests/unit/test_openai_agreement.py``).

Run by hand to refresh ``tests/schemas/openai.json`` (tests never read the upstream spec)::

    python tests/schemas/extract_openai.py /path/to/openai-openapi.json

The upstream spec lives in https://github.com/openai/openai-openapi (MIT). If a
``<spec>.SOURCE`` file sits next to the spec (``openai-openapi.SOURCE`` for
``openai-openapi.json``), its first line names the upstream commit and is copied into
``tests/schemas/SOURCE``; otherwise pass ``--source "TEXT"``.

The output is one JSON Schema (draft 2020-12) resource whose ``$defs`` hold the root
schemas below plus every schema they reference, transitively. OpenAPI's dialect is turned
into plain JSON Schema:

* ``nullable: true`` (an OpenAPI 3.0 keyword the 3.1 spec still uses) becomes
  ``anyOf: [<schema>, {"type": "null"}]``, which also covers enums and ``$ref`` siblings;
* ``discriminator`` is dropped (``oneOf`` alone decides), as are ``x-*`` extensions,
  ``example(s)``, ``deprecated``, ``description`` and formats JSON Schema does not define
  (``unixtime``);
* a schema with ``properties``/``required`` but no ``type`` or combinator is typed
  ``object``, as OpenAPI code generators read it (so ``null`` is not a valid ``Model``);
* ``#/components/schemas/X`` references become ``#/$defs/X``;
* draft 2019-09's ``$recursiveRef: "#"`` (with ``$recursiveAnchor: true`` on its component,
  ``CompoundFilter``'s filters of filters) becomes a plain ``$ref`` to that component: in the
  vendored resource ``#`` would be the whole document, and the spec's references never extend
  a recursive schema, so the dynamic scope would always resolve to the component itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOTS = (
    "CreateChatCompletionRequest",
    "CreateCompletionRequest",
    "CreateImageRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "ImagesResponse",
    "ImageGenStreamEvent",
    # POST /responses: the request, the answer, the streamed events (their union and the error event).
    "CreateResponse",
    "Response",
    "ResponseStreamEvent",
    "ResponseErrorEvent",
    # POST /responses/input_tokens: the request and the answer.
    "TokenCountsBody",
    "TokenCountsResource",
    # GET /responses/{response_id}/input_items: a stored response's input items.
    "ResponseItemList",
    # POST /embeddings: the request and the answer.
    "CreateEmbeddingRequest",
    "CreateEmbeddingResponse",
    # POST /images/edits (both forms, the stream's events) and /images/variations.
    "CreateImageEditRequest",
    "EditImageBodyJsonParam",
    "ImageEditStreamEvent",
    "CreateImageVariationRequest",
)

#: The id of the vendored resource; ``tests/openai_schema.py`` registers it under this URI.
SCHEMA_ID = "urn:conduit:openai-subset"

_OPENAPI_REF = "#/components/schemas/"

# Keywords whose value is one subschema, a list of subschemas, or a name -> subschema map.
_ONE = {"items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else",
        "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
_MANY = {"anyOf", "oneOf", "allOf", "prefixItems"}
_MAP = {"properties", "patternProperties", "dependentSchemas", "$defs"}
# Keywords kept as they are (values are data, not schemas).
_DATA = {"type", "enum", "const", "required", "default", "title", "minimum", "maximum", "exclusiveMinimum",
         "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern", "minItems", "maxItems",
         "uniqueItems", "minProperties", "maxProperties", "dependentRequired", "format"}
_DROPPED = {"description", "example", "examples", "deprecated", "discriminator", "nullable", "readOnly",
            "writeOnly", "externalDocs", "xml"}
# JSON Schema 2020-12's own formats; others (``unixtime``) are OpenAPI decorations.
_FORMATS = {"date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4",
            "ipv6", "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
            "relative-json-pointer", "regex"}


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def closure(schemas: dict[str, Any], roots: tuple[str, ...]) -> list[str]:
    """The roots and every component schema they reference, transitively (sorted)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in schemas:
            raise SystemExit(f"schema {name!r} is referenced but not in components.schemas")
        seen.add(name)
        for ref in _refs(schemas[name]):
            if not ref.startswith(_OPENAPI_REF):
                raise SystemExit(f"unsupported $ref {ref!r} in {name}")
            todo.append(ref[len(_OPENAPI_REF):])
    return sorted(seen)


def convert(node: Any, where: str) -> Any:
    """One OpenAPI schema object as a JSON Schema 2020-12 schema (``where``: its JSON pointer in the spec)."""
    if isinstance(node, bool):
        return node
    if not isinstance(node, dict):
        raise SystemExit(f"{where}: expected a schema object, got {type(node).__name__}")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-") or key in _DROPPED:
            continue
        if key == "$ref":
            out[key] = "#/$defs/" + value[len(_OPENAPI_REF):]
        elif key == "$recursiveAnchor" and value is True and where.count("/") == 3:
            continue
        elif key == "$recursiveRef" and value == "#":
            out["$ref"] = "#/$defs/" + where.split("/")[3]
        elif key in _ONE:
            out[key] = convert(value, f"{where}/{key}")
        elif key in _MANY:
            out[key] = [convert(v, f"{where}/{key}/{i}") for i, v in enumerate(value)]
        elif key in _MAP:
            out[key] = {name: convert(v, f"{where}/{key}/{name}") for name, v in value.items()}
        elif key == "format":
            if value in _FORMATS:
                out[key] = value
        elif key in _DATA:
            out[key] = value
        else:
            raise SystemExit(f"{where}: unknown keyword {key!r}; teach extract_openai.py what it means")
    if ("properties" in out or "required" in out) and not {"type", "anyOf", "oneOf", "allOf", "$ref"} & out.keys():
        out = {"type": "object", **out}
    if node.get("nullable") is True:
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def extract(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    names = closure(schemas, ROOTS)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "$comment": "Generated by tests/schemas/extract_openai.py from OpenAI's OpenAPI spec (MIT); see SOURCE. "
                    "Do not edit by hand.",
        "$defs": {name: convert(schemas[name], f"#/components/schemas/{name}") for name in names},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="OpenAI's openapi.json (or .yaml converted to JSON)")
    parser.add_argument("--source", help="upstream repo and commit, if no <spec>.SOURCE file is next to the spec")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write openai.json and SOURCE to (default: this script's folder)")
    args = parser.parse_args(argv)

    spec = json.loads(args.spec.read_text())
    source = args.source
    source_file = args.spec.with_suffix(".SOURCE")
    if source is None and source_file.exists():
        source = source_file.read_text().strip()
    if not source:
        parser.error(f"no {source_file.name} next to the spec; pass --source 'owner/repo file at commit SHA'")

    vendored = extract(spec)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openai.json").write_text(json.dumps(vendored, indent=1, sort_keys=False) + "\n")
    (args.out / "SOURCE").write_text(
        f"{source}\n"
        f"OpenAPI version: {spec.get('openapi')}; API version: {spec.get('info', {}).get('version')}\n"
        f"Upstream: https://github.com/openai/openai-openapi (MIT License, Copyright OpenAI)\n"
        f"Extracted: {', '.join(ROOTS)} and the schemas they reference ({len(vendored['$defs'])} in all)\n"
        f"Regenerate: python tests/schemas/extract_openai.py <openai-openapi.json>\n")
    print(f"wrote {len(vendored['$defs'])} schemas to {args.out / 'openai.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
