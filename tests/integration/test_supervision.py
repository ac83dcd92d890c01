"""Background duties outlive bad data: a corrupted registry and reply stream do not stop a gateway."""

from __future__ import annotations

import re
import time

import httpx
import msgspec
import redis

from engines.contract.keys import Keys
from tests.harness import Stack


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def metric(base_url: str, name: str, reason: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    m = re.search(name + r'\{[^}]*reason="' + reason + r'"[^}]*\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def test_corrupt_registry_and_reply_stream_do_not_stop_the_gateway(stack: Stack) -> None:
    gateway = stack.gateway()
    stack.synthetic("model-a")
    assert httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat("model-a"), timeout=10).status_code == 200
    keys = Keys(stack.prefix)
    with redis.Redis.from_url(stack.redis_url) as r:
        # (i) Two live engine ids whose info no gateway of this version can read.
        live = int(time.time() * 1000) + 60_000
        r.zadd(keys.engines, {"garbage-engine": live, "wrong-shape-engine": live})
        r.hset(keys.engine_info, "garbage-engine", b"\xc1 not msgpack at all")
        r.hset(keys.engine_info, "wrong-shape-engine", msgspec.msgpack.encode({"id": 7, "models": "model-z"}))
        # (ii) Entries in the gateway's reply stream that are not a list of events.
        (stream,) = (k for k in r.scan_iter(match=f"{stack.prefix}:replies:*") if not k.endswith(b":gen"))
        r.xadd(stream, {b"e": b"\xc1garbage"})
        r.xadd(stream, {b"unknown-field": msgspec.msgpack.encode([{"t": "d", "job": "x"}])})
        r.xadd(stream, {b"e": msgspec.msgpack.encode({"t": "d", "job": "x"})})
        try:
            # The registry still follows engines that come and go, and both models serve.
            stack.engine("--kind", "synthetic", "--served-name", "model-b", wait=False)
            stack.wait_for_model("model-b", stack.procs[-1], timeout=10)
            for model in ("model-a", "model-b"):
                resp = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat(model), timeout=10)
                assert resp.status_code == 200, resp.text
                assert resp.json()["choices"][0]["message"]["content"] == "tok tok "
            # Each kind of damage was counted, not just outlived.
            skipped = "conduit_gateway_events_skipped_total"
            assert metric(stack.base_url, skipped, "registry_entry") >= 2
            assert metric(stack.base_url, skipped, "undecodable_entry") == 2
        finally:
            r.zrem(keys.engines, "garbage-engine", "wrong-shape-engine")
            r.hdel(keys.engine_info, "garbage-engine", "wrong-shape-engine")
    assert gateway.alive()
    assert "Traceback" not in gateway.output(), gateway.output()[-3000:]
