"""Models that scale from zero: a declared model with no live engine is *cold* (``gateway.cold``).

Real Redis, real gateway and engine processes, the `openai` SDK as the client: requests for a cold
model wait (bounded as any queued request), an engine started within the cold-start deadline serves
every one of them exactly once, and past the deadline they get 503 with Retry-After, their jobs
withdrawn (an engine started later runs none of them) and their key charged nothing. The demand
gauge ``conduit_gateway_requests_cold`` rises while they wait and falls when they are served or
time out.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import redis

from gateway.tenancy.keys import HASHER, parse_key
from tests.harness import Stack, free_port
from tests.integration.test_telemetry import scrape, value

MODEL = "cold"
ADMIN = "cold-start-admin-credential-0123456789"
GAUGE = "conduit_gateway_requests_cold"


def cold_gauge(stack: Stack) -> float | None:
    return value(scrape(f"{stack.base_url}/metrics"), GAUGE, gen_ai_request_model=MODEL)


def wait_until(what: Callable[[], Any], expected: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (got := what()) != expected:
        assert time.monotonic() < deadline, f"still {got!r}, waited for {expected!r}"
        time.sleep(0.05)


def engine_jobs(port: int, outcome: str = "ok") -> float:
    found = value(scrape(f"http://127.0.0.1:{port}/metrics"), "conduit_engine_jobs_total",
                  gen_ai_request_model=MODEL, outcome=outcome)
    return found or 0.0


def ask(client: openai.OpenAI, i: int, stream: bool) -> str:
    """One chat request; its whole answer's text (the synthetic engine's numbered tokens)."""
    messages = [{"role": "user", "content": f"request {i}"}]
    if not stream:
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)  # type: ignore[arg-type]
        return answer.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5,  # type: ignore[arg-type]
                                            stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_an_engine_started_within_the_deadline_serves_every_waiting_request(stack: Stack) -> None:
    stack.gateway(models=MODEL, cold_start_timeout_s=60)
    assert cold_gauge(stack) == 0  # a declared model's series exists from the start
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=90)
    # Listed while cold: a client that picks its model from /v1/models can pick it (and so wake it).
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    n = 12
    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(ask, client, i, i % 2 == 0) for i in range(n)]
        wait_until(lambda: cold_gauge(stack), n)  # every one waits: nothing refused, nothing answered
        assert not any(f.done() for f in futures)
        port = free_port()
        # 4 slots for 12 jobs: most wait in their key's list and are promoted as slots free.
        stack.synthetic(MODEL, "--numbered", "--max-concurrency", "4", "--token-delay", "0.01",
                        "--metrics-port", str(port), wait=False)
        answers = [f.result(timeout=60) for f in futures]
    assert answers == ["0 1 2 3 4 "] * n  # 0 lost, no token twice
    wait_until(lambda: cold_gauge(stack), 0)
    assert engine_jobs(port) == n  # each job ran once
    client.close()


def test_past_the_deadline_503_with_retry_after_and_the_job_never_runs_nor_charges(stack: Stack) -> None:
    stack.gateway(models=MODEL, cold_start_timeout_s=2, retry_after_s=7, auth=True, admin_key_hash=HASHER.hash(ADMIN))
    r = httpx.post(f"{stack.base_url}/admin/keys", json={"name": "tenant", "limits": {"rpm": 3, "tpm": 1000}}, timeout=10,
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    key = str(r.json()["key"])
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=30)
    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(ask, client, i, i == 0) for i in range(3)]
        wait_until(lambda: cold_gauge(stack), 3)
        started = time.monotonic()
        errors = []
        for f in futures:
            with pytest.raises(openai.APIStatusError) as info:
                f.result(timeout=30)
            errors.append(info.value)
    assert time.monotonic() - started < 10
    for err in errors:  # the streaming one too: refused before its 200
        assert err.status_code == 503
        assert err.response.headers["retry-after"] == "7"
        assert err.body["code"] == "model_unavailable"  # type: ignore[index]
    wait_until(lambda: cold_gauge(stack), 0)

    # Nothing of them is left where an engine would find it, and nothing is held in the backlog.
    with redis.Redis.from_url(stack.redis_url) as db:
        assert db.xlen(f"{stack.prefix}:jobs:{{{MODEL}}}") == 0
        assert not db.keys(f"{stack.prefix}:wait:*")
        assert int(db.hget(f"{stack.prefix}:queued-bytes:{{{MODEL}}}", "total") or 0) == 0
        assert db.zcard(f"{stack.prefix}:queued-jobs:{{{MODEL}}}") == 0

    port = free_port()
    stack.api_key = key
    stack.synthetic(MODEL, "--metrics-port", str(port))
    time.sleep(1.5)  # an engine would have read and run them by now
    assert engine_jobs(port) == 0
    assert engine_jobs(port, "skipped") == 0
    # Not charged: the key's 3 requests a minute are all there (the 503s gave theirs back) ...
    for i in range(3):
        assert ask(client, i, False)
    with pytest.raises(openai.RateLimitError):
        ask(client, 3, False)
    # ... and its usage counts only the three served.
    key_id = parse_key(key)[0]  # type: ignore[index]
    deadline = time.monotonic() + 10
    while True:
        r = httpx.get(f"{stack.base_url}/admin/keys/{key_id}/usage?days=1", timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN}"})
        usage = r.json()["days"][0]["models"].get(MODEL, {}) if r.json()["days"] else {}
        if usage.get("requests") == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(1.5)  # a late charge would show at the next flush
    r = httpx.get(f"{stack.base_url}/admin/keys/{key_id}/usage?days=1", timeout=10,
                  headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.json()["days"][0]["models"][MODEL]["requests"] == 3
    assert engine_jobs(port) == 3
    client.close()


def test_cold_requests_keep_the_backlog_bound_and_the_key_share(stack: Stack) -> None:
    # 3 s: the four wait while the two 429s are asked for (well under a second), then time out.
    stack.gateway(models=MODEL, cold_start_timeout_s=3, max_backlog=4, key_backlog_share=0.5, auth=True,
                  admin_key_hash=HASHER.hash(ADMIN))
    keys = []
    for name in ("a", "b"):
        r = httpx.post(f"{stack.base_url}/admin/keys", json={"name": name}, timeout=10,
                       headers={"Authorization": f"Bearer {ADMIN}"})
        keys.append(str(r.json()["key"]))

    def post(key: str) -> httpx.Response:
        return httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})

    with cf.ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(post, keys[0]) for _ in range(2)]
        wait_until(lambda: cold_gauge(stack), 2)
        share = post(keys[0])  # a's share (half of 4) is full; b's is not
        assert share.status_code == 429, share.text
        assert share.json()["error"]["code"] == "model_overloaded" and "share" in share.json()["error"]["message"]
        waiting += [pool.submit(post, keys[1]) for _ in range(2)]
        wait_until(lambda: cold_gauge(stack), 4)
        full = post(keys[1])  # the model's whole backlog is full
        assert full.status_code == 429, full.text
        assert full.headers["retry-after"] == "1"
        assert cold_gauge(stack) == 4
        assert [w.result(timeout=30).status_code for w in waiting] == [503] * 4


def test_a_model_whose_engines_all_die_goes_cold(stack: Stack) -> None:
    """Its requests wait the cold-start deadline, not the whole request timeout; a job held by the
    dead engine is withdrawn too, so the engine that starts afterwards runs none of them. (The held
    one had generated nothing yet: one that had is ``engine_lost``, below.)"""
    stack.gateway(models=MODEL, cold_start_timeout_s=6)
    doomed = stack.synthetic(MODEL, "--max-concurrency", "1", "--first-token-delay", "30", "--tokens", "100")
    with cf.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(httpx.post, f"{stack.base_url}/v1/chat/completions", timeout=60,
                               json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
                   for _ in range(2)]
        time.sleep(1)  # one runs on the engine, one waits for its slot
        doomed.kill()
        wait_until(lambda: cold_gauge(stack), 2)  # once its heartbeat lapsed
        started = time.monotonic()
        answers = [f.result(timeout=60) for f in futures]
    assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]
    assert time.monotonic() - started < 15
    port = free_port()
    stack.synthetic(MODEL, "--metrics-port", str(port), "--reclaim-idle-ms", "200")
    time.sleep(2)  # its reclaimer and reads had time to find them
    assert engine_jobs(port) == 0 and engine_jobs(port, "expired") == 0
    with redis.Redis.from_url(stack.redis_url) as db:
        assert db.xlen(f"{stack.prefix}:jobs:{{{MODEL}}}") == 0


def test_undeclared_models_stay_unknown(stack: Stack) -> None:
    stack.gateway(models=MODEL, cold_start_timeout_s=30)
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=10,
                   json={"model": "never-declared", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(f"{stack.base_url}/v1/models/never-declared", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"]] == [MODEL]


def test_a_client_that_leaves_a_cold_request_leaves_no_job_behind(stack: Stack) -> None:
    """An engine that starts later never heard the cancellation: the job is withdrawn instead."""
    stack.gateway(models=MODEL, cold_start_timeout_s=60)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=1.0,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    wait_until(lambda: cold_gauge(stack), 0)
    with redis.Redis.from_url(stack.redis_url) as db:
        wait_until(lambda: db.xlen(f"{stack.prefix}:jobs:{{{MODEL}}}"), 0, timeout=5)
    port = free_port()
    stack.synthetic(MODEL, "--metrics-port", str(port))
    time.sleep(1.5)
    assert engine_jobs(port) == 0 and engine_jobs(port, "skipped") == 0


def usage_of(stack: Stack, key: str) -> dict[str, int]:
    key_id = parse_key(key)[0]  # type: ignore[index]
    r = httpx.get(f"{stack.base_url}/admin/keys/{key_id}/usage?days=1", timeout=10,
                  headers={"Authorization": f"Bearer {ADMIN}"})
    days = r.json()["days"]
    return dict(days[0]["models"].get(MODEL, {})) if days else {}


def test_an_engine_that_dies_mid_generation_is_engine_lost_and_charges_what_it_generated(stack: Stack) -> None:
    """Not streamed (so nothing was shown): the engine did work all the same. Its job is withdrawn
    at the cold-start deadline, but the answer says the engine was lost, not that none started, and
    the key is charged the tokens generated."""
    stack.gateway(models=MODEL, cold_start_timeout_s=1, auth=True, admin_key_hash=HASHER.hash(ADMIN))
    r = httpx.post(f"{stack.base_url}/admin/keys", json={"name": "tenant"}, timeout=10,
                   headers={"Authorization": f"Bearer {ADMIN}"})
    key = stack.api_key = str(r.json()["key"])
    doomed = stack.synthetic(MODEL, "--token-delay", "0.2", "--tokens", "1000")
    with cf.ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.post, f"{stack.base_url}/v1/chat/completions", timeout=60,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        time.sleep(1.5)  # a few tokens generated
        doomed.kill()
        wait_until(lambda: cold_gauge(stack), 1)  # once its heartbeat lapsed
        answer = future.result(timeout=60)
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "engine_lost"
    assert "mid-generation" in answer.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while not usage_of(stack, key).get("completion_tokens") and time.monotonic() < deadline:
        time.sleep(0.2)
    usage = usage_of(stack, key)
    assert usage["requests"] == 1 and usage["completion_tokens"] >= 3, usage


def test_a_left_request_whose_job_an_engine_held_is_withdrawn_once_it_can_be(stack: Stack) -> None:
    """Its client leaves while an engine that died a moment ago (here: the test, reading as one)
    holds its job: withdrawing it then finds it TAKEN. It is tried again until it succeeds (once
    the entry has aged past ``HELD_IDLE_MS``), so an engine that starts later never runs it. Each
    try that finds it TAKEN says the cancellation again: the engine holding it may have started
    after the client left, and never heard the first."""
    stack.gateway(models=MODEL, cold_start_timeout_s=60)
    stream = f"{stack.prefix}:jobs:{{{MODEL}}}"
    with redis.Redis.from_url(stack.redis_url) as db, cf.ThreadPoolExecutor(1) as pool, \
            db.pubsub(ignore_subscribe_messages=True) as cancels:
        cancels.subscribe(f"{stack.prefix}:cancel")
        leaving = pool.submit(httpx.post, f"{stack.base_url}/v1/chat/completions", timeout=2.0,
                              json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        wait_until(lambda: cold_gauge(stack), 1)
        db.xgroup_create(stream, "engines", id="0", mkstream=True)
        held = db.xreadgroup("engines", "ghost", {stream: ">"}, count=1)  # held, by an engine about to die
        assert held
        with pytest.raises(httpx.ReadTimeout):
            leaving.result(timeout=10)
        wait_until(lambda: cold_gauge(stack), 0)
        assert db.xlen(stream) == 1  # TAKEN: held for less than HELD_IDLE_MS
        wait_until(lambda: db.xlen(stream), 0, timeout=10)
        assert db.xpending(stream, "engines")["pending"] == 0
        said = []
        end = time.monotonic() + 1  # what was published meanwhile is buffered (the subscription's own reply reads as None)
        while time.monotonic() < end:
            if (message := cancels.get_message(timeout=0.1)) is not None:
                said.append(message["data"])
        assert len(said) >= 2, f"the cancellation was said {len(said)} time(s) while an engine held the job: {said}"
