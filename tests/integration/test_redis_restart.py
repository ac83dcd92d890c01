"""Redis restarting (without persistence) is survived: engines rejoin, gateways recover."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import redis

from engines.contract.keys import Keys
from gateway.stack import start_redis
from tests.harness import RedisServer, Stack, free_port

CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_stack_recovers_after_redis_restarts(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    stack = Stack(server.url, tmp_path)
    try:
        stack.gateway()
        stack.synthetic()
        assert httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200

        server.restart()  # every key, stream, group and script is gone

        # Engines re-register and rejoin their groups, the gateway reloads its script:
        # requests succeed again within a few seconds, without restarting anything.
        deadline = time.monotonic() + 20
        statuses = []
        while time.monotonic() < deadline:
            r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=10)
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code in (503, 502), r.text  # unavailable meanwhile, never a 500
            time.sleep(0.2)
        assert statuses[-1] == 200, statuses
        assert r.json()["choices"][0]["message"]["content"] == "tok tok "
    finally:
        stack.stop()
        server.stop()


def test_an_engine_started_before_redis_waits_for_it(tmp_path: Path) -> None:
    """An engine whose Redis is not up yet (containers start in any order; Redis restarting)
    keeps its loaded model and joins once Redis answers, instead of exiting."""
    port, metrics = free_port(), free_port()
    url = f"redis://127.0.0.1:{port}/0"
    stack = Stack(url, tmp_path)
    redis = None
    try:
        # --stall-s 1: waiting for Redis (or loading a model) is not a stalled event loop.
        engine = stack.synthetic("synthetic", "--metrics-port", str(metrics), "--stall-s", "1", wait=False)
        time.sleep(3)
        assert engine.alive(), engine.output()[-2000:]
        assert "not reachable" in engine.output()
        # Alive, not ready: probes (Kubernetes, compose) tell a waiting engine from a serving one.
        assert httpx.get(f"http://127.0.0.1:{metrics}/health").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{metrics}/ready").status_code == 503
        redis = start_redis(port, tmp_path / "redis")
        stack.gateway()
        stack.wait_for_model("synthetic", engine, timeout=20)
        assert httpx.get(f"http://127.0.0.1:{metrics}/ready").status_code == 200
        assert httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        assert "took no turn" not in engine.output()
    finally:
        stack.stop()
        if redis is not None:
            redis.terminate()
            redis.wait(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float) -> object:
    """``predicate()`` once it is truthy, else its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


# ---- what an engine does when Redis lost a key it writes to (played here by deleting the key) ----

def engine_and_job(stack: Stack, r: redis.Redis, reply_to: str, tokens: int, **job: object) -> str:
    """A synthetic engine writing ``tokens`` numbered tokens 0.05 s apart, and one streaming chat
    job of it replying to ``reply_to`` (which the caller made, as a gateway does); the job's id."""
    stack.synthetic("synthetic", "--numbered", "--tokens", str(tokens), "--token-delay", "0.05", wait=False)
    keys = Keys(stack.prefix)
    jobs = keys.jobs("synthetic")
    assert wait_for(lambda: r.exists(jobs) and r.xinfo_groups(jobs), 20), stack.procs[-1].output()
    now = int(time.time() * 1000)
    body = {"id": "chat-1", "kind": "chat", "model": "synthetic", "reply_to": reply_to, "stream": True,
            "body": msgspec.json.encode({**CHAT, "max_tokens": tokens}), "deadline_ms": now + 60_000,
            "created_ms": now, **job}
    r.xadd(jobs, {b"j": msgspec.msgpack.encode(body)})
    return "chat-1"


def events_of(r: redis.Redis, stream: str) -> list[dict[str, object]]:
    return [e for _id, fields in r.xrange(stream) if b"e" in fields for e in msgspec.msgpack.decode(fields[b"e"])]


def test_an_engine_restores_a_reply_stream_redis_lost_with_the_life_it_had(stack: Stack) -> None:
    """The stream vanishes before its expiry (Redis lost it): the engine's next write makes it again,
    with the expiry it had, not a longer one, and the job's later events are in it."""
    keys = Keys(stack.prefix)
    reply_to = keys.replies("live-gw")
    with redis.Redis.from_url(stack.redis_url) as r:
        r.xadd(reply_to, {b"h": b"1"})
        r.pexpire(reply_to, 30_000)
        made = time.monotonic()
        engine_and_job(stack, r, reply_to, tokens=40)
        assert wait_for(lambda: len(events_of(r, reply_to)) >= 3, 20), stack.procs[-1].output()
        r.delete(reply_to)
        gone = time.monotonic()
        assert wait_for(lambda: r.exists(reply_to), 5), "the engine did not re-create the reply stream"
        ttl = r.pttl(reply_to)
        assert 0 < ttl <= 30_000 - (gone - made) * 1000, ttl
        assert wait_for(lambda: (e := events_of(r, reply_to)) and e[-1]["t"] == "f", 10), events_of(r, reply_to)
        numbers = [e["seq"] for e in events_of(r, reply_to)]
        assert numbers == list(range(numbers[0], numbers[-1] + 1)), numbers  # in order, none lost since


def test_an_engine_never_revives_the_stream_of_a_gateway_that_is_gone(stack: Stack) -> None:
    """A gateway that stopped refreshing its stream is gone: once the stream expires, the engine
    running one of its jobs drops the job's events rather than make the stream again."""
    keys = Keys(stack.prefix)
    reply_to = keys.replies("gone-gw")
    with redis.Redis.from_url(stack.redis_url) as r:
        r.xadd(reply_to, {b"h": b"1"})
        r.pexpire(reply_to, 1500)  # and never refreshed
        engine_and_job(stack, r, reply_to, tokens=60)  # 3 s of tokens
        assert wait_for(lambda: events_of(r, reply_to), 20), stack.procs[-1].output()
        assert wait_for(lambda: not r.exists(reply_to), 5)
        jobs = keys.jobs("synthetic")
        assert wait_for(lambda: not r.xlen(jobs), 10), "the job was not acked"
        assert not r.exists(reply_to), f"re-created, TTL {r.pttl(reply_to)}"
