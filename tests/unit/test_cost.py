"""The admission cost estimate and the rate-limit header formats (no I/O)."""

from __future__ import annotations

import msgspec
import pytest

from gateway.images.protocol import ImageRequest
from gateway.chat.protocol import ChatCompletionRequest
from gateway.completions.protocol import CompletionRequest
from gateway.settings import RequestBounds
from gateway.tenancy.cost import IMAGE_PART_TOKENS, MESSAGE_OVERHEAD_TOKENS, Cost
from gateway.tenancy.limits import duration, has_limits
from gateway.tenancy.principal import ANONYMOUS, KeyLimits, Principal

SETTINGS = RequestBounds(default_max_tokens_estimate=1000)


def chat(**body: object) -> ChatCompletionRequest:
    return msgspec.convert({"model": "m", **body}, ChatCompletionRequest)


def test_chat_counts_characters_over_four_plus_the_most_output_times_n() -> None:
    req = chat(messages=[{"role": "user", "content": "x" * 41}], max_tokens=10, n=3)
    assert req.cost(SETTINGS) == Cost(tokens=11 + MESSAGE_OVERHEAD_TOKENS + 30)
    # max_completion_tokens wins over max_tokens; absent, the setting stands in.
    assert chat(messages=[{"role": "user", "content": ""}], max_tokens=10, max_completion_tokens=7).cost(
        SETTINGS).tokens == MESSAGE_OVERHEAD_TOKENS + 7
    assert chat(messages=[{"role": "user", "content": ""}]).cost(SETTINGS).tokens == MESSAGE_OVERHEAD_TOKENS + 1000


def test_chat_counts_parts_tool_calls_and_tools() -> None:
    req = chat(messages=[
        {"role": "user", "content": [{"type": "text", "text": "abcd"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 9999}}]},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "{}!"}}]},
    ], tools=[{"type": "function", "function": {"name": "get", "description": "d", "parameters": {"a": 1}}}],
        max_tokens=1)
    # "abcd" 4 + "f{}!" 4 + "get" "d" '{"a":1}' 11 = 19 chars -> 5 tokens; the image a fixed count, not its bytes.
    assert req.cost(SETTINGS).tokens == 5 + IMAGE_PART_TOKENS + 2 * MESSAGE_OVERHEAD_TOKENS + 1


@pytest.mark.parametrize(("prompt", "prompt_tokens", "prompts"), [
    ("x" * 8, 2, 1),
    (["x" * 5, "y"], 3, 2),
    ([1, 2, 3], 3, 1),
    ([[1, 2], [3]], 3, 2),
])
def test_completions_count_each_prompt_and_every_sequence(prompt: object, prompt_tokens: int, prompts: int) -> None:
    req = msgspec.convert({"model": "m", "prompt": prompt, "max_tokens": 5, "n": 2, "best_of": 3}, CompletionRequest)
    assert req.cost(SETTINGS) == Cost(tokens=prompt_tokens + 5 * 3 * prompts)
    bare = msgspec.convert({"model": "m", "prompt": prompt}, CompletionRequest)
    assert bare.cost(SETTINGS) == Cost(tokens=prompt_tokens + 16 * prompts)  # OpenAI's and vLLM's default


def test_images_count_images_not_tokens() -> None:
    assert msgspec.convert({"model": "m", "prompt": "a cat", "n": 3}, ImageRequest).cost(SETTINGS) == Cost(
        tokens=None, images=3)
    assert msgspec.convert({"model": "m", "prompt": "a cat"}, ImageRequest).cost(SETTINGS).images == 1


@pytest.mark.parametrize(("ms", "text"), [
    (0, "0s"), (17, "17ms"), (1000, "1s"), (1500, "1.5s"), (59_683, "59.683s"), (60_000, "1m0s"),
    (360_000, "6m0s"), (361_250, "6m1.25s"), (3_600_000, "1h0m0s"),
])
def test_durations_in_openai_format(ms: int, text: str) -> None:
    assert duration(ms) == text


def test_only_keys_with_a_limit_reach_redis() -> None:
    assert not has_limits(ANONYMOUS)
    assert not has_limits(Principal(key_id="abc", name="n"))
    assert not has_limits(Principal(key_id="abc", name="n", limits=KeyLimits(priority=3, backlog_share=0.1)))
    assert has_limits(Principal(key_id="abc", name="n", limits=KeyLimits(concurrency=1)))
    assert not has_limits(Principal(key_id="", name="n", limits=KeyLimits(rpm=1)))
