"""Per-key limits through the whole stack: two gateway processes with authentication on, real
keys made with the admin API, real Redis, synthetic (and for images, diffusers) engines.

Each limit must hold exactly across the two gateways under concurrent load: every request is
counted, and exactly the limit is admitted. Usage read back through the admin API must equal
the sum of the ``usage`` the responses carried.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.tenancy.keys import HASHER, parse_key
from tests.harness import Stack

ADMIN = "tenancy-admin-credential-0123456789"
CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def two_gateways(stack: Stack) -> list[str]:
    urls = []
    for _ in range(2):
        stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN))
        urls.append(stack.base_url)
    stack.api_key = new_key(urls[0], name="watcher")  # the harness's own (it waits for models)
    return urls


def new_key(url: str, **fields: Any) -> str:
    r = httpx.post(f"{url}/admin/keys", json={"name": "tenant", **fields}, timeout=10,
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def fire(urls: list[str], key: str, count: int, path: str = "/v1/chat/completions",
         body: dict[str, Any] | None = None) -> list[httpx.Response]:
    """``count`` requests at once, alternating between the gateways."""
    def one(i: int) -> httpx.Response:
        return httpx.post(f"{urls[i % len(urls)]}{path}", json=body or CHAT, timeout=60,
                          headers={"Authorization": f"Bearer {key}"})

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def statuses(responses: list[httpx.Response]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in responses:
        out[r.status_code] = out.get(r.status_code, 0) + 1
    return out


def assert_rate_limited(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded"), err
    assert int(r.headers["retry-after"]) >= 1


def test_requests_per_minute_hold_exactly_across_two_gateways(stack: Stack) -> None:
    urls = two_gateways(stack)
    stack.synthetic()
    key = new_key(urls[0], limits={"rpm": 10})
    got = fire(urls, key, 40)
    assert statuses(got) == {200: 10, 429: 30}
    for r in got:
        if r.status_code == 429:
            assert_rate_limited(r)
    ok = [r for r in got if r.status_code == 200]
    # Every response of a keyed request carries OpenAI's rate-limit headers.
    assert {r.headers["x-ratelimit-limit-requests"] for r in got} == {"10"}
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(range(10))
    assert all(r.headers["x-ratelimit-reset-requests"].endswith("s") for r in got)
    # The SDK surfaces it as its RateLimitError.
    with openai.OpenAI(base_url=f"{urls[1]}/v1", api_key=key, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="synthetic", messages=[{"role": "user", "content": "hi"}])


def test_concurrency_holds_exactly_across_two_gateways(stack: Stack) -> None:
    urls = two_gateways(stack)
    stack.synthetic("synthetic", "--token-delay", "0.5", "--tokens", "4")
    key = new_key(urls[0], limits={"concurrency": 3})
    got = fire(urls, key, 12)
    assert statuses(got) == {200: 3, 429: 9}
    # The slots are free again once those requests ended: the next three pass.
    assert statuses(fire(urls, key, 3)) == {200: 3}


def test_tokens_per_minute_reserve_then_reconcile(stack: Stack) -> None:
    urls = two_gateways(stack)
    stack.synthetic("synthetic", "--tokens", "2")
    # Each request reserves its prompt estimate (a few tokens) + max_tokens (100): 3 fit in 350.
    key = new_key(urls[0], limits={"tpm": 350})
    body = {**CHAT, "max_tokens": 100}
    got = fire(urls, key, 8, body=body)
    assert statuses(got) == {200: 3, 429: 5}
    # Each answer used ~2 completion tokens, not 100: the reservations were returned, and more fit.
    time.sleep(0.5)
    assert statuses([httpx.post(f"{urls[0]}/v1/chat/completions", json=body, timeout=30,
                                headers={"Authorization": f"Bearer {key}"})]) == {200: 1}


def test_images_per_minute_hold_exactly(stack: Stack, tiny_sd_dir: Path) -> None:
    urls = two_gateways(stack)
    stack.diffusers("tiny-sd", path=tiny_sd_dir, timeout=120)
    key = new_key(urls[0], limits={"ipm": 4})
    body = {"model": "tiny-sd", "prompt": "a fox", "size": "64x64", "num_inference_steps": 2, "n": 2,
            "response_format": "b64_json"}
    got = fire(urls, key, 5, path="/v1/images/generations", body=body)
    assert statuses(got) == {200: 2, 429: 3}  # 2 images each: two requests fill the 4


def test_usage_equals_the_sum_of_the_responses_usage(stack: Stack) -> None:
    urls = two_gateways(stack)
    stack.synthetic("synthetic", "--tokens", "3")
    key = new_key(urls[0])
    key_id = parse_key(key)[0]  # type: ignore[index]
    got = fire(urls, key, 12, body={**CHAT, "n": 2})
    assert statuses(got) == {200: 12}
    prompt = sum(r.json()["usage"]["prompt_tokens"] for r in got)
    completion = sum(r.json()["usage"]["completion_tokens"] for r in got)

    def recorded() -> dict[str, Any]:
        r = httpx.get(f"{urls[1]}/admin/keys/{key_id}/usage?days=1", timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200, r.text
        day = r.json()["days"][0]
        return dict(day["models"].get("synthetic", {}))

    deadline = time.monotonic() + 5  # written just after each answer went out
    while recorded().get("requests") != 12 and time.monotonic() < deadline:
        time.sleep(0.1)
    usage = recorded()
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (12, prompt, completion)
