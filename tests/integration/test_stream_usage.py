"""``stream_options``: usage at the end (OpenAI's ``include_usage``) or on every chunk
(vLLM's ``continuous_usage_stats``), through a gateway and a synthetic engine."""

from __future__ import annotations

import json

import httpx

from tests.harness import Stack
from tests.openai_schema import validate, validate_completion_chunk

CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def sse_events(base_url: str, path: str, body: dict[str, object]) -> list[dict[str, object]]:
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_continuous_usage_stats_put_running_usage_on_every_chunk(stack: Stack) -> None:
    stack.gateway()
    stack.synthetic("synthetic", "--tokens", "5")
    chat = {"model": "synthetic", "messages": [{"role": "user", "content": "one two three"}], "stream": True}

    events = sse_events(stack.base_url, "/v1/chat/completions", {**chat, "stream_options": CONTINUOUS})
    *chunks, final = events
    for e in events:
        validate("CreateChatCompletionStreamResponse", e)
    assert len(chunks) == 5 and all(c["choices"] for c in chunks)
    assert [c["usage"] for c in chunks] == [
        {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n} for n in range(1, 6)]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 5

    # Completions too, and nothing changes for the options OpenAI defines.
    completion = {"model": "synthetic", "prompt": "one two", "stream": True, "max_tokens": 3}
    *chunks, final = sse_events(stack.base_url, "/v1/completions", {**completion, "stream_options": CONTINUOUS})
    for e in (*chunks, final):
        validate_completion_chunk(e)
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3]
    assert all(c["usage"]["prompt_tokens"] == 2 for c in chunks) and final["usage"]["completion_tokens"] == 3

    *chunks, final = sse_events(stack.base_url, "/v1/chat/completions",
                                {**chat, "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in chunks) and final["usage"]["completion_tokens"] == 5
    # vLLM's rule: continuous usage only together with include_usage.
    events = sse_events(stack.base_url, "/v1/chat/completions",
                        {**chat, "stream_options": {"continuous_usage_stats": True}})
    assert len(events) == 5 and all("usage" not in e for e in events)
