"""``Idempotency-Key``: retries get the first response, the engine runs the job once.

Real gateways, a synthetic engine and Redis; the `openai` SDK where a client would use it.
The last tests drive the middleware directly (an ASGI app of their own) to set the request's
principal, which the auth guard does in the gateway.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis

from gateway.context import CTX, RequestContext
from engines.contract.keys import Keys
from gateway.settings import IdempotencySettings
from gateway.tenancy.idempotency import IdempotencyMiddleware
from gateway.tenancy.principal import ANONYMOUS, Principal
from tests.harness import RedisServer, Stack, free_port
from tests.integration.test_delivery import engine_jobs, wait_for_jobs

CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES: Any = CHAT["messages"]


def post(base_url: str, key: str, body: dict[str, Any] = CHAT, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(base_url + path, json=body, headers={"Idempotency-Key": key}, timeout=30)


def settle(metrics_port: int, ok: int) -> dict[str, float]:
    """The engine's job counts once ``ok`` jobs finished and a little longer (room for one too many)."""
    wait_for_jobs(metrics_port, "ok", ok)
    time.sleep(0.3)
    return engine_jobs(metrics_port)


def test_a_retry_gets_the_first_response_and_the_job_runs_once(stack: Stack) -> None:
    metrics_port = free_port()
    stack.gateway()
    stack.synthetic("synthetic", "--tokens", "3", "--metrics-port", str(metrics_port))
    client = stack.sdk()
    key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
    first = client.chat.completions.with_raw_response.create(model="synthetic", messages=MESSAGES, extra_headers=key)
    again = client.chat.completions.with_raw_response.create(model="synthetic", messages=MESSAGES, extra_headers=key)
    assert again.http_response.content == first.http_response.content
    assert again.parse().id == first.parse().id
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["x-request-id"] == first.headers["x-request-id"]
    assert again.headers["content-type"] == first.headers["content-type"]
    # Another key is another request; no key at all is never replayed.
    other = client.chat.completions.create(model="synthetic", messages=MESSAGES,
                                           extra_headers={"Idempotency-Key": "another"})
    plain = client.chat.completions.create(model="synthetic", messages=MESSAGES)
    assert len({first.parse().id, other.id, plain.id}) == 3
    assert settle(metrics_port, 3) == {"ok": 3}
    # The same key on another route is another request: refused, not replayed.
    r = post(stack.base_url, key["Idempotency-Key"], {"model": "synthetic", "prompt": "hi"}, "/v1/completions")
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert r.headers["x-should-retry"] == "false"  # the SDK would retry a 409 otherwise


def test_a_retry_while_the_first_runs_waits_for_its_response(stack: Stack) -> None:
    metrics_port = free_port()
    stack.gateway()
    stack.synthetic("synthetic", "--tokens", "8", "--token-delay", "0.1", "--metrics-port", str(metrics_port))
    with cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, stack.base_url, "slow")
        time.sleep(0.3)  # the first holds the key
        second = pool.submit(post, stack.base_url, "slow")
        a, b = first.result(), second.result()
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.content == b.content
    # Normally the second waited for the first; either way, exactly one was replayed.
    assert sorted(r.headers.get("idempotent-replayed", "") for r in (a, b)) == ["", "true"]
    assert settle(metrics_port, 1) == {"ok": 1}


def test_conflicts(stack: Stack) -> None:
    """Another body under a used key, a second stream while one runs, an oversized key."""
    stack.gateway()
    stack.synthetic("synthetic", "--tokens", "6", "--token-delay", "0.1")
    client = stack.sdk()
    key = {"Idempotency-Key": "conflict"}
    client.chat.completions.create(model="synthetic", messages=MESSAGES, extra_headers=key)
    with pytest.raises(openai.ConflictError) as caught:
        client.chat.completions.create(model="synthetic", messages=[{"role": "user", "content": "other"}],
                                       extra_headers=key)
    assert caught.value.body == {"message": caught.value.body["message"],  # type: ignore[index]
                                 "type": "invalid_request_error", "param": None, "code": "idempotency_key_reused"}

    # A stream holds its key while it runs, and is never stored: once it ended, it runs again.
    stream_key = {"Idempotency-Key": "stream"}
    with client.chat.completions.create(model="synthetic", messages=MESSAGES, stream=True,
                                        extra_headers=stream_key) as running:
        next(iter(running))
        with pytest.raises(openai.ConflictError) as caught:
            client.chat.completions.create(model="synthetic", messages=MESSAGES, stream=True, extra_headers=stream_key)
        assert caught.value.code == "idempotency_key_in_use"
        with pytest.raises(openai.ConflictError) as caught:  # the same request but not streamed: another body
            client.chat.completions.create(model="synthetic", messages=MESSAGES, extra_headers=stream_key)
        assert caught.value.code == "idempotency_key_reused"
        assert "".join(c.choices[0].delta.content or "" for c in running if c.choices).startswith("tok")
    again = client.chat.completions.create(model="synthetic", messages=MESSAGES, stream=True, extra_headers=stream_key)
    assert "".join(c.choices[0].delta.content or "" for c in again if c.choices) == "tok " * 6

    r = post(stack.base_url, "k" * 256)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"
    assert post(stack.base_url, "k" * 255).status_code == 200


def test_two_gateways_share_the_state(stack: Stack) -> None:
    metrics_port = free_port()
    stack.gateway()
    first_url = stack.base_url
    stack.gateway()
    stack.synthetic("synthetic", "--tokens", "3", "--metrics-port", str(metrics_port))
    a = post(first_url, "shared")
    b = post(stack.base_url, "shared")
    assert a.status_code == b.status_code == 200
    assert a.content == b.content and b.headers["idempotent-replayed"] == "true"
    assert settle(metrics_port, 1) == {"ok": 1}


def test_a_5xx_is_not_stored(stack: Stack) -> None:
    stack.gateway(models="synthetic")
    r = post(stack.base_url, "unavailable")
    assert r.status_code == 503, r.text
    stack.synthetic("synthetic", "--tokens", "3")
    retried = post(stack.base_url, "unavailable")
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
    assert post(stack.base_url, "unavailable").content == retried.content


def test_a_dead_gateways_key_is_free_after_its_lease(stack: Stack) -> None:
    """The first gateway is killed (-9) mid-request: its claim runs out, and the retry runs."""
    metrics_port = free_port()
    doomed = stack.gateway(idempotency_lease_s=1)
    doomed_url = stack.base_url
    stack.gateway(idempotency_lease_s=1)
    stack.synthetic("synthetic", "--tokens", "10", "--token-delay", "0.1", "--metrics-port", str(metrics_port))
    with cf.ThreadPoolExecutor(1) as pool:
        lost = pool.submit(post, doomed_url, "orphan")
        time.sleep(0.4)
        doomed.kill()
        with pytest.raises(httpx.TransportError):
            lost.result()
    started = time.monotonic()
    r = post(stack.base_url, "orphan")
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers, r.text
    assert time.monotonic() - started < 10
    assert post(stack.base_url, "orphan").headers["idempotent-replayed"] == "true"
    assert settle(metrics_port, 2) == {"ok": 2}  # the dead gateway's job ran to its end too


# ---- the middleware alone: principals, statuses -------------------------------------------


class Counter:
    """An ASGI app answering each request with its number and the status it is told."""

    def __init__(self) -> None:
        self.calls = 0
        self.status = 200

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        self.calls += 1
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"n": self.calls, "echo": body.decode()}).encode()})


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def call(app: Any, key: bytes, principal: Principal | None, body: bytes = b'{"model":"m"}'
               ) -> tuple[int, dict[bytes, bytes], bytes]:
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"idempotency-key", key)],
             "state": {} if principal is None else {CTX: RequestContext(principal=principal)}}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    out: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    await app(scope, receive, send)
    return out[0]["status"], dict(out[0]["headers"]), b"".join(m.get("body", b"") for m in out[1:])


def idempotent(inner: Any, redis_client: aioredis.Redis) -> IdempotencyMiddleware:
    """The middleware around ``inner``, on keys of its own."""
    return IdempotencyMiddleware(inner, IdempotencySettings(), lambda: redis_client, keys=Keys(f"t{uuid.uuid4().hex[:8]}"),
                                 max_body_bytes=8 * 1024 * 1024, request_timeout_s=600)


async def test_principals_do_not_share_keys(redis_client: aioredis.Redis) -> None:
    inner = Counter()
    app = idempotent(inner, redis_client)
    alice = Principal(key_id="0123456789ab", name="alice")
    bob = Principal(key_id="ba9876543210", name="bob")
    results = [await call(app, b"same", p) for p in (alice, bob, None, alice, bob, ANONYMOUS)]
    assert [json.loads(body)["n"] for _, _, body in results] == [1, 2, 3, 1, 2, 3]
    assert [h.get(b"idempotent-replayed") for _, h, _ in results] == [None] * 3 + [b"true"] * 3
    assert inner.calls == 3


@pytest.mark.parametrize("status, stored", [(400, True), (404, True), (429, False), (409, False), (500, False),
                                            (503, False)])
async def test_which_statuses_are_stored(redis_client: aioredis.Redis, status: int, stored: bool) -> None:
    inner = Counter()
    inner.status = status
    app = idempotent(inner, redis_client)
    first = await call(app, b"k", None)
    inner.status = 200
    second = await call(app, b"k", None)
    assert first[0] == status
    assert second[0] == (status if stored else 200)
    assert (second[2] == first[2]) is stored
    assert inner.calls == (1 if stored else 2)
