"""vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``, the tiny Llama on the CPU)
as the upstream of Conduit's upstream engine: chat, streaming, ``n`` = 2, tools (their deltas),
logprobs and ``json_schema`` through Conduit equal the server's own answers for a fixed seed or
temperature 0. One server for the module (~30-60 s to start here), a handful of requests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from engines.cli import CPU_ENGINE_ENV
from tests.harness import ROOT, Proc, RedisServer, Stack, free_port, wait_for_openai_server
from tests.openai_schema import validate, validate_completion_chunk

SERVED, UPSTREAM = "tiny-up", "tiny-llama"
USER = [{"role": "user", "content": "Tell me a story about a cat."}]
GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
TOOL = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"}},
                   "required": ["city"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


class Pair:
    """vLLM's server (``direct``) and a Conduit gateway whose upstream engine forwards to it (``conduit``)."""

    direct: str
    conduit: str


@pytest.fixture(scope="module")
def pair(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    work = tmp_path_factory.mktemp("upstream-vllm")
    model = work / "tiny-llama"
    built = subprocess.run([sys.executable, "-m", "gateway.cli", "models", "build-tiny", "--only", "llama", "--path",
                            str(model)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    port = free_port()
    server = Proc([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--served-model-name", UPSTREAM, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
                   "--max-model-len", "1024", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                  work / "vllm-server.log", env=CPU_ENGINE_ENV)
    stack = Stack(redis_server.url, work)
    try:
        wait_for_openai_server(server, port)
        stack.gateway()
        stack.engine("--kind", "upstream", "--base-url", f"http://127.0.0.1:{port}/v1", "--served-name", SERVED,
                     "--upstream-model", UPSTREAM, model=SERVED)
        p = Pair()
        p.direct, p.conduit = f"http://127.0.0.1:{port}", stack.base_url
        yield p
    finally:
        stack.stop()
        server.stop()


def both(pair: Pair, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[Any, Any]:
    """(Conduit's answer, vLLM's own) to the same body."""
    ours = httpx.post(f"{pair.conduit}{path}", json={**body, "model": SERVED}, timeout=120)
    theirs = httpx.post(f"{pair.direct}{path}", json={**body, "model": UPSTREAM}, timeout=120)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    return ours.json(), theirs.json()


def essence(answer: dict[str, Any]) -> Any:
    """What must agree: each choice's text, tool calls (their ids are random), logprobs and finish
    reason, and the token counts."""
    choices = []
    for c in answer["choices"]:
        m = c.get("message")
        calls = [(t["function"]["name"], t["function"]["arguments"]) for t in (m or {}).get("tool_calls") or []]
        logprobs = c.get("logprobs") or None
        if m and logprobs:  # (Conduit's chat logprobs carry OpenAI's `refusal: null` too)
            logprobs = logprobs["content"]
        choices.append((c["index"], c["finish_reason"], m["content"] if m else c["text"], calls, logprobs))
    u = answer["usage"]
    return choices, (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])


def streamed(base: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[Any, list[Any]]:
    """A streamed answer folded: per choice its text and tool calls (by index), and the chunks."""
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    text: dict[int, str] = {}
    calls: dict[tuple[int, int], list[str]] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            delta = c.get("delta") or {}
            text[c["index"]] = text.get(c["index"], "") + (delta.get("content") or c.get("text") or "")
            for t in delta.get("tool_calls") or []:
                name, args = calls.setdefault((c["index"], t["index"]), ["", ""])
                f = t.get("function") or {}
                calls[(c["index"], t["index"])] = [name + (f.get("name") or ""), args + (f.get("arguments") or "")]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    last = usage[-1] if usage else None
    return (text, calls, last and (last["prompt_tokens"], last["completion_tokens"])), chunks


def test_chat_and_completions_equal_vllm_s_own(pair: Pair) -> None:
    ours, theirs = both(pair, {"messages": USER, **GREEDY})
    validate("CreateChatCompletionResponse", ours)
    assert essence(ours) == essence(theirs) and ours["choices"][0]["message"]["content"]
    ours, theirs = both(pair, {"prompt": "Once upon a time", **GREEDY, "logprobs": 2}, "/v1/completions")
    validate("CreateCompletionResponse", ours)
    assert essence(ours) == essence(theirs)


def test_n_2_with_a_seed_and_logprobs_equal_vllm_s_own(pair: Pair) -> None:
    body = {"messages": USER, "n": 2, "seed": 1234, "temperature": 1.0, "max_tokens": 8, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
    ours, theirs = both(pair, body)
    validate("CreateChatCompletionResponse", ours)
    assert len(ours["choices"]) == 2 and essence(ours) == essence(theirs)


def test_streams_equal_vllm_s_own_and_usage_shows_only_where_asked(pair: Pair) -> None:
    body = {"messages": USER, "n": 2, "seed": 7, "max_tokens": 8, "ignore_eos": True}
    (text, _, usage), chunks = streamed(pair.conduit, {**body, "model": SERVED})
    (their_text, _, _), _ = streamed(pair.direct, {**body, "model": UPSTREAM})
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert text == their_text and usage is None  # the engine asked vLLM for usage; the client did not
    asked = {**body, "stream_options": {"include_usage": True}}
    ours, chunks = streamed(pair.conduit, {**asked, "model": SERVED})
    theirs, _ = streamed(pair.direct, {**asked, "model": UPSTREAM})
    assert ours == theirs and chunks[-1]["choices"] == [] and ours[2][1] == 16
    ours, chunks = streamed(pair.conduit, {"prompt": "Once", **GREEDY, "model": SERVED,
                                           "stream_options": {"include_usage": True}}, "/v1/completions")
    for chunk in chunks:
        validate_completion_chunk(chunk)
    assert ours == streamed(pair.direct, {"prompt": "Once", **GREEDY, "model": UPSTREAM,
                                          "stream_options": {"include_usage": True}}, "/v1/completions")[0]


def test_tool_calls_and_their_deltas_equal_vllm_s_own(pair: Pair) -> None:
    """Conduit asks vLLM as its client asked (a whole answer, or a stream), so each answer is vLLM's
    own: the same calls, and a stream's tool-call deltas piece by piece. (vLLM's non-streaming parser,
    for an answer cut at ``max_tokens``, may leave the raw text where its streaming parser made a call:
    then the whole answer is not the stream folded, in Conduit's answers as in vLLM's.)"""
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [TOOL], "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 200}
    ours, theirs = both(pair, body)
    validate("CreateChatCompletionResponse", ours)
    assert essence(ours) == essence(theirs)
    (_, calls, _), chunks = streamed(pair.conduit, {**body, "model": SERVED})
    (_, their_calls, _), their_chunks = streamed(pair.direct, {**body, "model": UPSTREAM})
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert calls == their_calls and calls[(0, 0)][0] == "get_weather"
    assert tool_deltas(chunks) == tool_deltas(their_chunks)
    if theirs["choices"][0]["finish_reason"] != "length":  # the non-streaming answer is the stream folded
        assert [(n, a) for n, a in calls.values()] == essence(ours)[0][0][3]


def tool_deltas(chunks: list[Any]) -> list[Any]:
    """Every tool-call delta of a stream, in order (without the call ids: random per answer; no
    arguments and empty ones alike: Conduit's first delta of a call says ``""``, as OpenAI's does)."""
    return [(c["index"], t["index"], (t.get("function") or {}).get("name"),
             (t.get("function") or {}).get("arguments") or "")
            for chunk in chunks for c in chunk["choices"] for t in (c.get("delta") or {}).get("tool_calls") or []]


def test_json_schema_equals_vllm_s_own(pair: Pair) -> None:
    body = {"messages": [{"role": "user", "content": "Describe a person as JSON."}], "max_tokens": 60,
            "temperature": 0, "response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}
    ours, theirs = both(pair, body)
    assert essence(ours) == essence(theirs)
    if ours["choices"][0]["finish_reason"] == "stop":
        assert set(json.loads(ours["choices"][0]["message"]["content"])) == {"name", "age"}
