"""Result records (background responses): an engine also appends every event of a job with
``JobOptions.result`` to that stream, acks the job only once its final event is there, and ends such
a job, when it is cancelled, with a ``Failed`` 499 ``cancelled`` (``engines.events``, ``engines.running``).

A real synthetic engine's :class:`~engines.worker.Worker` runs in the test's event loop against the
session's real Redis (as the ``engine`` user where the tests define users, so its ACL is checked too);
the test plays the gateway with plain Redis commands: it makes the streams, queues jobs, publishes
cancellations, and reads the streams back with the gateway's decoder (``Codec.decode_events``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from engines.contract.keys import ENGINE_GROUP, Keys
from engines.contract.messages import Codec, Delta, Done, Event, Failed, Job, JobOptions, Started, Unknown
from engines.contract.replies import REPLY_STREAM_TTL_MS
from engines.synthetic import SyntheticBackend, SyntheticSettings
from engines.worker import Worker, WorkerSettings
from tests.harness import REDIS_USERS, USER_PASSWORDS, RedisServer

MODEL = "synthetic"


class Engine:
    """One in-process synthetic engine on a key prefix of its own, and the gateway's side of Redis."""

    def __init__(self, redis_url: str, r: aioredis.Redis) -> None:
        self.redis_url = redis_url
        self.r = r
        self.keys = Keys(f"t{os.urandom(4).hex()}")
        self.jobs = self.keys.jobs(MODEL)
        self.reply_to = self.keys.replies(f"gw-{os.urandom(3).hex()}")
        self.worker: Worker | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self, synthetic: SyntheticSettings | None = None, **settings: Any) -> Worker:
        login = {"redis_username": "engine", "redis_password": USER_PASSWORDS["engine"]} if REDIS_USERS else {}
        self.worker = Worker(SyntheticBackend(synthetic or SyntheticSettings(tokens=3)),
                             WorkerSettings(redis_url=self.redis_url, key_prefix=self.keys.prefix, **login, **settings))
        self.task = asyncio.create_task(self.worker.run())
        return self.worker

    async def stop(self) -> None:
        if self.worker is not None and self.task is not None:
            self.worker.stop()
            await asyncio.wait_for(self.task, timeout=30)
            self.worker = self.task = None

    async def make_stream(self, stream: str) -> None:
        """What a gateway does before it queues a job: the stream exists, with an expiry."""
        await self.r.xadd(stream, {b"h": b"1"})
        await self.r.pexpire(stream, REPLY_STREAM_TTL_MS)

    async def submit(self, job_id: str, *, result: str = "", max_tokens: int = 3) -> Job:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
        job = Job(id=job_id, kind="chat", model=MODEL, body=msgspec.json.encode(body), reply_to=self.reply_to,
                  deadline_ms=int(time.time() * 1000) + 60_000, options=JobOptions(result=result) if result else None)
        await self.r.xadd(self.jobs, {b"j": Codec().encode(job)})
        return job

    async def events(self, stream: str, job_id: str) -> list[Event | Unknown]:
        """``job_id``'s events in ``stream``, decoded as the gateway decodes reply entries."""
        codec, out = Codec(), []
        for _id, fields in await self.r.xrange(stream):
            if b"e" in fields:
                events, skipped = codec.decode_events(fields[b"e"])
                assert skipped == 0, events
                out.extend(e for e in events if e.job == job_id)
        return out

    async def acked(self) -> bool:
        """Every job entry acked and deleted."""
        return await self.r.xlen(self.jobs) == 0 and (await self.r.xpending(self.jobs, ENGINE_GROUP))["pending"] == 0

    async def cancel(self, job_id: str) -> None:
        """Publish a cancellation, as a gateway does, once the engine listens (else it is lost)."""
        await until(lambda: self._listening(), "the engine's cancel listener subscribed")
        await self.r.publish(self.keys.cancel_channel, f"{job_id} {int(time.time() * 1000) + 60_000}")

    async def _listening(self) -> bool:
        ((_, n),) = await self.r.pubsub_numsub(self.keys.cancel_channel)
        return int(n) >= 1


async def until(predicate: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 15) -> None:
    """Until ``predicate`` holds (polled: what the test observes), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if isinstance(got, Awaitable):
            got = await got
        if got:
            return
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def engine(redis_server: RedisServer) -> AsyncIterator[Engine]:
    r = aioredis.Redis.from_url(redis_server.url)
    e = Engine(redis_server.url, r)
    try:
        yield e
    finally:
        await e.stop()
        await r.aclose()


def cancelled(event: Event | Unknown) -> bool:
    return isinstance(event, Failed) and (event.code, event.status, event.message) == (
        "cancelled", 499, "The response was cancelled.")


async def test_a_jobs_result_record_holds_every_event_in_order_as_its_reply_stream(engine: Engine) -> None:
    """Started, the deltas and Done, numbered 1..n, in the record as in the reply stream; and the
    engine announces that it writes records (``EngineInfo.results``)."""
    result = engine.keys.result("resp_a")
    await engine.make_stream(engine.reply_to)
    await engine.make_stream(result)
    worker = engine.start()
    await engine.submit("job-a", result=result)
    await until(engine.acked, "the job is acked")
    events = await engine.events(result, "job-a")
    assert events == await engine.events(engine.reply_to, "job-a")
    assert isinstance(events[0], Started) and isinstance(events[-1], Done)
    assert all(isinstance(e, Delta) for e in events[1:-1]) and len(events) >= 3
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert {e.attempt for e in events} == {1}
    assert 0 < await engine.r.pttl(result) <= REPLY_STREAM_TTL_MS  # its expiry is the gateway's, kept
    assert Codec().decode_info(worker.presence.info()).results


async def test_a_cancelled_running_job_ends_with_failed_cancelled_in_both_streams(engine: Engine) -> None:
    result = engine.keys.result("resp_b")
    await engine.make_stream(engine.reply_to)
    await engine.make_stream(result)
    engine.start(SyntheticSettings(tokens=100_000, token_delay_s=0.05))
    await engine.submit("job-b", result=result, max_tokens=100_000)

    async def output_began() -> bool:
        return any(isinstance(e, Delta) for e in await engine.events(result, "job-b"))

    await until(output_began, "a delta is in the record")
    await engine.cancel("job-b")
    await until(engine.acked, "the cancelled job is acked")
    events = await engine.events(result, "job-b")
    assert events == await engine.events(engine.reply_to, "job-b")
    assert cancelled(events[-1]) and not any(isinstance(e, Failed) for e in events[:-1])
    assert (events[-1].attempt, events[-1].seq) == (1, len(events))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_a_job_cancelled_before_it_is_read_ends_with_failed_cancelled(engine: Engine) -> None:
    """Remembered: the job is skipped at intake, and its record and reply stream still get its end."""
    result = engine.keys.result("resp_c")
    await engine.make_stream(engine.reply_to)
    await engine.make_stream(result)
    worker = engine.start()
    await engine.cancel("job-c")
    await until(lambda: "job-c" in worker.cancellations, "the engine heard the cancellation")
    await engine.submit("job-c", result=result)
    await until(engine.acked, "the skipped job is acked")
    events = await engine.events(result, "job-c")
    assert events == await engine.events(engine.reply_to, "job-c")
    assert len(events) == 1 and cancelled(events[0]) and (events[0].attempt, events[0].seq) == (1, 1)


async def test_a_job_without_a_record_is_unchanged(engine: Engine) -> None:
    """No record is made, and a cancelled one is acked silently (its client is gone)."""
    await engine.make_stream(engine.reply_to)
    engine.start(SyntheticSettings(tokens=100_000, token_delay_s=0.05))
    await engine.submit("job-d", max_tokens=100_000)

    async def output_began() -> bool:
        return any(isinstance(e, Delta) for e in await engine.events(engine.reply_to, "job-d"))

    await until(output_began, "a delta is in the reply stream")
    await engine.cancel("job-d")
    await until(engine.acked, "the cancelled job is acked")
    events = await engine.events(engine.reply_to, "job-d")
    assert not any(isinstance(e, (Done, Failed)) for e in events), events
    assert [k async for k in engine.r.scan_iter(match=f"{engine.keys.prefix}:result:*")] == []


async def test_a_job_is_acked_only_once_its_final_event_is_in_its_record(engine: Engine,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Redis refusing the record's write (here: its key holds a string, WRONGTYPE; in production a
    failover or maxmemory) keeps the job unacked, and retried, though the reply stream already has its
    Done; once the record can be written it holds every event, and the job is acked."""
    result = engine.keys.result("resp_e")
    await engine.make_stream(engine.reply_to)
    await engine.r.set(result, b"not a stream")
    engine.start()
    with caplog.at_level(logging.WARNING, logger="conduit.engine"):
        await engine.submit("job-e", result=result)

        async def done_in_reply_stream() -> bool:
            return any(isinstance(e, Done) for e in await engine.events(engine.reply_to, "job-e"))

        await until(done_in_reply_stream, "Done is in the reply stream")

        def refusals() -> int:
            return sum(f"redis refused events for {result}" in r.getMessage() for r in caplog.records)

        before = refusals()
        await until(lambda: refusals() >= before + 2, "the record's write was refused twice more")
        assert not await engine.acked(), "acked before its final event was in its record"
        await engine.r.delete(result)
        await engine.make_stream(result)
        await until(engine.acked, "the job is acked once its record is written")
    events = await engine.events(result, "job-e")
    assert events == await engine.events(engine.reply_to, "job-e")
    assert isinstance(events[0], Started) and isinstance(events[-1], Done)


async def test_a_record_the_gateway_never_made_is_not_made_and_the_job_still_ends(engine: Engine) -> None:
    """``APPEND`` never makes a stream it has not seen: the record's events are dropped (``DROPPED``,
    as a gone gateway's are), the reply stream gets them all, and the job is acked."""
    result = engine.keys.result("resp_f")
    await engine.make_stream(engine.reply_to)
    engine.start()
    await engine.submit("job-f", result=result)
    await until(engine.acked, "the job is acked")
    assert not await engine.r.exists(result)
    assert isinstance((await engine.events(engine.reply_to, "job-f"))[-1], Done)


async def test_a_reclaimed_job_writes_its_record_too(engine: Engine) -> None:
    """Another engine's attempt, after the first engine died holding the job, appends to the record."""
    result = engine.keys.result("resp_g")
    await engine.make_stream(engine.reply_to)
    await engine.make_stream(result)
    await engine.r.xgroup_create(engine.jobs, ENGINE_GROUP, id="0", mkstream=True)
    await engine.submit("job-g", result=result)
    # An engine that read the job and died: never in the registry, so its entry is reclaimed.
    ((_, entries),) = await engine.r.xreadgroup(ENGINE_GROUP, "dead-engine", {engine.jobs: ">"}, count=1)
    assert len(entries) == 1
    engine.start(reclaim_idle_ms=200)
    await until(engine.acked, "the reclaimed job is acked")
    events = await engine.events(result, "job-g")
    assert events == await engine.events(engine.reply_to, "job-g")
    assert isinstance(events[-1], Done) and {e.attempt for e in events} == {2}


async def test_a_drained_job_left_for_reclaim_writes_no_cancellation(engine: Engine) -> None:
    """A shutdown that cuts a job short leaves it pending for another engine: nothing final is written."""
    result = engine.keys.result("resp_h")
    await engine.make_stream(engine.reply_to)
    await engine.make_stream(result)
    engine.start(SyntheticSettings(tokens=100_000, token_delay_s=0.05), drain_timeout_s=0.2)
    await engine.submit("job-h", result=result, max_tokens=100_000)

    async def output_began() -> bool:
        return any(isinstance(e, Delta) for e in await engine.events(result, "job-h"))

    await until(output_began, "a delta is in the record")
    await engine.stop()
    assert (await engine.r.xpending(engine.jobs, ENGINE_GROUP))["pending"] == 1, (await engine.events(result, "job-h"))[-2:]
    for stream in (result, engine.reply_to):
        assert not any(isinstance(e, (Done, Failed)) for e in await engine.events(stream, "job-h"))
