"""The vLLM engine's ``input_tokens`` jobs on the tiny Llama: the count a chat completion of the same
body reports as ``prompt_tokens`` (chat template, tools rendered into it, ``add_generation_prompt``),
nothing generated; a prompt (or an output budget) over the context still counted; a bad body a 400.

No endpoint sends these jobs yet (``/v1/responses/input_tokens`` will), so the test plays that
gateway (``tests.fakes.run_job``): it writes each job to the model's stream itself and reads the
engine's events from a reply stream of its own. Chat completions go through the
stack's gateway with the ``openai`` SDK.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec
import openai
import pytest
import redis

from engines.contract.keys import Keys
from tests.e2e.conftest import MODEL, VllmStack
from tests.fakes import run_job as fake_gateway_job

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city today.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MESSAGES = [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What is the weather in Paris today?"}]


@pytest.fixture
def r(vllm_stack: VllmStack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(vllm_stack.redis_url)
    yield client
    client.close()


def run_job(stack: VllmStack, r: redis.Redis, kind: str, body: dict[str, Any] | bytes) -> list[dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps({"model": MODEL, **body}).encode()
    return fake_gateway_job(r, stack.prefix, MODEL, kind, raw)


def counted(stack: VllmStack, r: redis.Redis, body: dict[str, Any]) -> int:
    events = run_job(stack, r, "input_tokens", body)
    assert [e["t"] for e in events] == ["s", "f"], events  # Started, Done: nothing generated
    usage = events[-1]["usage"]
    assert usage.get("completion_tokens", 0) == 0, usage
    return int(usage["prompt_tokens"])


def test_the_engine_announces_input_tokens(vllm_stack: VllmStack, r: redis.Redis) -> None:
    infos = [msgspec.msgpack.decode(v) for v in r.hgetall(Keys(vllm_stack.prefix).engine_info).values()]
    kinds = [sorted(i["kinds"]) for i in infos if MODEL in i["models"]]
    assert kinds and all(k == ["chat", "completion", "input_tokens"] for k in kinds), kinds


@pytest.mark.parametrize("extra", [
    {},
    {"tools": [TOOL]},
    {"tools": [TOOL], "tool_choice": "none"},
    {"add_generation_prompt": False},
], ids=["plain", "tools", "tools-choice-none", "no-generation-prompt"])
def test_the_count_is_the_prompt_tokens_of_a_chat_completion(client: openai.OpenAI, vllm_stack: VllmStack,
                                                             r: redis.Redis, extra: dict[str, Any]) -> None:
    tools = extra.get("tools")
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0, **({"tools": tools} if tools else {}),
        **({"tool_choice": extra["tool_choice"]} if "tool_choice" in extra else {}),
        extra_body={k: v for k, v in extra.items() if k not in ("tools", "tool_choice")} or None)
    assert chat.usage is not None
    assert counted(vllm_stack, r, {"messages": MESSAGES, **extra}) == chat.usage.prompt_tokens


def test_tools_and_the_generation_prompt_are_in_the_count(vllm_stack: VllmStack, r: redis.Redis) -> None:
    plain = counted(vllm_stack, r, {"messages": MESSAGES})
    assert counted(vllm_stack, r, {"messages": MESSAGES, "tools": [TOOL]}) > plain + 20  # the tool's JSON
    assert counted(vllm_stack, r, {"messages": MESSAGES, "add_generation_prompt": False}) < plain


def test_a_prompt_over_the_context_is_counted_and_a_bad_body_refused(client: openai.OpenAI, vllm_stack: VllmStack,
                                                                       r: redis.Redis) -> None:
    long = [{"role": "user", "content": " ".join(f"w{i}" for i in range(1500))}]
    assert counted(vllm_stack, r, {"messages": long}) > 1024  # the engine's --max-model-len
    # An output budget past the context refuses a chat job, never a count (it changes no prompt token).
    assert counted(vllm_stack, r, {"messages": MESSAGES, "max_completion_tokens": 5000}) == \
        counted(vllm_stack, r, {"messages": MESSAGES})
    with pytest.raises(openai.BadRequestError):  # what a chat job of it gets
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=1)  # type: ignore[arg-type]
    for body in ({"messages": "hi"}, {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False,
                                      "continue_final_message": True, "echo": 5}, b"not json"):
        events = run_job(vllm_stack, r, "input_tokens", body)
        assert [e["t"] for e in events] == ["e"], events
        assert events[0]["status"] == 400, events
