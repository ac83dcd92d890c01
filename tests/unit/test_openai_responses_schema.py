"""The vendored Responses schemas (``tests/openai_schema.py``): what a well-formed answer passes, what breaks it fails.

The objects below are what OpenAI sends, written out by hand in the spec's current shape (the
spec's own ``x-oaiMeta`` examples are older than its schemas: no ``logprobs`` on output text,
``incomplete_details.reason: "max_tokens"``, no ``sequence_number``, so they are not used).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.openai_schema import (
    RESPONSE_STREAM_ENDS,
    response_event_schemas,
    validate_input_tokens,
    validate_response,
    validate_response_event,
    validate_response_stream,
)

TEXT = {"type": "output_text", "text": "Hello.", "annotations": [], "logprobs": []}
MESSAGE = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": [TEXT]}
CALL = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
        "arguments": '{"city":"Paris"}', "status": "completed"}
REASONING = {"type": "reasoning", "id": "rs_1", "summary": [],
             "content": [{"type": "reasoning_text", "text": "The user greets."}]}
USAGE = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
         "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}
RESPONSE: dict[str, Any] = {
    "id": "resp_1", "object": "response", "created_at": 1741476542, "status": "completed",
    "completed_at": 1741476543, "error": None, "incomplete_details": None, "instructions": None,
    "max_output_tokens": None, "model": "tiny", "output": [REASONING, MESSAGE, CALL], "parallel_tool_calls": True,
    "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
    "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
    "tools": [{"type": "function", "name": "get_weather", "description": None, "strict": False,
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    "top_p": 1.0, "truncation": "disabled", "usage": USAGE, "metadata": {"k": "v"},
}
IN_PROGRESS = {**{k: v for k, v in RESPONSE.items() if k != "usage"},
               "status": "in_progress", "completed_at": None, "output": []}


def changed(obj: dict[str, Any], **fields: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out.update(fields)
    return out


def without(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != name}


STREAM: list[dict[str, Any]] = [
    {"type": "response.created", "sequence_number": 0, "response": IN_PROGRESS},
    {"type": "response.in_progress", "sequence_number": 1, "response": IN_PROGRESS},
    {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
     "item": {**MESSAGE, "status": "in_progress", "content": []}},
    {"type": "response.content_part.added", "sequence_number": 3, "item_id": "msg_1", "output_index": 0,
     "content_index": 0, "part": {**TEXT, "text": ""}},
    {"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_1", "output_index": 0,
     "content_index": 0, "delta": "Hello.", "logprobs": []},
    {"type": "response.output_text.done", "sequence_number": 5, "item_id": "msg_1", "output_index": 0,
     "content_index": 0, "text": "Hello.", "logprobs": []},
    {"type": "response.content_part.done", "sequence_number": 6, "item_id": "msg_1", "output_index": 0,
     "content_index": 0, "part": TEXT},
    {"type": "response.output_item.done", "sequence_number": 7, "output_index": 0, "item": MESSAGE},
    {"type": "response.output_item.added", "sequence_number": 8, "output_index": 1,
     "item": {**CALL, "arguments": "", "status": "in_progress"}},
    {"type": "response.function_call_arguments.delta", "sequence_number": 9, "item_id": "fc_1",
     "output_index": 1, "delta": '{"city":"Paris"}'},
    {"type": "response.function_call_arguments.done", "sequence_number": 10, "item_id": "fc_1",
     "output_index": 1, "name": "get_weather", "arguments": '{"city":"Paris"}'},
    {"type": "response.output_item.done", "sequence_number": 11, "output_index": 1, "item": CALL},
    {"type": "response.completed", "sequence_number": 12,
     "response": changed(RESPONSE, output=[MESSAGE, CALL])},
]
ERROR = {"type": "error", "sequence_number": 3, "code": "engine_error", "message": "The engine failed.", "param": None}


def test_a_well_formed_response_and_its_stream_pass() -> None:
    validate_response(RESPONSE)
    validate_response(changed(RESPONSE, status="incomplete", incomplete_details={"reason": "max_output_tokens"}))
    validate_response(changed(RESPONSE, status="failed", output=[],
                              error={"code": "server_error", "message": "The engine failed."}))
    validate_response_stream(STREAM)
    validate_response_stream([*STREAM[:3], ERROR])
    validate_input_tokens({"object": "response.input_tokens", "input_tokens": 11})


def test_every_event_type_of_the_union_is_known_the_error_event_among_them() -> None:
    events = response_event_schemas()
    assert len(events) >= 50
    assert events["error"] == "ResponseErrorEvent"
    assert RESPONSE_STREAM_ENDS <= events.keys()
    assert {e["type"] for e in STREAM} <= events.keys()


@pytest.mark.parametrize("obj", [
    without(RESPONSE, "output"),
    changed(RESPONSE, status="weird"),
    changed(RESPONSE, object="chat.completion"),
    without(RESPONSE, "tools"),  # required, though a response without tools has []
    changed(RESPONSE, incomplete_details={"reason": "max_tokens"}),  # the spec's own old example says this
    changed(RESPONSE, output=[changed(MESSAGE, content=[without(TEXT, "logprobs")])]),
    changed(RESPONSE, output=[changed(MESSAGE, role="user")]),
    changed(RESPONSE, output=[without(CALL, "call_id")]),
    changed(RESPONSE, usage=changed(USAGE, input_tokens_details={"cached_tokens": 0})),
    changed(RESPONSE, usage=None),  # omit it instead (an in-progress response has none)
    changed(RESPONSE, user=None),  # likewise
    changed(RESPONSE, error={"message": "no code"}),
], ids=["no output", "weird status", "wrong object", "no tools", "max_tokens", "text without logprobs",
        "user message", "call without call_id", "usage without cache_write_tokens", "usage null", "user null",
        "error without code"])
def test_a_broken_response_fails(obj: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match="violation"):
        validate_response(obj)


@pytest.mark.parametrize("obj", [
    without(STREAM[4], "sequence_number"),
    without(STREAM[4], "logprobs"),  # required on every text delta, [] when none were asked for
    changed(STREAM[4], delta=None),
    changed(STREAM[10], arguments={"city": "Paris"}),
    without(ERROR, "param"),
    changed(STREAM[0], response=changed(IN_PROGRESS, status="started")),
    changed(STREAM[-1], response=without(RESPONSE, "id")),
], ids=["delta without sequence_number", "delta without logprobs", "null delta", "arguments as an object",
        "error without param", "created with a weird status", "completed without id"])
def test_a_broken_event_fails(obj: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match="violation"):
        validate_response_event(obj)


def test_an_event_type_outside_the_union_fails() -> None:
    with pytest.raises(AssertionError, match="not the type of any"):
        validate_response_event(changed(STREAM[4], type="response.text.delta"))


@pytest.mark.parametrize(("events", "why"), [
    ([], "empty"),
    (STREAM[1:], "opens with response.created"),
    (STREAM[:-1], "terminal"),
    ([*STREAM[:3], ERROR, STREAM[-1]], "terminal"),
    ([*STREAM[:4], *STREAM[5:]], "count up by one"),
])
def test_a_stream_out_of_order_fails(events: list[dict[str, Any]], why: str) -> None:
    with pytest.raises(AssertionError, match=why):
        validate_response_stream(events)


@pytest.mark.parametrize("obj", [
    {"object": "response", "input_tokens": 11},
    {"object": "response.input_tokens", "input_tokens": "11"},
    {"object": "response.input_tokens"},
])
def test_a_broken_input_tokens_answer_fails(obj: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match="violation"):
        validate_input_tokens(obj)
