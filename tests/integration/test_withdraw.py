"""The gateway's WITHDRAW script (``engines.contract.withdraw``) on a real Redis, path by path: a
job taken back from a wait list, from the stream before any engine read it, from a dead engine's
pending entries; one a live engine holds is left to it; a resend answers the same; and every
count fair queueing and the backlog keep comes back to nothing."""

from __future__ import annotations

import os
import time

import redis.asyncio as aioredis

from engines.contract.fairness import PROMOTE, promote_command
from engines.contract.keys import ENGINE_GROUP, FENCED, Keys
from engines.contract.lane import stream_entries
from engines.contract.messages import Codec, Job
from engines.contract.withdraw import GONE, HELD_IDLE_MS, TAKEN, WITHDRAWN
from gateway.queue import JobQueue
from tests.harness import Stack

MODEL = "cold"


def job(tenant: str) -> Job:
    now = int(time.time() * 1000)
    return Job(id=os.urandom(6).hex(), kind="chat", model=MODEL, body=b'{"x": 1}', reply_to="r",
               deadline_ms=now + 60_000, tenant=tenant)


async def test_withdraw_takes_back_only_what_no_live_engine_holds(stack: Stack) -> None:
    redis = aioredis.from_url(stack.redis_url)
    keys, codec = Keys(stack.prefix), Codec()
    queue = JobQueue(redis, keys, codec, max_backlog=100)
    queue.lane.start()
    stream, fair, ring = keys.jobs(MODEL), keys.fair_state(MODEL), keys.ring(MODEL)
    try:
        first, a2, a3, b1 = job("a"), job("a"), job("a"), job("b")
        entry = await queue.submit(first, share=0.5)
        assert entry  # no engine: straight into the stream, its id returned
        for j in (a2, a3, b1):
            assert await queue.submit(j, share=0.5) == b""  # the rest wait their key's turn
        assert int(await redis.hget(fair, "waiting")) == 3

        # From a wait list: the list, the counts and (once empty) the ring mended.
        assert await queue.withdraw(a3, b"") == WITHDRAWN
        assert int(await redis.hget(fair, "waiting")) == 2
        assert await redis.lrange(ring, 0, -1) == [b"a", b"b"]
        assert await queue.withdraw(a2, b"") == WITHDRAWN
        assert await redis.lrange(ring, 0, -1) == [b"b"]
        assert await redis.hget(fair, "n:a") is None
        assert await queue.withdraw(a2, b"") == WITHDRAWN  # a resend: the fence answers
        assert await redis.get(keys.job(MODEL, a2.id)) == FENCED
        assert await redis.zcard(keys.tenant_backlog(MODEL, "a")) == 1  # `first` only

        # From the stream, never delivered: deleted.
        assert await queue.withdraw(first, entry) == WITHDRAWN
        assert await redis.xlen(stream) == 0

        # An engine starts: it promotes b's job and reads it. It holds it: not withdrawn.
        await redis.xgroup_create(stream, ENGINE_GROUP, id="0", mkstream=True)
        await redis.script_load(PROMOTE)
        assert await redis.execute_command(*promote_command(keys, MODEL, 4)) == 0
        reply = await redis.xreadgroup(ENGINE_GROUP, "engine-1", {stream: ">"}, count=4)
        [read] = [entry_id for _, entries in stream_entries(reply) for entry_id, _ in entries]
        assert await queue.withdraw(b1, b"") == TAKEN  # found in the stream by its body
        assert (await redis.xpending(stream, ENGINE_GROUP))["pending"] == 1
        # The engine dies: its entry ages past what a live engine's beats allow.
        await redis.xclaim(stream, ENGINE_GROUP, "engine-1", 0, [read], idle=HELD_IDLE_MS + 1000)
        assert await queue.withdraw(b1, b"") == WITHDRAWN
        assert (await redis.xpending(stream, ENGINE_GROUP))["pending"] == 0  # no reclaimer finds it
        assert await redis.xlen(stream) == 0

        # Nothing held: the shares, the bytes and fair queueing's state are gone.
        for tenant in ("a", "b"):
            assert await redis.zcard(keys.tenant_backlog(MODEL, tenant)) == 0
        assert int(await redis.hget(keys.queued_bytes(MODEL), "total") or 0) == 0
        assert await redis.zcard(keys.queued_jobs(MODEL)) == 0
        assert not await redis.exists(ring, fair)
        assert await queue.withdraw(job("c"), b"") == GONE  # never queued (or acked): nothing to take
    finally:
        await queue.lane.close()
        await redis.aclose()
