"""Writing a worker's events: every running job's events batched into pipelined round trips.

:class:`EventWriter` collects the events of all jobs and writes them one stream entry per reply
stream per flush (``engines.contract.replies``: a stream Redis lost before its expiry is re-created,
see :class:`StreamLives`); a job with a result record (``JobOptions.result``) has each event written
to that stream too, the same way. A job's :class:`Ack` (XACK + XDEL, its job key, its backlog share
and bytes) goes out only once its final event is in Redis, in every stream it goes to. The worker
(``engines.worker``) owns one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, NoScriptError

from engines.contract.backlog import RELEASE
from engines.contract.keys import ENGINE_GROUP, OUTPUT_STARTED, Keys
from engines.contract.lane import REDIS_ERRORS, open_lane
from engines.contract.messages import Codec, Embedded, Event, Failed
from engines.contract.replies import APPEND, CHANGED, DROPPED, RECREATED, append_command
from engines.stream_lives import StreamLives
from telemetry.engine_instruments import EngineMetrics

if TYPE_CHECKING:
    from engines.worker import WorkerSettings

log = logging.getLogger("conduit.engine")


@dataclass(slots=True)
class Ack:
    """A job to XACK + XDEL on its stream, its job key to delete, and its tenant's backlog
    share to release."""

    stream: str
    entry_id: bytes
    #: None for an entry whose job id cannot be read.
    job_key: str | None
    #: (``Keys.tenant_backlog``, job id) of a job that has a tenant.
    release: tuple[str, str] | None = None
    #: The command counting the job's bytes out of its model's backlog (``engines.contract.backlog``).
    bytes_release: tuple[object, ...] | None = None
    #: The streams whose write of the job's final event is still to be answered (its reply stream,
    #: and its result record if it has one): the ack goes out when this reaches 0.
    waits: int = 0

    def commands(self) -> list[tuple[object, ...]]:
        """Idempotent, and none refused under maxmemory: an ack may be sent twice, and frees memory."""
        cmds: list[tuple[object, ...]] = [("XACK", self.stream, ENGINE_GROUP, self.entry_id),
                                          ("XDEL", self.stream, self.entry_id)]
        if self.job_key is not None:
            cmds.append(("DEL", self.job_key))
        if self.release is not None:
            cmds.append(("ZREM", *self.release))
        if self.bytes_release is not None:
            cmds.append(self.bytes_release)
        return cmds


#: What encoding an event a backend made may raise (an integer past 64 bits from an upstream).
_UNENCODABLE = (OverflowError, msgspec.EncodeError, TypeError, ValueError)


#: About the most bytes of events one stream entry holds: a flush of many large events (embedding
#: vectors) is written as several entries, never one past what Redis takes in a value.
ENTRY_BYTES = 4 * 1024 * 1024


def pieces_of(events: list[Event]) -> list[list[Event]]:
    """``events`` in runs of about :data:`ENTRY_BYTES` each (one run, nearly always)."""
    pieces, run, size = [], [], 0
    for event in events:
        n = 256 + len(event.vector) if type(event) is Embedded else 256
        if run and size + n > ENTRY_BYTES:
            pieces.append(run)
            run, size = [], 0
        run.append(event)
        size += n
    pieces.append(run)
    return pieces


def encoded(encode: Callable[[object], bytes], events: list[Event]) -> bytes:
    """``events`` encoded. An event that cannot be (a backend passed on a value no event can carry)
    becomes its job's failure (502 ``engine_error``) and the job's later events are dropped: that job
    ends, every other job's events still go, and the writer carries on."""
    try:
        return encode(events)
    except _UNENCODABLE:
        pass
    kept: list[Event] = []
    failed: set[str] = set()
    for event in events:
        if event.job in failed:
            continue
        try:
            encode(event)
        except _UNENCODABLE as exc:
            log.error("job %s: the engine made an event it cannot encode (%s: %s); the job fails", event.job,
                      type(exc).__name__, exc)
            failed.add(event.job)
            event = Failed(job=event.job, message="The engine produced output it cannot send.", status=502,
                           attempt=event.attempt, seq=event.seq)
        kept.append(event)
    return encode(kept)


class _Batch:
    __slots__ = ("events", "after", "acks", "markers", "resend")

    def __init__(self) -> None:
        #: reply stream -> events, in emission order.
        self.events: dict[str, list[Event]] = {}
        #: reply stream (or result record) -> acks of jobs whose final event is among that stream's
        #: events: sent only once those events are in Redis, in each of the job's streams, so a
        #: refused write never loses a job.
        self.after: dict[str, list[Ack]] = {}
        #: acks ready to send (their final event is already written, or they have none).
        self.acks: list[Ack] = []
        #: job keys of streaming jobs whose output began.
        self.markers: set[str] = set()
        #: A stream's recent entries, sent again with nothing new, were refused: write again.
        self.resend = False

    def __bool__(self) -> bool:
        return bool(self.events or self.acks or self.markers or self.resend)

    def put_back(self, newer: _Batch) -> _Batch:
        """``self`` (a batch that failed) in front of ``newer`` (the one that accumulated meanwhile)."""
        for stream, events in self.events.items():
            newer.events[stream] = events + newer.events.get(stream, [])
        for stream, acks in self.after.items():
            newer.after[stream] = acks + newer.after.get(stream, [])
        newer.acks[:0] = self.acks
        newer.markers |= self.markers
        newer.resend = newer.resend or self.resend
        return newer


class EventWriter:
    """Collects events from every running job and writes them in pipelined round trips.

    While one flush is on the wire the next batch accumulates, so under load the deltas of
    one engine step (and of many jobs) share a round trip and a stream entry.

    A job with a result record (``JobOptions.result``: a background response, which any gateway
    reads after its own is gone) has every event appended to that stream as well, in the same
    order and entries of the same encoding, with the same re-creation and retries.

    A job is acked only after its final event is in its reply stream and in its result record:
    its ack goes out in the round trip after the one that wrote the last of them (sharing it with
    the next events); an ack sent sooner would leave a background response in progress forever
    once the record's write failed for good.
    A write Redis refuses (out of memory, a failover) is kept and retried in order, ahead of
    the events that came later; the job stays unacked (and claimed by this engine's
    heartbeat) meanwhile. Events reach Redis at least once: a write resent after a broken
    connection may land twice, and gateways drop the repeats by their sequence numbers.

    A reply stream Redis lost (a restart without persistence) is re-created by the write that
    finds it missing, with the expiry it had (:class:`StreamLives`), so a stream in progress
    loses nothing; a stream this engine never saw, or saw expire, is not (its gateway is gone).
    """

    def __init__(self, redis: aioredis.Redis, codec: Codec, settings: WorkerSettings,
                 metrics: EngineMetrics | None = None) -> None:
        self.lane = open_lane(redis, "events")
        self._redis = redis
        self._codec = codec
        self._settings = settings
        self.metrics = metrics or EngineMetrics.noop()
        self._batch = _Batch()
        self.lives = StreamLives()
        #: What every reply stream's name starts with (the others, result records, have no generation).
        self._replies = Keys(settings.key_prefix).replies("")[:-1]
        #: Writes name the generation they saw (False: Redis's users predate generations).
        self.generations = True
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        #: entry id -> job stream of jobs finished but not yet acked (the heartbeat claims them).
        self.unacked: dict[bytes, str] = {}
        #: Load the scripts (``engines.contract.replies.APPEND``, ``engines.contract.backlog.RELEASE``) before
        #: the next write: at first, and after Redis answered NOSCRIPT.
        self.load_scripts = True

    def emit(self, reply_to: str, event: Event, result: str = "") -> None:
        """Write ``event`` to ``reply_to``, and to the job's result record ``result`` if it has one."""
        events = self._batch.events
        events.setdefault(reply_to, []).append(event)
        if result:
            events.setdefault(result, []).append(event)
        self._idle.clear()
        self._wake.set()

    def redis_trouble(self) -> None:
        """Redis failed another of this engine's connections (it restarted, or failed over): it may
        have lost the end of any stream, so every stream's recent entries go again, now (with or
        without new events): its gateway drops what it already had."""
        self.lives.changed_all()
        if self.lives.resending():
            self._batch.resend = True
            self._idle.clear()
            self._wake.set()

    def mark_output(self, job_key: str) -> None:
        """Record, with the next flush, that a streaming job's output began (so it is never re-run)."""
        self._batch.markers.add(job_key)

    def finish(self, reply_to: str, final: Event, ack: Ack, result: str = "") -> None:
        """Write a job's final event (to ``result`` too, its result record if it has one), then, once
        it is in Redis in each, ack the job."""
        self.unacked[ack.entry_id] = ack.stream
        streams = (reply_to, result) if result and result != reply_to else (reply_to,)
        ack.waits = len(streams)
        batch = self._batch
        for stream in streams:
            batch.events.setdefault(stream, []).append(final)
            batch.after.setdefault(stream, []).append(ack)
        self._idle.clear()
        self._wake.set()

    def ack(self, ack: Ack) -> None:
        """Ack a job that has no final event to write (its client is gone, it is malformed)."""
        self.unacked[ack.entry_id] = ack.stream
        self._batch.acks.append(ack)
        self._idle.clear()
        self._wake.set()

    async def wait_flushed(self) -> None:
        await self._idle.wait()

    async def run(self) -> None:
        backoff = 0.0
        while True:  # ends by cancellation only: a flush must never be cut short by a flag
            await self._wake.wait()
            self._wake.clear()
            batch, self._batch = self._batch, _Batch()
            try:
                retry = await self._write(batch)
            except REDIS_ERRORS as exc:
                # Nothing is known to have landed: all of it again (repeats are harmless); and Redis may
                # have lost the end of any stream (a restart, a failover): their recent entries again too.
                log.warning("writing events failed (%s); retrying", exc)
                self.lives.changed_all()
                self.metrics.background_error("event-writer")
                retry = batch
                retry.resend = bool(self.lives.resending())
            if retry:
                self._batch = retry.put_back(self._batch)
                self._wake.set()
                # NOSCRIPT (Redis is back after a restart) is cured by the load before the next
                # write: no need to wait as long as while it was down.
                backoff = 0.05 if self.load_scripts else min(max(backoff * 2, 0.05), 1.0)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            if not self._batch:
                self._idle.set()

    async def _write(self, batch: _Batch) -> _Batch | None:
        """One round trip; returns what must be written again (or None)."""
        if self.load_scripts:
            self.load_scripts = False
            try:
                for script in (APPEND, RELEASE):
                    await self._redis.script_load(script)  # every primary of a cluster
            except REDIS_ERRORS as exc:
                # Tried all the same; a write that meets NOSCRIPT asks for another load.
                log.warning("could not load the event writer's scripts: %s", exc)
        # XX: a job key Redis lost is restored by the heartbeat (with its lease), never here with
        # the job's deadline; KEEPTTL: the key keeps the life it has.
        cmds: list[tuple[object, ...]] = [("SET", key, OUTPUT_STARTED, "XX", "KEEPTTL") for key in batch.markers]
        maxlen = self._settings.reply_maxlen
        encode = self._codec.encode
        lives = self.lives
        sent = lives.now()
        # The streams with events, and those whose recent entries go again with nothing new (Redis may
        # have lost their end).
        streams = [*batch.events, *(s for s in lives.resending() if s not in batch.events)]
        #: Each stream's new entries: one, unless its events are large (embeddings: split near ENTRY_BYTES).
        pieces = [[encoded(encode, piece) for piece in pieces_of(batch.events.get(reply_to, []))]
                  for reply_to in streams]
        for reply_to, parts in zip(streams, pieces, strict=True):
            # One script per stream, all of its entries or none (its recent ones first when they go again).
            seen = lives.generation(reply_to) if self.generations and reply_to.startswith(self._replies) else None
            cmds.append(append_command(reply_to, lives.resend(reply_to) + parts, maxlen=maxlen,
                                       restore_ms=lives.left(reply_to, sent), seen=seen))
        ack_cmds = [a.commands() for a in batch.acks]
        for c in ack_cmds:
            cmds.extend(c)
        if not cmds:
            return None
        replies = await self.lane.round_trip(cmds)
        retry = _Batch()
        for key, reply in zip(batch.markers, replies, strict=False):
            if isinstance(reply, Exception):
                # A gateway that already showed output fails a re-run attempt on its own; the
                # mark only spares that attempt's work. Retried all the same.
                retry.markers.add(key)
        i = len(batch.markers)
        ready: list[Ack] = []
        for reply_to, parts in zip(streams, pieces, strict=True):
            reply = replies[i]
            i += 1
            if isinstance(reply, Exception) or int(reply[0]) == CHANGED:
                if isinstance(reply, Exception):
                    # Refused: kept, in order, with the acks that wait for it.
                    log.warning("redis refused events for %s: %s", reply_to, reply)
                    if isinstance(reply, NoScriptError):
                        self.load_scripts = True  # Redis restarted or flushed its scripts
                        lives.changed_all()  # (and lost what it held: every stream's recent entries again)
                    elif isinstance(reply, NoPermissionError) and self.generations:
                        log.error("Redis's users predate reply stream generations (engines/contract/acl.py): "
                                  "writing without them; load the ACL file `conduit redis-acl` writes")
                        self.generations = False
                else:
                    # Lost and made again since this engine's last write: nothing written; all of it again,
                    # its recent entries first (the events its gateway may not have read before the loss).
                    log.warning("stream %s was lost by Redis; writing its last entries again", reply_to)
                    lives.changed(reply_to)
                if reply_to in batch.events:
                    retry.events[reply_to] = batch.events[reply_to]
                else:
                    retry.resend = True  # (only its recent entries: they go again with the next write)
                if reply_to in batch.after:
                    retry.after[reply_to] = batch.after[reply_to]
                continue
            # Written (or its gateway is gone: DROPPED; nobody waits for them).
            state, pttl = int(reply[0]), int(reply[1])
            generation = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
            kept = state != DROPPED and self.generations and reply_to.startswith(self._replies)
            lives.heard(reply_to, sent, pttl, generation, parts if kept else [])
            if state == RECREATED:
                log.warning("stream %s was lost by Redis; re-created it (%d ms to live)", reply_to, pttl)
            for a in batch.after.get(reply_to, ()):
                a.waits -= 1
                if a.waits <= 0:  # its final event is in every stream of its job
                    ready.append(a)
        for a, c in zip(batch.acks, ack_cmds, strict=True):
            n = len(c)
            if any(isinstance(r, Exception) for r in replies[i:i + n]):
                retry.acks.append(a)
                if any(isinstance(r, NoScriptError) for r in replies[i:i + n]):
                    self.load_scripts = True  # Redis restarted or flushed its scripts: load before the retry
            else:
                self.unacked.pop(a.entry_id, None)
            i += n
        if ready:
            # Acked in the next round trip, together with whatever was emitted meanwhile.
            self._batch.acks.extend(ready)
            self._wake.set()
        return retry if retry else None

