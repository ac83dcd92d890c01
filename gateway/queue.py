"""The gateway's side of the Redis Streams queue: submitting jobs and routing replies."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, NoScriptError

from engines.contract.fairness import (
    BACKLOG_FULL,
    BYTES_FULL,
    BYTES_SHARE_FULL,
    SHARE_FULL,
    SUBMIT,
    submit_command,
)
from engines.contract.lane import REDIS_ERRORS, ScriptLoader, open_lane, stream_entries
from engines.contract.keys import FENCED, Keys
from engines.contract.messages import Codec, Job
from engines.contract.replies import GONE, KEEP, REPLY_STREAM_TTL_MS, generation_key, new_generation
from engines.contract.backlog import backlog_size
from engines.contract.withdraw import WITHDRAW, withdraw_command
from engines.contract.reach import Outage
from telemetry.instruments import GatewayMetrics

log = logging.getLogger("conduit.gateway")


def cancel_message(job_id: str, deadline_ms: int) -> str:
    """What the cancel channel carries: engines abort ``job_id``, or skip it until ``deadline_ms``."""
    return f"{job_id} {deadline_ms}"


class NotQueued(Exception):
    """A job the queue refused, so not queued: a subclass says which bound, its fields by how much."""

    #: ``str()`` of one, from its fields.
    message: ClassVar[str]

    def __str__(self) -> str:
        return self.message.format_map(vars(self))


@dataclass(eq=False)
class BacklogFull(NotQueued):
    """The model's backlog is at its limit; the job was not queued."""

    message = "backlog {backlog}"
    backlog: int


@dataclass(eq=False)
class ShareFull(NotQueued):
    """The job's tenant (API key) holds its share of the model's backlog; the job was not queued."""

    message = "tenant holds {held} of {limit}"
    held: int
    limit: int


@dataclass(eq=False)
class BytesFull(NotQueued):
    """The model's backlog (``tenant`` False) or the job's tenant's share of it (True) would pass its
    bound in bytes; the job was not queued."""

    held: int
    limit: int
    tenant: bool = field(kw_only=True)

    def __str__(self) -> str:
        return f"{'tenant' if self.tenant else 'backlog'} holds {self.held} of {self.limit} bytes"


@dataclass(eq=False)
class JobTooLarge(NotQueued):
    """The job alone is larger than its tenant may ever hold of the backlog (``limit`` bytes)."""

    message = "job of {size} bytes, limit {limit}"
    size: int
    limit: int


class JobQueue:
    """Writes jobs to the model's stream, refusing them when its backlog is full.

    Submissions of concurrent requests share one pipelined round trip (a :class:`RedisLane`).
    """

    def __init__(self, redis: aioredis.Redis, keys: Keys, codec: Codec, *, max_backlog: int,
                 max_backlog_bytes: int = 128 * 1024 * 1024) -> None:
        self._redis = redis
        self._keys = keys
        self._codec = codec
        self._max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self._cap = max(max_backlog * 4, 10_000)
        self._scripts = ScriptLoader(redis)
        self.lane = open_lane(redis, "submit")

    def stream_of(self, model: str) -> str:
        """The job stream of ``model``."""
        return self._keys.jobs(model)

    async def submit(self, job: Job, *, share: float | None = None) -> bytes:
        """Queue ``job`` once, however often it is resent, and return its stream entry's id if it
        went straight into the job stream (b"" if it waits its key's turn, or was a resend); raises
        :class:`BacklogFull` / :class:`BytesFull` instead of queueing past the model's limits, :class:`ShareFull` /
        :class:`BytesFull` when the job's tenant would hold more than ``share`` of them (None, or
        tenant "": no per-tenant limit), :class:`JobTooLarge` for a job larger than the tenant's
        share of the bytes (before asking Redis)."""
        model, tenant = job.model, job.tenant
        limit = self.share_limit(share) if tenant and share is not None else 0
        byte_limit = max(int(share * self.max_backlog_bytes), 1) if tenant and share is not None else 0
        encoded = self._codec.encode(job)
        size = backlog_size(len(encoded), job)  # an edit's pictures in the blob store count too
        if size > (byte_limit or self.max_backlog_bytes):
            raise JobTooLarge(size, byte_limit or self.max_backlog_bytes)
        args = submit_command(self._keys, model, job.id, tenant, encoded, deadline_ms=job.deadline_ms,
                              max_backlog=self._max_backlog, stream_cap=self._cap, tenant_limit=limit,
                              weight=job.priority, now_ms=int(time.time() * 1000),
                              max_bytes=self.max_backlog_bytes, tenant_bytes=byte_limit, inputs=size - len(encoded))
        try:
            reply = await self.lane.execute(*args)
        except NoScriptError:
            # Redis restarted (or flushed its scripts) since we last loaded it.
            await self._scripts.load(SUBMIT)
            reply = await self.lane.execute(*args)
        outcome, n = reply[0], reply[1]
        if outcome == BACKLOG_FULL:
            raise BacklogFull(int(n))
        if outcome == SHARE_FULL:
            raise ShareFull(int(n), limit)
        if outcome in (BYTES_FULL, BYTES_SHARE_FULL):
            tenant_full = outcome == BYTES_SHARE_FULL
            raise BytesFull(int(n), byte_limit if tenant_full else self.max_backlog_bytes, tenant=tenant_full)
        return reply[2] if len(reply) > 2 else b""

    async def withdraw(self, job: Job, entry: bytes) -> int:
        """Take ``job`` back from its model's queue unless an engine has it (``engines.contract.withdraw``):
        ``WITHDRAWN`` (no engine will ever run it), ``TAKEN`` or ``GONE``. ``entry``: what :meth:`submit`
        returned. Safe to resend."""
        encoded = self._codec.encode(job)
        cmd = withdraw_command(self._keys, job.model, job.id, job.tenant, encoded, entry=entry,
                               inputs=backlog_size(len(encoded), job) - len(encoded),
                               deadline_ms=job.deadline_ms, scan=self._max_backlog)
        try:
            return int(await self.lane.execute(*cmd))
        except NoScriptError:
            await self._scripts.load(WITHDRAW)
            return int(await self.lane.execute(*cmd))

    def share_limit(self, share: float) -> int:
        """How many jobs of a model's backlog ``share`` (a fraction of ``max_backlog``) allows: at least one."""
        return max(int(share * self._max_backlog), 1)

    async def missing(self, jobs: list[tuple[str, str]]) -> list[bool]:
        """For each (model, job id): whether its job key is gone (acked, or lost with Redis) or
        fenced (its idempotency claim was taken over before it was queued: it never will be)."""
        replies = await self.lane.pipeline([("GET", self._keys.job(model, job_id)) for model, job_id in jobs])
        return [r is None or r == FENCED for r in replies]

    async def announce(self, record: str, job_id: str) -> bool:
        """Name a job submitted again in its result record (``JobOptions.result``), before it is queued:
        readers take that job's events from then on (``gateway.responses.background``). False when Redis
        did not answer (the job must not be queued then: its readers would never take its events)."""
        try:
            await self.lane.execute("XADD", record, "NOMKSTREAM", "*", "job", job_id)
        except REDIS_ERRORS as exc:
            log.warning("could not announce job %s in its result record: %s", job_id, exc)
            return False
        return True

    async def cancel(self, job_id: str, deadline_ms: int) -> None:
        """Tell every engine that the client of ``job_id`` went away (remember it until ``deadline_ms``)."""
        try:
            await self.lane.execute("PUBLISH", self._keys.cancel_channel, cancel_message(job_id, deadline_ms))
        except REDIS_ERRORS as exc:
            log.warning("could not publish cancellation of %s: %s", job_id, exc)


class ReplyRouter:
    """The one reader of this process's reply stream; hands each event to its request.

    Each waiting request registers a queue under its job id before its job is written,
    so no event can arrive for a request that is not listening. Events for requests
    that already ended (client gone, deadline) are dropped. The router creates its stream
    and keeps it alive (an expiry it refreshes, re-creating the stream if Redis lost it);
    engines append to it, and re-create it only when Redis lost it before its expiry
    (``engines.contract.replies``).
    """

    def __init__(self, redis: aioredis.Redis, stream: str, codec: Codec, metrics: GatewayMetrics | None = None) -> None:
        self._redis = redis
        self.stream = stream
        #: Its generation's key (``engines.contract.replies``), kept by a script (False: Redis's users predate it).
        self.generation = generation_key(stream)
        self._keep = redis.register_script(KEEP) if redis is not None else None
        self._generations = True
        self._codec = codec
        self.metrics = metrics or GatewayMetrics.noop()
        self._waiters: dict[str, asyncio.Queue[Any]] = {}
        #: Ends :meth:`run` (a cancellation landing inside a Redis call can be swallowed).
        self.closed = False

    def open(self, job_id: str, queue: asyncio.Queue[Any] | None = None) -> asyncio.Queue[Any]:
        q: asyncio.Queue[Any] = queue if queue is not None else asyncio.Queue()
        self._waiters[job_id] = q
        return q

    def close(self, job_id: str) -> None:
        self._waiters.pop(job_id, None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def create_stream(self) -> bool:
        """Make the reply stream exist, with its expiry (engines never make a stream they have not seen)
        and a new generation (engines that wrote to a lost one write their last entries again); keep
        it alive if it does (``engines.contract.replies.KEEP``). Whether it was there."""
        if self._generations:
            try:
                return bool(await self._keep(keys=[self.stream, self.generation],
                                             args=[REPLY_STREAM_TTL_MS, new_generation()]))
            except NoPermissionError:
                log.error("Redis's users predate reply stream generations (engines/contract/acl.py): keeping the "
                          "reply stream without one; load the ACL file `conduit redis-acl` writes")
                self._generations = False
        if await self._redis.pexpire(self.stream, REPLY_STREAM_TTL_MS):
            return True
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self.stream, {b"h": b"1"})
        pipe.pexpire(self.stream, REPLY_STREAM_TTL_MS)
        await pipe.execute()
        return False

    async def _keep_alive(self, last: bytes) -> None:
        # Consumed entries are of no further use: keep the stream short, and alive.
        if last != b"0-0":
            await self._redis.xtrim(self.stream, minid=last, approximate=True)
        if not await self.create_stream():  # Redis lost it (a restart without persistence): engines need it back
            log.warning("reply stream %s was gone; re-created it", self.stream)

    async def close_stream(self) -> None:
        """This gateway stops: its stream goes, and its generation says so, so no engine makes it again."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(self.stream)
        if self._generations:
            pipe.set(self.generation, GONE, px=REPLY_STREAM_TTL_MS)
        await pipe.execute()

    async def run(self) -> None:
        """Read and dispatch until :attr:`closed` (the lifespan also cancels it)."""
        # The stream is new with this process (its name carries a fresh id): read it whole.
        last: bytes = b"0-0"
        last_kept = 0.0
        lane = open_lane(self._redis, "replies", blocking=True)  # its own connection: XREAD blocks
        outage = Outage(log, "reading replies")
        try:
            while not self.closed:
                try:
                    now = time.monotonic()
                    if now - last_kept > 1.0:
                        last_kept = now
                        await self._keep_alive(last)
                    reply = await lane.call("XREAD", "COUNT", 1024, "BLOCK", 1000, "STREAMS", self.stream, last)
                except REDIS_ERRORS as exc:
                    outage.failed(exc)
                    self.metrics.background_error("reply-router")
                    await asyncio.sleep(0.2)
                    continue
                outage.answered()
                for _stream, entries in stream_entries(reply):
                    for entry_id, fields in entries:
                        last = entry_id
                        self._dispatch(entry_id, fields)
        finally:
            await lane.close()

    def _dispatch(self, entry_id: bytes, fields: Any) -> None:
        """Hand one entry's events to their waiters; nothing in an entry can stop the reader."""
        if isinstance(fields, dict):  # the cluster client parses entries
            blob = fields.get(b"e")
        else:
            blob = fields[1] if len(fields) >= 2 and fields[0] == b"e" else None
        if blob is None:
            return  # the stream's own creation marker, or a kind of entry this version does not know
        try:
            events, skipped = self._codec.decode_events(blob)
        except Exception:  # noqa: BLE001 - one bad entry must not stop the reader
            log.error("dropping undecodable reply entry %s", entry_id)
            self.metrics.skipped("undecodable_entry")
            return
        if skipped:
            log.warning("skipped %d events of unknown type in reply entry %s", skipped, entry_id)
            self.metrics.skipped("unknown_type", skipped)
        waiters = self._waiters
        for event in events:
            q = waiters.get(event.job)
            if q is not None:
                q.put_nowait(event)
