"""The synthetic engine reads only what its job's kind defines (``engines/synthetic.py``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engines.backend import JobRejected
from engines.synthetic import SyntheticBackend, SyntheticSettings
from engines.contract.messages import ChoiceDelta, Generated, Job, Usage


class Recorder:
    """A ``JobOutput`` that keeps what the backend wrote."""

    def __init__(self) -> None:
        self.deltas: list[list[ChoiceDelta]] = []
        self.usage: Usage | None = None

    def started(self) -> None:
        pass

    def delta(self, choices: list[ChoiceDelta], usage: Usage | None = None, total: Generated | None = None) -> None:
        self.deltas.append(choices)

    def done(self, usage: Usage) -> None:
        self.usage = usage


@pytest.mark.parametrize(("kind", "body", "prompt_tokens"), [
    # Found by fuzzing: a chat request with a field named `prompt` that is an object (the gateway
    # passes unknown fields through) failed the job with a 500; so did `messages` in a completion.
    ("chat", {"messages": [{"role": "user", "content": "hi there"}], "prompt": {"x": 1}, "n": 2}, 2),
    ("completion", {"prompt": "a b c", "messages": 5, "max_completion_tokens": "many", "n": 2}, 3),
    ("completion", {"prompt": [[1, 2], [3]], "messages": [{"content": {"a": 1}}]}, 3),
])
async def test_fields_of_the_other_kind_are_ignored(kind: str, body: dict[str, Any], prompt_tokens: int) -> None:
    backend = SyntheticBackend(SyntheticSettings(models=["m"], tokens=2))
    out = Recorder()
    job = Job(id="j", kind=kind, model="m", body=json.dumps({"model": "m", **body}).encode(), reply_to="r",
              deadline_ms=2**40)
    await backend.run(job, out)  # type: ignore[arg-type]
    n = body.get("n", 1)
    assert out.usage == Usage(prompt_tokens=prompt_tokens, completion_tokens=2 * n)
    assert [len(d) for d in out.deltas] == [n, n]


def _chat(backend: SyntheticBackend, **body: Any) -> Recorder:
    import asyncio

    out = Recorder()
    job = Job(id="j", kind="chat", model="m", body=json.dumps({"model": "m", **body}).encode(), reply_to="r",
              deadline_ms=2**40)
    asyncio.run(backend.run(job, out))  # type: ignore[arg-type]
    return out


TOOLS = [{"type": "function", "function": {"name": "first"}}, {"type": "function", "function": {"name": "second"}}]


def test_scripted_tool_calling_calls_the_named_or_first_tool_then_answers_its_result() -> None:
    backend = SyntheticBackend(SyntheticSettings(models=["m"], tool_calls=True, tool_arguments='{"x": 1}'))
    asked = [{"role": "user", "content": "go"}]
    first = _chat(backend, messages=asked, tools=TOOLS).deltas
    assert [(c.name, c.arguments, c.id) for c in first[0][0].tool_calls] == [("first", '{"x": 1}', "call_synthetic_1")]
    assert first[0][0].finish_reason == "tool_calls"
    named = _chat(backend, messages=asked, tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "second"}}).deltas
    assert named[0][0].tool_calls[0].name == "second"
    answered = _chat(backend, tools=TOOLS, messages=[*asked, {"role": "tool", "tool_call_id": "c", "content": "42"}])
    assert [c.text for d in answered.deltas for c in d] == ["tool said: 42"]
    # No tools offered, or tool_choice "none": the ordinary tokens.
    plain = _chat(backend, messages=asked, tools=TOOLS, tool_choice="none")
    assert all(not c.tool_calls for d in plain.deltas for c in d) and len(plain.deltas) == 16


def test_tools_are_ignored_unless_scripted() -> None:
    out = _chat(SyntheticBackend(SyntheticSettings(models=["m"], tokens=3)),
                messages=[{"role": "user", "content": "go"}], tools=TOOLS)
    assert len(out.deltas) == 3 and all(not c.tool_calls for d in out.deltas for c in d)


def job(kind: str, body: dict[str, Any] | bytes) -> Job:
    raw = body if isinstance(body, bytes) else json.dumps({"model": "m", **body}).encode()
    return Job(id="j", kind=kind, model="m", body=raw, reply_to="r", deadline_ms=2**40)


async def test_input_tokens_counts_the_prompt_as_its_chat_job_does() -> None:
    """An ``input_tokens`` job answers the prompt tokens the same body's chat job reports, and
    generates nothing: words of a string content, 1 for parts or none; tools are not counted."""
    backend = SyntheticBackend(SyntheticSettings(models=["m"], tokens=3))
    assert "input_tokens" in backend.kinds
    body = {"messages": [{"role": "system", "content": "be  brief\nplease"},
                         {"role": "user", "content": [{"type": "text", "text": "a b c d"}]},
                         {"role": "assistant", "content": None},
                         {"role": "user", "content": "what now"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "max_completion_tokens": 2}
    counted, chatted = Recorder(), Recorder()
    await backend.run(job("input_tokens", body), counted)  # type: ignore[arg-type]
    await backend.run(job("chat", body), chatted)  # type: ignore[arg-type]
    assert counted.usage == Usage(prompt_tokens=3 + 1 + 1 + 2, completion_tokens=0)
    assert counted.deltas == []
    assert chatted.usage == Usage(prompt_tokens=7, completion_tokens=2)


@pytest.mark.parametrize("body", [b"not json", b'{"messages": "hi"}', b'{"messages": [{"content": 5}]}'])
async def test_input_tokens_refuses_a_body_it_cannot_read_with_a_400(body: bytes) -> None:
    backend = SyntheticBackend(SyntheticSettings(models=["m"]))
    out = Recorder()
    with pytest.raises(JobRejected) as caught:
        await backend.run(job("input_tokens", body), out)  # type: ignore[arg-type]
    assert caught.value.status == 400 and out.usage is None
