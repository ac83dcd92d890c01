"""Fair queueing: one API key cannot fill a model's backlog and starve the others.

Real Redis and real synthetic engine processes; the gateway side is the gateway's own
dispatcher, job queue, reply router and engine registry in this process, so each job runs as
a principal (an API key) without going through key authentication.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import pytest
import redis.asyncio as aioredis

from engines.contract.backlog import RELEASE, release_command
from engines.contract.fairness import PROMOTE, promote_command
from engines.contract.keys import Keys
from engines.contract.messages import Codec, Done, Failed, Job
from gateway.context import RequestContext
from gateway.dispatch import Dispatcher, JobKind
from gateway.errors import Overloaded
from gateway.queue import BacklogFull, BytesFull, JobQueue, JobTooLarge, ReplyRouter, ShareFull
from gateway.registry import EngineRegistry
from gateway.settings import GatewaySettings
from gateway.tenancy.principal import ANONYMOUS, KeyLimits, Principal
from telemetry.instruments import GatewayMetrics
from tests.harness import Stack

MODEL = "synthetic"


def key(key_id: str, priority: int = 1, share: float | None = None) -> Principal:
    return Principal(key_id=key_id, name=f"key {key_id}", limits=KeyLimits(priority=priority, backlog_share=share))


@dataclass
class Gateway:
    """A gateway's dispatcher without HTTP, and a record of which key's jobs finished in what order."""

    dispatcher: Dispatcher
    queue: JobQueue
    redis: aioredis.Redis
    keys: Keys
    finished: list[str] = field(default_factory=list)

    async def run(self, principal: Principal, *, tokens: int = 2, stream: bool = False) -> Done | Failed:
        """One job to its end; its key id is recorded when it finishes."""
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": tokens}).encode()
        async with self.dispatcher.job(JobKind("chat", "chatcmpl"), MODEL, body, stream=stream,
                                       ctx=RequestContext(principal=principal)) as run:
            while True:
                event = await run.next()
                if isinstance(event, (Done, Failed)):
                    self.finished.append(principal.key_id)
                    return event

    async def wait_live(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.dispatcher.registry.is_live(MODEL):
            assert time.monotonic() < deadline, "no engine registered"
            await asyncio.sleep(0.05)

    async def held(self, key_id: str) -> int:
        """The key's share of the backlog as Redis counts it."""
        return await self.redis.zcard(self.keys.tenant_backlog(MODEL, key_id))

    async def assert_drained(self, *key_ids: str, timeout: float = 15) -> None:
        """Every count back to zero: keys' shares, waiting jobs, the ring, the stream."""
        deadline = time.monotonic() + timeout
        while True:
            state = {
                "held": {k: await self.held(k) for k in key_ids},
                "waiting": int(await self.redis.hget(self.keys.fair_state(MODEL), "waiting") or 0),
                "ring": await self.redis.llen(self.keys.ring(MODEL)),
                "stream": await self.redis.xlen(self.keys.jobs(MODEL)),
                # The backlog's byte counts (engines.contract.backlog) are back to nothing.
                "bytes": int(await self.redis.hget(self.keys.queued_bytes(MODEL), "total") or 0)
                + await self.redis.zcard(self.keys.queued_jobs(MODEL)),
            }
            if state == {"held": dict.fromkeys(key_ids, 0), "waiting": 0, "ring": 0, "stream": 0, "bytes": 0}:
                return
            assert time.monotonic() < deadline, f"not drained: {state}"
            await asyncio.sleep(0.1)


@pytest.fixture
async def gw(stack: Stack) -> AsyncIterator[Gateway]:
    settings = GatewaySettings.from_env({}, redis_url=stack.redis_url, key_prefix=stack.prefix, max_backlog=400,
                                          request_timeout_s=60, registry_refresh_s=0.1).with_gateway_id()
    keys, codec, metrics = Keys(stack.prefix), Codec(), GatewayMetrics.noop()
    redis = aioredis.from_url(stack.redis_url)
    registry = EngineRegistry(redis, keys, codec, refresh_s=settings.queue.registry_refresh_s, configured=[], metrics=metrics)
    router = ReplyRouter(redis, keys.replies(settings.gateway_id), codec, metrics)
    queue = JobQueue(redis, keys, codec, max_backlog=settings.queue.max_backlog)
    queue.lane.start()
    dispatcher = Dispatcher(settings.queue, registry, queue, router, metrics)
    await router.create_stream()
    tasks = [asyncio.create_task(router.run()), asyncio.create_task(registry.run())]
    try:
        yield Gateway(dispatcher, queue, redis, keys)
    finally:
        router.closed = registry.closed = dispatcher.closed = True
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=5)
        await queue.lane.close()
        await redis.aclose()


def engine(stack: Stack, *args: str) -> None:
    """A synthetic engine of two slots: jobs of two tokens take about 60 ms."""
    stack.synthetic(MODEL, "--max-concurrency", "2", "--token-delay", "0.03", *args, wait=False)


async def test_a_key_flooding_a_model_does_not_starve_another(stack: Stack, gw: Gateway) -> None:
    engine(stack)
    await gw.wait_live()
    flood = [asyncio.create_task(gw.run(key("a"))) for _ in range(100)]
    # A's jobs are all queued (and the engine is busy with them); on a loaded machine that takes a while.
    deadline = time.monotonic() + 10
    while sum(1 for t in flood if t.done()) + sum(1 for r in gw.dispatcher._runs.values() if r.job.tenant == "a") < 100:
        assert time.monotonic() < deadline, "A's jobs were not all queued"
        await asyncio.sleep(0.02)
    assert await gw.held("a") > 50, "the engine took most of A's jobs before B came: nothing to show"
    a_done_before = len(gw.finished)
    late = [asyncio.create_task(gw.run(key("b"))) for _ in range(5)]
    results = await asyncio.gather(*late)
    assert all(isinstance(r, Done) for r in results)
    # Served in turn: from the moment B's jobs wait, they alternate with A's (one each per
    # turn), so they finish among the next few of A's, not after A's 100. Ahead of them: at
    # most 3 of A's in the stream (two slots, one read next), then one of A's per job of B's,
    # and 2 for the order in which two slots finish.
    a_done_before_last_b = gw.finished[:len(gw.finished) - 1 - gw.finished[::-1].index("b")].count("a")
    assert a_done_before_last_b <= a_done_before + 3 + 5 + 2, gw.finished
    assert all(isinstance(r, Done) for r in await asyncio.gather(*flood))
    await gw.assert_drained("a", "b")


async def test_weights_share_the_engines_two_to_one(stack: Stack, gw: Gateway) -> None:
    engine(stack)
    await gw.wait_live()
    heavy, light = key("heavy", priority=2), key("light", priority=1)
    jobs = [asyncio.create_task(gw.run(heavy)) for _ in range(30)]
    await asyncio.sleep(0)  # queued in this order, in one pipelined round trip
    jobs += [asyncio.create_task(gw.run(light)) for _ in range(30)]
    assert all(isinstance(r, Done) for r in await asyncio.gather(*jobs))
    # Both keys wait from the start (3 of heavy's at most went straight to the engine): of the
    # next 27 jobs, weight 2 against 1 gives heavy 18; equal weights would give it 13 or 14.
    both_waiting = gw.finished[3:30]
    assert 16 <= both_waiting.count("heavy") <= 20, gw.finished
    await gw.assert_drained("heavy", "light")


async def test_a_key_beyond_its_share_is_refused_and_others_are_admitted(stack: Stack, gw: Gateway) -> None:
    # Keys get 5% of the backlog of 400 (20 jobs) by default; "other" has a share of its own.
    d = gw.dispatcher
    d.settings = msgspec.structs.replace(d.settings, key_backlog_share=0.05)
    greedy, other = key("greedy"), key("other", share=0.5)
    # One slot, busy for the whole test: every other job stays queued.
    stack.synthetic(MODEL, "--max-concurrency", "1", "--first-token-delay", "30", wait=False)
    await gw.wait_live()
    hold = [asyncio.create_task(gw.run(greedy)) for _ in range(20)]
    while await gw.held("greedy") < 20:
        await asyncio.sleep(0.05)
    with pytest.raises(Overloaded) as refused:
        await gw.run(greedy)
    err = refused.value
    assert (err.status, err.code, err.type) == (429, "model_overloaded", "rate_limit_error")
    assert "share (5% of the model's backlog of 400)" in err.message
    assert err.headers is not None and "Retry-After" in err.headers
    assert await gw.held("greedy") == 20  # the refused job took nothing
    hold += [asyncio.create_task(gw.run(other)) for _ in range(25)]  # more than 20: its own share
    while await gw.held("other") < 25:
        await asyncio.sleep(0.05)
    # Without authentication (tenant ""), no share applies: only the model's backlog limit.
    hold += [asyncio.create_task(gw.run(ANONYMOUS)) for _ in range(30)]
    while await backlog(gw) < 20 + 25 + 30:
        assert not any(t.done() for t in hold), [t.exception() for t in hold if t.done()]
        await asyncio.sleep(0.05)
    for t in hold:
        t.cancel()
    await asyncio.gather(*hold, return_exceptions=True)


async def backlog(gw: Gateway) -> int:
    return await gw.redis.xlen(gw.keys.jobs(MODEL)) + int(await gw.redis.hget(gw.keys.fair_state(MODEL), "waiting")
                                                          or 0)


async def test_job_queue_limits(stack: Stack) -> None:
    """The queue's own verdicts: the backlog counts waiting jobs, a share allows at least one job."""
    redis = aioredis.from_url(stack.redis_url)
    keys, codec = Keys(stack.prefix), Codec()
    queue = JobQueue(redis, keys, codec, max_backlog=4)
    queue.lane.start()
    try:
        def job(tenant: str) -> Job:
            now = int(time.time() * 1000)
            return Job(id=os.urandom(6).hex(), kind="chat", model=MODEL, body=b"{}", reply_to="r",
                       deadline_ms=now + 60_000, tenant=tenant)

        assert queue.share_limit(0.01) == 1
        await queue.submit(job("x"), share=0.01)
        with pytest.raises(ShareFull):
            await queue.submit(job("x"), share=0.01)
        for _ in range(3):
            await queue.submit(job("y"), share=1.0)
        with pytest.raises(BacklogFull) as full:
            await queue.submit(job(""), share=1.0)
        assert full.value.backlog == 4
        # No consumer group (no engine yet): the first job went into the stream, the rest wait.
        assert await redis.xlen(keys.jobs(MODEL)) == 1
        assert int(await redis.hget(keys.fair_state(MODEL), "waiting")) == 3
    finally:
        await queue.lane.close()
        await redis.aclose()


async def test_no_share_leaks_from_cancelled_or_reclaimed_jobs(stack: Stack, gw: Gateway) -> None:
    slow = ("--token-delay", "0.2", "--reclaim-idle-ms", "1000")
    doomed = stack.synthetic(MODEL, "--max-concurrency", "2", *slow, wait=False)
    stack.synthetic(MODEL, "--max-concurrency", "2", *slow, wait=False)
    await gw.wait_live()
    while len(gw.dispatcher.registry.models.get(MODEL, [])) < 2:
        await asyncio.sleep(0.05)
    # Four running (two on each engine), two waiting.
    running = [asyncio.create_task(gw.run(key("r"), tokens=5)) for _ in range(6)]
    while await gw.held("r") < 6:
        await asyncio.sleep(0.05)
    # A key whose clients give up while their jobs wait: cancelled, skipped once promoted.
    gone = [asyncio.create_task(gw.run(key("c"))) for _ in range(5)]
    while await gw.held("c") < 5:
        await asyncio.sleep(0.05)
    assert int(await gw.redis.hget(gw.keys.fair_state(MODEL), "waiting")) >= 5
    for t in gone:
        t.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    await asyncio.sleep(0.2)  # the cancellations reach the engines
    doomed.kill()
    # The other engine reclaims the dead one's jobs (non-streaming: run again) and promotes the rest.
    results = await asyncio.wait_for(asyncio.gather(*running), timeout=40)
    assert all(isinstance(r, Done) for r in results), results
    await gw.assert_drained("r", "c")


async def test_the_backlog_is_bounded_in_bytes(stack: Stack) -> None:
    """The model's jobs may hold at most max_backlog_bytes, a key at most its share of them; counted
    out by the engine's ack (once, however often it is sent), and after their deadline without one."""
    redis = aioredis.from_url(stack.redis_url)
    keys, codec = Keys(stack.prefix), Codec()
    queue = JobQueue(redis, keys, codec, max_backlog=1000, max_backlog_bytes=100_000)
    queue.lane.start()

    def job(tenant: str, size: int, deadline_s: float = 60) -> Job:
        now = int(time.time() * 1000)
        return Job(id=os.urandom(6).hex(), kind="chat", model=MODEL, body=b"x" * size, reply_to="r",
                   deadline_ms=now + int(deadline_s * 1000), tenant=tenant)

    async def counts() -> dict[bytes, bytes]:
        return dict(await redis.hgetall(keys.queued_bytes(MODEL)))

    try:
        a = [job("a", 20_000) for _ in range(2)]
        for j in a:
            await queue.submit(j, share=0.5)
        with pytest.raises(BytesFull) as full:  # a's share: 50,000 bytes
            await queue.submit(job("a", 20_000), share=0.5)
        assert full.value.tenant and full.value.limit == 50_000 and 40_000 < full.value.held < 41_000
        with pytest.raises(JobTooLarge):  # never fits a's share: refused before Redis
            await queue.submit(job("a", 60_000), share=0.5)
        b = [job("b", 20_000) for _ in range(2)]
        for j in b:
            await queue.submit(j, share=0.5)
        short = job("", 15_000, deadline_s=0.3)  # no tenant: only the model's bound
        await queue.submit(short, share=None)
        with pytest.raises(BytesFull) as full:  # the model's 100,000
            await queue.submit(job("c", 10_000), share=0.5)
        assert not full.value.tenant and full.value.held > 95_000
        size = {j.id: len(codec.encode(j)) for j in (*a, *b, short)}
        assert await counts() == {b"total": str(sum(size.values())).encode(),
                                  b"t:a": str(size[a[0].id] + size[a[1].id]).encode(),
                                  b"t:b": str(size[b[0].id] + size[b[1].id]).encode()}
        # An ack's release counts a job out once, however often it is sent.
        await redis.script_load(RELEASE)
        for _ in range(2):
            await redis.execute_command(*release_command(keys, MODEL, a[0].id, size[a[0].id], "a"))
        assert int((await counts())[b"t:a"]) == size[a[1].id]
        await queue.submit(job("a", 20_000), share=0.5)  # room again
        # A job never acked stops counting at its deadline.
        await asyncio.sleep(0.4)
        await queue.submit(job("c", 10_000), share=0.5)
        assert not [m for m in await redis.zrange(keys.queued_jobs(MODEL), 0, -1) if m.startswith(short.id.encode())]
        # Both keys expire with the last job's deadline at the latest (acks lost: counts do not outlive it).
        assert 0 < await redis.pttl(keys.queued_bytes(MODEL)) <= 120_000
        assert 0 < await redis.pttl(keys.queued_jobs(MODEL)) <= 120_000
        # Once every job is counted out, nothing is counted (the keys go at their expiry).
        for m in await redis.zrange(keys.queued_jobs(MODEL), 0, -1):
            job_id, n, tenant = m.decode().split(" ")
            await redis.execute_command(*release_command(keys, MODEL, job_id, int(n), tenant))
        assert await counts() == {b"total": b"0"} and await redis.zcard(keys.queued_jobs(MODEL)) == 0
    finally:
        await queue.lane.close()
        await redis.aclose()


async def test_expired_byte_counts_never_hold_a_backlog_shut(stack: Stack) -> None:
    """Jobs never acked stop counting at their deadline, even when there are more of them than one
    submission prunes (256): a refused submission prunes too, so the next one gets in."""
    redis = aioredis.from_url(stack.redis_url)
    keys, codec = Keys(stack.prefix), Codec()
    queue = JobQueue(redis, keys, codec, max_backlog=1000, max_backlog_bytes=100_000)
    queue.lane.start()
    try:
        now = int(time.time() * 1000)
        for _ in range(600):  # 600 jobs of ~160 bytes (96 KB) whose acks never come
            await queue.submit(Job(id=os.urandom(6).hex(), kind="chat", model=MODEL, body=b"x" * 79, reply_to="r",
                                   deadline_ms=now + 300), share=None)
        live = Job(id=os.urandom(6).hex(), kind="chat", model=MODEL, body=b"", reply_to="r", deadline_ms=now + 60_000)
        await queue.submit(live, share=None)  # one still running: the keys live on
        assert 95_000 < int(await redis.hget(keys.queued_bytes(MODEL), "total")) < 100_000
        await asyncio.sleep(0.4)
        big = Job(id=os.urandom(6).hex(), kind="chat", model=MODEL, body=b"x" * 50_000, reply_to="r",
                  deadline_ms=int(time.time() * 1000) + 60_000)
        with pytest.raises(BytesFull):  # 256 expired ones left out are not enough room yet
            await queue.submit(big, share=None)
        await queue.submit(big, share=None)  # the refusal pruned them: now there is room
        assert await redis.zcard(keys.queued_jobs(MODEL)) < 600 - 256 + 1
    finally:
        await queue.lane.close()
        await redis.aclose()


async def test_a_script_redis_lost_is_loaded_once_for_every_waiting_submission(stack: Stack) -> None:
    """After a Redis restart (here: SCRIPT FLUSH) every submission in flight gets NOSCRIPT: the
    script is loaded once for all of them (one load each took more connections than the pool had
    and failed them all with 503 queue_unavailable)."""
    redis = aioredis.from_url(stack.redis_url, max_connections=4)
    keys, codec = Keys(stack.prefix), Codec()
    queue = JobQueue(redis, keys, codec, max_backlog=1000)
    queue.lane.start()
    try:
        await redis.script_flush()
        now = int(time.time() * 1000)
        await asyncio.gather(*(queue.submit(Job(id=os.urandom(6).hex(), kind="chat", model=MODEL, body=b"{}",
                                                reply_to="r", deadline_ms=now + 60_000), share=None)
                               for _ in range(100)))
        assert await redis.xlen(keys.jobs(MODEL)) + int(await redis.hget(keys.fair_state(MODEL), "waiting")) == 100
    finally:
        await queue.lane.close()
        await redis.aclose()


async def test_wait_lists_live_as_long_as_their_jobs_and_no_longer(stack: Stack) -> None:
    """Fair queueing's keys expire: each wait list at its last job's deadline (pushed on with every
    job, so nothing queued is lost), the ring, weights and state at the last of all. A key gone
    idle leaves nothing behind, and the jobs its list lost with it stop counting in the backlog."""
    redis = aioredis.from_url(stack.redis_url)
    keys, codec = Keys(stack.prefix), Codec()
    queue = JobQueue(redis, keys, codec, max_backlog=100)
    queue.lane.start()

    def job(tenant: str, deadline_s: float) -> Job:
        return Job(id=os.urandom(6).hex(), kind="chat", model=MODEL, body=b"{}", reply_to="r",
                   deadline_ms=int(time.time() * 1000) + int(deadline_s * 1000), tenant=tenant)

    async def expiries() -> dict[str, int]:
        names = {"a": keys.wait(MODEL, "a"), "b": keys.wait(MODEL, "b"), "ring": keys.ring(MODEL),
                 "weights": keys.weights(MODEL), "fair": keys.fair_state(MODEL)}
        return {name: await redis.pexpiretime(key) for name, key in names.items()}

    async def promote(free: int) -> int:
        return int(await redis.execute_command(*promote_command(keys, MODEL, free)))

    try:
        await redis.script_load(PROMOTE)
        await queue.submit(job("", 60), share=None)  # no engine yet: into the stream, untaken; the rest wait
        a = [job("a", 2) for _ in range(2)]
        b = [job("b", 60), job("b", 30)]
        for j in (*a, *b):
            await queue.submit(j, share=None)
        last = b[0].deadline_ms
        assert await expiries() == {"a": a[1].deadline_ms, "b": last, "ring": last, "weights": last, "fair": last}
        # Key a goes idle: its list goes at its last job's deadline; b's jobs and the ring stay.
        deadline = time.monotonic() + 10
        while await redis.exists(keys.wait(MODEL, "a")):
            assert time.monotonic() < deadline, "a's wait list outlived its jobs"
            await asyncio.sleep(0.05)
        assert await redis.llen(keys.wait(MODEL, "b")) == 2
        # a comes back: its list is new, its place in the ring kept (not a second turn).
        back = job("a", 45)
        await queue.submit(back, share=None)
        assert await redis.lrange(keys.ring(MODEL), 0, -1) == [b"a", b"b"]
        assert (await expiries())["a"] == back.deadline_ms
        # Promotion: a's job, then one of b's. b, alone in the ring, takes its turn and keeps its expiry.
        assert await promote(2) == 1
        assert await redis.lrange(keys.ring(MODEL), 0, -1) == [b"b"]
        assert await redis.pexpiretime(keys.ring(MODEL)) == last
        assert int(await redis.hget(keys.fair_state(MODEL), "waiting")) == 1  # a's two lost jobs not counted
        assert await promote(2) == 0
        assert not await redis.exists(keys.ring(MODEL), keys.weights(MODEL), keys.fair_state(MODEL),
                                      keys.wait(MODEL, "a"), keys.wait(MODEL, "b"))
        assert await redis.xlen(keys.jobs(MODEL)) == 4
    finally:
        await queue.lane.close()
        await redis.aclose()
