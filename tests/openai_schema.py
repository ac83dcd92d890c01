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

#: ``POST /responses``: the answer, and the union of the events its stream sends (``error`` among them).
RESPONSE = "Response"
RESPONSE_EVENT = "ResponseStreamEvent"
#: ``POST /responses/input_tokens``' answer.
INPUT_TOKENS = "TokenCountsResource"
#: ``POST /embeddings``' answer as the spec has it (float vectors), and as OpenAI answers either
#: ``encoding_format`` (not in the spec: below).
EMBEDDINGS = "CreateEmbeddingResponse"
EMBEDDINGS_ANY = "CreateEmbeddingResponseAnyEncoding"
#: The events after which a response stream sends nothing more.
RESPONSE_STREAM_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})


@functools.cache
def _document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    Draft202012Validator.check_schema(doc)
    doc["$defs"][COMPLETION_CHUNK] = _completion_chunk(doc["$defs"]["CreateCompletionResponse"])
    doc["$defs"][EMBEDDINGS_ANY] = _any_encoding(doc["$defs"])
    return doc


def _any_encoding(defs: dict[str, Any]) -> dict[str, Any]:
    """``CreateEmbeddingResponse`` as OpenAI answers either ``encoding_format``: the spec's ``Embedding``
    says an array of numbers only, yet for ``base64`` the API (and the SDK, which asks for base64 by
    default and decodes it) sends each vector as a base64 string. Only ``embedding`` changes: every
    other field still has to match the spec."""
    answer = copy.deepcopy(defs[EMBEDDINGS])
    item = copy.deepcopy(defs["Embedding"])
    item["properties"]["embedding"] = {"anyOf": [item["properties"]["embedding"],
                                                 {"type": "string", "contentEncoding": "base64"}]}
    answer["properties"]["data"]["items"] = item
    return answer


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


@functools.cache
def response_event_schemas() -> dict[str, str]:
    """Each ``type`` a ``ResponseStreamEvent`` may have, and the member of the union that has it."""
    defs = _document()["$defs"]
    out: dict[str, str] = {}
    for member in defs[RESPONSE_EVENT]["anyOf"]:
        name = member["$ref"].removeprefix("#/$defs/")
        types = defs[name]["properties"]["type"]["enum"]
        if len(types) != 1 or types[0] in out:
            raise ValueError(f"{name}: a stream event's type must name it alone, got {types}")
        out[types[0]] = name
    return out


def validate_embeddings(obj: Any, *, base64: bool = False) -> None:
    """Validate ``POST /embeddings``' answer: the spec's, or with ``base64`` each vector a base64 string."""
    if not base64:
        validate(EMBEDDINGS, obj)
        return
    validate(EMBEDDINGS_ANY, obj)
    if not all(isinstance(item["embedding"], str) for item in obj["data"]):
        raise AssertionError("a base64 answer's vectors must be base64 strings")


def validate_response(obj: Any) -> None:
    """Validate a ``Response`` object (the answer of ``POST /responses``, or one a stream event carries)."""
    validate(RESPONSE, obj)


def validate_response_event(obj: Any) -> None:
    """Validate one streamed event against the member of ``ResponseStreamEvent`` its ``type`` names.

    The union is an ``anyOf`` of 58 members: checked against all of them, a wrong field would be
    reported 58 times over; checked against its own member, once. A ``type`` the union lacks fails.
    """
    kind = obj.get("type") if isinstance(obj, dict) else None
    events = response_event_schemas()
    if kind not in events:
        raise AssertionError(f"{kind!r} is not the type of any of OpenAI's {RESPONSE_EVENT}s: {json.dumps(obj)[:500]}")
    validate(events[kind], obj)


def validate_response_stream(events: list[Any]) -> None:
    """Validate a whole response stream: each event, and the order OpenAI's streams keep.

    It opens with ``response.created``, ends with its only terminal event (completed, incomplete,
    failed or ``error``), and its sequence numbers count up by one. One leeway: an ``error`` event
    may come just before ``response.failed``. A stream that fails after its 200 sends both, since
    clients read one or the other: the Codex CLI reads ``response.failed`` and takes a bare
    ``error`` for a dropped stream; other clients stop at the ``error``.
    """
    if not events:
        raise AssertionError("an empty response stream")
    for event in events:
        validate_response_event(event)
    kinds = [event["type"] for event in events]
    numbers = [event["sequence_number"] for event in events]
    if kinds[0] != "response.created":
        raise AssertionError(f"a response stream opens with response.created, not {kinds[0]}: {kinds}")
    ends = [i for i, kind in enumerate(kinds) if kind in RESPONSE_STREAM_ENDS]
    if kinds[-2:] == ["error", "response.failed"]:
        ends = ends[1:]
    if ends != [len(kinds) - 1]:
        raise AssertionError(f"a response stream ends with its one terminal event: {kinds}")
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise AssertionError(f"sequence numbers must count up by one: {numbers}")


def validate_input_tokens(obj: Any) -> None:
    """Validate the answer of ``POST /responses/input_tokens``."""
    validate(INPUT_TOKENS, obj)
