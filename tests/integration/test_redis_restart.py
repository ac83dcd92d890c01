"""Redis restarting (without persistence) is survived: engines rejoin, gateways recover."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from gateway.stack import start_redis
from tests.harness import REDIS_USERS, RedisServer, Stack, free_port, redis_user_args

CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_stack_recovers_after_redis_restarts(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    stack = Stack(redis.url, tmp_path)
    try:
        stack.gateway()
        stack.synthetic()
        assert httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200

        redis.stop()  # every key, stream, group and script is gone
        redis.proc = start_redis(redis.port, tmp_path / "redis", redis.args)

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
        redis.stop()


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
        redis = start_redis(port, tmp_path / "redis", redis_user_args() if REDIS_USERS else ())
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
