"""The response store's bounds on a real Redis (``gateway.responses.store``): each API key's live-bytes
ledger and the gateway-wide one (deleting and expiry give bytes back, saving an id again replaces its
size), the record bound, ``full``, and records of a shape this version cannot read. The store is driven
directly here; tests/integration/test_responses_store.py drives it through gateways and the SDK."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from engines.contract.keys import EVERY_KEY, Keys
from gateway.responses.store import ResponseStore
from gateway.settings import ResponseSettings
from gateway.tenancy.principal import Principal
from tests.harness import RedisServer

A, B = Principal(key_id="0123456789ab", name="a"), Principal(key_id="ba9876543210", name="b")


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


def new_store(client: aioredis.Redis, **settings: float) -> ResponseStore:
    """A store of a prefix of its own (the session's Redis is shared)."""
    return ResponseStore(client, Keys(f"ledger-{os.urandom(4).hex()}"), ResponseSettings(**settings))


def rid() -> str:
    return "resp_" + os.urandom(12).hex()


async def live(store: ResponseStore, key_id: str) -> int:
    return int(await store.redis.hget(store.keys.stored_response_ledger(key_id)[1], "live") or 0)


async def save(store: ResponseStore, owner: Principal, response_id: str, size: int = 1000) -> int:
    return await store.save(owner, "m", response_id, b"{}", b"x" * size)


async def test_deleting_gives_the_bytes_back(client: aioredis.Redis) -> None:
    store = new_store(client, response_max_stored_bytes=2500)
    first, second, third = rid(), rid(), rid()
    size = await save(store, A, first)
    assert size > 1000 and await save(store, A, second) == size and await save(store, A, third) == size
    assert await store.full(A)  # 3 records hold past 2,500 bytes: the next is refused
    assert await save(store, A, rid()) == 0
    assert await live(store, A.key_id) == 3 * size == await live(store, EVERY_KEY)
    assert await store.delete(A.key_id, second) and not await store.delete(A.key_id, second)
    assert await live(store, A.key_id) == 2 * size == await live(store, EVERY_KEY)
    assert not await store.full(A)
    fourth = rid()
    assert await save(store, A, fourth) == size and await store.load(A.key_id, fourth) is not None
    assert await store.load(A.key_id, second) is None


async def test_saving_an_id_again_replaces_its_size(client: aioredis.Redis) -> None:
    """A background response is saved queued, then final: it counts once, its final size; and its
    final record is taken though the ledger is full."""
    store = new_store(client, response_max_stored_bytes=1500)
    same = rid()
    small = await save(store, A, same, 100)
    assert await save(store, A, same, 100) == small and await live(store, A.key_id) == small
    big = await save(store, A, same, 2000)
    assert big > 2000 and await live(store, A.key_id) == big == await live(store, EVERY_KEY)
    assert await store.full(A) and await save(store, A, rid()) == 0
    assert await save(store, A, same, 500) > 0 and not await store.full(A)
    record = await store.load(A.key_id, same)
    assert record is not None and record.input == b"x" * 500


async def test_the_global_cap_bounds_every_key_and_a_refused_key_takes_its_member_back(
        client: aioredis.Redis) -> None:
    store = new_store(client, response_max_stored_bytes=1500, response_store_max_bytes=3000)
    size = await save(store, A, rid())
    assert await save(store, A, rid()) == size and await save(store, A, rid()) == 0  # A's own cap
    assert await live(store, EVERY_KEY) == 2 * size  # A's refused record is not counted globally
    kept = rid()
    assert await save(store, B, kept) == size  # B under its own cap and the global one (2,000 < 3,000)
    assert await store.full(B) and await store.full(A)  # 3 records: the global cap holds
    assert await save(store, B, rid()) == 0 and await live(store, B.key_id) == size
    assert await store.delete(B.key_id, kept) and not await store.full(B)


async def test_expired_records_give_their_bytes_back(client: aioredis.Redis) -> None:
    """A member expires with its record and is pruned at the next call (``full`` prunes a full ledger:
    a key refused at admission saves nothing that would); the ledger lives as long as its last member."""
    long = new_store(client, response_ttl_s=60, response_max_stored_bytes=2000)
    short = ResponseStore(client, long.keys, ResponseSettings(response_ttl_s=0.2, response_max_stored_bytes=2000))
    size = await save(long, A, rid())
    gone = rid()
    assert await save(short, A, gone) == size and await short.full(A) and await long.full(A)
    for name in long.keys.stored_response_ledger(A.key_id):
        assert 59_000 < await client.pttl(name) <= 60_000, name
    while await client.exists(long.keys.stored_response(A.key_id, gone)):  # expired, as Redis's clock says
        await asyncio.sleep(0.02)
    assert not await long.full(A) and await live(long, A.key_id) == size
    assert await live(long, EVERY_KEY) == 2 * size  # not full: pruned by its next save, not by ``full``
    assert await save(long, A, rid()) == size and await live(long, EVERY_KEY) == 2 * size


async def test_a_record_over_its_bound_is_not_stored(client: aioredis.Redis,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    store = new_store(client, response_max_record_bytes=4096)
    big, small = rid(), rid()
    with caplog.at_level(logging.WARNING, "conduit.gateway"):
        assert await save(store, A, big, 5000) == 0
    assert "response_max_record_bytes" in caplog.text
    assert await store.load(A.key_id, big) is None and await live(store, EVERY_KEY) == 0
    assert await save(store, A, small, 4000) > 0


async def test_a_record_of_another_shape_is_missing(client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    store = new_store(client)
    old, older = rid(), rid()
    await client.set(store.keys.stored_response(A.key_id, old), b'{"an": "old shape"}')
    await client.set(store.keys.stored_response(A.key_id, older), b"\x93\x01\x02\x03")
    with caplog.at_level(logging.WARNING, "conduit.gateway"):
        assert await store.load(A.key_id, old) is None and await store.load(A.key_id, older) is None
    assert caplog.text.count("cannot be read") == 1
