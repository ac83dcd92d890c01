"""Engines announce themselves: /v1/models and /ready follow live engines; drains and retries."""

from __future__ import annotations

import concurrent.futures as cf
import re
import threading
import time

import httpx
import pytest

from tests.harness import Stack, free_port, hang_up_after
from tests.openai_schema import validate

CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}


def test_models_follow_engines_that_start_and_stop(stack: Stack) -> None:
    stack.gateway()
    client = stack.sdk()
    assert [m.id for m in client.models.list()] == []
    assert httpx.get(f"{stack.base_url}/ready").status_code == 503

    first = stack.synthetic("alpha")
    second = stack.synthetic("beta")
    body = httpx.get(f"{stack.base_url}/v1/models").json()
    validate("ListModelsResponse", body)
    assert sorted(m["id"] for m in body["data"]) == ["alpha", "beta"]
    model = httpx.get(f"{stack.base_url}/v1/models/alpha").json()
    validate("Model", model)
    assert model["id"] == "alpha" and model["object"] == "model" and model["created"] > 1_600_000_000
    time.sleep(2.1)  # two heartbeats later the model still reports when its engine started
    assert httpx.get(f"{stack.base_url}/v1/models/alpha").json()["created"] == model["created"]
    assert client.models.retrieve("beta").id == "beta"
    ready = httpx.get(f"{stack.base_url}/ready")
    assert ready.status_code == 200 and ready.json()["engines"] == 2

    # A stopped engine deregisters at once; its model is then known but down: 503, not 404.
    assert first.stop() == 0
    stack.wait_for_model("alpha", present=False, timeout=5)
    assert [m.id for m in client.models.list()] == ["beta"]
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json={**CHAT, "model": "alpha"})
    assert r.status_code == 503
    assert httpx.get(f"{stack.base_url}/v1/models/alpha").status_code == 404

    # A killed engine (no deregistration) disappears when its heartbeat expires.
    second.kill()
    stack.wait_for_model("beta", present=False, timeout=15)


def test_model_ids_with_slashes(stack: Stack) -> None:
    stack.gateway()
    stack.synthetic("org/model-7b")
    r = httpx.get(f"{stack.base_url}/v1/models/org/model-7b")
    assert r.status_code == 200 and r.json()["id"] == "org/model-7b"


def test_engine_drains_in_flight_jobs_on_sigterm(stack: Stack) -> None:
    stack.gateway()
    engine = stack.synthetic("synthetic", "--token-delay", "0.2", "--tokens", "10")
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.update(
        r=httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=30)))
    t.start()
    time.sleep(0.8)  # the job is running (about 2 s of tokens)
    assert engine.stop() == 0
    t.join()
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 10


def test_job_of_a_dead_engine_is_retried_elsewhere(stack: Stack) -> None:
    """An engine killed before any output: its job is reclaimed by another engine and succeeds."""
    stack.gateway()
    # First token only after 3 s: the job is taken but has produced nothing when we kill.
    doomed = stack.synthetic("synthetic", "--first-token-delay", "3", "--reclaim-idle-ms", "1000")
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.update(
        r=httpx.post(f"{stack.base_url}/v1/chat/completions", json={**CHAT, "max_tokens": 3}, timeout=60)))
    t.start()
    time.sleep(1.0)
    doomed.kill()
    stack.synthetic("synthetic", "--reclaim-idle-ms", "1000")
    t.join()
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "tok tok tok "


def test_job_of_a_wedged_engine_is_retried_elsewhere(stack: Stack) -> None:
    """An engine whose event loop stops (a backend that blocks it for 30 s) keeps heart-beating
    from its own thread, but only while its loop turns: 2 s after it stopped the heartbeat stops,
    and another engine takes the job over, well before the wedged one would have answered."""
    stack.gateway()
    wedged = stack.synthetic("synthetic", "--block", "30", "--stall-s", "2", "--reclaim-idle-ms", "1000")
    result: dict[str, httpx.Response] = {}
    sent = time.monotonic()
    t = threading.Thread(target=lambda: result.update(
        r=httpx.post(f"{stack.base_url}/v1/chat/completions", json={**CHAT, "max_tokens": 3}, timeout=60)))
    t.start()
    time.sleep(1.0)  # the wedged engine took it
    stack.synthetic("synthetic", "--reclaim-idle-ms", "1000", wait=False)
    t.join()
    took = time.monotonic() - sent
    wedged.kill()  # still asleep; it would answer SIGTERM only when it wakes
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "tok tok tok "
    assert took < 20, f"answered after {took:.1f}s: the wedged engine was never failed over"


def test_stream_of_a_dead_engine_ends_with_an_error_not_duplicates(stack: Stack) -> None:
    """Output already reached the client: a reclaimed job fails cleanly instead of re-running."""
    stack.gateway()
    doomed = stack.synthetic("synthetic", "--token-delay", "0.3", "--tokens", "50", "--reclaim-idle-ms", "1000")
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json={**CHAT, "stream": True},
                      timeout=60) as s:
        assert s.status_code == 200
        lines = s.iter_lines()
        events: list[str] = []
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 3:
                    doomed.kill()
                    stack.synthetic("synthetic", "--reclaim-idle-ms", "1000", wait=False)
                    break
        events.extend(line for line in lines if line.startswith("data: "))
    assert events[-1] == "data: [DONE]"
    assert '"engine_lost"' in events[-2], events[-2]
    content = [e for e in events[:-2] if '"content"' in e]
    assert len(content) <= 4, "no token may be sent twice"
    assert job_keys(stack) == {}, "the dead engine's job key is deleted once the job is failed"


def job_keys(stack: Stack) -> dict[bytes, bytes]:
    """Every job key (``Keys.job``) of the stack, with its value."""
    import redis

    with redis.Redis.from_url(stack.redis_url) as r:
        return {k: r.get(k) for k in r.scan_iter(match=f"{stack.prefix}:job:*")}


def test_job_keys_do_not_outlive_their_jobs(stack: Stack) -> None:
    """A job's key lives from submission to ack; a streaming job's says when output began."""
    stack.gateway()
    stack.synthetic("synthetic", "--token-delay", "0.05", "--tokens", "5")
    body = {**CHAT, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=30) as s:
        lines = s.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert list(job_keys(stack).values()) == [b"o"]  # mid-output: marked
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    hang_up_after(f"{stack.base_url}/v1/chat/completions", body, 2)  # and one cancelled mid-output
    deadline = time.monotonic() + 5
    while job_keys(stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job_keys(stack) == {}


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_engine_job(stack: Stack, stream: bool) -> None:
    metrics_port = free_port()
    stack.gateway()
    stack.synthetic("synthetic", "--token-delay", "0.2", "--tokens", "100", "--metrics-port", str(metrics_port))
    body = {**CHAT, "stream": stream}
    if stream:
        hang_up_after(f"{stack.base_url}/v1/chat/completions", body, 3)
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=1.0)
    # The engine hears of it and stops the job long before its 20 s of tokens.
    deadline = time.monotonic() + 10
    pattern = re.compile(r'conduit_engine_jobs_total\{[^}]*outcome="cancelled"[^}]*\} (\d+)')
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        m = pattern.search(text)
        if m and float(m.group(1)) >= 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"engine never reported a cancelled job:\n{text}")


def test_job_that_kills_every_engine_is_dead_lettered(stack: Stack, request: pytest.FixtureRequest) -> None:
    """After max attempts the job goes to the dead-letter stream and its client gets an error."""
    import redis

    stack.gateway()
    args = ("--first-token-delay", "30", "--reclaim-idle-ms", "600")
    engine = stack.synthetic("synthetic", *args)
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.update(
        r=httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=60)))
    t.start()
    r = redis.Redis.from_url(stack.redis_url)
    request.addfinalizer(r.close)
    jobs = f"{stack.prefix}:jobs:{{synthetic}}"
    for attempt in (1, 2, 3):  # three engines in a row take the job and die before any output
        deadline = time.monotonic() + 15
        while True:  # wait until this attempt's engine holds the job (its delivery count says so)
            pending = r.xpending_range(jobs, "engines", min="-", max="+", count=1)
            if pending and pending[0]["times_delivered"] == attempt:
                break
            assert time.monotonic() < deadline, f"attempt {attempt} never took the job"
            time.sleep(0.05)
        engine.kill()
        engine = stack.synthetic("synthetic", *args, wait=False)
    t.join()
    resp = result["r"]
    assert resp.status_code == 502, resp.text
    assert resp.json()["error"]["code"] == "engine_failed"
    dead = r.xrange(f"{stack.prefix}:dead:{{synthetic}}")
    assert len(dead) == 1 and dead[0][1][b"attempts"] == b"3"


def test_gateway_exports_metrics(stack: Stack) -> None:
    stack.gateway()
    stack.synthetic()
    client = stack.sdk()
    client.chat.completions.create(model="synthetic", messages=[{"role": "user", "content": "a b c"}], max_tokens=4)
    for _ in range(2):
        assert httpx.post(f"{stack.base_url}/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
    text = httpx.get(f"{stack.base_url}/metrics").text
    assert re.search(r'conduit_gateway_rejections_total\{[^}]*error_type="model_not_found"[^}]*\} 2', text), text
    assert re.search(r"conduit_gateway_requests_in_flight(\{[^}]*\})? 0", text), text
    assert re.search(r'gen_ai_server_request_duration_seconds_count\{[^}]*gen_ai_request_model="synthetic"[^}]*\} 1',
                     text), text
    assert re.search(r'gen_ai_client_token_usage_sum\{[^}]*gen_ai_token_type="output"[^}]*\} 4', text), text
    assert "gen_ai_server_time_to_first_token_seconds_bucket" in text


def test_job_past_its_deadline_is_never_started(stack: Stack) -> None:
    """A job that waited in the queue past its deadline: the client got a 504 and no engine runs it."""
    metrics_port = free_port()
    stack.gateway(request_timeout_s=30)
    patient = stack.base_url
    stack.gateway(request_timeout_s=1)
    hasty = stack.base_url
    # One job at a time; the first takes ~3 s, so the second waits in the queue past its deadline.
    stack.synthetic("synthetic", "--max-concurrency", "1", "--token-delay", "1", "--tokens", "3",
                    "--metrics-port", str(metrics_port))
    with cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{patient}/v1/chat/completions", json=CHAT, timeout=30)
        time.sleep(0.3)
        second = pool.submit(httpx.post, f"{hasty}/v1/chat/completions", json=CHAT, timeout=30)
        assert second.result().status_code == 504
        assert first.result().status_code == 200
    pattern = re.compile(r'conduit_engine_jobs_total\{[^}]*outcome="expired"[^}]*\} (\d+)')
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = pattern.search(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text)
        if m and float(m.group(1)) == 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the expired job was not skipped by the engine")
