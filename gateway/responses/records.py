"""Background responses' result records (``Keys.result``): made, written to by the gateway, rendered
(``gateway.responses.background.Replay``), and a finished response stored and charged, once.

The record decides how a response ends, for every replica alike: its first entry holds the job's
deadline (the accepting gateway's), so any replica that finds it overdue by :data:`OVERDUE_S` (by
Redis's clock) writes the end (``job_lost``) into it and reads on: whichever final event came first
wins, everywhere. The first replica that renders a response finished stores it
(``gateway.responses.store``) and charges its key (a ``SET NX`` flag next to the record): the
accepting gateway when it lives to see the end, else the first replica asked about it. A finished
response too large for a stored record (``response_max_record_bytes``) is stored failed, without its
output, rather than never ending.

A response's stream holds one Redis connection (``XREAD BLOCK``) while it waits for events: a gateway
serves at most ``response_max_streams`` of them, ``response_max_streams_per_key`` per API key (429
beyond).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from engines.contract.keys import Keys
from engines.contract.lane import REDIS_ERRORS, stream_entries
from engines.contract.messages import Codec, Failed
from gateway.errors import ConduitError, RateLimited
from gateway.queue import JobQueue
from gateway.responses.background import FINAL, LOST, Replay, head_of_record
from gateway.responses.objects import ResponseError, ResponseObject
from gateway.responses.store import ResponseStore, StoredRecord
from gateway.settings import ResponseSettings
from gateway.tenancy.principal import Principal
from gateway.tenancy.usage import UsageLog

log = logging.getLogger("conduit.gateway")

#: How long past its deadline a response whose record never ended is ended ``job_lost``.
OVERDUE_S = 30.0
_CODEC = Codec()
_ENC = msgspec.json.Encoder()
_RECORD = msgspec.msgpack.Encoder()
# A record made with its life in one step (never a record without one). KEYS: the record. ARGV: 1 the
# job's deadline (epoch ms), 2 the record's life (ms).
_MAKE = "redis.call('XADD', KEYS[1], '*', 'deadline', ARGV[1]) redis.call('PEXPIRE', KEYS[1], ARGV[2])"


class ResultRecords:
    """Background responses' result records, and the stored responses they end in."""

    __slots__ = ("redis", "keys", "queue", "store", "usage", "timeout_ms", "keep_ms", "max_streams",
                 "max_streams_per_key", "streams")

    def __init__(self, redis: Any, keys: Keys, queue: JobQueue, store: ResponseStore, usage: UsageLog | None,
                 timeout_s: float, settings: ResponseSettings) -> None:
        self.redis = redis
        self.keys = keys
        #: Where cancellations are published to the engines.
        self.queue = queue
        self.store = store
        self.usage = usage
        self.timeout_ms = int(timeout_s * 1000)
        #: How long a record lives past its response's deadline.
        self.keep_ms = int(settings.response_events_keep_s * 1000)
        self.max_streams = settings.response_max_streams
        self.max_streams_per_key = settings.response_max_streams_per_key
        #: API key id -> its streams open on this gateway.
        self.streams: dict[str, int] = {}

    # ---- writing -------------------------------------------------------------------------

    async def make(self, response_id: str, deadline_ms: int) -> str:
        """Make ``response_id``'s record (before its job is queued: engines append only to a stream
        that exists), its first entry the job's deadline, its life that deadline and ``keep_ms``."""
        key = self.keys.result(response_id)
        await self.redis.execute_command("EVAL", _MAKE, 1, key, deadline_ms, self.timeout_ms + self.keep_ms)
        return key

    async def end(self, response_id: str, job_id: str, exc: ConduitError) -> None:
        """Write a job's end no engine reports (attempt 0); the record must exist (NOMKSTREAM)."""
        event = Failed(job=job_id, message=exc.message, code=exc.code or "error", status=exc.status,
                       param=exc.param, attempt=0)
        await self.redis.execute_command("XADD", self.keys.result(response_id), "NOMKSTREAM", "*", "e",
                                         _CODEC.encode([event]))

    async def kept(self, response_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.result(response_id)))

    async def drop(self, response_id: str) -> None:
        """Delete a record whose job was never queued (best effort: it expires anyway)."""
        try:
            await self.redis.delete(self.keys.result(response_id))
        except REDIS_ERRORS as exc:
            log.warning("could not delete a background response's record: %s", exc)

    async def cancel_job(self, job_id: str, deadline_ms: int) -> None:
        """Tell the engines to drop ``job_id`` (it ends there with a ``Failed``, code ``cancelled``)."""
        await self.queue.cancel(job_id, deadline_ms)

    # ---- reading -------------------------------------------------------------------------

    async def render(self, head: ResponseObject) -> Replay:
        """The response rendered from its whole record now; one overdue is ended ``job_lost`` in it."""
        replay = Replay(head, stream=False)
        sink = bytearray()
        key, last = self.keys.result(head.id), b"-"
        for entry_id, fields in await self.redis.xrange(key):
            last = entry_id
            replay.entry(entry_id, fields, sink)
            if replay.final is not None:
                return replay
        if await self._overdue(head, replay):
            for entry_id, fields in await self.redis.xrange(key, b"(" + last if last != b"-" else b"-"):
                replay.entry(entry_id, fields, sink)  # whichever end came first
                if replay.final is not None:
                    break
            if replay.final is None:  # no record to write to: lost with it
                replay.fail(LOST, sink)
        return replay

    async def _overdue(self, head: ResponseObject, replay: Replay) -> bool:
        """Whether the response is past its deadline by :data:`OVERDUE_S`, by Redis's clock; if so, its end
        is written into its record (when it still has one) for every replica to read."""
        deadline = replay.deadline_ms or head.created_at * 1000 + self.timeout_ms
        seconds, micros = await self.redis.time()
        if seconds * 1000 + micros // 1000 < deadline + OVERDUE_S * 1000:
            return False
        await self.end(head.id, replay.job, ConduitError(LOST.message, status=LOST.status, code=LOST.code))
        return True

    async def current(self, owner: Principal, record: StoredRecord) -> bytes:
        """A stored response as it stands (JSON): a background one still running rendered from its
        record, and stored (and charged) once it has ended."""
        head = head_of_record(record.response)
        if not head.background or head.status in FINAL:
            return record.response
        return await self.finish(owner, head, record.input)

    async def finish(self, owner: Principal, head: ResponseObject, items: bytes) -> bytes:
        """``head``'s response rendered now (JSON); once it has ended, stored and its key charged (the
        first replica to get there charges: ``SET NX``)."""
        replay = await self.render(head)
        final = replay.final
        if final is None:
            return _ENC.encode(replay.now())
        body = _ENC.encode(final)
        if len(_RECORD.encode(StoredRecord(body, items))) > self.store.max_record_bytes:
            final = msgspec.structs.replace(final, status="failed", output=[], error=ResponseError(
                code="server_error", message="The response is larger than a stored response may be "
                                             "(response_max_record_bytes); its output was not kept."))
            body = _ENC.encode(final)
        # Charged first, once (whoever sets the flag), whether or not the store takes it.
        if await self.redis.set(self.keys.response_charged(owner.key_id, head.id), 1, nx=True,
                                px=self.timeout_ms + self.keep_ms) and self.usage is not None:
            u = replay.usage
            self.usage.add(owner.key_id, owner.name, head.model, prompt_tokens=u.prompt_tokens,
                           completion_tokens=u.completion_tokens)
        if len(_RECORD.encode(StoredRecord(body, items))) > self.store.max_record_bytes:
            items = b"[]"  # (what is left of it is stored all the same: it ended, for every reader)
        if await self.store.save(owner, head.model, head.id, body, items):
            # Ended: its events are kept ``keep_ms`` from now, no longer than they would have been.
            await self.redis.execute_command("PEXPIRE", self.keys.result(head.id), self.keep_ms, "LT")
        return body

    def open_stream(self, owner: Principal, head: ResponseObject, starting_after: int) -> Watch:
        """The response's events; its slot taken now (429 past this gateway's bounds on open streams),
        given back when the stream ends (:class:`Watch`)."""
        mine = self.streams.get(owner.key_id, 0)
        if mine >= self.max_streams_per_key or sum(self.streams.values()) >= self.max_streams:
            raise RateLimited(f"Too many background response streams are open ({mine} of this API key's "
                              f"{self.max_streams_per_key}, or this gateway's {self.max_streams}); retry after 1s.",
                              retry_after_s=1)
        self.streams[owner.key_id] = mine + 1
        watch = Watch(self, owner.key_id)
        watch.events = self._stream(watch, head, starting_after)
        return watch

    def release(self, key_id: str) -> None:
        left = self.streams.pop(key_id) - 1
        if left:
            self.streams[key_id] = left

    async def _stream(self, watch: Watch, head: ResponseObject, starting_after: int) -> AsyncIterator[bytes]:
        """The events from the first after ``starting_after`` (-1: all) to the end, as they are written."""
        try:
            replay = Replay(head, stream=True)
            out = bytearray()
            replay.open(head, out)
            key, last = self.keys.result(head.id), b"0-0"
            skip = starting_after + 1
            while True:
                if out:
                    chunk, skip = after(bytes(out), skip)
                    out.clear()
                    if chunk:
                        yield chunk
                if replay.final is not None:
                    return
                try:
                    reply = await self.redis.xread({key: last}, count=512, block=1000)
                    if not reply:  # a second without news
                        if not await self.kept(head.id):
                            replay.fail(LOST, out)  # its record is gone: nothing more will come
                        else:
                            await self._overdue(head, replay)  # (its end, if written, is read next)
                        continue
                except REDIS_ERRORS as exc:
                    log.warning("reading a background response's record: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                for _stream, entries in stream_entries(reply):
                    for entry_id, fields in entries:
                        last = entry_id
                        replay.entry(entry_id, fields, out)
        finally:
            watch.release()


class Watch:
    """One open stream of a background response: its events, and its slot among the gateway's open
    streams, given back once (at the stream's end, or when it is dropped before it started)."""

    __slots__ = ("records", "key_id", "events", "held")

    def __init__(self, records: ResultRecords, key_id: str) -> None:
        self.records = records
        self.key_id = key_id
        self.events: AsyncIterator[bytes] | None = None
        self.held = True

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self.events)  # type: ignore[arg-type]

    def release(self) -> None:
        if self.held:
            self.held = False
            self.records.release(self.key_id)

    def __del__(self) -> None:
        self.release()


def after(chunk: bytes, skip: int) -> tuple[bytes, int]:
    """``chunk`` (whole SSE events) without its first ``skip`` events; what is left to skip."""
    if skip <= 0:
        return chunk, 0
    events = chunk.split(b"\n\n")[:-1]  # every event ends with a blank line; no data holds a raw newline
    if len(events) <= skip:
        return b"", skip - len(events)
    return b"\n\n".join(events[skip:]) + b"\n\n", 0
