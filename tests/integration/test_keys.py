"""Every key bounded: after traffic, crashes and restarts, nothing Conduit wrote lives forever
unless it is on the short list of keys that must (each bounded another way)."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from engines.contract.keys import ENGINE_GROUP, Keys
from tests.harness import Stack, hang_up_after

#: Keys that may live without an expiry, by :class:`Keys` member, and what bounds each one.
#: DEVELOPERS.md documents the same list; every other key must have a TTL.
PERMANENT_PER_MODEL = {
    "jobs": "a model's job stream: capped (MAXLEN), each entry deleted when its job is acked",
    "dead_letters": "a model's dead-letter stream: capped (MAXLEN)",
}
PERMANENT_REGISTRY = {
    "engines": "live engines: an engine deregisters on stop; gateways prune ids whose heartbeat expired",
    "engine_info": "one entry per engine id, deregistered and pruned with it",
    "models_seen": "one field per model ever served (tells 503 from 404)",
}


def permanent_keys(keys: Keys, models: list[str]) -> set[str]:
    return ({getattr(keys, name)(m) for name in PERMANENT_PER_MODEL for m in models}
            | {getattr(keys, name) for name in PERMANENT_REGISTRY})


CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}


def traffic(stack: Stack) -> None:
    """Complete answers streaming and not, and clients that leave mid-answer."""
    url = f"{stack.base_url}/v1/chat/completions"
    resp = httpx.post(url, json={**CHAT, "max_tokens": 3}, timeout=30)
    assert resp.status_code == 200, resp.text
    with httpx.stream("POST", url, json={**CHAT, "max_tokens": 3, "stream": True}, timeout=30) as s:
        assert s.status_code == 200
        assert [line for line in s.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    hang_up_after(url, {**CHAT, "stream": True}, 2)
    # A stored response (its record and its key's byte counter) and one continuing it.
    first = httpx.post(f"{stack.base_url}/v1/responses", json={"model": "synthetic", "input": "hi",
                                                               "max_output_tokens": 3}, timeout=30)
    assert first.status_code == 200, first.text
    then = httpx.post(f"{stack.base_url}/v1/responses", json={"model": "synthetic", "input": "more",
                                                              "max_output_tokens": 3,
                                                              "previous_response_id": first.json()["id"]}, timeout=30)
    assert then.status_code == 200, then.text
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=CHAT, timeout=0.5)


def open_stream_then(stack: Stack, events: int, action: object) -> None:
    """Start a long streaming answer, and after ``events`` of it run ``action`` (a crash)."""
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json={**CHAT, "stream": True},
                      timeout=30) as s:
        assert s.status_code == 200
        got = 0
        for line in s.iter_lines():
            got += line.startswith("data: ")
            if got == events:
                break
        action()  # type: ignore[operator]


def test_every_key_has_a_ttl_or_is_a_documented_permanent_key(stack: Stack) -> None:
    engine_args = ("--token-delay", "0.05", "--tokens", "60", "--reclaim-idle-ms", "1000")
    first_gateway = stack.gateway()
    first_engine = stack.synthetic("synthetic", *engine_args)
    traffic(stack)
    # Crash the engine while it streams; that client leaves, and its gateway stops. The job is
    # reclaimed later by the next engine, which answers it to a gateway that is gone.
    open_stream_then(stack, 3, first_engine.kill)
    first_gateway.stop()  # graceful (uvicorn re-raises SIGTERM once shut down: exit status -15)

    second_gateway = stack.gateway()
    # Once it serves: the first engine's heartbeat may have lapsed already (no engine: a 503).
    stack.synthetic("synthetic", *engine_args)
    traffic(stack)
    # Crash a gateway while an engine streams to it: the engine finishes writing to its stream.
    open_stream_then(stack, 2, second_gateway.kill)

    stack.gateway()
    traffic(stack)

    keys = Keys(stack.prefix)
    with redis.Redis.from_url(stack.redis_url) as r:
        jobs = keys.jobs("synthetic")
        deadline = time.monotonic() + 20
        while r.xlen(jobs) or r.xpending(jobs, ENGINE_GROUP)["pending"]:  # every job answered and acked
            assert time.monotonic() < deadline, f"jobs never acked: {r.xpending(jobs, ENGINE_GROUP)}"
            time.sleep(0.1)
        permanent = permanent_keys(keys, [m.decode() for m in r.hkeys(keys.models_seen)])
        unbounded = {k.decode(): r.type(k).decode() for k in r.scan_iter(match=f"{stack.prefix}:*")
                     if k.decode() not in permanent and r.pttl(k) <= 0}
    assert unbounded == {}, "keys without a TTL that are not on the permanent list"
