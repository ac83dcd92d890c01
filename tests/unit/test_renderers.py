"""The chat and completions renderers (``gateway/chat/serving.py``, ``gateway/completions/serving.py``):
engine events in, OpenAI's exact objects out.

Every object a renderer produces is also validated against OpenAI's vendored schema.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from engines.contract.messages import ChoiceDelta, Delta, SampledLogprob, TokenLogprob, ToolCallDelta, Usage
from gateway.chat.serving import ChatRenderer
from gateway.common.generation import ChoiceState, StreamState
from gateway.completions.serving import CompletionRenderer
from tests.openai_schema import validate, validate_completion_chunk

RID, CREATED, MODEL = "chatcmpl-0123456789abcdef", 1_700_000_000, "tiny-chat"
CRID = "cmpl-0123456789abcdef"

TOP_HI = [TokenLogprob("Hi", -0.25, [72, 105]), TokenLogprob("Hey", -1.75, None)]
TOP_THERE = [TokenLogprob(" there", -0.5, [32, 116, 104, 101, 114, 101]), TokenLogprob("!", -3.0, [33])]


def conversation() -> list[Delta]:
    """n=2: choice 0 answers in text with logprobs and is aborted; choice 1 streams two tool calls."""
    return [
        Delta(job=RID, choices=[
            ChoiceDelta(index=0, text="Hi", logprobs=[SampledLogprob("Hi", -0.25, [72, 105], TOP_HI, 0)]),
            ChoiceDelta(index=1, tool_calls=[ToolCallDelta(index=0, id="call_w", name="get_weather")]),
        ]),
        Delta(job=RID, choices=[
            ChoiceDelta(index=1, tool_calls=[ToolCallDelta(index=0, arguments='{"city": '),
                                             ToolCallDelta(index=1, id="call_t", name="get_time", arguments="{")]),
            ChoiceDelta(index=0, text=" there",
                        logprobs=[SampledLogprob(" there", -0.5, [32, 116, 104, 101, 114, 101], TOP_THERE, 2)]),
        ]),
        Delta(job=RID, choices=[
            ChoiceDelta(index=1, tool_calls=[ToolCallDelta(index=0, arguments='"Oslo"}'),
                                             ToolCallDelta(index=1, arguments="}")]),
        ]),
        Delta(job=RID, choices=[
            ChoiceDelta(index=0, finish_reason="abort"),
            ChoiceDelta(index=1, finish_reason="tool_calls"),
        ]),
    ]


USAGE = Usage(prompt_tokens=11, completion_tokens=17, cached_tokens=8)


def accumulate(deltas: list[Delta], n: int) -> list[ChoiceState]:
    choices = [ChoiceState(i) for i in range(n)]
    for delta in deltas:
        for c in delta.choices:
            choices[c.index].add(c)
    return choices


def sse_events(data: bytes) -> list[dict[str, Any]]:
    """Parse SSE frames, insisting on the exact ``data: <json>\\n\\n`` framing."""
    assert data.endswith(b"\n\n"), data
    frames = data[:-2].split(b"\n\n")
    events = []
    for frame in frames:
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame
        events.append(json.loads(frame[len(b"data: "):]))
    return events


def stream(renderer: Any, deltas: list[Delta], include_usage: bool, rid: str = RID) -> list[dict[str, Any]]:
    state = StreamState(include_usage)
    chunks: list[dict[str, Any]] = []
    for delta in deltas:
        out = bytearray()
        renderer.chunks(rid, CREATED, MODEL, delta, out, state)
        chunks += sse_events(bytes(out))
    return chunks


# ---- chat: full response -----------------------------------------------------------------


def test_chat_full_response() -> None:
    body = json.loads(ChatRenderer().full(RID, CREATED, MODEL, accumulate(conversation(), 2), USAGE))
    validate("CreateChatCompletionResponse", body)
    assert body["id"] == RID and body["object"] == "chat.completion"
    assert body["created"] == CREATED and body["model"] == MODEL
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 17, "total_tokens": 28,
                             "prompt_tokens_details": {"cached_tokens": 8}}

    first, second = body["choices"]
    assert first["index"] == 0
    assert first["finish_reason"] == "stop"  # vLLM's "abort" is not an OpenAI reason
    assert first["message"] == {"role": "assistant", "content": "Hi there", "refusal": None}
    assert first["logprobs"] == {"refusal": None, "content": [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [
            {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
            {"token": "Hey", "logprob": -1.75, "bytes": None}]},
        {"token": " there", "logprob": -0.5, "bytes": [32, 116, 104, 101, 114, 101], "top_logprobs": [
            {"token": " there", "logprob": -0.5, "bytes": [32, 116, 104, 101, 114, 101]},
            {"token": "!", "logprob": -3.0, "bytes": [33]}]},
    ]}

    assert second["index"] == 1 and second["finish_reason"] == "tool_calls"
    assert second["logprobs"] is None
    assert second["message"]["content"] is None  # tool calls only: content is null, not ""
    assert second["message"]["tool_calls"] == [
        {"id": "call_w", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_t", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]


def test_chat_full_plain_text_has_no_tool_calls_or_nulls_for_arrays() -> None:
    deltas = [Delta(job=RID, choices=[ChoiceDelta(text="a")]),
              Delta(job=RID, choices=[ChoiceDelta(text="b", finish_reason="length")])]
    body = json.loads(ChatRenderer().full(RID, CREATED, MODEL, accumulate(deltas, 1), Usage(1, 2)))
    validate("CreateChatCompletionResponse", body)
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "ab", "refusal": None}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert "prompt_tokens_details" not in body["usage"]


def test_chat_full_reasoning_and_missing_tool_call_id() -> None:
    deltas = [Delta(job=RID, choices=[ChoiceDelta(reasoning="think ")]),
              Delta(job=RID, choices=[ChoiceDelta(reasoning="more", tool_calls=[ToolCallDelta(index=0, name="f")])]),
              Delta(job=RID, choices=[ChoiceDelta(finish_reason="error")])]
    body = json.loads(ChatRenderer().full(RID, CREATED, MODEL, accumulate(deltas, 1), Usage()))
    validate("CreateChatCompletionResponse", body)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    message = choice["message"]
    assert message["reasoning_content"] == "think more"
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "f", "arguments": ""}
    assert call["id"].startswith("call_") and len(call["id"]) > len("call_")


@pytest.mark.parametrize(("engine", "openai"), [
    ("stop", "stop"), ("length", "length"), ("tool_calls", "tool_calls"), ("content_filter", "content_filter"),
    ("abort", "stop"), ("error", "stop"), (None, "stop"),
])
def test_chat_finish_reasons(engine: str | None, openai: str) -> None:
    choices = accumulate([Delta(job=RID, choices=[ChoiceDelta(text="x", finish_reason=engine)])], 1)
    body = json.loads(ChatRenderer().full(RID, CREATED, MODEL, choices, Usage()))
    assert body["choices"][0]["finish_reason"] == openai
    validate("CreateChatCompletionResponse", body)
    if engine is not None:
        (chunk,) = stream(ChatRenderer(), [Delta(job=RID, choices=[ChoiceDelta(finish_reason=engine)])], False)
        assert chunk["choices"][0]["finish_reason"] == openai
        validate("CreateChatCompletionStreamResponse", chunk)


# ---- chat: stream ------------------------------------------------------------------------


def test_chat_chunks() -> None:
    chunks = stream(ChatRenderer(), conversation(), include_usage=False)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["id"], chunk["created"], chunk["model"]) == (RID, CREATED, MODEL)
        assert "usage" not in chunk
        assert len(chunk["choices"]) == 1

    by_choice: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in chunks:
        by_choice[chunk["choices"][0]["index"]].append(chunk["choices"][0])
    assert [c["index"] for chunk in chunks for c in chunk["choices"]] == [0, 1, 1, 0, 1, 0, 1]

    # The role only on each choice's first chunk.
    for choices in by_choice.values():
        assert [c["delta"].get("role") for c in choices] == ["assistant"] + [None] * (len(choices) - 1)
        assert [c["finish_reason"] for c in choices][:-1] == [None] * (len(choices) - 1)

    text = by_choice[0]
    assert "".join(c["delta"].get("content") or "" for c in text) == "Hi there"
    assert text[-1]["finish_reason"] == "stop"
    assert [t["token"] for c in text if c["logprobs"] for t in c["logprobs"]["content"]] == ["Hi", " there"]
    assert text[0]["logprobs"]["content"][0]["top_logprobs"][1] == {"token": "Hey", "logprob": -1.75, "bytes": None}

    tools = by_choice[1]
    assert tools[-1]["finish_reason"] == "tool_calls"
    assert all("content" not in c["delta"] for c in tools[:-1])
    assert tools[0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_w", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]
    # Continuations carry neither id nor type nor name, as OpenAI's do.
    assert tools[1]["delta"]["tool_calls"] == [
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 1, "id": "call_t", "type": "function", "function": {"name": "get_time", "arguments": "{"}}]
    assert tools[2]["delta"]["tool_calls"] == [
        {"index": 0, "function": {"arguments": '"Oslo"}'}}, {"index": 1, "function": {"arguments": "}"}}]

    # A client merging the stream by index gets what the full response has.
    merged: dict[int, dict[str, str]] = {}
    for c in tools:
        for call in c["delta"].get("tool_calls") or []:
            slot = merged.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] = call.get("id", slot["id"])
            slot["name"] += call["function"].get("name") or ""
            slot["arguments"] += call["function"].get("arguments") or ""
    assert merged == {0: {"id": "call_w", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
                      1: {"id": "call_t", "name": "get_time", "arguments": "{}"}}


def test_chat_chunks_with_include_usage() -> None:
    renderer = ChatRenderer()
    chunks = stream(renderer, conversation(), include_usage=True)
    assert chunks and all(chunk["usage"] is None for chunk in chunks)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)

    (last,) = sse_events(renderer.usage_chunk(RID, CREATED, MODEL, USAGE))
    validate("CreateChatCompletionStreamResponse", last)
    assert last == {"object": "chat.completion.chunk", "id": RID, "choices": [], "created": CREATED, "model": MODEL,
                    "usage": {"completion_tokens": 17, "prompt_tokens": 11, "total_tokens": 28,
                              "prompt_tokens_details": {"cached_tokens": 8}}}


def running_usage(deltas: list[Delta]) -> list[Delta]:
    """The deltas as an engine sends them under continuous_usage_stats: usage so far on each."""
    return [msgspec.structs.replace(d, usage=Usage(prompt_tokens=11, completion_tokens=i + 1))
            for i, d in enumerate(deltas)]


def test_chat_chunks_with_continuous_usage() -> None:
    deltas = running_usage(conversation())
    chunks = stream(ChatRenderer(), deltas, include_usage=True)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    # One chunk per choice of a delta; each carries its delta's usage.
    expected = [i + 1 for i, d in enumerate(deltas) for _ in d.choices]
    assert [c["usage"]["completion_tokens"] for c in chunks] == expected
    assert all(c["usage"] == {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n}
               for c, n in zip(chunks, expected))
    # Without include_usage the engine's running usage stays out, as does the key.
    assert all("usage" not in c for c in stream(ChatRenderer(), deltas, include_usage=False))


def test_chat_stream_state_is_per_stream() -> None:
    renderer = ChatRenderer()
    delta = Delta(job=RID, choices=[ChoiceDelta(text="x")])
    assert stream(renderer, [delta], False)[0]["choices"][0]["delta"]["role"] == "assistant"
    assert stream(renderer, [delta], False)[0]["choices"][0]["delta"]["role"] == "assistant"


def test_chat_chunk_reasoning_only_has_no_content() -> None:
    (chunk,) = stream(ChatRenderer(), [Delta(job=RID, choices=[ChoiceDelta(reasoning="hmm")])], False)
    validate("CreateChatCompletionStreamResponse", chunk)
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "reasoning_content": "hmm"}


# ---- completions -------------------------------------------------------------------------


def completion_deltas() -> list[Delta]:
    return [
        Delta(job=CRID, choices=[
            ChoiceDelta(index=0, text="Hi", logprobs=[SampledLogprob("Hi", -0.25, [72, 105], TOP_HI, 0)]),
            ChoiceDelta(index=1, text="Yo", logprobs=[SampledLogprob("Yo", -0.75, None, [], 0)]),
        ]),
        Delta(job=CRID, choices=[
            ChoiceDelta(index=0, text=" there", finish_reason="length",
                        logprobs=[SampledLogprob(" there", -0.5, None, TOP_THERE, 2)]),
        ]),
        Delta(job=CRID, choices=[ChoiceDelta(index=1, finish_reason="abort", logprobs=[])]),
    ]


def test_completion_full_response() -> None:
    body = json.loads(CompletionRenderer().full(CRID, CREATED, MODEL, accumulate(completion_deltas(), 2), USAGE))
    validate("CreateCompletionResponse", body)
    assert body["object"] == "text_completion"
    assert (body["id"], body["created"], body["model"]) == (CRID, CREATED, MODEL)
    assert body["usage"]["total_tokens"] == 28
    first, second = body["choices"]
    assert first == {"index": 0, "text": "Hi there", "finish_reason": "length", "logprobs": {
        "tokens": ["Hi", " there"], "token_logprobs": [-0.25, -0.5], "text_offset": [0, 2],
        "top_logprobs": [{"Hi": -0.25, "Hey": -1.75}, {" there": -0.5, "!": -3.0}]}}
    assert second == {"index": 1, "text": "Yo", "finish_reason": "stop", "logprobs": {
        "tokens": ["Yo"], "token_logprobs": [-0.75], "text_offset": [0], "top_logprobs": [{}]}}


@pytest.mark.parametrize(("engine", "openai"), [
    ("stop", "stop"), ("length", "length"), ("content_filter", "content_filter"),
    ("abort", "stop"), ("tool_calls", "stop"), (None, "stop"),
])
def test_completion_finish_reasons(engine: str | None, openai: str) -> None:
    choices = accumulate([Delta(job=CRID, choices=[ChoiceDelta(text="x", finish_reason=engine)])], 1)
    body = json.loads(CompletionRenderer().full(CRID, CREATED, MODEL, choices, Usage()))
    assert body["choices"][0]["finish_reason"] == openai
    validate("CreateCompletionResponse", body)
    if engine is not None:
        (chunk,) = stream(CompletionRenderer(), [Delta(job=CRID, choices=[ChoiceDelta(finish_reason=engine)])],
                          False, CRID)
        assert chunk["choices"][0]["finish_reason"] == openai
        validate_completion_chunk(chunk)


def test_completion_chunks() -> None:
    chunks = stream(CompletionRenderer(), completion_deltas(), include_usage=False, rid=CRID)
    for chunk in chunks:
        validate_completion_chunk(chunk)
        assert chunk["object"] == "text_completion"
        assert (chunk["id"], chunk["created"], chunk["model"]) == (CRID, CREATED, MODEL)
        assert "usage" not in chunk
    assert [(c["index"], c["text"], c["finish_reason"]) for chunk in chunks for c in chunk["choices"]] == [
        (0, "Hi", None), (1, "Yo", None), (0, " there", "length"), (1, "", "stop")]
    assert chunks[0]["choices"][0]["logprobs"] == {"tokens": ["Hi"], "token_logprobs": [-0.25], "text_offset": [0],
                                                   "top_logprobs": [{"Hi": -0.25, "Hey": -1.75}]}
    assert chunks[2]["choices"][0]["logprobs"]["text_offset"] == [2]


def test_completion_chunks_with_include_usage() -> None:
    renderer = CompletionRenderer()
    chunks = stream(renderer, completion_deltas(), include_usage=True, rid=CRID)
    assert all(chunk["usage"] is None for chunk in chunks)
    for chunk in chunks:
        validate_completion_chunk(chunk)
    (last,) = sse_events(renderer.usage_chunk(CRID, CREATED, MODEL, USAGE))
    validate("CreateCompletionResponse", last)
    assert last["choices"] == [] and last["object"] == "text_completion"
    assert last["usage"] == {"completion_tokens": 17, "prompt_tokens": 11, "total_tokens": 28,
                             "prompt_tokens_details": {"cached_tokens": 8}}


def test_completion_chunks_with_continuous_usage() -> None:
    deltas = running_usage(completion_deltas())
    chunks = stream(CompletionRenderer(), deltas, include_usage=True, rid=CRID)
    for chunk in chunks:
        validate_completion_chunk(chunk)
    expected = [i + 1 for i, d in enumerate(deltas) for _ in d.choices]
    assert [c["usage"] for c in chunks] == [
        {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n} for n in expected]
    assert all("usage" not in c for c in stream(CompletionRenderer(), deltas, include_usage=False, rid=CRID))


# ---- the validators themselves catch what they must ----------------------------------------


def test_schema_rejects_what_openai_clients_would_choke_on() -> None:
    good = json.loads(ChatRenderer().full(RID, CREATED, MODEL, accumulate(conversation(), 2), USAGE))
    validate("CreateChatCompletionResponse", good)
    bad = json.loads(json.dumps(good))
    bad["choices"][0]["message"]["tool_calls"] = None
    bad["choices"][1]["finish_reason"] = "abort"
    with pytest.raises(AssertionError) as info:
        validate("CreateChatCompletionResponse", bad)
    assert "$.choices[0].message.tool_calls" in str(info.value)
    assert "$.choices[1].finish_reason" in str(info.value)

    chunk = stream(CompletionRenderer(), completion_deltas(), include_usage=True, rid=CRID)[0]
    with pytest.raises(AssertionError):
        validate("CreateCompletionResponse", chunk)  # the leeway is only in validate_completion_chunk
    chunk["choices"][0]["finish_reason"] = "abort"
    with pytest.raises(AssertionError):
        validate_completion_chunk(chunk)
