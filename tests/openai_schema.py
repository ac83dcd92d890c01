"""Validate objects against OpenAI's own response schemas (vendored in ``tests/schemas``).

``tests/schemas/openai.json`` is generated from OpenAI's OpenAPI spec by
``tests/schemas/extract_openai.py``; see ``tests/schemas/SOURCE`` for the upstream commit.
Validation is as strict as the spec: extra properties pass where the spec allows them, but
a ``null`` where the spec has an array, object or non-nullable string fails.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "openai.json"

#: Not in the spec: ``CreateCompletionResponse`` as OpenAI actually streams it (see below).
COMPLETION_CHUNK = "CompletionChunk"


@functools.cache
def _document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    Draft202012Validator.check_schema(doc)
    doc["$defs"][COMPLETION_CHUNK] = _completion_chunk(doc["$defs"]["CreateCompletionResponse"])
    return doc


def _completion_chunk(full: dict[str, Any]) -> dict[str, Any]:
    """``CreateCompletionResponse`` loosened for streamed chunks, and only where OpenAI's stream differs.

    The spec says streamed and non-streamed completions "share the same shape", but OpenAI's
    stream sends ``finish_reason: null`` on every chunk before a choice ends (the schema's
    enum is not nullable), and with ``stream_options.include_usage`` every chunk but the
    last carries ``usage: null``, as the spec's own ``ChatCompletionStreamOptions`` (which
    the completion request uses too) describes. Any other value still has to match the
    spec: an ``"abort"`` finish reason or a ``null`` ``logprobs.tokens`` still fails.
    """
    chunk = copy.deepcopy(full)
    props = chunk["properties"]
    choice = props["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    props["usage"] = {"anyOf": [props["usage"], {"type": "null"}]}
    return chunk


@functools.cache
def _validator(schema_name: str) -> Draft202012Validator:
    doc = _document()
    if schema_name not in doc["$defs"]:
        raise KeyError(f"no schema {schema_name!r} in {SCHEMA_FILE.name}; have: {', '.join(sorted(doc['$defs']))}")
    registry: Registry[Any] = Registry().with_resource(doc["$id"], Resource.from_contents(doc))
    return Draft202012Validator({"$ref": f"{doc['$id']}#/$defs/{schema_name}"}, registry=registry)


def _describe(error: ValidationError, indent: str = "  ") -> list[str]:
    lines = [f"{indent}{error.json_path}: {error.message}"]
    # anyOf/oneOf failures say only "not valid under any"; their branches say why.
    for sub in sorted(error.context or (), key=lambda e: (list(e.relative_schema_path), e.json_path)):
        lines += _describe(sub, indent + "    ")
    return lines


def validate(schema_name: str, obj: Any) -> None:
    """Raise ``AssertionError`` listing every way ``obj`` violates OpenAI's ``schema_name``."""
    errors = sorted(_validator(schema_name).iter_errors(obj), key=lambda e: (e.json_path, e.message))
    if errors:
        lines = [f"{len(errors)} violation(s) of OpenAI's {schema_name}:"]
        for error in errors:
            lines += _describe(error)
        lines.append(f"object: {json.dumps(obj)[:2000]}")
        raise AssertionError("\n".join(lines))


def validate_completion_chunk(obj: Any) -> None:
    """Validate a streamed ``text_completion`` chunk (see :func:`_completion_chunk` for the leeway)."""
    validate(COMPLETION_CHUNK, obj)
