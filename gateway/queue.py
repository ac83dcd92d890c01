"""The gateway's side of the Redis Streams queue: submitting jobs and routing replies."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from engines.backlog import HELD
from engines.lane import ScriptLoader, open_lane, stream_entries
from engines.wire import ENGINE_GROUP, Codec, Job, Keys
from telemetry.instruments import GatewayMetrics

log = logging.getLogger("conduit.gateway")

# Admission and enqueue in one atomic round trip. Engines delete a job's entry when they
# ack it, so the model's backlog (queued + running) is its stream's length plus the jobs
# waiting in its tenants' lists (engines.fairness).
# The job key (KEYS[2], same slot) makes a submission idempotent: a resend after a lost
# reply finds it and queues nothing. It lives until the engine acks the job, at most
# until the job's deadline (after which no engine would start the job anyway).
# A tenant (API key) may hold at most ARGV[6] jobs of the backlog (0: no limit, tenant "").
# Its jobs are members of a ZSET scored by deadline rather than a counter: the engine's ack
# removes the member (idempotent, though acks may repeat; allowed under maxmemory), and a
# removal lost in a failover stops counting at the job's deadline.
# The job goes straight into the stream when nothing waits and every entry there is taken
# (XLEN - pending = 0; with no consumer group yet, every entry counts as untaken): an engine
# has a free slot, or will read it next. Otherwise it waits in its tenant's list and the tenant
# joins the ring; engines promote jobs from the lists in turn as their slots free.
# The model's backlog is bounded in bytes too (engines.backlog: the job's encoded size counted
# in here, out by the engine's ack), and so is the tenant's share of it (ARGV[12]).
# SET is the first write: under maxmemory the script is refused with nothing written.
# KEYS: 1 job stream, 2 job key, 3 tenant's wait list, 4 ring, 5 fair state, 6 weights,
# 7 tenant backlog, 8 queued bytes, 9 queued jobs. ARGV: 1 max backlog, 2 stream cap, 3 job,
# 4 deadline (ms), 5 tenant, 6 tenant's limit, 7 weight, 8 now (ms), 9 job id, 10 consumer
# group, 11 max backlog bytes, 12 tenant's bytes (0: no limit).
# Returns {outcome, n}: QUEUED, DUPLICATE, BACKLOG_FULL (n: the backlog), SHARE_FULL (n: the
# tenant's jobs), BYTES_FULL (n: the backlog's bytes) or BYTES_SHARE_FULL (n: the tenant's bytes).
_SUBMIT = HELD + """
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, 0} end
local waiting = tonumber(redis.call('HGET', KEYS[5], 'waiting') or '0')
local xlen = redis.call('XLEN', KEYS[1])
if xlen + waiting >= tonumber(ARGV[1]) then return {2, xlen + waiting} end
local limit = tonumber(ARGV[6])
if limit > 0 then
  local held = redis.call('ZCOUNT', KEYS[7], '(' .. ARGV[8], '+inf')
  if held >= limit then return {3, held} end
end
local size = #ARGV[3]
local byte_limit = tonumber(ARGV[12])
local total, mine, expired = backlog_bytes(KEYS[8], KEYS[9], ARGV[8], ARGV[5], size, tonumber(ARGV[11]), byte_limit)
if total + size > tonumber(ARGV[11]) or (byte_limit > 0 and mine + size > byte_limit) then
  prune(KEYS[8], KEYS[9], expired)
  if total + size > tonumber(ARGV[11]) then return {4, total} end
  return {5, mine}
end
redis.call('SET', KEYS[2], 'q', 'PXAT', ARGV[4])
count_in(KEYS[8], KEYS[9], expired, ARGV[9] .. ' ' .. size .. ' ' .. ARGV[5], ARGV[4], size, ARGV[5])
if ARGV[5] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', ARGV[8])
  redis.call('ZADD', KEYS[7], ARGV[4], ARGV[9])
  local last = redis.call('ZRANGE', KEYS[7], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[7], last[2])
end
local pending = 0
local summary = redis.pcall('XPENDING', KEYS[1], ARGV[10])
if type(summary) == 'table' and summary.err == nil then pending = summary[1] end
if waiting == 0 and xlen - pending <= 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'j', ARGV[3])
  return {0, 0}
end
if redis.call('RPUSH', KEYS[3], ARGV[3]) == 1 then redis.call('RPUSH', KEYS[4], ARGV[5]) end
redis.call('HSET', KEYS[6], ARGV[5], ARGV[7])
redis.call('HINCRBY', KEYS[5], 'waiting', 1)
return {0, 1}
"""
_QUEUED, _DUPLICATE, _BACKLOG_FULL, _SHARE_FULL, _BYTES_FULL, _BYTES_SHARE_FULL = 0, 1, 2, 3, 4, 5

#: Seconds a reply stream outlives its gateway's last sign of life (the gateway refreshes it
#: every second); engines never re-create one (NOMKSTREAM).
REPLY_STREAM_TTL_MS = 60_000


class BacklogFull(Exception):
    """The model's backlog is at its limit; the job was not queued."""

    def __init__(self, backlog: int) -> None:
        super().__init__(f"backlog {backlog}")
        self.backlog = backlog


class ShareFull(Exception):
    """The job's tenant (API key) holds its share of the model's backlog; the job was not queued."""

    def __init__(self, held: int, limit: int) -> None:
        super().__init__(f"tenant holds {held} of {limit}")
        self.held = held
        self.limit = limit


class BytesFull(Exception):
    """The model's backlog (``tenant`` False) or the job's tenant's share of it (True) would pass its
    bound in bytes; the job was not queued."""

    def __init__(self, held: int, limit: int, *, tenant: bool) -> None:
        super().__init__(f"{'tenant' if tenant else 'backlog'} holds {held} of {limit} bytes")
        self.held = held
        self.limit = limit
        self.tenant = tenant


class JobTooLarge(Exception):
    """The job alone is larger than its tenant may ever hold of the backlog (``limit`` bytes)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"job of {size} bytes, limit {limit}")
        self.size = size
        self.limit = limit


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
        self._sha = hashlib.sha1(_SUBMIT.encode()).hexdigest()
        self._scripts = ScriptLoader(redis)
        self.lane = open_lane(redis, "submit")

    def stream_of(self, model: str) -> str:
        """The job stream of ``model``."""
        return self._keys.jobs(model)

    async def submit(self, job: Job, *, share: float | None = None) -> None:
        """Queue ``job`` once, however often it is resent; raises :class:`BacklogFull` /
        :class:`BytesFull` instead of queueing past the model's limits, :class:`ShareFull` /
        :class:`BytesFull` when the job's tenant would hold more than ``share`` of them (None, or
        tenant "": no per-tenant limit), :class:`JobTooLarge` for a job larger than the tenant's
        share of the bytes (before asking Redis)."""
        model, tenant = job.model, job.tenant
        limit = self.share_limit(share) if tenant and share is not None else 0
        byte_limit = max(int(share * self.max_backlog_bytes), 1) if tenant and share is not None else 0
        encoded = self._codec.encode(job)
        if len(encoded) > (byte_limit or self.max_backlog_bytes):
            raise JobTooLarge(len(encoded), byte_limit or self.max_backlog_bytes)
        args = ("EVALSHA", self._sha, 9, self._keys.jobs(model), self._keys.job(model, job.id),
                self._keys.wait(model, tenant), self._keys.ring(model), self._keys.fair_state(model),
                self._keys.weights(model), self._keys.tenant_backlog(model, tenant), self._keys.queued_bytes(model),
                self._keys.queued_jobs(model), self._max_backlog, self._cap, encoded, job.deadline_ms, tenant, limit,
                max(job.priority, 1), int(time.time() * 1000), job.id, ENGINE_GROUP, self.max_backlog_bytes,
                byte_limit)
        try:
            outcome, n = await self.lane.execute(*args)
        except NoScriptError:
            # Redis restarted (or flushed its scripts) since we last loaded it.
            await self._scripts.load(_SUBMIT)
            outcome, n = await self.lane.execute(*args)
        if outcome == _BACKLOG_FULL:
            raise BacklogFull(int(n))
        if outcome == _SHARE_FULL:
            raise ShareFull(int(n), limit)
        if outcome in (_BYTES_FULL, _BYTES_SHARE_FULL):
            tenant_full = outcome == _BYTES_SHARE_FULL
            raise BytesFull(int(n), byte_limit if tenant_full else self.max_backlog_bytes, tenant=tenant_full)

    def share_limit(self, share: float) -> int:
        """How many jobs of a model's backlog ``share`` (a fraction of ``max_backlog``) allows: at least one."""
        return max(int(share * self._max_backlog), 1)

    async def missing(self, jobs: list[tuple[str, str]]) -> list[bool]:
        """For each (model, job id): whether its job key is gone (acked, or lost with Redis)."""
        replies = await self.lane.pipeline([("EXISTS", self._keys.job(model, job_id)) for model, job_id in jobs])
        return [r == 0 for r in replies]

    async def cancel(self, job_id: str, deadline_ms: int) -> None:
        """Tell every engine that the client of ``job_id`` went away (remember it until ``deadline_ms``)."""
        try:
            await self.lane.execute("PUBLISH", self._keys.cancel_channel, f"{job_id} {deadline_ms}")
        except (ConnectionError, OSError, aioredis.RedisError) as exc:
            log.warning("could not publish cancellation of %s: %s", job_id, exc)


class ReplyRouter:
    """The one reader of this process's reply stream; hands each event to its request.

    Each waiting request registers a queue under its job id before its job is written,
    so no event can arrive for a request that is not listening. Events for requests
    that already ended (client gone, deadline) are dropped. The router creates its stream
    and keeps it alive (an expiry it refreshes, re-creating the stream if Redis lost it);
    engines only ever append to an existing one.
    """

    def __init__(self, redis: aioredis.Redis, stream: str, codec: Codec, metrics: GatewayMetrics | None = None) -> None:
        self._redis = redis
        self.stream = stream
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

    async def create_stream(self) -> None:
        """Make the reply stream exist (engines write with NOMKSTREAM) with its expiry."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self.stream, {b"h": b"1"}, maxlen=1000, approximate=True)
        pipe.pexpire(self.stream, REPLY_STREAM_TTL_MS)
        await pipe.execute()

    async def _keep_alive(self, last: bytes) -> None:
        # Consumed entries are of no further use: keep the stream short, and alive.
        pipe = self._redis.pipeline(transaction=False)
        if last != b"0-0":
            pipe.xtrim(self.stream, minid=last, approximate=True)
        pipe.pexpire(self.stream, REPLY_STREAM_TTL_MS)
        *_, alive = await pipe.execute()
        if not alive:  # Redis lost it (a restart without persistence): engines need it back
            log.warning("reply stream %s was gone; re-creating it", self.stream)
            await self.create_stream()

    async def run(self) -> None:
        """Read and dispatch until :attr:`closed` (the lifespan also cancels it)."""
        # The stream is new with this process (its name carries a fresh id): read it whole.
        last: bytes = b"0-0"
        last_kept = 0.0
        lane = open_lane(self._redis, "replies", blocking=True)  # its own connection: XREAD blocks
        try:
            while not self.closed:
                try:
                    now = time.monotonic()
                    if now - last_kept > 1.0:
                        last_kept = now
                        await self._keep_alive(last)
                    (reply,) = await lane.round_trip([("XREAD", "COUNT", 1024, "BLOCK", 1000, "STREAMS", self.stream,
                                                       last)])
                    if isinstance(reply, Exception):
                        raise reply
                except (ConnectionError, OSError, aioredis.RedisError) as exc:
                    log.warning("reading replies failed (%s); retrying", exc)
                    self.metrics.background_error("reply-router")
                    await asyncio.sleep(0.2)
                    continue
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
