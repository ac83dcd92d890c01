"""The wire contract is open: peers of other versions, on either side, still work together.

A "newer" or "older" engine is played by :class:`tests.fakes.FakeEngine` (plain Redis
commands, no product engine code) against a real gateway; a "newer" gateway is played by
the test writing job entries itself, against a real synthetic engine.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import msgspec
import pytest
import redis

from engines.contract.keys import ENGINE_GROUP, Keys
from tests.fakes import FakeEngine, now_ms
from tests.harness import Stack


@pytest.fixture
def r(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def post_in_thread(url: str, body: dict[str, Any]) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(url, json=body, timeout=30)))
    t.start()
    return t, result


def stream_in_thread(url: str, body: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """POST a streaming request from a thread; its status and SSE data lines land in the dict."""
    result: dict[str, Any] = {}

    def read() -> None:
        with httpx.stream("POST", url, json=body, timeout=30) as s:
            result["status"] = s.status_code
            result["data"] = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=read)
    t.start()
    return t, result


def skipped_events(base_url: str, reason: str) -> float:
    """The gateway's count of reply events it skipped for ``reason`` (0 if none yet)."""
    text = httpx.get(f"{base_url}/metrics").text
    m = re.search(r'conduit_gateway_events_skipped_total\{[^}]*reason="' + reason + r'"[^}]*\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def test_newer_engine_event_types_and_fields_are_skipped_not_fatal(stack: Stack) -> None:
    """An event type and a field this gateway does not know cost nothing but themselves."""
    stack.gateway(request_timeout_s=5)  # an old gateway drops the whole entry: a 504 after 5 s
    with FakeEngine(stack.redis_url, stack.prefix, "future", protocol=3) as engine:
        stack.wait_for_model("future", timeout=10)
        t, result = post_in_thread(f"{stack.base_url}/v1/chat/completions", chat("future"))
        job = engine.next_job()
        assert job.body["kind"] == "chat"
        engine.reply(job, [
            {"t": "s", "engine": engine.id, "created": int(time.time())},
            {"t": "zz", "hologram": {"frames": [1, 2, 3]}, "note": "an event type from the future"},
            {"t": "d", "choices": [{"index": 0, "text": "Hello, "}], "x_confidence": 0.9},
            {"t": "d", "choices": [{"index": 0, "text": "world", "finish_reason": "stop", "x_new": [1]}],
             "x_confidence": 0.8},
            {"t": "f", "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
        ])
        engine.ack(job)
        t.join()
    resp = result["r"]
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == "Hello, world"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2
    assert skipped_events(stack.base_url, "unknown_type") == 1


class V1Job(msgspec.Struct):
    """A job as protocol-1 engines decode it (engines/contract/messages.py before protocol 2)."""

    id: str
    kind: Literal["chat", "completion"]
    model: str
    body: bytes
    reply_to: str
    deadline_ms: int
    created_ms: int = 0
    traceparent: str = ""


def test_older_engine_serves_through_a_newer_gateway(stack: Stack) -> None:
    """A protocol-1 engine: no sequence numbers, no job keys, an EngineInfo without protocol/kinds."""
    stack.gateway(request_timeout_s=10)
    with FakeEngine(stack.redis_url, stack.prefix, "vintage", protocol=1) as engine:
        assert "protocol" not in engine.info() and "kinds" not in engine.info()
        stack.wait_for_model("vintage", timeout=10)

        t, result = post_in_thread(f"{stack.base_url}/v1/chat/completions", chat("vintage"))
        job = engine.next_job()
        assert msgspec.msgpack.decode(job.raw, type=V1Job).kind == "chat"  # readable by an old engine
        engine.reply(job, [{"t": "s", "engine": engine.id}, {"t": "d", "choices": [{"text": "old "}]}])
        engine.reply(job, [{"t": "d", "choices": [{"text": "school", "finish_reason": "stop"}]},
                           {"t": "f", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}])
        engine.ack(job)
        t.join()
        resp = result["r"]
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "old school"

        t, streamed = stream_in_thread(f"{stack.base_url}/v1/chat/completions", chat("vintage", stream=True))
        job = engine.next_job()
        msgspec.msgpack.decode(job.raw, type=V1Job)
        engine.reply(job, [{"t": "s", "engine": engine.id}, {"t": "d", "choices": [{"text": "one "}]}])
        engine.reply(job, [{"t": "d", "choices": [{"text": "two"}]}])
        engine.reply(job, [{"t": "d", "choices": [{"text": "", "finish_reason": "stop"}]},
                           {"t": "f", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}])
        engine.ack(job)
        t.join()
    assert streamed["status"] == 200
    data = streamed["data"]
    assert data[-1] == "[DONE]"
    chunks = [msgspec.json.decode(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "one two"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def reply_events(r: redis.Redis, stream: str, want: int, timeout: float) -> list[dict[str, Any]]:
    """The events written to ``stream``, once there are ``want`` of them (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        events = [e for _id, fields in r.xrange(stream) if b"e" in fields
                  for e in msgspec.msgpack.decode(fields[b"e"])]
        if len(events) >= want or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def start_engine_without_gateway(stack: Stack, r: redis.Redis) -> str:
    """A synthetic engine of model ``synthetic``; returns its job stream once it consumes it."""
    stack.synthetic("synthetic", wait=False)
    jobs = Keys(stack.prefix).jobs("synthetic")
    deadline = time.monotonic() + 20
    while not (r.exists(jobs) and r.xinfo_groups(jobs)):
        assert time.monotonic() < deadline, stack.procs[-1].output()
        time.sleep(0.05)
    return jobs


def wait_acked(r: redis.Redis, jobs: str, timeout: float = 5) -> None:
    """Until every entry of ``jobs`` is acked and deleted."""
    deadline = time.monotonic() + timeout
    while r.xlen(jobs) or r.xpending(jobs, ENGINE_GROUP)["pending"]:
        assert time.monotonic() < deadline, f"jobs left on {jobs}: {r.xrange(jobs)}"
        time.sleep(0.05)


def test_engine_answers_a_job_kind_it_does_not_run_and_a_malformed_job(stack: Stack, r: redis.Redis) -> None:
    """A newer gateway's job kind gets a 501, a damaged job a 400: its client never hangs."""
    jobs = start_engine_without_gateway(stack, r)
    reply_to = Keys(stack.prefix).replies(f"newer-gw-{os.urandom(4).hex()}")
    r.xadd(reply_to, {b"h": b"1"})  # the gateway's stream exists while it lives
    r.pexpire(reply_to, 60_000)
    job = {"id": "img-1", "kind": "image", "model": "synthetic", "body": b'{"prompt": "a cat"}', "reply_to": reply_to,
           "deadline_ms": now_ms() + 60_000, "created_ms": now_ms(), "stream": False}
    r.xadd(jobs, {b"j": msgspec.msgpack.encode(job)})
    damaged = {**job, "id": "chat-2", "kind": "chat", "deadline_ms": "tomorrow"}
    r.xadd(jobs, {b"j": msgspec.msgpack.encode(damaged)})

    events = {e["job"]: e for e in reply_events(r, reply_to, 2, timeout=5)}
    assert set(events) == {"img-1", "chat-2"}, f"engine wrote {events}:\n{stack.procs[-1].output()[-3000:]}"
    assert events["img-1"]["t"] == "e"
    assert (events["img-1"]["status"], events["img-1"]["code"]) == (501, "unsupported_job_kind")
    assert events["chat-2"]["t"] == "e"
    assert (events["chat-2"]["status"], events["chat-2"]["code"]) == (400, "malformed_job")
    wait_acked(r, jobs)


def test_gateway_refuses_a_kind_no_live_engine_of_the_model_announces(stack: Stack, r: redis.Redis) -> None:
    """Engines announce the job kinds they run; a request of another kind is a 404 at admission
    (OpenAI's answer for a model that exists but not on that endpoint), and nothing is queued."""
    stack.gateway(request_timeout_s=10)
    with FakeEngine(stack.redis_url, stack.prefix, "painter", kinds=["image"]):
        stack.wait_for_model("painter", timeout=10)
        for path, body in (("chat/completions", chat("painter")),
                           ("completions", {"model": "painter", "prompt": "hi"})):
            resp = httpx.post(f"{stack.base_url}/v1/{path}", json=body, timeout=10)
            assert resp.status_code == 404, resp.text
            err = resp.json()["error"]
            assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "model",
                                                                "model_not_supported"), err
            assert f"v1/{path}" in err["message"]
        assert r.xlen(Keys(stack.prefix).jobs("painter")) == 0


def test_a_kind_one_engine_of_a_mixed_fleet_announces_is_queued(stack: Stack) -> None:
    """One engine of the model announces ``image``, an older one does not: the request is queued,
    and an engine that cannot run it after all answers 501, which the client gets."""
    stack.gateway(request_timeout_s=10)
    with FakeEngine(stack.redis_url, stack.prefix, "mixed", kinds=["chat", "completion", "image"]) as engine, \
            FakeEngine(stack.redis_url, stack.prefix, "mixed", protocol=1):
        stack.wait_for_model("mixed", timeout=10)
        t, result = post_in_thread(f"{stack.base_url}/v1/images/generations", {"model": "mixed", "prompt": "a cat"})
        job = engine.next_job()
        assert job.body["kind"] == "image"
        engine.reply(job, [{"t": "e", "message": "This engine does not run image jobs.",
                            "code": "unsupported_job_kind", "status": 501, "type": "invalid_request_error"}])
        engine.ack(job)
        t.join()
    resp = result["r"]
    assert resp.status_code == 501, resp.text
    assert resp.json()["error"]["code"] == "unsupported_job_kind"


def test_engine_never_recreates_a_reply_stream(stack: Stack, r: redis.Redis) -> None:
    """Events for a gateway whose stream is gone (and that this engine never saw alive) are dropped,
    not left in a key that never expires."""
    jobs = start_engine_without_gateway(stack, r)
    reply_to = Keys(stack.prefix).replies(f"gone-gw-{os.urandom(4).hex()}")
    job = {"id": "chat-1", "kind": "chat", "model": "synthetic", "reply_to": reply_to,
           "body": msgspec.json.encode(chat("synthetic", max_tokens=3)),
           "deadline_ms": now_ms() + 60_000, "created_ms": now_ms()}
    r.xadd(jobs, {b"j": msgspec.msgpack.encode(job)})
    wait_acked(r, jobs)
    assert not r.exists(reply_to), f"re-created, TTL {r.ttl(reply_to)}"


def test_the_clients_trace_context_travels_with_its_job(stack: Stack) -> None:
    """A W3C ``traceparent`` header reaches the engine in the job, so its logs join the trace."""
    stack.gateway(request_timeout_s=10)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with FakeEngine(stack.redis_url, stack.prefix, "traced") as engine:
        stack.wait_for_model("traced", timeout=10)
        box: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: box.update(r=httpx.post(
            f"{stack.base_url}/v1/chat/completions", json=chat("traced"), headers={"traceparent": traceparent},
            timeout=10)))
        t.start()
        job = engine.next_job()
        assert job.body.get("traceparent") == traceparent
        assert job.body.get("created_ms", 0) > 0
        engine.reply(job, [{"t": "s"}, {"t": "d", "choices": [{"text": "x", "finish_reason": "stop"}]}, {"t": "f"}])
        engine.ack(job)
        t.join()
    assert box["r"].status_code == 200
