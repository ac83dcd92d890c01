"""Background responses (``background: true``): queued jobs whose events any replica can read.

A background response is answered ``queued`` at once; its job runs through the normal queue (the
key's limits and fair queueing, reclaimed by another engine when its engine dies: run again, never
lost). The job names a **result record** (``JobOptions.result``, ``Keys.result``): a stream the
gateway makes before queueing it, to which the engine appends every event of the job, exactly as to
the accepting gateway's reply stream. Everything a client sees of the response is *rendered* from
that record (:class:`Replay`), by whichever replica it asks, the same way every time: ``GET`` (its
state now), a stream (``stream: true``, or ``GET ?stream=true&starting_after=n`` after a disconnect:
the same events with the same ``sequence_number``\\ s, so a resumed stream has no gap and no
duplicate), and the final stored response (``gateway.responses.store``), saved by the first replica
that renders it finished. The accepting gateway drives the job's run (its deadline, a job Redis lost
submitted again, its usage settled), but nothing depends on it living: if it dies, the engine still
finishes the job into the record, and the next ``GET`` stores the result.

The gateway writes to the record only a job's end that no engine reports: a cancellation
(``POST /v1/responses/{id}/cancel``), a run that failed (its deadline, a job lost too often), as a
``Failed`` of attempt 0, which ends the response whatever follows. A response its record cannot finish
(the record lost with its job, nobody left to resubmit it) fails ``job_lost`` once its deadline has
passed by :data:`OVERDUE_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from engines.contract.keys import Keys
from engines.contract.lane import REDIS_ERRORS, stream_entries
from engines.contract.messages import Codec, Delta, Done, Event, Failed, Started, Unknown
from gateway.errors import ConduitError
from gateway.queue import JobQueue
from gateway.responses.objects import ResponseObject
from gateway.responses.output import ResponseOutput

log = logging.getLogger("conduit.gateway")

#: How long after its deadline a background response whose record never finished counts as lost.
OVERDUE_S = 30.0
#: A response's status once it ended (nothing changes it after).
FINAL = frozenset(("completed", "incomplete", "failed", "cancelled"))
_CODEC = Codec()
_HEAD = msgspec.json.Decoder(ResponseObject)
_ENC = msgspec.json.Encoder()


def job_of(response_id: str) -> str:
    """The first job id of a response (``resp_<hex>`` is job ``resp-<hex>``)."""
    return "resp-" + response_id.partition("_")[2]


def head_of_record(raw: bytes) -> ResponseObject:
    return _HEAD.decode(raw)


def entry_events(fields: Any) -> list[Event | Unknown]:
    """The events of one record entry (``e``: an engine's batch, as in a reply stream); none for
    the record's creation marker."""
    blob = fields.get(b"e") if isinstance(fields, dict) else (
        fields[1] if len(fields) >= 2 and fields[0] == b"e" else None)
    if blob is None:
        return []
    try:
        return _CODEC.decode_events(blob)[0]
    except Exception:  # noqa: BLE001 - a damaged entry is skipped, as the reply router does
        log.error("skipping an undecodable result record entry")
        return []


class Replay:
    """One background response rendered from its result record's events, in order.

    The exactly-once rules of a run (``gateway.run``) apply: an event of a job given up (an earlier
    submission) or of an attempt given up is dropped, a repeated number is dropped, a new attempt (an
    engine died, another runs the job from scratch) starts the output over. The first final event
    ends it; a gateway's ``Failed`` (attempt 0) ends it whatever came before.
    """

    __slots__ = ("output", "job", "jobs", "attempt", "seq", "started", "final", "events")

    def __init__(self, head: ResponseObject, *, stream: bool) -> None:
        self.output = ResponseOutput(msgspec.structs.replace(head, status="in_progress", output=[]), stream=stream)
        self.output.begun = True  # the opening events are this class's: created and queued, then in_progress
        self.job = job_of(head.id)
        self.jobs: set[str] = {self.job}
        self.attempt, self.seq = 1, 0
        self.started = False
        #: The response once it ended (None: still queued or in progress).
        self.final: ResponseObject | None = None
        #: Events rendered so far (a stream's next ``sequence_number``).
        self.events = 0

    def open(self, head: ResponseObject, out: bytearray) -> None:
        """A stream's first events: ``response.created`` and ``response.queued``."""
        queued = msgspec.structs.replace(head, status="queued", output=[])
        self.output._event(out, "response.created", {"response": queued})
        self.output._event(out, "response.queued", {"response": queued})

    def feed(self, entry_id: bytes, events: list[Event | Unknown], out: bytearray) -> None:
        """Render one entry's events (``entry_id``: its time, a finished response's ``completed_at``)."""
        for event in events:
            if self.final is not None:
                return
            if not self._admit(event):
                continue
            kind = type(event)
            if kind is Started:
                self._in_progress(out)
            elif kind is Delta:
                self._in_progress(out)
                for c in event.choices:  # type: ignore[union-attr]
                    if c.index == 0:
                        self.output.add(c, out)
            elif kind is Done:
                self._in_progress(out)
                self.final = self.output.finished(event.usage, out, now=int(entry_id.split(b"-")[0]) // 1000)  # type: ignore[union-attr]
            elif kind is Failed:
                self.fail(event, out)  # type: ignore[arg-type]

    def fail(self, event: Failed, out: bytearray) -> None:
        if event.code == "cancelled":
            # (OpenAI's stream has no event for it: a cancelled response's stream ends.)
            self.final = msgspec.structs.replace(self.output.head, status="cancelled",
                                                 output=self.output.so_far("incomplete"))
        else:
            self.final = self.output.failure(ConduitError(event.message, status=event.status, code=event.code,
                                                          param=event.param), out)

    def _in_progress(self, out: bytearray) -> None:
        if not self.started:
            self.started = True
            self.output._event(out, "response.in_progress", {"response": self.output.head})

    def _admit(self, event: Event | Unknown) -> bool:
        if event.attempt == 0:  # a gateway's: the end
            return isinstance(event, Failed)
        if event.job != self.job:
            if event.job in self.jobs:  # an earlier submission's, given up
                return False
            self.jobs.add(event.job)  # submitted again (Redis lost the job): from scratch
            self.job, self.attempt, self.seq = event.job, event.attempt, 0
            self.output.restart()
        elif event.attempt != self.attempt:
            if event.attempt < self.attempt:
                return False
            self.attempt, self.seq = event.attempt, 0
            self.output.restart()  # another engine runs it from scratch
        if event.seq:
            if event.seq <= self.seq:
                return False
            self.seq = event.seq
        return not isinstance(event, Unknown)

    def now(self) -> ResponseObject:
        """The response as it stands."""
        if self.final is not None:
            return self.final
        return msgspec.structs.replace(self.output.head, status="in_progress" if self.started else "queued",
                                       output=self.output.so_far("in_progress"))


def overdue(head: ResponseObject, timeout_s: float) -> bool:
    return time.time() > head.created_at + timeout_s + OVERDUE_S


LOST = Failed(job="", message="The background response's job was lost and could not be run again; create it "
                              "again.", code="job_lost", status=503, attempt=0)


class ResultRecords:
    """Background responses' result records: made, written to (a gateway's end of a job), rendered."""

    __slots__ = ("redis", "keys", "queue", "timeout_s", "keep_ms")

    def __init__(self, redis: Any, keys: Keys, queue: JobQueue, timeout_s: float, keep_s: float) -> None:
        self.redis = redis
        self.keys = keys
        #: Where cancellations are published to the engines.
        self.queue = queue
        self.timeout_s = timeout_s
        #: How long a record lives past its response's deadline.
        self.keep_ms = int(keep_s * 1000)

    async def make(self, response_id: str) -> str:
        """Make ``response_id``'s record (before its job is queued: engines append only to a stream
        that exists) with its life: the job's deadline, then ``keep_ms``."""
        key = self.keys.result(response_id)
        life = int(self.timeout_s * 1000) + self.keep_ms
        await self.redis.execute_command("XADD", key, "*", "created", "1")
        await self.redis.execute_command("PEXPIRE", key, life)
        return key

    async def kept(self, response_id: str) -> bool:
        """Whether ``response_id``'s record is still kept."""
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

    async def end(self, response_id: str, job_id: str, exc: ConduitError) -> None:
        """Write a job's end no engine reports (attempt 0); the record must exist (NOMKSTREAM)."""
        event = Failed(job=job_id, message=exc.message, code=exc.code or "error", status=exc.status,
                       param=exc.param, attempt=0)
        await self.redis.execute_command("XADD", self.keys.result(response_id), "NOMKSTREAM", "*", "e",
                                         _CODEC.encode([event]))

    async def render(self, head: ResponseObject) -> Replay:
        """The response rendered from its whole record now (an overdue one failed ``job_lost``)."""
        replay = Replay(head, stream=False)
        sink = bytearray()
        for entry_id, fields in await self.redis.xrange(self.keys.result(head.id)):
            replay.feed(entry_id, entry_events(fields), sink)
            if replay.final is not None:
                break
        if replay.final is None and overdue(head, self.timeout_s):
            replay.fail(LOST, sink)
        return replay

    async def stream(self, head: ResponseObject, starting_after: int) -> AsyncIterator[bytes]:
        """The response's events, from the first after ``starting_after`` (-1: all) to its end, as
        they are written to its record."""
        replay = Replay(head, stream=True)
        out = bytearray()
        replay.open(head, out)
        key, last = self.keys.result(head.id), b"0-0"
        skip = starting_after + 1
        while True:
            if out:
                chunk, skip = _after(bytes(out), skip)
                out.clear()
                if chunk:
                    yield chunk
            if replay.final is not None:
                return
            if overdue(head, self.timeout_s):
                replay.fail(LOST, out)
                continue
            try:
                reply = await self.redis.xread({key: last}, count=512, block=1000)
            except REDIS_ERRORS as exc:
                log.warning("reading a background response's record: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for _stream, entries in stream_entries(reply):
                for entry_id, fields in entries:
                    last = entry_id
                    replay.feed(entry_id, entry_events(fields), out)


def _after(chunk: bytes, skip: int) -> tuple[bytes, int]:
    """``chunk`` (whole SSE events) without its first ``skip`` events; what is left to skip."""
    if skip <= 0:
        return chunk, 0
    events = chunk.split(b"\n\n")[:-1]  # every event ends with a blank line; no data holds a raw newline
    if len(events) <= skip:
        return b"", skip - len(events)
    return b"\n\n".join(events[skip:]) + b"\n\n", 0
