"""Bounded work per request: hostile bodies get a quick 400 naming the field; the gateway serves on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import RedisServer, Stack

# On the old code the first of these took seconds and the second killed or wedged the gateway
# (n x prompts choices allocated up front); a short timeout makes that a failure, not a hang.
TIMEOUT = 10


@pytest.fixture(scope="module")
def gw(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway that reads bodies up to 16 MB (the 8 MB one must reach validation) and allows
    256 choices per request (a raised limit, set as CONDUIT_MAX_CHOICES)."""
    s = Stack(redis_server.url, tmp_path_factory.mktemp("bounds"))
    s.gateway(max_body_bytes=16_000_000, max_choices=256)
    s.synthetic()
    yield s
    s.stop()


def post(gw: Stack, path: str, body: dict[str, Any]) -> httpx.Response:
    data = json.dumps({"model": "synthetic", **body}, separators=(",", ":")).encode()
    with httpx.Client(base_url=gw.base_url, timeout=TIMEOUT) as client:
        return client.post(path, content=data, headers={"content-type": "application/json"})


def assert_still_serving(gw: Stack) -> None:
    r = post(gw, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert all(p.alive() for p in gw.procs)


@pytest.mark.parametrize(("path", "body", "param"), [
    # The bodies: 100 KB (20,000 one-letter prompts) and 8 MB (2,000,000), n = 128.
    pytest.param("/v1/completions", {"prompt": ["a"] * 20_000, "n": 128}, "prompt", id="100KB-20k-prompts"),
    pytest.param("/v1/completions", {"prompt": ["a"] * 2_000_000, "n": 128}, "prompt", id="8MB-2M-prompts"),
    pytest.param("/v1/completions", {"prompt": ["a"] * 3, "n": 128}, "n", id="384-choices"),
    pytest.param("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 200_000},
                 "messages", id="200k-messages"),
    pytest.param("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                          "logit_bias": {str(i): 1 for i in range(100_000)}},
                 "logit_bias", id="100k-logit-bias"),
])
def test_hostile_body_is_400_and_the_gateway_serves_on(gw: Stack, path: str, body: dict[str, Any],
                                                       param: str) -> None:
    r = post(gw, path, body)
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, "invalid_value", "invalid_request_error")
    assert "at most" in err["message"]
    assert_still_serving(gw)


def test_raised_limit_is_honoured(gw: Stack) -> None:
    # 2 prompts x n=128 = 256 choices: refused by default, allowed by this gateway's setting.
    r = post(gw, "/v1/completions", {"prompt": ["a", "b"], "n": 128, "max_tokens": 1})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["object"] == "text_completion"


def test_a_chat_request_without_max_tokens_is_capped_to_what_the_bound_allows(stack: Stack) -> None:
    """It names no max_tokens, so each of its 4 choices may run as long as the engine goes (1,000
    tokens here): 4,000 tokens against a bound of 2,000. It is served with max_tokens 500, as a
    model's own output limit caps it; one that names 1,000 is refused."""
    stack.gateway(max_output_work=2000)
    stack.synthetic("synthetic", "--tokens", "1000")
    chat = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "n": 4}
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["usage"]["completion_tokens"] == 2000
    assert {c["finish_reason"] for c in r.json()["choices"]} == {"length"}
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json={**chat, "max_tokens": 1000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
