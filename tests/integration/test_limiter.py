"""The rate limiter against a real Redis, two limiters (two gateways' worth of connections) at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from engines.contract.lane import open_lane
from engines.contract.keys import Keys
from gateway.errors import RateLimited
from gateway.tenancy.cost import Cost
from gateway.tenancy.limits import SLOT_GRACE_MS, Grant, Limiter
from gateway.tenancy.principal import ANONYMOUS, KeyLimits, Principal
from tests.harness import RedisServer


class Pair:
    """Two limiters on their own connections, as two gateway processes have."""

    def __init__(self, url: str) -> None:
        self.keys = Keys(f"t{uuid.uuid4().hex[:8]}")
        self.clients = [aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)]
        self.limiters = [Limiter(c, open_lane(c, f"limits-{i}"), self.keys) for i, c in enumerate(self.clients)]
        for limiter in self.limiters:
            limiter.lane.start()

    async def close(self) -> None:
        for limiter in self.limiters:
            await limiter.lane.close()
        for c in self.clients:
            await c.aclose()

    async def burst(self, principal: Principal, count: int, cost: Cost, expiry_s: float = 30
                    ) -> tuple[list[Grant], list[RateLimited]]:
        """``count`` admissions at once, alternating between the two limiters."""
        expiry = int((time.time() + expiry_s) * 1000)

        async def one(i: int) -> Grant | RateLimited:
            try:
                grant = await self.limiters[i % 2].admit(principal, f"r-{uuid.uuid4().hex}", cost, expiry)
            except RateLimited as exc:
                return exc
            assert grant is not None
            return grant

        results = await asyncio.gather(*(one(i) for i in range(count)))
        return ([r for r in results if isinstance(r, Grant)], [r for r in results if isinstance(r, RateLimited)])


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[Pair]:
    p = Pair(redis_server.url)
    yield p
    await p.close()


def key(**limits: int) -> Principal:
    return Principal(key_id=uuid.uuid4().hex[:12], name="test-key", limits=KeyLimits(**limits))


async def test_requests_per_minute_hold_exactly_across_two_gateways(pair: Pair) -> None:
    p = key(rpm=10)
    granted, refused = await pair.burst(p, 40, Cost(tokens=10))
    assert (len(granted), len(refused)) == (10, 30)
    for exc in refused:
        assert exc.status == 429 and exc.code == "rate_limit_exceeded" and exc.type == "rate_limit_error"
        # The first request's second leaves the window within a minute: that is when one fits.
        assert 1 <= int(exc.headers["Retry-After"]) <= 60
        assert "requests per minute" in exc.message and "test-key" in exc.message
    # Ending requests frees no request budget: requests per minute count arrivals.
    for g in granted:
        await pair.limiters[0].release(g, 5)
    assert (await pair.burst(p, 5, Cost(tokens=1)))[0] == []


async def test_tokens_per_minute_reserve_and_reconcile(pair: Pair) -> None:
    p = key(tpm=1000)
    granted, refused = await pair.burst(p, 10, Cost(tokens=300))
    assert (len(granted), len(refused)) == (3, 7)  # 900 reserved; another 300 would pass 1000
    assert "tokens per minute" in refused[0].message
    # A short answer gives back what it did not use: 300 reserved, 50 used.
    await pair.limiters[1].release(granted[0], 50)
    headers: dict[str, str] = {}
    again = await pair.limiters[0].admit(p, "after-release", Cost(tokens=300), int(time.time() * 1000) + 30_000,
                                         headers)
    assert again is not None
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - 300 - 300 - 50 - 300)
    # A long answer is charged its excess: 300 reserved, 700 used leaves nothing for 1 more token.
    await pair.limiters[0].release(again, 700)
    with pytest.raises(RateLimited):
        await pair.limiters[1].admit(p, "over", Cost(tokens=1), int(time.time() * 1000) + 30_000)
    # 1350 taken. A release resent (the lane resends after a broken connection) reconciles once.
    await pair.limiters[0].release(granted[1], 0)  # 1050
    await pair.limiters[0].release(granted[2], 0)  # 750
    await pair.limiters[1].release(granted[2], 0)  # still 750
    h2: dict[str, str] = {}
    assert await pair.limiters[1].admit(p, "x", Cost(tokens=0), int(time.time() * 1000) + 30_000, h2)
    assert h2["x-ratelimit-remaining-tokens"] == "250"


async def test_images_per_minute(pair: Pair) -> None:
    p = key(ipm=5, tpm=10)
    granted, refused = await pair.burst(p, 10, Cost(tokens=None, images=2))
    assert (len(granted), len(refused)) == (2, 8)  # 4 images; images take no tokens
    assert "images per minute" in refused[0].message
    assert len((await pair.burst(p, 3, Cost(tokens=None, images=1)))[0]) == 1


async def test_concurrency_slots_are_freed_by_release_and_by_expiry(pair: Pair) -> None:
    p = key(concurrency=3)
    granted, refused = await pair.burst(p, 20, Cost(tokens=5))
    assert (len(granted), len(refused)) == (3, 17)
    assert refused[0].headers["Retry-After"] == "1"
    assert "concurrent requests" in refused[0].message
    await pair.limiters[1].release(granted[0], None)
    assert len((await pair.burst(p, 5, Cost(tokens=5)))[0]) == 1
    # A gateway that dies never releases: its slots expire (deadline + grace) and are dropped.
    q = key(concurrency=2)
    expiry_s = (400 - SLOT_GRACE_MS) / 1000  # slots that expire 0.4 s from now
    assert len((await pair.burst(q, 4, Cost(tokens=5), expiry_s=expiry_s))[0]) == 2
    assert len((await pair.burst(q, 2, Cost(tokens=5)))[0]) == 0
    await asyncio.sleep(0.6)
    assert len((await pair.burst(q, 4, Cost(tokens=5)))[0]) == 2


async def test_a_refused_request_takes_nothing(pair: Pair) -> None:
    p = key(rpm=100, tpm=500, concurrency=10)
    expiry = int(time.time() * 1000) + 30_000
    assert await pair.limiters[0].admit(p, "a", Cost(tokens=400), expiry)
    with pytest.raises(RateLimited):
        await pair.limiters[1].admit(p, "b", Cost(tokens=200), expiry)
    headers: dict[str, str] = {}
    assert await pair.limiters[1].admit(p, "c", Cost(tokens=100), expiry, headers)
    assert headers["x-ratelimit-remaining-requests"] == "98"  # a and c, not b
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    in_flight = pair.keys.rate_limits(p.key_id)[3]
    assert sorted(await pair.clients[0].zrange(in_flight, 0, -1)) == [b"a", b"c"]


async def test_a_resent_admission_takes_once(pair: Pair) -> None:
    p = key(rpm=5, concurrency=5)
    expiry = int(time.time() * 1000) + 30_000
    for limiter in pair.limiters:
        assert await limiter.admit(p, "same", Cost(tokens=1), expiry)
    headers: dict[str, str] = {}
    await pair.limiters[0].admit(p, "other", Cost(tokens=1), expiry, headers)
    assert headers["x-ratelimit-remaining-requests"] == "3"


async def test_headers_and_retry_after(pair: Pair) -> None:
    p = key(rpm=2, tpm=100)
    expiry = int(time.time() * 1000) + 30_000
    headers: dict[str, str] = {}
    assert await pair.limiters[0].admit(p, "1", Cost(tokens=30), expiry, headers)
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "70"
    # The window empties a minute after the last admission (within this second).
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        value = headers[name]
        assert value.endswith("s") and 59 <= float(value.removesuffix("s")) <= 60, value
    assert await pair.limiters[1].admit(p, "2", Cost(tokens=30), expiry)
    refused: dict[str, str] = {}
    with pytest.raises(RateLimited) as info:
        await pair.limiters[0].admit(p, "3", Cost(tokens=30), expiry, refused)
    assert 59 <= int(info.value.headers["Retry-After"]) <= 60
    assert refused["x-ratelimit-remaining-requests"] == "0"
    assert refused["x-ratelimit-limit-requests"] == "2"


async def test_a_request_larger_than_the_limit_is_refused_as_such(pair: Pair) -> None:
    p = key(tpm=100)
    with pytest.raises(RateLimited) as info:
        await pair.limiters[0].admit(p, "big", Cost(tokens=101), int(time.time() * 1000) + 30_000)
    assert "Request too large" in info.value.message and "max_tokens" in info.value.message


async def test_no_limits_cost_nothing(pair: Pair) -> None:
    expiry = int(time.time() * 1000) + 30_000
    for p in (ANONYMOUS, key()):
        assert await pair.limiters[0].admit(p, "r", Cost(tokens=10**9, images=10), expiry) is None
    assert await pair.clients[0].keys(f"{pair.keys.prefix}:*") == []


async def test_every_key_expires(pair: Pair) -> None:
    p = key(rpm=5, tpm=50, ipm=5, concurrency=5)
    await pair.burst(p, 3, Cost(tokens=5, images=1))
    names = await pair.clients[0].keys(f"{pair.keys.prefix}:*")
    assert len(names) == 4
    for name in names:
        assert 0 < await pair.clients[0].pttl(name) <= 61_000 + SLOT_GRACE_MS + 30_000


async def test_the_window_slides_second_by_second(redis_server: RedisServer) -> None:
    """Moved by a clock of the test's: what second ``s`` took is counted until second ``s + 60``."""
    now = [1_000_000.0]
    client = aioredis.Redis.from_url(redis_server.url)
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")
    limiter = Limiter(client, open_lane(client, "clock"), keys, clock=lambda: now[0])
    limiter.lane.start()
    try:
        p = key(rpm=3, tpm=100)
        expiry = int(now[0] * 1000) + 10**9

        async def admit(tokens: int = 10) -> bool:
            try:
                return await limiter.admit(p, uuid.uuid4().hex, Cost(tokens=tokens), expiry) is not None
            except RateLimited:
                return False

        assert await admit() and await admit(50)   # second 0: 2 requests, 60 tokens
        now[0] += 30.5
        assert await admit()                       # second 30: 3 requests, 70 tokens
        assert not await admit()
        now[0] += 29.4                             # 59.9 s: second 0 still counts
        assert not await admit()
        now[0] += 0.1                              # second 60: second 0 has left the window
        headers: dict[str, str] = {}
        assert await limiter.admit(p, "h", Cost(tokens=10), expiry, headers)
        assert headers["x-ratelimit-remaining-requests"] == "1"
        assert headers["x-ratelimit-remaining-tokens"] == str(100 - 10 - 10)
        assert headers["x-ratelimit-reset-requests"] == "1m0s"  # at 120 the window is empty
        assert await admit()
        refused: dict[str, str] = {}
        with pytest.raises(RateLimited) as info:
            await limiter.admit(p, "r", Cost(tokens=10), expiry, refused)
        assert info.value.headers["Retry-After"] == "30"  # second 30 leaves the window at 90
        assert refused["x-ratelimit-reset-requests"] == "30s"
        now[0] += 30
        assert await admit(75)                     # 10 + 10 + 75 tokens
        assert not await admit(10)                 # 3 requests in 60..90, and tokens short
        now[0] += 200                              # everything gone, the hashes included
        assert await admit(100)
        tokens_hash = keys.rate_limits(p.key_id)[1]
        fields = {k.decode(): int(v) for k, v in (await client.hgetall(tokens_hash)).items()}
        seconds = {k: v for k, v in fields.items() if k.isdigit()}
        assert seconds == {str(int(now[0])): 100} and fields["sum"] == 100
    finally:
        await limiter.lane.close()
        await client.aclose()
