"""Per-key limits, headers and usage through the gateway's request path: two gateway apps in
this process (each its own gateway id, Redis connections and reply stream) over one real
Redis and a real synthetic engine process, driven through HTTP (httpx's ASGI transport) and
the `openai` SDK.

The requests run as keys: a stand-in for the auth guard (``as_keys``) puts the Principal at
the request's context (``gateway.context``) and sends the ``x-ratelimit-*`` headers the limiter
put there, as the shared design has the guard do.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

import httpx
import openai
import pytest
from litestar import Litestar

from gateway.app import create_app
from gateway.context import context_of
from gateway.settings import GatewaySettings
from gateway.tenancy.principal import KeyLimits, Principal
from gateway.tenancy.usage import UsageLog
from tests.harness import ROOT, Stack

MODEL = "synthetic"

# The app's handlers take ``services`` by inference, which Litestar 2.x warns about when an app
# is built (elsewhere gateways run as subprocesses, where warnings are not errors).


def as_keys(app: Litestar, principals: dict[str, Principal]) -> Any:
    """The guard's part, for tests: Bearer token -> principal; rate-limit headers on the response."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        ctx = context_of(scope)
        ctx.principal = principals[auth.removeprefix("Bearer ")]

        async def send_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.encode(), v.encode()) for k, v in (ctx.ratelimit or {}).items()]
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await app(scope, receive, send_headers)

    return wrapped


class Gateways:
    """Two gateway apps on the stack's Redis, serving the given keys."""

    def __init__(self, stack: Stack, **settings: Any) -> None:
        self.stack = stack
        self.settings = GatewaySettings.from_env({}, redis_url=stack.redis_url, key_prefix=stack.prefix,
                                                 registry_refresh_s=0.1, **settings)
        self.apps = [create_app(self.settings), create_app(self.settings)]
        self.principals: dict[str, Principal] = {}
        self.clients: list[httpx.AsyncClient] = []
        self._exit = AsyncExitStack()

    async def __aenter__(self) -> Gateways:
        for app in self.apps:
            await self._exit.enter_async_context(app.lifespan())
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=as_keys(app, self.principals)),
                                       base_url="http://gw", timeout=30)
            self.clients.append(await self._exit.enter_async_context(client))
        deadline = time.monotonic() + 30
        while not all(app.state.services.registry.is_live(MODEL) for app in self.apps):
            assert time.monotonic() < deadline, "the synthetic engine never appeared"
            await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._exit.aclose()

    def key(self, name: str = "team-a", **limits: int) -> str:
        """A key's token for requests, running as a principal with ``limits``."""
        token = uuid.uuid4().hex
        self.principals[token] = Principal(key_id=uuid.uuid4().hex[:12], name=name, limits=KeyLimits(**limits))
        return token

    async def chat(self, i: int, token: str, **body: Any) -> httpx.Response:
        """A chat request through gateway ``i % 2``."""
        return await self.clients[i % 2].post(
            "/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "one two three"}], **body})

    async def in_flight(self, token: str) -> int:
        redis = self.apps[0].state.services.redis
        keys = self.apps[0].state.services.dispatcher.limiter._keys
        return int(await redis.zcard(keys.rate_limits(self.principals[token].key_id)[3]))


def gateways(stack: Stack) -> Gateways:
    """Two gateways and a quick synthetic engine (entered in the test's own task: the apps'
    lifespans must end in the task that began them)."""
    stack.synthetic(MODEL, "--tokens", "8", "--token-delay", "0.01", wait=False)
    return Gateways(stack)


async def test_rpm_holds_exactly_across_two_gateways(stack: Stack) -> None:
    async with gateways(stack) as g:
        token = g.key(rpm=10)
        replies = await asyncio.gather(*(g.chat(i, token, max_tokens=4) for i in range(40)))
        statuses = [r.status_code for r in replies]
        assert (statuses.count(200), statuses.count(429)) == (10, 30)
        refused = next(r for r in replies if r.status_code == 429)
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-limit-requests"] == "10"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        ok = [r for r in replies if r.status_code == 200]
        remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
        assert remaining == list(range(10))  # each admission saw the one before it, on either gateway
        for r in ok:
            assert r.headers["x-ratelimit-limit-requests"] == "10"
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")


async def test_tpm_reserves_the_estimate_and_gives_back_what_a_short_answer_left(stack: Stack) -> None:
    async with gateways(stack) as g:
        token = g.key(tpm=1000)
        # "one two three" (13 chars: 4 tokens) + 4 (message) + 400 most output = 408 reserved; 8 produced.
        first = await g.chat(0, token, max_tokens=400)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "1000"
        assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - 408)
        used = first.json()["usage"]["total_tokens"]
        await asyncio.sleep(0.2)  # the release goes out just after the answer
        second = await g.chat(1, token, max_tokens=400)
        assert second.status_code == 200
        assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - used - 408)
        # Two reservations at once do not fit: the estimate is what admission goes by.
        replies = await asyncio.gather(*(g.chat(i, token, max_tokens=500) for i in range(2)))
        assert sorted(r.status_code for r in replies) == [200, 429]


async def test_concurrency_holds_across_gateways_and_frees_on_client_disconnect(stack: Stack) -> None:
    stack.synthetic(MODEL, "--tokens", "50", "--token-delay", "0.1", wait=False)  # each answer takes 5 s
    async with Gateways(stack) as g:
        token = g.key(concurrency=2)
        tasks = [asyncio.create_task(g.chat(i, token)) for i in range(2)]
        deadline = time.monotonic() + 10
        while await g.in_flight(token) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        refused = await asyncio.gather(*(g.chat(i, token) for i in range(6)))
        assert [r.status_code for r in refused] == [429] * 6
        assert refused[0].headers["retry-after"] == "1"
        assert "concurrent requests" in refused[0].json()["error"]["message"]
        for t in tasks:  # the clients go away
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        deadline = time.monotonic() + 5
        while await g.in_flight(token):
            assert time.monotonic() < deadline, "the slots of the abandoned requests were not freed"
            await asyncio.sleep(0.05)
        later = asyncio.create_task(g.chat(0, token, max_tokens=2))
        assert (await later).status_code == 200


async def test_usage_counts_are_the_sum_of_the_responses_usage(stack: Stack) -> None:
    async with gateways(stack) as g:
        token = g.key(name="usage-team", rpm=100)
        other = g.key(name="other-team")  # no limits: never reaches the limiter, still counted
        replies = await asyncio.gather(*(g.chat(i, token, max_tokens=1 + i % 5, n=1 + i % 2) for i in range(12)),
                                       *(g.chat(i, other, max_tokens=3) for i in range(3)))
        assert all(r.status_code == 200 for r in replies)
        assert "x-ratelimit-limit-requests" not in replies[-1].headers
        await asyncio.sleep(0.3)  # settled just after each answer went out
        for app in g.apps:  # counts are written once a second; now, here
            await app.state.services.usage_log.flush()
        services = g.apps[1].state.services
        log = UsageLog(services.redis, services.dispatcher.limiter._keys)
        for tok, rs in ((token, replies[:12]), (other, replies[12:])):
            usage = await log.read(g.principals[tok].key_id, 2, time.time())
            m = usage.days[0].models[MODEL]
            assert m.requests == len(rs)
            assert m.prompt_tokens == sum(r.json()["usage"]["prompt_tokens"] for r in rs)
            assert m.completion_tokens == sum(r.json()["usage"]["completion_tokens"] for r in rs)
            assert m.images == 0
            assert usage.days[1].models == {}
        # The same numbers from ``conduit keys usage``.
        key_id = g.principals[token].key_id
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway.cli", "keys", "usage", key_id, "--days", "1", "--json",
                             "--redis-url", stack.redis_url, "--key-prefix", stack.prefix],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        shown = json.loads(done.stdout)
        assert shown["key_id"] == key_id and len(shown["days"]) == 1
        assert shown["days"][0]["models"][MODEL]["completion_tokens"] == sum(
            r.json()["usage"]["completion_tokens"] for r in replies[:12])
        table = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway.cli", "keys", "usage", key_id, "--redis-url",
                             stack.redis_url, "--key-prefix", stack.prefix],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert table.stdout.split("\n")[0].split() == ["date", "model", "requests", "prompt_tokens",
                                                       "completion_tokens", "images"]
        assert table.stdout.split("\n")[1].split()[1:3] == [MODEL, "12"]


async def test_the_sdk_raises_rate_limit_error(stack: Stack) -> None:
    async with gateways(stack) as g:
        token = g.key(rpm=1)
        sdk = openai.AsyncOpenAI(base_url="http://gw/v1", api_key=token, max_retries=0, http_client=g.clients[0])
        await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.RateLimitError) as info:
            await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert info.value.code == "rate_limit_exceeded"
        assert info.value.response.headers["retry-after"]


async def test_streamed_requests_are_settled_and_counted(stack: Stack) -> None:
    async with gateways(stack) as g:
        token = g.key(name="stream-team", tpm=10_000, concurrency=5)
        sdk = openai.AsyncOpenAI(base_url="http://gw/v1", api_key=token, max_retries=0, http_client=g.clients[1])
        totals = []
        for _ in range(3):
            stream = await sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "one two three"}], max_tokens=100, stream=True,
                stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.usage is not None:
                    totals.append(chunk.usage.total_tokens)
        assert len(totals) == 3
        await asyncio.sleep(0.3)
        assert await g.in_flight(token) == 0
        # Each reservation (4 + 4 + 100) was replaced by the real total.
        after = await g.chat(0, token, max_tokens=100)
        assert after.headers["x-ratelimit-remaining-tokens"] == str(10_000 - sum(totals) - 108)
        services = g.apps[0].state.services
        log = UsageLog(services.redis, services.dispatcher.limiter._keys)
        for app in g.apps:  # counts are written once a second; now, here
            await app.state.services.usage_log.flush()
        assert (await log.read(g.principals[token].key_id, 1, time.time())).days[0].models[MODEL].requests >= 4
