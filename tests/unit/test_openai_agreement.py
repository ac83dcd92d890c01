"""Conduit's OpenAPI document agrees with OpenAI's on the endpoints both have.

OpenAI's schemas are vendored in ``tests/schemas/openai.json`` (``extract_openai.py``, see
``SOURCE``); Conduit's are ``openapi/openapi.json``, generated from the code. Compared
structurally (``tests/schema_compare.py``):

* requests: every value OpenAI's request schema allows, Conduit's accepts, or it is one of the
  differences listed below with the reason; OpenAI's fields Conduit does not name are passed to
  the engine unvalidated, and listed too;
* responses: every answer Conduit's schema allows, OpenAI's accepts (every property OpenAI
  requires is required in Conduit's, with a compatible type);
* every property OpenAI does not define is marked ``x-conduit-extension``, and no other.

A new difference fails until it is fixed or listed here with its reason; so does a listed
difference that no longer exists.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gateway import openapi
from tests import openai_schema
from tests.schema_compare import Document, compare, property_names

OURS = Document(json.loads(openapi.document_bytes())["components"]["schemas"], "#/components/schemas/")
THEIRS = Document(openai_schema._document()["$defs"], "#/$defs/")

_CUSTOM_TOOLS = ("custom tools: no engine runs them (vLLM's tools are functions); a 400 naming the field, as for "
                 "any value the schema refuses")

#: OpenAI request schema -> (Conduit's, {difference: why Conduit refuses what OpenAI's schema allows}).
REQUESTS: dict[str, tuple[str, dict[str, str]]] = {
    "CreateChatCompletionRequest": ("ChatCompletionRequest", {
        "logit_bias.{}: range": "OpenAI documents biases from -100 to 100 (and refuses others); the schema says so",
        "max_completion_tokens: range": "at least 1, as OpenAI's API answers (its schema has no bound)",
        "max_tokens: range": "at least 1, as OpenAI's API answers (its schema has no bound)",
        "messages[]<ChatCompletionRequestAssistantMessage>.tool_calls[]<ChatCompletionMessageCustomToolCall>"
        ".function: required": _CUSTOM_TOOLS,
        "messages[]<ChatCompletionRequestAssistantMessage>.tool_calls[]<ChatCompletionMessageCustomToolCall>"
        ".type: enum": _CUSTOM_TOOLS,
        "messages[]<ChatCompletionRequestFunctionMessage>.role: enum": "the deprecated `function` role: vLLM's chat "
                                                                       "templates know `tool` messages only",
        "messages[]<ChatCompletionRequestUserMessage>.content[]<ChatCompletionRequestMessageContentPartAudio>"
        ".text: required": "audio input: no engine takes audio",
        "messages[]<ChatCompletionRequestUserMessage>.content[]<ChatCompletionRequestMessageContentPartAudio>"
        ".type: enum": "audio input: no engine takes audio",
        "messages[]<ChatCompletionRequestUserMessage>.content[]<ChatCompletionRequestMessageContentPartFile>"
        ".text: required": "file input: no engine reads files",
        "messages[]<ChatCompletionRequestUserMessage>.content[]<ChatCompletionRequestMessageContentPartFile>"
        ".type: enum": "file input: no engine reads files",
        "response_format<ResponseFormatJsonSchema>.json_schema.name: pattern": "OpenAI documents the name's "
                                                                               "characters and length; enforced",
        "tool_choice<ChatCompletionAllowedToolsChoice>.function: required": "`allowed_tools`: vLLM has no such "
                                                                           "tool choice",
        "tool_choice<ChatCompletionAllowedToolsChoice>.type: enum": "`allowed_tools`: vLLM has no such tool choice",
        "tool_choice<ChatCompletionNamedToolChoiceCustom>.function: required": _CUSTOM_TOOLS,
        "tool_choice<ChatCompletionNamedToolChoiceCustom>.type: enum": _CUSTOM_TOOLS,
        "tools[]<ChatCompletionTool>.function.name: pattern": "OpenAI documents the name's characters and length; "
                                                             "enforced",
        "tools[]<CustomToolChatCompletions>.function: required": _CUSTOM_TOOLS,
        "tools[]<CustomToolChatCompletions>.type: enum": _CUSTOM_TOOLS,
    }),
    "CreateCompletionRequest": ("CompletionRequest", {
        "best_of: range": "at least 1: zero candidates leave nothing to return (vLLM refuses 0 too)",
        "logit_bias.{}: range": "OpenAI documents biases from -100 to 100 (and refuses others); the schema says so",
        "prompt: minItems": "an empty list of prompts asks for nothing; a 400 naming `prompt`",
        "prompt: type": "no null prompt: OpenAI reads it as its own `<|endoftext|>`, which names no token of "
                        "another model's vocabulary",
    }),
    "CreateResponse": ("ResponseRequest", {
        "model: required": "OpenAI's schema leaves it out for a stored prompt template that names the model; stored "
                           "prompts are refused, so the model is required (a 400 `missing_required_parameter`)",
        "text.format<TextResponseFormatJsonSchema>.name: pattern": "OpenAI documents the name's characters and "
                                                                   "length; enforced",
        "max_tool_calls: range": "a count: a negative one is a 400 (it is echoed in the Response)",
        "prompt_cache_key: maxLength": "at most 256 characters: the Response echoes it in a stream's three lifecycle "
                                      "events, and nothing charges it (a cache key is a short identifier)",
        "user: maxLength": "at most 256 characters: echoed three times in a stream and carried in the job, and "
                           "nothing charges it (an end user's id)",
    }),
    "CreateEmbeddingRequest": ("EmbeddingRequest", {}),
    "CreateImageRequest": ("ImageRequest", {
        "model: required": "no default model: a gateway serves whichever image models its engines have, none is "
                           "`dall-e-2`; a 400 `missing_required_parameter` naming `model`",
        "model: type": "no default model (see above): `null` is refused",
        "output_compression: range": "OpenAI documents 0-100%; the schema says so",
        "prompt: minLength": "an empty prompt is refused, as OpenAI's API refuses it",
    }),
}

_IGNORED = "vLLM ignores it (an OpenAI-hosted feature)"
#: OpenAI request schema -> {field Conduit's schema does not name: what becomes of it}. The
#: gateway passes each to the engine unchanged.
PASSED_THROUGH: dict[str, dict[str, str]] = {
    "CreateChatCompletionRequest": {
        "audio": "vLLM ignores it (no audio output)",
        "function_call": "vLLM ignores it (deprecated by OpenAI for `tool_choice`)",
        "functions": "vLLM ignores it (deprecated by OpenAI for `tools`)",
        "messages[].audio": "vLLM ignores it (no audio)",
        "messages[].content[].prompt_cache_breakpoint": "vLLM ignores it (it caches prefixes itself)",
        "messages[].function_call": "vLLM ignores it (deprecated by OpenAI for `tool_calls`)",
        "messages[].refusal": "vLLM ignores it",
        "metadata": _IGNORED,
        "modalities": "vLLM ignores it (text output only)",
        "moderation": _IGNORED,
        "prediction": _IGNORED,
        "prompt_cache_key": "vLLM ignores it (it caches prefixes itself)",
        "prompt_cache_options": "vLLM ignores it (it caches prefixes itself)",
        "prompt_cache_retention": "vLLM ignores it (it caches prefixes itself)",
        "reasoning_effort": "vLLM reads it (reasoning models)",
        "safety_identifier": _IGNORED,
        "service_tier": _IGNORED,
        "store": _IGNORED,
        "stream_options.include_obfuscation": _IGNORED,
        "verbosity": _IGNORED,
        "web_search_options": _IGNORED,
    },
    "CreateCompletionRequest": {
        "stream_options.include_obfuscation": _IGNORED,
    },
    "CreateImageRequest": {},
    # (CreateResponse: nothing is passed to an engine as it came; gateway/responses/fields.py decides
    # every field, tests/unit/test_responses_outcomes.py holds it to that.)
}

#: Conduit's response schema -> OpenAI's (each of Conduit's answers must be one of OpenAI's).
RESPONSES = {
    "ChatCompletion": "CreateChatCompletionResponse",
    "ChatCompletionChunk": "CreateChatCompletionStreamResponse",
    "Completion": "CreateCompletionResponse",
    # OpenAI's stream of text completions, as it is (tests/openai_schema.py: null finish reasons and usage).
    "CompletionChunk": openai_schema.COMPLETION_CHUNK,
    "ModelList": "ListModelsResponse",
    "Model": "Model",
    "ImagesResponse": "ImagesResponse",
    "PartialImageEvent": "ImageGenPartialImageEvent",
    "CompletedImageEvent": "ImageGenCompletedEvent",
    "ErrorEnvelope": "ErrorResponse",
    "ResponseObject": "Response",
    "InputTokens": "TokenCountsResource",
    "EmbeddingList": openai_schema.EMBEDDINGS_ANY,
}


def _unlabelled(path: str) -> str:
    return re.sub(r"<[^>]*>", "", path)


@pytest.mark.parametrize("theirs", sorted(REQUESTS))
def test_every_request_openai_allows_is_accepted_or_a_listed_difference(theirs: str) -> None:
    ours, listed = REQUESTS[theirs]
    found = compare(OURS, ours, THEIRS, theirs)
    new = {k: v for k, v in found.differences.items() if k not in listed}
    assert not new, f"{ours} refuses what OpenAI's {theirs} allows (fix it, or list it with a reason):\n" + "\n".join(
        f"  {k}: {v}" for k, v in sorted(new.items()))
    stale = set(listed) - set(found.differences)
    assert not stale, f"listed differences that no longer exist (remove them): {sorted(stale)}"


@pytest.mark.parametrize("theirs", sorted(PASSED_THROUGH))
def test_openai_fields_conduit_does_not_name_are_passed_through_and_listed(theirs: str) -> None:
    ours, _ = REQUESTS[theirs]
    passed = {_unlabelled(p) for p in compare(OURS, ours, THEIRS, theirs).passed_through}
    assert passed == set(PASSED_THROUGH[theirs]), (
        f"OpenAI's {theirs} fields that {ours} does not name: new {sorted(passed - set(PASSED_THROUGH[theirs]))}, "
        f"gone {sorted(set(PASSED_THROUGH[theirs]) - passed)}")
    assert OURS.schemas[ours]["additionalProperties"] is True  # what lets them through


@pytest.mark.parametrize("ours", sorted(RESPONSES))
def test_every_answer_conduit_gives_is_one_openai_allows(ours: str) -> None:
    found = compare(THEIRS, RESPONSES[ours], OURS, ours)
    assert not found.differences, f"{ours} allows answers OpenAI's {RESPONSES[ours]} does not:\n" + "\n".join(
        f"  {k}: {v}" for k, v in sorted(found.differences.items()))


def _extensions(name: str) -> tuple[set[str], set[str]]:
    """In a component of ours and what it refers to: the names of the properties marked as
    extensions, and the names of every property inside one (a vLLM-only object's own fields)."""
    marked: set[str] = set()
    inside: set[str] = set()
    seen: set[tuple[str, bool]] = set()
    todo = [(name, False)]
    while todo:
        current, within = todo.pop()
        if (current, within) in seen:
            continue
        seen.add((current, within))
        for prop, schema in OURS.schemas[current].get("properties", {}).items():
            extension = openapi.EXTENSION in schema
            if within:
                inside.add(prop)
            elif extension:
                marked.add(prop)
            todo += [(ref, within or extension) for ref in re.findall(r'"#/components/schemas/([^"]+)"',
                                                                       json.dumps(schema))]
    return marked, inside


@pytest.mark.parametrize(("ours", "theirs"), sorted([(o, t) for t, (o, _) in REQUESTS.items()]
                                                     + list(RESPONSES.items())))
def test_what_openai_does_not_define_is_marked_as_an_extension(ours: str, theirs: str) -> None:
    """Every property OpenAI lacks is marked (or lies inside a marked one), and no property OpenAI
    has is marked outside an extension."""
    theirs_names = property_names(THEIRS, theirs)
    only_ours = property_names(OURS, ours) - theirs_names
    marked, inside = _extensions(ours)
    assert only_ours - marked - inside == set(), (f"{ours}: fields OpenAI's {theirs} lacks, not marked "
                                                  f"{openapi.EXTENSION}: {sorted(only_ours - marked - inside)}")
    assert marked & theirs_names == set(), f"{ours}: OpenAI's own fields marked as extensions: {marked & theirs_names}"


def test_the_comparison_finds_differences() -> None:
    """The comparison can fail: a narrower enum, a new required field, a null, a bound."""
    ours: dict[str, Any] = json.loads(json.dumps(OURS.schemas))
    ours["ModelList"]["properties"]["object"] = {"enum": ["list", "page"]}
    ours["Model"]["properties"]["object"] = {"anyOf": [{"enum": ["model"]}, {"type": "null"}]}
    ours["ImageRequest"]["required"].append("size")
    ours["ImageRequest"]["properties"]["n"] = {"type": "integer", "minimum": 2, "maximum": 10}
    doc = Document(ours, OURS.prefix)
    assert set(compare(THEIRS, "ListModelsResponse", doc, "ModelList").differences) == {
        "object: enum", "data[].object: type"}
    found = compare(doc, "ImageRequest", THEIRS, "CreateImageRequest").differences
    assert {"size: required", "n: range", "n: type"} <= set(found)
