"""``POST /v1/responses`` through a keyed gateway and synthetic engines scripting tool calls: the
`openai` SDK's ``responses.create`` and ``.stream``, every body and event validated against
OpenAI's schemas, a function-call round trip, refusals, bounds, cancellation, failures after the
200, Idempotency-Key, usage charged and metrics labelled by route."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.tenancy.keys import HASHER, parse_key
from tests.harness import RedisServer, Stack, free_port
from tests.openai_schema import validate_response, validate_response_event, validate_response_stream

ADMIN = "responses-admin-credential-0123456789"
MODEL = "synthetic"
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                         "additionalProperties": False}},
         {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}]
ARGUMENTS = '{"city": "Paris"}'
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", *["response.output_text.delta"] * 4, "response.output_text.done",
               "response.content_part.done", "response.output_item.done", "response.completed"]
CALL_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.function_call_arguments.delta", "response.function_call_arguments.done",
               "response.output_item.done", "response.completed"]


def new_key(url: str, **fields: Any) -> str:
    r = httpx.post(f"{url}/admin/keys", json={"name": "tenant", **fields}, timeout=10,
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def keyed(stack: Stack, **settings: object) -> str:
    """A keyed gateway on ``stack``; the harness's key (it waits for models) is returned too."""
    stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN), **settings)
    stack.api_key = new_key(stack.base_url, name="harness")
    return stack.api_key


@pytest.fixture(scope="module")
def tooled(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A keyed gateway and a synthetic engine of 4 tokens scripting tool calls."""
    s = Stack(redis_server.url, tmp_path_factory.mktemp("responses"))
    keyed(s, max_messages=64, max_tools=8)
    s.synthetic(MODEL, "--tokens", "4", "--tool-calls", "--tool-arguments", ARGUMENTS)
    yield s
    s.stop()


def post(stack: Stack, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/responses", json={"model": MODEL, **body}, timeout=30,
                      headers={"Authorization": f"Bearer {stack.api_key}", **headers})


def events(stack: Stack, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed response's events, each checked: its ``event:`` line names its ``type``, its
    ``sequence_number`` is the next, and it validates against OpenAI's schema of its type."""
    out: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{stack.base_url}/v1/responses", json={"model": MODEL, **body, "stream": True},
                      headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name and event["sequence_number"] == len(out), event
                validate_response_event(event)
                out.append(event)
    validate_response_stream(out)
    return out


def test_a_text_answer_streamed_and_not_validates_and_agrees(tooled: Stack) -> None:
    client = tooled.sdk()
    response = client.responses.create(model=MODEL, input="hello there", instructions="Be brief.",
                                       metadata={"run": "7"}, temperature=0.5, store=True)
    body = response.model_dump(mode="json", exclude_unset=True)
    validate_response(body)
    assert re.fullmatch(r"resp_[0-9a-f]{24}", response.id) and response.status == "completed"
    assert response.output_text == "tok " * 4
    assert [(o.type, o.role, o.status) for o in response.output] == [("message", "assistant", "completed")]  # type: ignore[union-attr]
    assert (response.instructions, response.metadata, response.temperature) == ("Be brief.", {"run": "7"}, 0.5)
    # The synthetic engine counts words of every message: the instructions are the first.
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (4, 4, 8)  # type: ignore[union-attr]

    with client.responses.stream(model=MODEL, input="hello there", instructions="Be brief.") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds == TEXT_EVENTS
    assert final.output_text == response.output_text and final.usage == response.usage
    streamed = events(tooled, {"input": "hello there"})
    assert [e["type"] for e in streamed] == TEXT_EVENTS
    assert streamed[0]["response"]["status"] == "in_progress" and streamed[0]["response"]["output"] == []
    assert "".join(e["delta"] for e in streamed if e["type"] == "response.output_text.delta") == "tok " * 4
    done = streamed[-1]["response"]
    assert done["id"] == streamed[0]["response"]["id"] and done["output"] == [streamed[-2]["item"]]


def test_a_function_call_round_trip(tooled: Stack) -> None:
    client = tooled.sdk()
    first = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Weather in Paris?"}],
                                    tools=TOOLS)  # type: ignore[arg-type]
    validate_response(first.model_dump(mode="json", exclude_unset=True))
    [call] = first.output
    assert (call.type, call.name, call.arguments, call.status) == (  # type: ignore[union-attr]
        "function_call", "get_weather", ARGUMENTS, "completed")
    assert call.id.startswith("fc_") and call.call_id  # type: ignore[union-attr]
    # The next turn replays the output as it came (ids, statuses), as stateless clients do.
    replay = [{"role": "user", "content": "Weather in Paris?"}, *(o.model_dump(mode="json", exclude_unset=True)
                                                                    for o in first.output),
              {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]  # type: ignore[union-attr]
    second = client.responses.create(model=MODEL, input=replay, tools=TOOLS)  # type: ignore[arg-type]
    assert second.output_text == "tool said: sunny"

    streamed = events(tooled, {"input": "Weather?", "tools": TOOLS})
    assert [e["type"] for e in streamed] == CALL_EVENTS
    added, delta, args_done, item_done = streamed[2:6]
    assert added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"
    assert delta["delta"] == ARGUMENTS and args_done["arguments"] == ARGUMENTS and args_done["name"] == "get_weather"
    assert item_done["item"]["call_id"] == added["item"]["call_id"] and item_done["item"]["status"] == "completed"
    assert streamed[-1]["response"]["output"] == [item_done["item"]]


def test_a_named_tool_choice_calls_that_tool(tooled: Stack) -> None:
    response = tooled.sdk().responses.create(model=MODEL, input="What time is it?", tools=TOOLS,  # type: ignore[arg-type]
                                             tool_choice={"type": "function", "name": "get_time"})
    assert [o.name for o in response.output] == ["get_time"]  # type: ignore[union-attr]
    assert response.tool_choice.name == "get_time"  # type: ignore[union-attr]
    r = post(tooled, {"input": "hi", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "tool_choice")


def test_max_output_tokens_makes_an_incomplete_response(tooled: Stack) -> None:
    r = post(tooled, {"input": "hi", "max_output_tokens": 2})
    assert r.status_code == 200
    body = r.json()
    validate_response(body)
    assert (body["status"], body["incomplete_details"], body["output"][0]["status"]) == (
        "incomplete", {"reason": "max_output_tokens"}, "incomplete")
    streamed = events(tooled, {"input": "hi", "max_output_tokens": 2})
    assert streamed[-1]["type"] == "response.incomplete"
    assert streamed[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


#: What stateless clients send every turn (the Codex CLI, the Agents SDK): never refused.
CLIENT_HINTS: dict[str, Any] = {
    "store": False, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "5e6f", "parallel_tool_calls": True,
    "reasoning": {"summary": "auto"}, "text": {"verbosity": "low"}, "service_tier": "auto",
    "safety_identifier": "user-1", "client_metadata": {"x-codex-turn-metadata": "{}"}, "tool_choice": "auto",
    "max_tool_calls": 3, "prompt_cache_retention": "24h", "background": False, "truncation": "disabled",
    "input": [
        {"type": "message", "id": "msg_0f6a", "role": "developer", "content": [{"type": "input_text", "text": "a"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "b"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None,
         "content": [{"type": "reasoning_text", "text": "thinking"}]},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "c", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "id": "fc_1", "status": "completed", "call_id": "call_1", "name": "get_time",
         "arguments": "{}"},
        {"type": "function_call_output", "id": "fco_1", "call_id": "call_1", "output": "noon"}],
}


def test_the_hints_clients_always_send_are_accepted(tooled: Stack) -> None:
    r = post(tooled, {**CLIENT_HINTS, "tools": TOOLS})
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["text"] == "tool said: noon"
    streamed = events(tooled, {**CLIENT_HINTS, "stream_options": {"include_obfuscation": False}})
    assert streamed[-1]["type"] == "response.completed"


@pytest.mark.parametrize(("field", "value", "param"), [
    ("previous_response_id", "resp_1", "previous_response_id"),
    ("conversation", "conv_1", "conversation"),
    ("prompt", {"id": "pmpt_1"}, "prompt"),
    ("truncation", "auto", "truncation"),
    ("tools", [{"type": "web_search"}], "tools[0].type"),
    ("tools", [TOOLS[0], {"type": "file_search", "vector_store_ids": ["vs_1"]}], "tools[1].type"),
    ("tool_choice", {"type": "web_search_preview"}, "tool_choice.type"),
    ("input", [{"type": "item_reference", "id": "msg_1"}], "input[0].type"),
    ("input", [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}],
     "input[0].content[0].type"),
    ("input", [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}],
     "input[0].content[0].file_id"),
    ("input", [{"role": "user", "content": [{"type": "input_image", "image_url": "http://10.0.0.1/a.png"}]}],
     "input[0].content[0].image_url"),
    ("include", ["everything"], "include[0]"),
    ("input", [{"type": "reasoning", "summary": []}], "input"),
    ("input", [{"role": "robot", "content": "hi"}], "input[0].role"),
    ("input", [{"type": "function_call", "call_id": "c", "name": "f"}], "input[0].arguments"),
    ("stream_options", {"include_obfuscation": True}, "stream_options"),
])
def test_what_is_not_served_is_a_400_naming_it(tooled: Stack, field: str, value: Any, param: str) -> None:
    body = {"input": "hi", field: value}
    r = post(tooled, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"role": "user", "content": "x"}] * 65}, "input"),
    ({"tools": [{**TOOLS[1], "name": f"t{i}"} for i in range(9)]}, "tools"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"top_logprobs": 21}, "top_logprobs"),
    # Echoed in a stream's three lifecycle events and charged nothing: bounded.
    ({"user": "u" * 257}, "user"),
    ({"prompt_cache_key": "k" * 257}, "prompt_cache_key"),
    ({"max_tool_calls": -1}, "max_tool_calls"),
    ({"tools": [{**TOOLS[1], "parameters": json.loads("[" * 70 + "]" * 70)}]}, "tools[0].parameters"),
])
def test_what_scales_work_is_bounded(tooled: Stack, body: dict[str, Any], param: str) -> None:
    r = post(tooled, {"input": "hi", **body})
    assert (r.status_code, r.json()["error"]["param"]) == (400, param), r.text


def test_an_idempotency_key_replays_the_response(tooled: Stack) -> None:
    key = f"idem-{time.time_ns()}"
    first = post(tooled, {"input": "hi"}, **{"Idempotency-Key": key})
    again = post(tooled, {"input": "hi"}, **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 200
    assert again.headers.get("idempotent-replayed") == "true" and again.json()["id"] == first.json()["id"]


def test_a_response_is_charged_and_counted_by_its_route(tooled: Stack) -> None:
    key = new_key(tooled.base_url)
    got = [httpx.post(f"{tooled.base_url}/v1/responses", json={"model": MODEL, "input": "one two"}, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) for _ in range(3)]
    assert all(r.status_code == 200 for r in got)
    key_id = parse_key(key)[0]  # type: ignore[index]

    def recorded() -> dict[str, Any]:
        r = httpx.get(f"{tooled.base_url}/admin/keys/{key_id}/usage?days=1", timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200, r.text
        return dict(r.json()["days"][0]["models"].get(MODEL, {}))

    deadline = time.monotonic() + 10  # counted once each run ends, written each second
    while recorded().get("requests") != 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    usage = recorded()
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (
        3, sum(r.json()["usage"]["input_tokens"] for r in got), sum(r.json()["usage"]["output_tokens"] for r in got))
    metrics = httpx.get(f"{tooled.base_url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert re.search(r'http_server_request_duration_seconds_count\{(?=[^}]*http_route="/v1/responses")'
                     r'(?=[^}]*http_response_status_code="200")[^}]*\} [1-9]', metrics), metrics[:3000]


def test_a_client_that_leaves_cancels_the_engine_job(stack: Stack) -> None:
    metrics_port = free_port()
    keyed(stack)
    stack.synthetic(MODEL, "--token-delay", "0.2", "--tokens", "100", "--metrics-port", str(metrics_port))
    with httpx.stream("POST", f"{stack.base_url}/v1/responses", json={"model": MODEL, "input": "hi", "stream": True},
                      headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if "response.output_text.delta" in line)
    deadline = time.monotonic() + 10  # the engine hears of it long before its 20 s of tokens
    pattern = re.compile(r'conduit_engine_jobs_total\{[^}]*outcome="cancelled"[^}]*\} (\d+)')
    while time.monotonic() < deadline:
        m = pattern.search(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text)
        if m and float(m.group(1)) >= 1:
            return
        time.sleep(0.2)
    pytest.fail("the engine never cancelled the job")


def test_a_failure_after_the_stream_began_ends_it_with_error_and_response_failed(stack: Stack) -> None:
    keyed(stack, request_timeout_s=1.5)
    stack.synthetic(MODEL, "--token-delay", "0.2", "--tokens", "100")
    streamed = events(stack, {"input": "hi"})
    kinds = [e["type"] for e in streamed]
    assert "response.output_text.delta" in kinds and kinds[-2:] == ["error", "response.failed"], kinds
    failed = streamed[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert streamed[-2]["code"] == "deadline_exceeded"
    with stack.sdk().responses.stream(model=MODEL, input="hi") as stream:
        last = [event for event in stream][-1]
    assert last.type == "response.failed" and last.response.status == "failed"  # type: ignore[union-attr]
    assert last.response.error.message == "The request did not finish within 1.5s."  # type: ignore[union-attr]
    # What was made before the failure is in it, marked incomplete.
    [partial] = last.response.output
    assert partial.status == "incomplete" and partial.content[0].text.startswith("tok ")  # type: ignore[union-attr]


def test_no_key_no_response(tooled: Stack) -> None:
    for path in ("/v1/responses", "/v1/responses/input_tokens", "//v1/responses", "/v1//responses"):
        r = httpx.post(f"{tooled.base_url}{path}", json={"model": MODEL, "input": "hi"})
        assert r.status_code in (401, 404), (path, r.status_code)
        assert r.status_code == 401 or path.count("//"), path


def test_a_streamed_response_whose_engine_dies_before_output_is_run_elsewhere(stack: Stack) -> None:
    """The stream's opening events say nothing the model made: a job lost before its first token is
    run again by another engine, as a chat stream's is, not failed."""
    import threading

    import redis

    keyed(stack)
    doomed = stack.synthetic(MODEL, "--first-token-delay", "30", "--reclaim-idle-ms", "1000")
    got: dict[str, Any] = {}
    t = threading.Thread(target=lambda: got.update(events=events(stack, {"input": "hi", "max_output_tokens": 3})))
    t.start()
    r = redis.Redis.from_url(stack.redis_url)
    try:
        deadline = time.monotonic() + 10
        while not r.xpending(f"{stack.prefix}:jobs:{{{MODEL}}}", "engines")["pending"]:
            assert time.monotonic() < deadline, "the engine never took the job"
            time.sleep(0.05)
    finally:
        r.close()
    doomed.kill()
    stack.synthetic(MODEL, "--reclaim-idle-ms", "1000")
    t.join(timeout=60)
    kinds = [e["type"] for e in got["events"]]
    assert kinds[-1] == "response.incomplete", kinds  # 3 tokens of max_output_tokens 3, from the second engine
    assert "".join(e["delta"] for e in got["events"] if e["type"] == "response.output_text.delta") == "tok " * 3


def test_input_tokens_are_counted_and_charged_as_a_request_only(tooled: Stack) -> None:
    key = new_key(tooled.base_url)
    given = {"model": MODEL, "input": "one two three", "instructions": "be brief"}
    got = [httpx.post(f"{tooled.base_url}/v1/responses/input_tokens", json=given, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) for _ in range(3)]
    assert [r.status_code for r in got] == [200] * 3, got[0].text
    assert got[0].json() == {"input_tokens": 5, "object": "response.input_tokens"}  # the synthetic engine's words
    answered = post(tooled, given)
    assert answered.json()["usage"]["input_tokens"] == 5
    key_id = parse_key(key)[0]  # type: ignore[index]

    def recorded() -> dict[str, Any]:
        r = httpx.get(f"{tooled.base_url}/admin/keys/{key_id}/usage?days=1", timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN}"})
        return dict(r.json()["days"][0]["models"].get(MODEL, {})) if r.json()["days"] else {}

    deadline = time.monotonic() + 10  # counted once each run ends, written each second
    while recorded().get("requests") != 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    usage = recorded()
    assert (usage["requests"], usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)) == (3, 0, 0), usage
