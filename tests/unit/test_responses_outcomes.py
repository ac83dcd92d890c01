"""Every thing ``gateway.responses.fields.FIELDS`` decides is what a request setting it gets: a
refused thing is a 400 naming it, an honoured or ignored one is accepted (decoded, checked and
translated into its chat request, as the gateway does before anything is queued)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.responses.fields import FIELDS, Outcome
from gateway.responses.serving import ResponsesDecoder
from gateway.settings import RequestBounds

DECODER = ResponsesDecoder(RequestBounds())
BASE: dict[str, Any] = {"model": "m", "input": "hi"}
FUNCTION = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False}
MESSAGE = {"type": "message", "role": "user", "content": "hi"}
CALL = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
OUTPUT = {"type": "function_call_output", "call_id": "c", "output": "ok"}
PARTS = {"input_text": {"text": "x"}, "output_text": {"text": "x"}, "refusal": {"refusal": "no"},
         "input_image": {"image_url": "data:image/png;base64,AAAA"}, "input_file": {"file_id": "file_1"}}
#: A value for each thing whose key names no value of its own (the key's value is the sample).
SAMPLES: dict[str, Any] = {
    "model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 16, "temperature": 0.5,
    "top_p": 0.5, "top_logprobs": 2, "metadata": {"k": "v"}, "user": "u", "include": [], "tools": [FUNCTION],
    "tool_choice": "auto", "text": {}, "text.format": {"type": "text"}, "text.verbosity": "low", "reasoning": {},
    "reasoning.effort": "low", "reasoning.summary": "auto", "reasoning.generate_summary": "auto",
    "reasoning.mode": "auto", "reasoning.context": "auto",
    "stream_options": {}, "stream_options.include_obfuscation": False, "prompt_cache_key": "k",
    "prompt_cache_options": {}, "prompt_cache_options.mode": "auto", "prompt_cache_options.ttl": "24h",
    "safety_identifier": "s", "max_tool_calls": 3, "previous_response_id": "resp_1", "conversation": "conv_1",
    "conversation.id": "conv_1", "prompt": {"id": "p"}, "prompt.id": "p", "prompt.version": "1",
    "prompt.variables": {"a": "b"}, "context_management": [{"type": "compaction"}],
    "context_management.type": "compaction", "context_management.compact_threshold": 1000,
    "moderation": {"model": "omni-moderation-latest"}, "moderation.model": "omni-moderation-latest",
    "moderation.policy": {},
}


def body_for(key: str) -> dict[str, Any] | None:
    """A request that sets the thing ``key`` names (None: no way to write one is known here)."""
    if m := re.fullmatch(r"tools\[type=(\w+)\](?:\.(\w+))?", key):
        tool = dict(FUNCTION) if m[1] == "function" else {"type": m[1]}
        if m[2]:
            tool[m[2]] = SAMPLES.get(f"tool.{m[2]}", [] if m[2] == "allowed_callers" else
                                     True if m[2] in ("strict", "defer_loading") else {"type": "object"}
                                     if m[2] in ("parameters", "output_schema") else "x" if m[2] != "name" else "f")
        return {"tools": [tool]}
    if m := re.fullmatch(r"tool_choice\[type=(\w+)\]", key):
        return {"tools": [FUNCTION], "tool_choice": {"type": m[1], "name": "f"}}
    if m := re.fullmatch(r"tool_choice=(\w+)", key):
        return {"tools": [FUNCTION], "tool_choice": m[1]}
    if m := re.fullmatch(r"include=([\w.]+)", key):
        return {"include": [m[1]]}
    if m := re.fullmatch(r"input\[type=(\w+)\](?:\.(\w+))?", key):
        item = {"message": MESSAGE, "function_call": CALL, "function_call_output": OUTPUT}.get(
            m[1], {"type": m[1], "id": "x", "summary": []})
        item = dict(item)
        if m[2]:
            item[m[2]] = "user" if m[2] == "role" else "ns" if m[2] == "namespace" else "completed" \
                if m[2] == "status" else {"type": "x"} if m[2] == "caller" else "x" if m[2] != "content" else "hi"
        if m[1] == "function_call_output":
            return {"input": [MESSAGE, CALL, item]}
        return {"input": [MESSAGE, item]}
    if m := re.fullmatch(r"input\.content\[type=(\w+)\](?:\.(\w+))?", key):
        part = {"type": m[1], **PARTS.get(m[1], {})}
        if m[2]:
            part[m[2]] = "file_1" if m[2] == "file_id" else "data:image/png;base64,AAAA" \
                if m[2] == "image_url" else "auto" if m[2] == "detail" else {"mode": "x"} \
                if m[2] == "prompt_cache_breakpoint" else "x"
        return {"input": [{"role": "user", "content": [part]}]}
    if m := re.fullmatch(r"input\.output\[type=(\w+)\]", key):
        return {"input": [MESSAGE, CALL, {**OUTPUT, "output": [{"type": m[1], **PARTS.get(m[1], {})}]}]}
    if m := re.fullmatch(r"text\.format\[type=(\w+)\]", key):
        fmt = {"type": m[1]} if m[1] != "json_schema" else {"type": m[1], "name": "o", "schema": {"type": "object"}}
        return {"text": {"format": fmt}}
    if m := re.fullmatch(r"(\w+)=([\w.]+)", key):
        value: Any = {"true": True, "false": False}.get(m[2], m[2])
        return {m[1]: value, **({"stream": True} if m[1] == "stream_options" else {})}
    if key in SAMPLES:
        head, _, field = key.partition(".")
        value = {field: SAMPLES[key]} if field else SAMPLES[key]
        if head in ("text", "reasoning", "prompt_cache_options", "prompt", "moderation", "conversation") and field:
            value = {**({"id": "p"} if head == "prompt" else {"model": "x"} if head == "moderation" else {}), **value}
        if head == "context_management" and field:
            value = [{"type": "compaction", field: SAMPLES[key]}]
        return {head: value, **({"stream": True} if head == "stream_options" else {})}
    return None


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_a_thing_gets_its_decided_outcome(key: str) -> None:
    body = body_for(key)
    assert body is not None, f"no request is known that sets {key!r}: teach body_for() how to write one"
    outcome = FIELDS[key][0]
    try:
        DECODER.decode(json.dumps({**BASE, **body}).encode())
    except InvalidRequest as exc:
        assert outcome is Outcome.REFUSED, f"{key} is {outcome}, but {body} got a 400: {exc.message}"
        assert exc.param, exc.message
    else:
        assert outcome is not Outcome.REFUSED, f"{key} is refused, but {body} was accepted"
