"""A Responses request as the chat request its job carries (``gateway.responses.convert``)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.errors import InvalidRequest
from gateway.responses.convert import translate
from gateway.responses.protocol import ResponseRequest
from gateway.settings import RequestBounds

BOUNDS = RequestBounds()


def chat(**body: Any) -> dict[str, Any]:
    req = msgspec.convert({"model": "m", **body}, ResponseRequest)
    req.check(BOUNDS)
    return translate(req, BOUNDS).body


def test_items_become_messages_in_order() -> None:
    body = chat(instructions="sys", input=[
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "dev"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "let me look"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
    ])
    assert body["messages"] == [
        {"role": "system", "content": "sys\n\ndev"},  # instructions and the developer message joined
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "let me look", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{\"x\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]


def test_fields_map_to_their_chat_fields() -> None:
    body = chat(input="hi", max_output_tokens=20, temperature=0.2, top_p=0.5, user="u", parallel_tool_calls=False,
                tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
                tool_choice={"type": "function", "name": "f"}, reasoning={"effort": "low", "summary": "auto"},
                text={"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
                top_logprobs=2, stream=True)
    assert body == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": False,
        "max_completion_tokens": 20, "temperature": 0.2, "top_p": 0.5, "user": "u",
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"},
                                                                   "strict": True}},
        "reasoning_effort": "low", "logprobs": True, "top_logprobs": 2, "stream": True}
    assert chat(input="hi", text={"format": {"type": "json_object"}})["response_format"] == {"type": "json_object"}
    assert chat(input="hi", include=["message.output_text.logprobs"])["top_logprobs"] == 0


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]},
     "input[0].output[0]"),
    ({"input": [{"content": "no role"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
    ({"input": "hi", "tools": [{"type": "function", "name": "has space"}]}, "tools[0].name"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    # Any JSON where a string is expected is a 400, never a 500 (a list is not hashable).
    ({"input": [{"role": ["user"], "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": ["input_text"], "text": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [{"type": ["message"], "role": "user", "content": "x"}]}, "input[0].type"),
    ({"input": [{"type": {"a": 1}}]}, "input[0].type"),
    ({"input": "hi", "tools": [{"type": ["function"], "name": "f"}]}, "tools[0].type"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": ["function"]}},
     "tool_choice.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": ["x"]}]}]},
     "input[0].content[0].image_url"),
])
def test_what_cannot_be_translated_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat(**body)
    assert caught.value.param == param
