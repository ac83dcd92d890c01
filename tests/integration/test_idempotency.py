"""``Idempotency-Key``: retries get the first response, the engine runs the job once.

Real gateways, a synthetic engine and Redis; the `openai` SDK where a client would use it.
The last tests drive the middleware directly (an ASGI app of their own) to set the request's
principal, which the auth guard does in the gateway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import redis
import redis.asyncio as aioredis

from engines.contract.keys import Keys
from gateway.context import CTX, RequestContext
from gateway.settings import IdempotencySettings
from gateway.tenancy.idempotency import IdempotencyMiddleware
from gateway.tenancy.keys import HASHER, parse_key
from gateway.tenancy.principal import ANONYMOUS, Principal
from tests.harness import RedisServer, Stack, free_port
from tests.integration.test_delivery import engine_jobs, wait_for_jobs
from tests.integration.test_tenancy_stack import ADMIN, new_key

CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES: Any = CHAT["messages"]


def post(base_url: str, key: str, body: dict[str, Any] = CHAT, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(base_url + path, json=body, headers={"Idempotency-Key": key}, timeout=30)


def wait_until(condition: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def keyed_gateway(stack: Stack, **settings: Any) -> str:
    """A gateway with authentication on (its admin credential: ``ADMIN``); its URL."""
    stack.gateway(auth=True, admin_key_hash=HASHER.hash(ADMIN), **settings)
    stack.api_key = new_key(stack.base_url, name="watcher")  # the harness's own (it waits for models)
    return stack.base_url


def send(url: str, key: str, idempotency_key: str, body: dict[str, Any] = CHAT) -> httpx.Response:
    """A chat request as API key ``key``."""
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idempotency_key})


def idempotency_records(stack: Stack) -> list[bytes]:
    with redis.Redis.from_url(stack.redis_url) as r:
        return list(r.scan_iter(f"{stack.prefix}:idempotency:*"))


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


def test_refused_requests_leave_nothing_in_redis(stack: Stack) -> None:
    """Only a success is kept for a retry: a request refused (or failed) leaves no record, so its
    retry runs again, and refusals cost Redis nothing beyond their request."""
    url = keyed_gateway(stack, max_body_bytes=64_000, max_backlog_bytes=20_000)
    stack.synthetic("synthetic", "--tokens", "3")
    key = new_key(url, models=["synthetic"], limits={"rpm": 2})
    prompt = {"model": "synthetic", "messages": [{"role": "user", "content": "x" * 15_000}]}
    huge = {"model": "synthetic", "messages": [{"role": "user", "content": "x" * 70_000}]}
    statuses = {
        "a job over the key's share of the backlog's bytes": send(url, key, "share", prompt).status_code,
        "ok": send(url, key, "ok").status_code,
        "no key": send(url, "cdt-000000000000-" + "x" * 43, "who").status_code,
        "invalid": send(url, key, "invalid", {"model": "synthetic"}).status_code,
        "unknown model": send(url, key, "unknown", {**CHAT, "model": "nope"}).status_code,
        "a body over the limit": send(url, key, "huge", huge).status_code,
        "over the key's rpm": send(url, key, "rpm").status_code,
    }
    assert statuses == {"a job over the key's share of the backlog's bytes": 413, "ok": 200, "no key": 401,
                        "invalid": 400, "unknown model": 404, "a body over the limit": 413, "over the key's rpm": 429}
    assert len(idempotency_records(stack)) == 1  # the success's


def test_a_client_that_hung_up_can_retry(stack: Stack) -> None:
    """The first request's client left before its answer (499): nothing is kept, the retry runs."""
    stack.gateway()
    stack.synthetic("synthetic", "--tokens", "20", "--token-delay", "0.05")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.base_url + "/v1/chat/completions", json=CHAT, headers={"Idempotency-Key": "hung-up"},
                   timeout=0.3)
    wait_until(lambda: not idempotency_records(stack), "the request that lost its client left its record")
    retried = post(stack.base_url, "hung-up")
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers, retried.text


def test_a_waiting_duplicate_counts_against_its_keys_concurrency(stack: Stack) -> None:
    """A duplicate waiting for the first request's answer holds a connection and a task: it takes
    one of its key's concurrent slots while it waits, and a key at its limit gets a 429 for it."""
    url = keyed_gateway(stack)
    stack.synthetic("synthetic", "--tokens", "20", "--token-delay", "0.1")  # answers take 2 s
    pair, single = new_key(url, limits={"concurrency": 2}), new_key(url, limits={"concurrency": 1})
    keys = Keys(stack.prefix)
    with redis.Redis.from_url(stack.redis_url) as r, cf.ThreadPoolExecutor(2) as pool:

        def in_flight(key: str) -> int:
            return int(r.zcard(keys.rate_limits(parse_key(key)[0])[3]))  # type: ignore[index]

        first = pool.submit(send, url, pair, "twin")
        wait_until(lambda: in_flight(pair) == 1, "the first request was never admitted")
        twin = pool.submit(send, url, pair, "twin")
        wait_until(lambda: in_flight(pair) == 2, "the waiting duplicate holds no slot of its key")
        other = send(url, pair, "other")
        assert other.status_code == 429 and "concurrent requests" in other.json()["error"]["message"], other.text
        a, b = first.result(), twin.result()
        assert a.status_code == b.status_code == 200 and a.content == b.content
        assert b.headers["idempotent-replayed"] == "true"
        wait_until(lambda: in_flight(pair) == 0, "a slot outlived its request")

        first = pool.submit(send, url, single, "twin")
        wait_until(lambda: in_flight(single) == 1, "the first request was never admitted")
        refused = send(url, single, "twin")
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.headers["retry-after"] == "1"
        assert first.result().status_code == 200
        wait_until(lambda: in_flight(single) == 0, "a slot outlived its request")


# ---- the middleware alone: principals, statuses -------------------------------------------


class Counter:
    """An ASGI app answering each request with its number and the status it is told (and
    ``pad`` characters more)."""

    def __init__(self) -> None:
        self.calls = 0
        self.status = 200
        self.pad = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        self.calls += 1
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json")]})
        answer = {"n": self.calls, "echo": body.decode(), "pad": "x" * self.pad}
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


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
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    await app(scope, receive, send)
    return out[0]["status"], dict(out[0]["headers"]), b"".join(m.get("body", b"") for m in out[1:])


def idempotent(inner: Any, redis_client: aioredis.Redis, prefix: str = "") -> IdempotencyMiddleware:
    """The middleware around ``inner``, on keys of its own (under ``prefix``)."""
    return IdempotencyMiddleware(inner, IdempotencySettings(), lambda: redis_client,
                                 keys=Keys(prefix or f"t{uuid.uuid4().hex[:8]}"), max_body_bytes=8 * 1024 * 1024,
                                 request_timeout_s=600)


async def records(redis_client: aioredis.Redis, prefix: str) -> list[bytes]:
    return [key async for key in redis_client.scan_iter(f"{prefix}:idempotency:*")]


async def test_principals_do_not_share_keys(redis_client: aioredis.Redis) -> None:
    inner = Counter()
    app = idempotent(inner, redis_client)
    alice = Principal(key_id="0123456789ab", name="alice")
    bob = Principal(key_id="ba9876543210", name="bob")
    results = [await call(app, b"same", p) for p in (alice, bob, None, alice, bob, ANONYMOUS)]
    assert [json.loads(body)["n"] for _, _, body in results] == [1, 2, 3, 1, 2, 3]
    assert [h.get(b"idempotent-replayed") for _, h, _ in results] == [None] * 3 + [b"true"] * 3
    assert inner.calls == 3


@pytest.mark.parametrize("status", [200, 201, 400, 404, 409, 413, 429, 499, 500, 503])
async def test_only_successful_responses_are_stored(redis_client: aioredis.Redis, status: int) -> None:
    inner = Counter()
    inner.status = status
    prefix = f"t{uuid.uuid4().hex[:8]}"
    app = idempotent(inner, redis_client, prefix)
    first = await call(app, b"k", None)
    stored = 200 <= status < 300
    assert first[0] == status
    assert len(await records(redis_client, prefix)) == (1 if stored else 0)
    inner.status = 200
    second = await call(app, b"k", None)
    assert second[0] == (status if stored else 200)
    assert (second[2] == first[2]) is stored
    assert inner.calls == (1 if stored else 2)


@pytest.mark.parametrize("pad, stored", [(1000 * 1000, True), (1024 * 1024, False)])
async def test_a_response_over_the_cap_is_not_stored(redis_client: aioredis.Redis, pad: int, stored: bool) -> None:
    """``idempotency_max_response_bytes`` (1 MiB by default): what one retried request can keep in
    Redis for a day."""
    inner = Counter()
    inner.pad = pad
    prefix = f"t{uuid.uuid4().hex[:8]}"
    app = idempotent(inner, redis_client, prefix)
    first = await call(app, b"k", None)
    assert len(await records(redis_client, prefix)) == (1 if stored else 0)
    second = await call(app, b"k", None)
    assert first[0] == second[0] == 200
    assert (second[1].get(b"idempotent-replayed") == b"true") is stored
    assert inner.calls == (1 if stored else 2)
