"""Per-key limits through the whole stack: two gateway processes with authentication on, real
keys made with the admin API, real Redis, synthetic (and for images, diffusers) engines.

Each limit must hold exactly across the two gateways under concurrent load: every request is
counted, and exactly the limit is admitted. Usage read back through the admin API must equal
the sum of the ``usage`` the responses carried.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from gateway.tenancy.keys import HASHER, parse_key
from tests.fakes import FakeEngine
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
    # Slow enough that all 8 arrive while the first ones still hold their reservations.
    stack.synthetic("synthetic", "--tokens", "2", "--token-delay", "0.4")
    # Each request reserves its prompt estimate (a few tokens) + max_tokens (100): 3 fit in 350.
    key = new_key(urls[0], limits={"tpm": 350})
    body = {**CHAT, "max_tokens": 100}
    got = fire(urls, key, 8, body=body)
    assert statuses(got) == {200: 3, 429: 5}
    # Each answer used ~2 completion tokens, not 100: the reservations were returned, and more fit.
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


def test_a_flooding_key_does_not_starve_another_and_holds_only_its_share(stack: Stack) -> None:
    """Key A queues 30 slow requests on an engine that runs 2 at a time; key B's 3 requests, sent
    after, are served in turn with A's (each waits at most a turn), not after all of A's. A key
    with a small backlog share is refused beyond it while the others are admitted."""
    urls: list[str] = []
    gateways = []
    for _ in range(2):
        gateways.append(stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN), max_backlog=40))
        urls.append(stack.base_url)
    stack.api_key = new_key(urls[0], name="watcher")
    stack.synthetic("synthetic", "--max-concurrency", "2", "--tokens", "2", "--token-delay", "0.1")
    flood = new_key(urls[0], name="flood", limits={"backlog_share": 1.0})
    polite = new_key(urls[1], name="polite")
    small = new_key(urls[0], name="small", limits={"backlog_share": 0.05})  # 2 of 40

    def one(key: str, url: str) -> int:
        return httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}).status_code

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        floods = [pool.submit(one, flood, urls[i % 2]) for i in range(30)]
        time.sleep(0.8)  # A's backlog is queued; a few of its 30 are done
        polites = [pool.submit(one, polite, urls[i % 2]) for i in range(3)]
        smalls = [pool.submit(one, small, urls[0]) for _ in range(4)]
        assert [f.result() for f in floods + polites] == [200] * 33
        assert sorted(f.result() for f in smalls) == [200, 200, 429, 429]
    # When each request reached a gateway and when it ended, as the gateways logged them (the
    # client's clock would count the time a loaded machine takes to send B's requests as A's turns).
    deadline = time.monotonic() + 5
    while len(lines := [x for gw in gateways for x in gw.request_lines() if x["route"] == "/v1/chat/completions"
                        and x["key"] in ("flood", "polite")]) < 33:
        assert time.monotonic() < deadline, lines
        time.sleep(0.1)
    spans = [(x["key"], _epoch(x["ts"]) - x["duration_ms"] / 1000, _epoch(x["ts"])) for x in lines]
    b_arrived = max(start for key, start, _ in spans if key == "polite")
    b_last = max(end for key, _, end in spans if key == "polite")
    a_meanwhile = sum(1 for key, _, end in spans if key == "flood" and b_arrived < end < b_last)
    # Served in turn: once B's 3 jobs were queued, A got about one turn per job of B's and C's
    # still waiting, plus the 2 already running (6-7 measured here); served in arrival order it
    # is the ~22 A jobs still queued when B arrived (22 measured with tenants switched off).
    assert a_meanwhile <= 8, sorted(spans, key=lambda s: s[2])


def _epoch(ts: str) -> float:
    """A log line's ``ts`` (``2026-12-02T07:31:26.029Z``) in seconds since the epoch."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _usage_of(url: str, key: str) -> dict[str, Any]:
    key_id = parse_key(key)[0]  # type: ignore[index]
    r = httpx.get(f"{url}/admin/keys/{key_id}/usage?days=1", timeout=10, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return dict(r.json()["days"][0]["models"].get("synthetic", {}))


def _settled(url: str, key: str, requests: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10  # counted once the run ends, written each second
    while (usage := _usage_of(url, key)).get("requests", 0) < requests and time.monotonic() < deadline:
        time.sleep(0.1)
    return usage


def _remaining_tokens(url: str, key: str) -> int:
    """What the key's token window has left, as the next (tiny) request's headers say."""
    r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}, timeout=30,
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return int(r.headers["x-ratelimit-remaining-tokens"]) + r.json()["usage"]["total_tokens"]


def test_a_dropped_stream_is_charged_every_token_it_was_sent(stack: Stack) -> None:
    """A client that reads 2,500 streamed tokens and hangs up is charged them (usage and the tpm
    window), not 0 tokens and its ~1,030-token admission reservation."""
    urls = two_gateways(stack)
    stack.synthetic("synthetic", "--tokens", "6000", "--token-delay", "0.001")
    key = new_key(urls[0], limits={"tpm": 8000})
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi there"}], "stream": True}
    got = 0
    with httpx.stream("POST", f"{urls[0]}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += json.loads(line[6:])["choices"][0]["delta"].get("content", "").count("tok")
                if got >= 2500:
                    break
    usage = _settled(urls[1], key, 1)
    assert usage["prompt_tokens"] == 2  # the synthetic engine's count: words
    assert 2500 <= usage["completion_tokens"] < 6000, usage
    left = _remaining_tokens(urls[1], key)
    assert left <= 8000 - 2502 and left >= 8000 - usage["completion_tokens"] - 2 - 50, left


def test_a_stream_ended_by_its_deadline_is_charged_what_it_was_sent(stack: Stack) -> None:
    stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN), request_timeout_s=2)
    url = stack.base_url
    stack.api_key = new_key(url, name="watcher")
    stack.synthetic("synthetic", "--tokens", "1000", "--token-delay", "0.01")
    key = new_key(url)
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "deadline_exceeded" in lines[-2] and lines[-1] == "data: [DONE]"
    sent = sum(json.loads(x[6:])["choices"][0]["delta"].get("content", "").count("tok") for x in lines[:-2])
    usage = _settled(url, key, 1)
    assert sent > 20 and sent <= usage["completion_tokens"] <= sent + 10, (sent, usage)


def test_refusals_after_admission_give_back_the_request_slot(stack: Stack) -> None:
    """A 429 model_overloaded (the queue) comes after the key's limits admitted the request: its
    request (rpm) slot and tokens go back, so the key still has its 3 requests."""
    stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN), max_backlog=2)
    url = stack.base_url
    stack.api_key = new_key(url, name="watcher")
    stack.synthetic("synthetic", "--max-concurrency", "1", "--tokens", "2", "--token-delay", "1")
    flood = new_key(url, name="flood", limits={"backlog_share": 1.0})
    key = new_key(url, limits={"rpm": 3, "tpm": 100_000})

    def post(k: str, **fields: Any) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json={**CHAT, **fields}, timeout=30,
                          headers={"Authorization": f"Bearer {k}"})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(post, flood) for _ in range(2)]  # the backlog of 2 is full for ~2 s
        time.sleep(0.5)
        refused = [post(key) for _ in range(5)]
        assert {r.json()["error"]["code"] for r in refused} == {"model_overloaded"}, [r.text for r in refused]
        assert [f.result().status_code for f in busy] == [200, 200]
    ok = [post(key) for _ in range(3)]
    assert [r.status_code for r in ok] == [200, 200, 200], [r.text for r in ok]
    assert post(key).status_code == 429  # and then the limit holds
    assert _settled(url, key, 3)["requests"] == 3
    # A refusal by the key's own share of the backlog is its own doing: it keeps its request slot
    # (else a key at its share could send requests past its rpm without end).
    small = new_key(url, name="small", limits={"rpm": 3, "backlog_share": 0.0001})  # one job at a time
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, small)
        time.sleep(0.5)
        assert [post(small).json()["error"]["code"] for _ in range(2)] == ["model_overloaded"] * 2
        assert post(small).json()["error"]["code"] == "rate_limit_exceeded"  # 1 running + 2 refused = 3
        assert running.result().status_code == 200


def test_an_engines_refusal_gives_back_tokens_not_the_request(stack: Stack) -> None:
    """An engine that refuses a job (a 400 before any output) did work on it: the key gets its
    tokens back but keeps the request counted, so refused requests cannot reach engines past the
    key's rpm (a refund there let a key of rpm 5 send 30 in 0.1 s)."""
    stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN))
    url = stack.base_url
    key = new_key(url, limits={"rpm": 2, "tpm": 5_000})
    with FakeEngine(stack.redis_url, stack.prefix, "fake") as engine:
        stack.api_key = key
        stack.wait_for_model("fake")

        def refused_by_the_engine() -> httpx.Response:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                answer = pool.submit(httpx.post, f"{url}/v1/chat/completions", timeout=30,
                                     json={**CHAT, "model": "fake", "max_tokens": 1000},
                                     headers={"Authorization": f"Bearer {key}"})
                job = engine.next_job()
                engine.reply(job, [{"t": "e", "message": "No.", "code": "invalid_request", "status": 400,
                                    "type": "invalid_request_error", "param": "messages"}])
                engine.ack(job)
                return answer.result()

        first = refused_by_the_engine()
        assert first.status_code == 400 and first.json()["error"]["message"] == "No."
        assert int(first.headers["x-ratelimit-remaining-tokens"]) < 4_000  # ~1,006 reserved at admission
        second = refused_by_the_engine()
        # The first's ~1,006 reserved tokens came back; its request did not.
        assert int(second.headers["x-ratelimit-remaining-tokens"]) > 3_900, second.headers
        third = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "fake"}, timeout=30,
                           headers={"Authorization": f"Bearer {key}"})
        assert third.status_code == 429 and "requests per minute" in third.json()["error"]["message"], third.text


def test_one_key_cannot_fill_redis_with_jobs_at_the_body_limit(stack: Stack) -> None:
    """The backlog is bounded in bytes: a key holds at most its share of ``max_backlog_bytes`` (here
    4.5 of 9 MB: four 1 MB jobs), then gets 429 model_overloaded; another key still gets in."""
    stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN), max_body_bytes=1_100_000, max_backlog_bytes=9_000_000)
    url = stack.base_url
    stack.api_key = new_key(url, name="watcher")
    stack.synthetic("synthetic", "--max-concurrency", "1", "--tokens", "2", "--token-delay", "1")
    big, other = new_key(url, name="big"), new_key(url, name="other")
    body = {**CHAT, "messages": [{"role": "user", "content": "a" * 1_000_000}]}
    r = redis.Redis.from_url(stack.redis_url)
    try:
        before = int(r.info("memory")["used_memory"])
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            floods = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=60,
                                  headers={"Authorization": f"Bearer {big}"}) for _ in range(8)]
            time.sleep(1.0)
            held = int(r.info("memory")["used_memory"]) - before
            polite = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {other}"})
            got = [f.result() for f in floods]
            assert polite.result().status_code == 200, polite.result().text
    finally:
        r.close()
    assert statuses(got) == {200: 4, 429: 4}, [x.text[:200] for x in got]
    for refused in (x for x in got if x.status_code == 429):
        error = refused.json()["error"]
        assert error["code"] == "model_overloaded" and "bytes" in error["message"], error
    assert held < 8_000_000, held  # four jobs' bytes (and Redis's own), not eight


def test_a_stream_whose_engine_died_is_charged_what_it_was_sent(stack: Stack) -> None:
    stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN))
    url = stack.base_url
    stack.api_key = key = new_key(url)
    doomed = stack.synthetic("synthetic", "--token-delay", "0.05", "--tokens", "500", "--reclaim-idle-ms", "1000")
    sent = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 500, "stream": True},
                      timeout=60, headers={"Authorization": f"Bearer {key}"}) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                sent += json.loads(line[6:])["choices"][0]["delta"].get("content", "").count("tok")
                if sent >= 20:
                    break
        doomed.kill()
        stack.synthetic("synthetic", "--reclaim-idle-ms", "1000", wait=False)  # finds the job, fails it cleanly
        rest = [line for line in lines if line.startswith("data: ")]
    assert "engine_lost" in rest[-2], rest[-3:]
    sent += sum(json.loads(x[6:])["choices"][0]["delta"].get("content", "").count("tok") for x in rest[:-2])
    usage = _settled(url, key, 1)
    assert sent <= usage["completion_tokens"] <= sent + 5 and usage["prompt_tokens"] == 1, (sent, usage)
