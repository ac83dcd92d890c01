"""The gateway's side of the Redis Streams queue: submitting jobs and routing replies."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from engines.lane import RedisLane, stream_entries
from engines.wire import Codec, Event, Job, Keys

log = logging.getLogger("conduit.gateway")

# Admission and enqueue in one atomic round trip. Engines delete a job's entry when they
# ack it, so the stream's length is exactly the model's backlog (queued + running).
_SUBMIT = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return n end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'j', ARGV[3])
return -1
"""


class BacklogFull(Exception):
    """The model's backlog is at its limit; the job was not queued."""

    def __init__(self, backlog: int) -> None:
        super().__init__(f"backlog {backlog}")
        self.backlog = backlog


class JobQueue:
    """Writes jobs to the model's stream, refusing them when its backlog is full.

    Submissions of concurrent requests share one pipelined round trip (a :class:`RedisLane`).
    """

    def __init__(self, redis: aioredis.Redis, keys: Keys, codec: Codec, *, max_backlog: int) -> None:
        self._redis = redis
        self._keys = keys
        self._codec = codec
        self._max_backlog = max_backlog
        self._cap = max(max_backlog * 4, 10_000)
        self._sha = hashlib.sha1(_SUBMIT.encode()).hexdigest()
        self.lane = RedisLane(redis, "submit")

    async def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`BacklogFull` instead of queueing past the limit."""
        args = ("EVALSHA", self._sha, 1, self._keys.jobs(job.model), self._max_backlog, self._cap,
                self._codec.encode(job))
        try:
            res = await self.lane.execute(*args)
        except NoScriptError:
            # Redis restarted (or flushed its scripts) since we last loaded it.
            await self.lane.execute("SCRIPT", "LOAD", _SUBMIT)
            res = await self.lane.execute(*args)
        if res != -1:
            raise BacklogFull(int(res))

    async def cancel(self, job_id: str) -> None:
        """Tell every engine that the client of ``job_id`` went away."""
        try:
            await self.lane.execute("PUBLISH", self._keys.cancel_channel, job_id)
        except (ConnectionError, OSError, aioredis.RedisError) as exc:
            log.warning("could not publish cancellation of %s: %s", job_id, exc)


class ReplyRouter:
    """The one reader of this process's reply stream; hands each event to its request.

    Each waiting request registers a queue under its job id before its job is written,
    so no event can arrive for a request that is not listening. Events for requests
    that already ended (client gone, deadline) are dropped.
    """

    def __init__(self, redis: aioredis.Redis, stream: str, codec: Codec) -> None:
        self._redis = redis
        self.stream = stream
        self._codec = codec
        self._waiters: dict[str, asyncio.Queue[Event]] = {}
        #: Ends :meth:`run` (a cancellation landing inside a Redis call can be swallowed).
        self.closed = False

    def open(self, job_id: str) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._waiters[job_id] = q
        return q

    def close(self, job_id: str) -> None:
        self._waiters.pop(job_id, None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def run(self) -> None:
        """Read and dispatch until :attr:`closed` (the lifespan also cancels it)."""
        # The stream is new with this process (its name carries a fresh id): read it whole.
        last: bytes = b"0-0"
        last_trim = time.monotonic()
        waiters = self._waiters
        decode = self._codec.decode_events
        lane = RedisLane(self._redis, "replies", blocking=True)  # its own connection: XREAD blocks
        try:
            while not self.closed:
                try:
                    (reply,) = await lane.round_trip([("XREAD", "COUNT", 1024, "BLOCK", 5000, "STREAMS", self.stream,
                                                       last)])
                    if isinstance(reply, Exception):
                        raise reply
                except (ConnectionError, OSError, aioredis.RedisError) as exc:
                    log.warning("reading replies failed (%s); retrying", exc)
                    await asyncio.sleep(0.2)
                    continue
                for _stream, entries in stream_entries(reply):
                    for entry_id, fields in entries:
                        last = entry_id
                        try:
                            events = decode(fields[1])
                        except Exception:  # noqa: BLE001 - one bad entry must not stop the reader
                            log.exception("dropping undecodable reply entry %s", entry_id)
                            continue
                        for event in events:
                            q = waiters.get(event.job)
                            if q is not None:
                                q.put_nowait(event)
                now = time.monotonic()
                if now - last_trim > 1.0 and last != b"0-0":
                    last_trim = now
                    # Consumed entries are of no further use: keep the stream short.
                    try:
                        await self._redis.xtrim(self.stream, minid=last, approximate=True)
                        await self._redis.expire(self.stream, 3600)
                    except (ConnectionError, OSError, aioredis.RedisError):
                        pass
        finally:
            await lane.close()
