"""Every error the gateway answers has OpenAI's envelope and the right status."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest

from tests.harness import Stack

CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}


def envelope(r: httpx.Response) -> dict[str, object]:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] is None or isinstance(err["code"], str)
    assert r.headers.get("x-request-id"), "every response carries x-request-id"
    return err


@pytest.fixture
def gw(shared_stack: Stack) -> Stack:
    return shared_stack


def test_malformed_json_is_400(gw: Stack) -> None:
    r = httpx.post(f"{gw.base_url}/v1/chat/completions", content=b'{"model": "synthetic", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert envelope(r)["code"] == "invalid_json"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "synthetic"}, "messages"),
    ({**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({**CHAT, "temperature": 3}, "temperature"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "max_tokens": "many"}, "max_tokens"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
])
def test_schema_violation_names_the_param(gw: Stack, body: dict[str, object], param: str) -> None:
    r = httpx.post(f"{gw.base_url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = envelope(r)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_sdk_raises_bad_request(gw: Stack) -> None:
    client = gw.sdk()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="synthetic", messages=[{"role": "user", "content": "x"}],
                                       temperature=5)
    assert info.value.body["param"] == "temperature"  # type: ignore[index]


def test_unknown_model_is_404(gw: Stack) -> None:
    r = httpx.post(f"{gw.base_url}/v1/chat/completions", json={**CHAT, "model": "gpt-99"})
    assert r.status_code == 404
    err = envelope(r)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    r = httpx.get(f"{gw.base_url}/v1/models/gpt-99")
    assert r.status_code == 404 and envelope(r)["code"] == "model_not_found"


def test_body_over_limit_is_413(gw: Stack) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
    r = httpx.post(f"{gw.base_url}/v1/chat/completions", json=big)
    assert r.status_code == 413
    assert envelope(r)["code"] == "request_too_large"


def test_routing_errors_have_the_envelope(gw: Stack) -> None:
    r = httpx.get(f"{gw.base_url}/v1/nope")
    assert r.status_code == 404
    envelope(r)
    r = httpx.get(f"{gw.base_url}/v1/chat/completions")
    assert r.status_code == 405
    envelope(r)


def test_request_id_is_echoed_or_made(gw: Stack) -> None:
    r = httpx.get(f"{gw.base_url}/health", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    a = httpx.get(f"{gw.base_url}/health").headers["x-request-id"]
    b = httpx.get(f"{gw.base_url}/health").headers["x-request-id"]
    assert a and b and a != b


def test_known_model_without_engine_is_503(stack: Stack) -> None:
    stack.gateway(models="reserved")
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json={**CHAT, "model": "reserved"})
    assert r.status_code == 503
    assert envelope(r)["code"] == "model_unavailable"
    assert httpx.get(f"{stack.base_url}/ready").status_code == 503


def test_backlog_over_limit_is_429_with_retry_after(stack: Stack) -> None:
    stack.gateway(max_backlog=2, retry_after_s=3)
    # One job at a time, one token a second: the backlog fills at once.
    stack.synthetic("synthetic", "--max-concurrency", "1", "--token-delay", "1", "--tokens", "2")
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(httpx.post, f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=30)
                   for _ in range(6)]
        responses = [f.result() for f in futures]
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 2, statuses
    assert statuses.count(429) == 4, statuses
    rejected = [r for r in responses if r.status_code == 429]
    for r in rejected:
        assert r.headers["retry-after"] == "3"
        assert envelope(r)["type"] == "rate_limit_error"


def test_deadline_is_504(stack: Stack) -> None:
    stack.gateway(request_timeout_s=1)
    stack.synthetic("synthetic", "--token-delay", "0.5", "--tokens", "10")
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 504
    assert envelope(r)["code"] == "deadline_exceeded"
    # Streaming: the 200 is out before the deadline passes, so it ends with one error event.
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json={**CHAT, "stream": True},
                      timeout=30) as s:
        assert s.status_code == 200
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"deadline_exceeded"' in events[-2]
