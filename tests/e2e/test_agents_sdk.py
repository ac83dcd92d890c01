"""The OpenAI Agents SDK (``openai-agents``) runs an agent with a function tool to completion through
``/v1/responses``: a keyed gateway and a synthetic engine scripted to call the tool once, then to
answer the tool's result (``--tool-calls``). Two requests per run: the SDK sends the call and its
output back on the second (stateless: no ``previous_response_id``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from agents import (Agent, FunctionTool, ItemHelpers, MessageOutputItem, OpenAIResponsesModel, RawResponsesStreamEvent,
                    RunConfig, RunItemStreamEvent, Runner, ToolCallItem, ToolCallOutputItem, function_tool)
from openai import AsyncOpenAI

from gateway.tenancy.keys import HASHER
from tests.harness import Stack

ADMIN = "test-admin-credential-0123456789"
MODEL = "synthetic"
#: The arguments the engine's scripted call carries (``--tool-arguments``).
CITY = "Paris"
#: No trace is exported: nothing of OpenAI's can be reached from a test.
UNTRACED = RunConfig(tracing_disabled=True)


@dataclass
class Weather:
    """The agent's one tool, recording every call it gets."""

    cities: list[str] = field(default_factory=list)

    def tool(self) -> FunctionTool:
        @function_tool
        def get_weather(city: str) -> str:
            """The weather in a city."""
            self.cities.append(city)
            return f"sunny in {city.upper()}"

        return get_weather


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    """The `openai` SDK with a real key of a keyed gateway, a synthetic engine calling tools."""
    stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN))
    made = httpx.post(f"{stack.base_url}/admin/keys", json={"name": "agents"}, timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN}"})
    assert made.status_code == 201, made.text
    stack.api_key = made.json()["key"]
    stack.synthetic(MODEL, "--tool-calls", "--tool-arguments", json.dumps({"city": CITY}))
    async with AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0,
                           timeout=30) as c:
        yield c


def agent(client: AsyncOpenAI, weather: Weather) -> Agent:
    return Agent(name="forecaster", instructions="Answer with the weather tool.", tools=[weather.tool()],
                 model=OpenAIResponsesModel(model=MODEL, openai_client=client))


async def test_runner_run_calls_the_tool_and_answers_its_result(client: AsyncOpenAI) -> None:
    weather = Weather()
    result = await Runner.run(agent(client, weather), "What is the weather in Paris?", run_config=UNTRACED)

    assert weather.cities == [CITY]
    assert result.final_output == f"tool said: sunny in {CITY.upper()}"
    calls = [i.raw_item for i in result.new_items if isinstance(i, ToolCallItem)]
    outputs = [i for i in result.new_items if isinstance(i, ToolCallOutputItem)]
    assert [(c.type, c.name, json.loads(c.arguments)) for c in calls] == [
        ("function_call", "get_weather", {"city": CITY})]
    assert calls[0].call_id.startswith("call_")
    assert [o.output for o in outputs] == [f"sunny in {CITY.upper()}"]
    assert [r.response_id[:5] for r in result.raw_responses] == ["resp_", "resp_"]
    usage = result.context_wrapper.usage
    assert usage.requests == 2 and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_runner_run_streamed_calls_the_tool_and_answers_its_result(client: AsyncOpenAI) -> None:
    weather = Weather()
    result = Runner.run_streamed(agent(client, weather), "What is the weather in Paris?", run_config=UNTRACED)
    raw: list[list[tuple[int, str]]] = [[]]
    items: list[str] = []
    text = ""
    async for event in result.stream_events():
        if isinstance(event, RawResponsesStreamEvent):
            raw[-1].append((event.data.sequence_number, event.data.type))
            if event.data.type == "response.output_text.delta":
                text += event.data.delta
            if event.data.type == "response.completed":
                raw.append([])
        elif isinstance(event, RunItemStreamEvent):
            items.append(event.name)
            if isinstance(event.item, MessageOutputItem):
                assert ItemHelpers.text_message_output(event.item) == f"tool said: sunny in {CITY.upper()}"

    assert weather.cities == [CITY]
    assert result.final_output == f"tool said: sunny in {CITY.upper()}"
    assert text == result.final_output
    assert items == ["tool_called", "tool_output", "message_output_created"]
    streams = raw[:-1]
    assert len(streams) == 2 and raw[-1] == []
    for events in streams:
        # Each response's events numbered from 0 in order, opened and completed once.
        assert [n for n, _ in events] == list(range(len(events)))
        kinds = [k for _, k in events]
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.done" in [k for _, k in streams[0]]
    assert "response.output_text.done" in [k for _, k in streams[1]]
