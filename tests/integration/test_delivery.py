"""Exactly-once delivery over at-least-once Redis, and every request ending cleanly.

Each test reproduces one way a request used to be lost, duplicated or left hanging.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from engines.contract.keys import ENGINE_GROUP, Keys
from engines.contract.messages import Codec, Failed, Job
from engines.contract.replies import APPEND_SHA
from tests.harness import RedisServer, Stack, free_port
from tests.proxy import FlakyProxy

CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}


def engine_jobs(metrics_port: int) -> dict[str, float]:
    """The engine's ``conduit_engine_jobs_total`` by outcome, all its models together (outcomes
    no job has had yet, which the engine exports at 0, left out)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    jobs: dict[str, float] = {}
    for m in re.finditer(r'conduit_engine_jobs_total\{[^}]*outcome="(\w+)"[^}]*\} ([\d.]+)', text):
        jobs[m.group(1)] = jobs.get(m.group(1), 0.0) + float(m.group(2))
    return {outcome: n for outcome, n in jobs.items() if n}


def wait_for_jobs(metrics_port: int, outcome: str, count: int, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    jobs = engine_jobs(metrics_port)
    while jobs.get(outcome, 0) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        jobs = engine_jobs(metrics_port)
    return jobs


def stream_text(url: str, body: dict[str, object], timeout: float = 30) -> tuple[list[str], list[str]]:
    """(content pieces, raw data lines) of one streamed chat completion."""
    pieces: list[str] = []
    lines: list[str] = []
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line)
            if line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    if choice["delta"].get("content"):
                        pieces.append(choice["delta"]["content"])
    return pieces, lines


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FlakyProxy]:
    p = FlakyProxy(redis_server.port)
    yield p
    p.close()


def test_a_resent_submission_makes_no_second_job(stack: Stack, proxy: FlakyProxy) -> None:
    """The connection breaks after Redis ran the submission but before its reply came back: the
    gateway sends it again, and still exactly one job runs."""
    metrics_port = free_port()
    stack.gateway(redis_url=proxy.url)
    stack.synthetic("synthetic", "--token-delay", "0.1", "--tokens", "4", "--metrics-port", str(metrics_port))
    url = f"{stack.base_url}/v1/chat/completions"
    assert httpx.post(url, json=CHAT, timeout=30).status_code == 200  # the script is loaded: EVALSHA runs it
    proxy.drop_after(b"EVALSHA")
    r = httpx.post(url, json=CHAT, timeout=30)
    assert proxy.dropped == 1
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "tok " * 4
    time.sleep(1.0)  # a second job, if any, would have run by now
    assert engine_jobs(metrics_port).get("ok") == 2


def test_events_written_twice_reach_the_client_once(stack: Stack, proxy: FlakyProxy) -> None:
    """The engine's event write is resent after a broken connection: Redis holds those events
    twice, and the client still sees each token once."""
    stack.gateway()
    stack.synthetic("synthetic", "--token-delay", "0.15", "--tokens", "5", redis_url=proxy.url)
    proxy.drop_after(APPEND_SHA.encode(), 2)  # the second flush: a delta in the middle of the answer
    pieces, lines = stream_text(f"{stack.base_url}/v1/chat/completions", CHAT)
    assert proxy.dropped == 1
    assert pieces == ["tok "] * 5, pieces
    assert lines[-1] == "data: [DONE]"


def test_a_refused_event_write_is_retried_not_lost(tmp_path: Path) -> None:
    """Redis refuses writes (maxmemory, noeviction) while a job ends: the engine keeps the job
    and its events until Redis takes them, and the client gets its answer, not a 504."""
    server = RedisServer(tmp_path / "redis")
    stack = Stack(server.url, tmp_path)
    r = redis.Redis.from_url(server.url)
    try:
        stack.gateway(request_timeout_s=20)
        stack.synthetic("synthetic", "--token-delay", "0.1", "--tokens", "12")
        with cf.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            answer = pool.submit(httpx.post, f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=30)
            time.sleep(0.4)
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)  # below what is used: every write that allocates is refused
            time.sleep(2.5)  # the job ends (about 1.2 s of tokens) while writes are refused
            r.config_set("maxmemory", 0)
            resp = answer.result()
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "tok " * 12
        assert time.monotonic() - started < 10, "answered long before the 20 s deadline"
    finally:
        r.config_set("maxmemory", 0)
        r.close()
        stack.stop()
        server.stop()


def test_a_streaming_client_that_leaves_while_queued_cancels_its_job(stack: Stack) -> None:
    """The gateway watches a stream's connection from submission on, so a job whose client left
    while it waited is never started (skipped), not started and then aborted mid-run."""
    metrics_port = free_port()
    stack.gateway()
    stack.synthetic("synthetic", "--max-concurrency", "1", "--token-delay", "0.2", "--tokens", "8",
                    "--metrics-port", str(metrics_port))
    with cf.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=30)
        time.sleep(0.3)  # the engine's one slot is taken
        with pytest.raises(httpx.ReadTimeout):  # queued behind it; its client gives up
            with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json={**CHAT, "stream": True},
                              timeout=0.7) as s:
                s.read()
        assert busy.result().status_code == 200
    wait_for_jobs(metrics_port, "skipped", 1, timeout=5)
    time.sleep(2.0)  # a job that was not cancelled would run (and count as ok or cancelled) by now
    jobs = engine_jobs(metrics_port)
    assert jobs == {"ok": 1, "skipped": 1}, jobs


@pytest.mark.parametrize("stream", [False, True])
def test_a_job_whose_engine_died_mid_output(stack: Stack, stream: bool) -> None:
    """Non-streaming: nobody saw the dead engine's output, so the job runs again and completes.
    Streaming: the client saw some; it gets a clean error, never a token twice."""
    stack.gateway()
    doomed = stack.synthetic("synthetic", "--token-delay", "0.2", "--tokens", "10", "--reclaim-idle-ms", "1000")
    box: dict[str, object] = {}

    def ask() -> None:
        if stream:
            box["r"] = stream_text(f"{stack.base_url}/v1/chat/completions", CHAT)
        else:
            box["r"] = httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=30)

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(1.0)  # about five tokens out
    doomed.kill()
    stack.synthetic("synthetic", "--reclaim-idle-ms", "1000", "--token-delay", "0.02", "--tokens", "10")
    t.join(30)
    if stream:
        pieces, lines = box["r"]  # type: ignore[misc]
        assert lines[-1] == "data: [DONE]" and '"engine_lost"' in lines[-2]
        assert 0 < len(pieces) <= 10 and all(p == "tok " for p in pieces)
    else:
        resp = box["r"]
        assert isinstance(resp, httpx.Response)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "tok " * 10


def test_an_engine_of_several_models_keeps_its_concurrency_limit(stack: Stack) -> None:
    """A read across two models' streams must not start more jobs than ``max_concurrency``."""
    stack.gateway()
    stack.synthetic("alpha,beta", "--max-concurrency", "1", "--token-delay", "0.25", "--tokens", "4")
    stack.wait_for_model("beta")
    start = time.monotonic()

    def ask(model: str) -> tuple[httpx.Response, float]:
        r = httpx.post(f"{stack.base_url}/v1/chat/completions", json={**CHAT, "model": model}, timeout=30)
        return r, time.monotonic() - start

    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(ask, "alpha")]
        time.sleep(0.3)  # the one slot is busy: a job of each model waits in its stream
        futures += [pool.submit(ask, m) for m in ("alpha", "beta")]
        results = [f.result() for f in futures]
    assert all(r.status_code == 200 for r, _ in results)
    # One second of tokens each, one at a time: each ends about a second after the one before.
    _, second, third = sorted(t for _, t in results)
    assert third - second > 0.7, [t for _, t in results]


def test_the_engine_measures_queue_wait(stack: Stack) -> None:
    """``Job.created_ms`` is used: the engine exports how long jobs waited in the queue."""
    metrics_port = free_port()
    stack.gateway()
    stack.synthetic("synthetic", "--metrics-port", str(metrics_port))
    assert httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert re.search(r"conduit_engine_job_queue_wait_seconds_count\{[^}]*\} 1", text), text


def test_a_dead_letter_keeps_no_prompt_and_ages_out(stack: Stack) -> None:
    """A job that failed on engine after engine goes to its model's dead-letter stream without its
    body (the prompt is the user's data; the entry only names the job), and the stream keeps
    neither entries older than its age bound nor itself once no dead letter has come for that long."""
    with redis.Redis.from_url(stack.redis_url) as r:
        keys = Keys(stack.prefix)
        dead = keys.dead_letters("synthetic")
        # A dead letter of long ago, as older engines wrote them (the whole job).
        r.xadd(dead, {b"j": b"an ancient prompt", b"attempts": 3}, id="1000-0")
        reply_to = keys.replies(f"test-{uuid.uuid4().hex[:6]}")
        r.xadd(reply_to, {b"h": b"1"})
        body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "my secret prompt"}]}).encode()
        job = Job(id=uuid.uuid4().hex, kind="chat", model="synthetic", body=body, reply_to=reply_to,
                  deadline_ms=int(time.time() * 1000) + 60_000, tenant="key1")
        stream = keys.jobs("synthetic")
        # Delivered to engines that died, three times in a row (a consumer the registry never knew),
        # before the engine that reclaims it starts.
        r.xgroup_create(stream, ENGINE_GROUP, id="0", mkstream=True)
        entry = r.xadd(stream, {b"j": Codec().encode(job)})
        r.xreadgroup(ENGINE_GROUP, "gone-engine", {stream: ">"}, count=1)
        for _ in range(2):
            r.xclaim(stream, ENGINE_GROUP, "gone-engine", 0, [entry])
        stack.synthetic("synthetic", "--reclaim-idle-ms", "200", "--dead-letter-max-age-s", "3600", wait=False)
        deadline = time.monotonic() + 30
        while r.xlen(dead) < 1 or r.xrange(dead, "-", "+")[-1][0] == b"1000-0":
            assert time.monotonic() < deadline, "the job was never dead-lettered"
            time.sleep(0.05)
        entries = r.xrange(dead, "-", "+")
        fields = entries[-1][1]
        assert {
            "prompt kept": any(b"secret" in v for v in fields.values()),
            "entries older than the age bound": [e for e, _ in entries if e == b"1000-0"],
            "stream expires": 3_500_000 < r.pttl(dead) <= 3_600_000,
        } == {"prompt kept": False, "entries older than the age bound": [], "stream expires": True}
        assert fields[b"job"] == job.id.encode() and fields[b"attempts"] == b"3" and fields[b"tenant"] == b"key1"
        assert fields[b"kind"] == b"chat" and int(fields[b"bytes"]) == len(body)
        assert fields[b"sha256"] == hashlib.sha256(body).hexdigest().encode()
        events = Codec().decode_events(r.xrange(reply_to, "-", "+")[-1][1][b"e"])[0]
        assert isinstance(events[-1], Failed) and events[-1].code == "engine_failed"
