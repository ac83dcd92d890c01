"""``Idempotency-Key`` within a key's limits: duplicates and replays count against its RPM, the
waiters one key can make a gateway hold are capped, and what one key can store is budgeted."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis

from engines.contract.keys import Keys
from gateway.settings import IdempotencySettings
from gateway.tenancy.idempotency import IdempotencyMiddleware
from gateway.tenancy.keys import parse_key
from gateway.tenancy.principal import Principal
from tests.harness import Stack
from tests.integration.test_idempotency import Counter, call, keyed_gateway, records, redis_client, send, wait_until
from tests.integration.test_tenancy_stack import new_key

__all__ = ["redis_client"]  # the fixture


def test_waiting_duplicates_and_replays_take_requests_from_the_keys_rpm(stack: Stack) -> None:
    """A key with an rpm and no concurrency limit: a duplicate that waits and a replay each take
    one request of its rpm, and get the usual 429 beyond it."""
    url = keyed_gateway(stack)
    stack.synthetic("synthetic", "--tokens", "10", "--token-delay", "0.1")  # answers take 1 s
    key = new_key(url, limits={"rpm": 2})
    in_flight = Keys(stack.prefix).rate_limits(parse_key(key)[0])[3]  # type: ignore[index]
    with redis.Redis.from_url(stack.redis_url) as r, cf.ThreadPoolExecutor(4) as pool:
        first = pool.submit(send, url, key, "twin")
        wait_until(lambda: r.zcard(in_flight) == 1, "the first request was never admitted")
        duplicates = [pool.submit(send, url, key, "twin") for _ in range(3)]
        dup_statuses = sorted(d.result().status_code for d in duplicates)
        assert first.result().status_code == 200
    replay = send(url, key, "twin")
    fresh = send(url, key, "fresh")
    assert (dup_statuses, replay.status_code, fresh.status_code) == ([200, 429, 429], 429, 429), replay.text
    assert replay.json()["error"]["code"] == "rate_limit_exceeded"
    assert replay.headers["x-ratelimit-limit-requests"] == "2" and "retry-after" in replay.headers


class Blocked:
    """An ASGI app whose first call waits until ``go`` is set (then answers 200)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        self.calls += 1
        await self.go.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok":true}'})


def middleware(inner: Any, redis_client: aioredis.Redis, prefix: str, **settings: Any) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(inner, IdempotencySettings(**settings), lambda: redis_client, keys=Keys(prefix),
                                 max_body_bytes=1 << 20, request_timeout_s=30)


async def test_waiters_per_key_are_capped_without_a_concurrency_limit(redis_client: aioredis.Redis) -> None:
    """One key can make a gateway hold at most ``idempotency_max_waiters`` waiting duplicates,
    whatever its limits (here none); another key is not affected."""
    inner = Blocked()
    app = middleware(inner, redis_client, f"t{uuid.uuid4().hex[:8]}", idempotency_max_waiters=2)
    alice, bob = Principal(key_id="0123456789ab", name="alice"), Principal(key_id="ba9876543210", name="bob")
    first = asyncio.ensure_future(call(app, b"k", alice))
    while not inner.calls:
        await asyncio.sleep(0.01)
    waiting = [asyncio.ensure_future(call(app, b"k", alice)) for _ in range(2)]
    await asyncio.sleep(0.2)
    status, headers, body = await asyncio.wait_for(call(app, b"k", alice), 5)
    assert status == 429 and json.loads(body)["error"]["code"] == "rate_limit_exceeded", body
    assert headers[b"retry-after"] == b"1"
    bobs = asyncio.ensure_future(call(app, b"k", bob))  # bob's own key, bob's own cap
    inner.go.set()
    results = await asyncio.gather(first, *waiting, bobs)
    assert [s for s, _, _ in results] == [200] * 4
    assert [h.get(b"idempotent-replayed") for _, h, _ in results] == [None, b"true", b"true", None]
    assert not app._waiters.count  # every waiter was counted out


async def test_a_keys_stored_bytes_are_budgeted(redis_client: aioredis.Redis) -> None:
    """Past ``idempotency_max_stored_bytes`` stored in a window of ``idempotency_ttl_s``, a key's
    successes are answered but not stored (a retry runs again); other keys store as before."""
    inner = Counter()
    inner.pad = 3000
    prefix = f"t{uuid.uuid4().hex[:8]}"
    app = middleware(inner, redis_client, prefix, idempotency_max_stored_bytes=5000, idempotency_ttl_s=60)
    alice, bob = Principal(key_id="0123456789ab", name="alice"), Principal(key_id="ba9876543210", name="bob")
    for idem_key in (b"one", b"two", b"one", b"two"):
        assert (await call(app, idem_key, alice))[0] == 200
    assert inner.calls == 3  # "one" stored (3 KB) and replayed; "two" over the budget, run twice
    assert (await call(app, b"one", bob))[0] == 200 and (await call(app, b"one", bob))[1].get(b"idempotent-replayed")
    assert inner.calls == 4
    counter = Keys(prefix).idempotency_bytes("0123456789ab")
    assert 3000 < int(await redis_client.get(counter)) < 5000
    assert 0 < await redis_client.pttl(counter) <= 60_000
    assert len(await records(redis_client, prefix)) == 2  # alice's "one", bob's "one"
