"""The engine runtime: pulls jobs from Redis Streams, runs them on a backend, writes events.

Independent of the engine kind. One worker per engine process:

* joins the consumer group of each model's job stream and keeps up to
  ``backend.max_concurrency`` jobs in flight (so vLLM's continuous batching sees them together);
* numbers each attempt's events (``seq``) and batches the events of all jobs into one
  pipelined round trip per flush, one stream entry per reply stream; acks a job only once
  its final event is in Redis, and retries refused writes in order;
* heart-beats its presence (a TTL'd registry entry) and its jobs (XCLAIM resets their idle
  time), so only jobs of a dead engine look idle;
* reclaims idle jobs of engines gone from the registry: retried unless a streaming job's
  output may have reached its client (then failed cleanly), dead-lettered after
  ``max_attempts``;
* answers jobs it cannot read or run (unknown kind) with a ``Failed``, aborts jobs whose
  client went away (Pub/Sub cancel channel) and never starts a job whose deadline passed;
* drains on SIGTERM: stops reading, finishes what it holds, deregisters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from engines.backend import Backend, JobRejected
from engines.contract.backlog import RELEASE, release_command
from engines.contract.fairness import PROMOTE, promote_command
from engines.heartbeat import HeartbeatThread
from engines.contract.lane import connect, entry_fields, open_lane, redacted, stream_entries
from engines.contract.store import new_ref, open_image_store
from engines.contract.keys import ENGINE_GROUP, OUTPUT_STARTED, Keys
from engines.contract.messages import (
    JOB_KINDS,
    PROTOCOL_VERSION,
    ChoiceDelta,
    Codec,
    Delta,
    Done,
    EngineInfo,
    Event,
    Failed,
    Generated,
    ImageReady,
    Job,
    Started,
    Usage,
)
from telemetry.instruments import OPERATIONS, EngineMetrics
from telemetry.tracing import SpanKind, Status, StatusCode, Tracing, is_sampled

log = logging.getLogger("conduit.engine")


class WorkerSettings(msgspec.Struct, kw_only=True):
    """Settings of one engine process's worker (built at the entrypoint, passed down)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Talk to a Redis Cluster (also chosen by a ``redis+cluster://`` URL).
    redis_cluster: bool = False
    key_prefix: str = "conduit"
    engine_id: str = ""
    heartbeat_s: float = 1.0
    #: An engine not heard from for this long is gone (registry entry expires).
    engine_ttl_s: float = 5.0
    #: A pending job idle this long belongs to a dead engine and is reclaimed.
    reclaim_idle_ms: int = 5000
    #: ... provided its engine's heartbeat is also this much overdue: after Redis itself
    #: stalled (``DEBUG SLEEP``, a slow fork), every heartbeat is late by the stall, and
    #: running jobs must not be taken from engines that are alive.
    reclaim_grace_ms: int = 2000
    max_attempts: int = 3
    drain_timeout_s: float = 30.0
    #: An event loop that has not taken a turn for this long is wedged (a backend that blocks it,
    #: a hang): the heartbeat thread stops announcing the engine, so its jobs go to other engines
    #: and its readiness probe fails. Far above the longest turn a bounded job takes (~2 s).
    stall_s: float = 20.0
    reply_maxlen: int = 100_000
    dead_letter_maxlen: int = 10_000
    #: How long a cancellation is remembered when its message carries no deadline (older gateways).
    cancel_memory_s: float = 600.0
    #: Where images go (``engines.contract.store``): ``redis`` or a directory every gateway reads too.
    image_store: str = "redis"
    #: How long a stored image stays readable when its job does not say (``Job.output_ttl_ms``).
    image_ttl_s: float = 3600.0


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class _Running:
    job: Job
    stream: str
    entry_id: bytes
    attempt: int
    task: asyncio.Task[None] | None = None
    output_marked: bool = False
    finished: bool = False
    #: Number of the last event emitted for this attempt.
    seq: int = 0
    #: The job's usage, once the backend reported it.
    usage: Usage | None = None
    #: The job's encoded size (bytes), as its model's backlog counts it (``engines.contract.backlog``).
    size: int = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


@dataclass(slots=True)
class _Ack:
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


class _Batch:
    __slots__ = ("events", "after", "acks", "markers")

    def __init__(self) -> None:
        #: reply stream -> events, in emission order.
        self.events: dict[str, list[Event]] = {}
        #: reply stream -> acks of jobs whose final event is among that stream's events: sent
        #: only once those events are in Redis, so a refused write never loses a job.
        self.after: dict[str, list[_Ack]] = {}
        #: acks ready to send (their final event is already written, or they have none).
        self.acks: list[_Ack] = []
        #: job key -> expiry (epoch ms) of streaming jobs whose output began.
        self.markers: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.events or self.acks or self.markers)

    def put_back(self, newer: _Batch) -> _Batch:
        """``self`` (a batch that failed) in front of ``newer`` (the one that accumulated meanwhile)."""
        for stream, events in self.events.items():
            newer.events[stream] = events + newer.events.get(stream, [])
        for stream, acks in self.after.items():
            newer.after[stream] = acks + newer.after.get(stream, [])
        newer.acks[:0] = self.acks
        newer.markers = {**self.markers, **newer.markers}
        return newer


class EventWriter:
    """Collects events from every running job and writes them in pipelined round trips.

    While one flush is on the wire the next batch accumulates, so under load the deltas of
    one engine step (and of many jobs) share a round trip and a stream entry.

    A job is acked only after its final event is in its reply stream: its ack goes out in
    the round trip after the one that wrote the event (sharing it with the next events).
    A write Redis refuses (out of memory, a failover) is kept and retried in order, ahead of
    the events that came later; the job stays unacked (and claimed by this engine's
    heartbeat) meanwhile. Events reach Redis at least once: a write resent after a broken
    connection may land twice, and gateways drop the repeats by their sequence numbers.
    """

    def __init__(self, redis: aioredis.Redis, codec: Codec, settings: WorkerSettings,
                 metrics: EngineMetrics | None = None) -> None:
        self.lane = open_lane(redis, "events")
        self._redis = redis
        self._codec = codec
        self._settings = settings
        self.metrics = metrics or EngineMetrics.noop()
        self._batch = _Batch()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        #: entry id -> job stream of jobs finished but not yet acked (the heartbeat claims them).
        self.unacked: dict[bytes, str] = {}
        #: Load the ack's scripts (``engines.contract.backlog.RELEASE``) before the next write: at first, and
        #: after Redis answered NOSCRIPT.
        self.load_scripts = True

    def emit(self, reply_to: str, event: Event) -> None:
        self._batch.events.setdefault(reply_to, []).append(event)
        self._idle.clear()
        self._wake.set()

    def mark_output(self, job_key: str, expire_at_ms: int) -> None:
        """Record, with the next flush, that a streaming job's output began (so it is never re-run)."""
        self._batch.markers[job_key] = expire_at_ms

    def finish(self, reply_to: str, final: Event, ack: _Ack) -> None:
        """Write a job's final event, then (once it is in Redis) ack the job."""
        self.unacked[ack.entry_id] = ack.stream
        self._batch.events.setdefault(reply_to, []).append(final)
        self._batch.after.setdefault(reply_to, []).append(ack)
        self._idle.clear()
        self._wake.set()

    def ack(self, ack: _Ack) -> None:
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
            except (ConnectionError, OSError, aioredis.RedisError) as exc:
                # Nothing is known to have landed: all of it again (repeats are harmless).
                log.warning("writing events failed (%s); retrying", exc)
                self.metrics.background_error("event-writer")
                retry = batch
            if retry:
                self._batch = retry.put_back(self._batch)
                self._wake.set()
                backoff = min(max(backoff * 2, 0.05), 1.0)
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
                await self._redis.script_load(RELEASE)  # every primary of a cluster
            except (ConnectionError, OSError, aioredis.RedisError) as exc:
                # Events go out all the same; an ack that meets NOSCRIPT asks for another load.
                log.warning("could not load the ack's script: %s", exc)
        cmds: list[tuple[object, ...]] = [("SET", key, OUTPUT_STARTED, "PXAT", at) for key, at in batch.markers.items()]
        maxlen = self._settings.reply_maxlen
        encode = self._codec.encode
        streams = list(batch.events)
        # NOMKSTREAM: a reply stream exists while its gateway lives (it refreshes the stream's
        # expiry); events for a gateway that is gone are dropped, not left to live forever.
        cmds.extend(("XADD", reply_to, "NOMKSTREAM", "MAXLEN", "~", maxlen, "*", b"e", encode(batch.events[reply_to]))
                    for reply_to in streams)
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
                retry.markers[key] = batch.markers[key]
        i = len(batch.markers)
        ready: list[_Ack] = []
        for reply_to in streams:
            reply = replies[i]
            i += 1
            if isinstance(reply, Exception):
                # Refused: kept, in order, with the acks that wait for it.
                log.warning("redis refused events for %s: %s", reply_to, reply)
                retry.events[reply_to] = batch.events[reply_to]
                if reply_to in batch.after:
                    retry.after[reply_to] = batch.after[reply_to]
                continue
            # Written (or its gateway is gone: nil under NOMKSTREAM; nobody waits for them).
            ready.extend(batch.after.get(reply_to, ()))
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


class _Output:
    """The :class:`~engines.backend.JobOutput` of one running job."""

    __slots__ = ("_worker", "_run", "_started")

    def __init__(self, worker: Worker, run: _Running) -> None:
        self._worker = worker
        self._run = run
        self._started = False

    def started(self) -> None:
        if not self._started:
            self._started = True
            run = self._run
            job = run.job
            self._worker.writer.emit(
                job.reply_to,
                Started(job=job.id, engine=self._worker.engine_id, attempt=run.attempt, created=int(time.time()),
                        seq=run.next_seq()),
            )

    def _mark_output(self) -> None:
        run = self._run
        job = run.job
        if not run.output_marked and job.stream:
            # Only a streaming job's output can reach its client before the job ends; a
            # collected one can always be run again from scratch.
            run.output_marked = True
            self._worker.writer.mark_output(self._worker.keys.job(job.model, job.id), job.deadline_ms)

    def delta(self, choices: list[ChoiceDelta], usage: Usage | None = None, total: Generated | None = None) -> None:
        self.started()
        self._mark_output()
        run = self._run
        job = run.job
        self._worker.writer.emit(job.reply_to, Delta(job=job.id, choices=choices, attempt=run.attempt,
                                                     seq=run.next_seq(), usage=usage, total=total))

    async def image(self, data: bytes, *, index: int, format: str, width: int, height: int, seed: int,
                    partial: int | None = None, joined: bool = False, batch: int = 1) -> None:
        self.started()
        worker = self._worker
        job = self._run.job
        ref = new_ref(format)
        # Stored before its event is emitted: a gateway never sees a reference it cannot read.
        await worker.images.put(ref, data, job.output_ttl_ms or int(worker.settings.image_ttl_s * 1000))
        run = self._run
        if run.finished:
            return  # cancelled or failed while the image was being stored
        self._mark_output()
        worker.writer.emit(job.reply_to, ImageReady(
            job=job.id, ref=ref, index=index, format=format, width=width, height=height, seed=seed, partial=partial,
            joined=joined, batch=batch, attempt=run.attempt, seq=run.next_seq()))

    def done(self, usage: Usage) -> None:
        self.started()
        run = self._run
        run.usage = usage
        self._worker.finish(run, Done(job=run.job.id, usage=usage, attempt=run.attempt, seq=run.next_seq()))


class Worker:
    """Runs one backend against the job streams of its models."""

    def __init__(self, backend: Backend, settings: WorkerSettings, metrics: EngineMetrics | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.codec = Codec()
        if settings.stall_s < 1:
            raise ValueError(f"stall_s must be at least 1 s (the event loop's tick is 0.25 s), got {settings.stall_s}")
        self.engine_id = settings.engine_id or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.redis: Any = connect(settings.redis_url, cluster=settings.redis_cluster)
        self.writer = EventWriter(self.redis, self.codec, settings)
        self.images = open_image_store(settings.image_store, self.redis, self.keys)
        self.metrics = metrics or EngineMetrics.noop()
        #: Continues the traces gateways sampled (``Job.traceparent``); None: no spans.
        self.tracing: Tracing | None = None
        self._started_ms = now_ms()
        #: When this engine's heartbeat last reached Redis (monotonic; 0: never).
        self._heartbeat_ok = 0.0
        #: When the event loop last took a turn (monotonic): the heartbeat thread reads it.
        self._loop_tick = time.monotonic()
        self._stalled = False
        self._info_blob = b""  # the encoded EngineInfo, built once the backend has started
        self._kinds = frozenset(backend.kinds) & JOB_KINDS
        self._running: dict[str, _Running] = {}
        #: Jobs read but not started yet (a read across several models can bring more than the
        #: free slots); started in order as slots free, claimed by the heartbeat meanwhile.
        self._waiting: deque[tuple[str, bytes, dict[bytes, bytes]]] = deque()
        #: job id -> epoch ms until which its cancellation is remembered.
        self._cancelled: OrderedDict[str, int] = OrderedDict()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        # Background loops end on this flag, not on cancellation alone: a cancellation that
        # lands inside a Redis call can be swallowed by the client library.
        self._closed = False
        self._streams = {self.keys.jobs(m): m for m in backend.models}

    @property
    def metrics(self) -> EngineMetrics:
        return self._metrics

    @metrics.setter
    def metrics(self, value: EngineMetrics) -> None:
        self._metrics = self.writer.metrics = value

    # ---- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Begin draining: read no new jobs, finish the ones held, then return from run()."""
        self._stopping.set()
        self._slot_free.set()

    async def run(self) -> None:
        """Serve until :meth:`stop`; then drain and deregister."""
        await self.backend.start()
        self._info_blob = self.codec.encode(EngineInfo(
            id=self.engine_id, kind=self.backend.kind, models=list(self.backend.models),
            max_concurrency=self.backend.max_concurrency, host=socket.gethostname(), pid=os.getpid(),
            started_ms=self._started_ms, max_model_len=self.backend.max_model_len,
            max_chars_per_token=self.backend.max_chars_per_token, max_sequences=self.backend.max_sequences,
            protocol=PROTOCOL_VERSION,
            kinds=sorted(self._kinds)))
        if not await self._join():
            await self._close()
            return
        # Its own thread, loop and connection: a job that keeps this loop busy cannot stop it.
        heartbeat = HeartbeatThread(lambda: connect(self.settings.redis_url, cluster=self.settings.redis_cluster),
                                    self._heartbeat_once, self.settings.heartbeat_s, self._heartbeat_failed)
        heartbeat.start()
        tasks = [
            asyncio.create_task(self._tick(), name="loop-tick"),
            asyncio.create_task(self.writer.run(), name="event-writer"),
            asyncio.create_task(self._cancel_listener(), name="cancel-listener"),
            asyncio.create_task(self._every(max(self.settings.reclaim_idle_ms / 2000, 0.2), self._reclaim_once,
                                            "reclaim"), name="reclaim"),
        ]
        log.info("engine %s serving %s (%s, up to %d jobs at once)", self.engine_id,
                 ", ".join(self.backend.models), self.backend.kind, self.backend.max_concurrency)
        try:
            # One reader per job stream: a blocking read stays within one Redis Cluster slot.
            await asyncio.gather(*(self._read_loop(stream) for stream in self._streams))
            await self._drain()
        finally:
            await asyncio.to_thread(heartbeat.stop)  # no beat may re-register it after this
            await self._deregister()
            self._closed = True
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=5)
            if stuck:
                log.warning("background tasks did not stop: %s", ", ".join(t.get_name() for t in stuck))
            await self._close()

    async def _join(self) -> bool:
        """Join the consumer groups and announce this engine, waiting for Redis as long as it
        takes (it may start after the engine, or be restarting): a loaded model is not thrown
        away over it. False if stopped first."""
        delay = 0.5
        while not self._stopping.is_set():
            # This loop is turning (loading the model or waiting for Redis took it, no stall).
            self._loop_tick = time.monotonic()
            try:
                await self._create_groups()
                await self._heartbeat_once(self.redis)
                return True
            except (ConnectionError, OSError, aioredis.RedisError) as exc:
                log.warning("Redis at %s not reachable (%s); retrying in %.1f s", redacted(self.settings.redis_url),
                            exc, delay)
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)
        return False

    async def _close(self) -> None:
        await self.writer.lane.close()
        await self.backend.close()
        await self.redis.aclose()

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``step`` every ``interval`` seconds until closed; an error is logged, counted and
        outlived (bad data or a Redis outage must not end a background duty for good)."""
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                await step()
            except (ConnectionError, OSError, aioredis.RedisError) as exc:
                log.warning("%s: redis unavailable (%s)", name, exc)
                self.metrics.background_error(name)
            except Exception:
                log.exception("%s failed; carrying on", name)
                self.metrics.background_error(name)

    async def _create_groups(self) -> None:
        """Join (creating if needed) the consumer group of every model's job stream."""
        for stream in self._streams:
            try:
                await self.redis.xgroup_create(stream, ENGINE_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _drain(self) -> None:
        # Jobs read but never started go back to the group: another engine reclaims them.
        self._waiting.clear()
        pending = [r.task for r in self._running.values() if r.task is not None]
        if pending:
            log.info("draining %d in-flight jobs", len(pending))
            done, not_done = await asyncio.wait(pending, timeout=self.settings.drain_timeout_s)
            for t in not_done:
                # Left unacked: another engine reclaims them once this one's heartbeat stops.
                t.cancel()
        try:
            await asyncio.wait_for(self.writer.wait_flushed(), timeout=10)
        except TimeoutError:
            log.warning("events still unwritten at exit; their jobs will be reclaimed")

    async def _deregister(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(self.keys.engines, self.engine_id)
            pipe.hdel(self.keys.engine_info, self.engine_id)
            await pipe.execute()
        except (ConnectionError, OSError, aioredis.RedisError):
            log.warning("could not deregister from Redis")

    # ---- reading jobs ------------------------------------------------------------------

    def ready(self) -> bool:
        """Serving: the model is loaded, the engine joined its job streams and its heartbeat
        reached Redis within ``engine_ttl_s`` (so gateways see it), and it is not draining."""
        return (self._heartbeat_ok > 0 and not self._stopping.is_set() and not self._stalled
                and time.monotonic() - self._heartbeat_ok < self.settings.engine_ttl_s)

    def in_flight(self) -> list[tuple[str, int]]:
        """(model, jobs running now) for each model this engine serves."""
        counts = dict.fromkeys(self.backend.models, 0)
        for run in list(self._running.values()):  # read from the metrics server's thread
            counts[run.job.model] = counts.get(run.job.model, 0) + 1
        return list(counts.items())

    def _free(self) -> int:
        return self.backend.max_concurrency - len(self._running) - len(self._waiting)

    async def _read_loop(self, stream: str) -> None:
        read_cmd = ("XREADGROUP", "GROUP", ENGINE_GROUP, self.engine_id, "COUNT")
        model = self._streams[stream]
        lane = open_lane(self.redis, f"jobs-{self._streams[stream]}", blocking=True)  # its own connection: it blocks
        try:
            while not self._stopping.is_set():
                free = self._free()
                if free <= 0:
                    self._slot_free.clear()
                    await self._slot_free.wait()  # set by a finishing job, and by stop()
                    continue
                try:
                    # Every turn with free slots (a job read, a slot freed, a read timed out)
                    # first takes waiting jobs into the stream, in turn by key. When jobs still
                    # wait after that (other engines read the ones promoted here), look again soon.
                    block = 100 if await self._promote(lane, model, free) else 1000
                    # A read blocks at most a second, so a stop takes effect within one; it is
                    # never cut short, so no job is left half-read.
                    (reply,) = await lane.round_trip([(*read_cmd, free, "BLOCK", block, "STREAMS", stream, ">")])
                    if isinstance(reply, Exception):
                        raise reply
                except (ConnectionError, OSError, aioredis.RedisError) as exc:
                    log.warning("reading jobs failed (%s); retrying", exc)
                    self.metrics.background_error("read-jobs")
                    await asyncio.sleep(0.5)
                    if "NOGROUP" in str(exc):
                        # Redis lost its data (restarted without persistence): rejoin.
                        await self._try(self._create_groups())
                    continue
                for _stream, entries in stream_entries(reply):
                    for entry_id, fields in entries:
                        if fields:  # nil: deleted after it was delivered
                            self._waiting.append((stream, entry_id, entry_fields(fields)))
                self._start_waiting()
        finally:
            await lane.close()

    async def _promote(self, lane: Any, model: str, free: int) -> int:
        """Move up to ``free`` waiting jobs of ``model`` into its stream (``engines.contract.fairness``);
        returns how many still wait."""
        cmd = promote_command(self.keys, model, free)
        (reply,) = await lane.round_trip([cmd])
        if isinstance(reply, NoScriptError):  # Redis restarted or flushed its scripts
            await self.redis.script_load(PROMOTE)
            (reply,) = await lane.round_trip([cmd])
        if isinstance(reply, Exception):
            # Refused (a failover, out of memory): what is in the stream is read all the same.
            log.warning("promoting waiting jobs of %s failed: %s", model, reply)
            self.metrics.background_error("promote")
            return 0
        return int(reply)

    def _start_waiting(self) -> None:
        while self._waiting and len(self._running) < self.backend.max_concurrency and not self._stopping.is_set():
            stream, entry_id, fields = self._waiting.popleft()
            self._accept(stream, entry_id, fields, attempt=1)

    async def _try(self, op: Coroutine[Any, Any, None]) -> None:
        try:
            await op
        except (ConnectionError, OSError, aioredis.RedisError) as exc:
            log.warning("redis still unavailable: %s", exc)

    def _accept(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], attempt: int) -> None:
        model = self._streams[stream]
        try:
            job = self.codec.decode_job(fields[b"j"])
        except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
            self._refuse_malformed(stream, model, entry_id, fields, attempt)
            return
        run = _Running(job=job, stream=stream, entry_id=entry_id, attempt=attempt, size=len(fields[b"j"]))
        if job.kind not in self._kinds:
            self.metrics.job_finished(model, "unsupported")
            self.finish(run, Failed(job=job.id, message=f"No engine of model `{model}` runs `{job.kind}` requests "
                                    f"(this one runs: {', '.join(sorted(self._kinds))}).", code="unsupported_job_kind",
                                    status=501, type="invalid_request_error", attempt=attempt, seq=run.next_seq()))
            return
        if job.deadline_ms and now_ms() >= job.deadline_ms:
            self.metrics.job_finished(job.model, "expired")
            self.finish(run, Failed(job=job.id, message="The request's deadline passed before an engine could start it.",
                                    code="deadline_exceeded", status=504, type="timeout_error", attempt=attempt,
                                    seq=run.next_seq()))
            return
        if job.id in self._cancelled:
            # Its client left while it waited: not a moment of compute spent on it.
            self.metrics.job_finished(job.model, "skipped")
            self.writer.ack(self._ack_of(run))
            return
        if job.created_ms and attempt == 1:
            self.metrics.queue_wait(job.model, max(now_ms() - job.created_ms, 0) / 1000)
        self._running[job.id] = run
        run.task = asyncio.create_task(self._run_job(run), name=f"job-{job.id}")

    def _refuse_malformed(self, stream: str, model: str, entry_id: bytes, fields: dict[bytes, bytes],
                          attempt: int) -> None:
        """A job this engine cannot read: answered with a 400 if its sender can be named, and
        acked either way (no engine of this version could run it)."""
        self.metrics.job_finished(model, "malformed")
        try:
            header = self.codec.decode_job_header(fields[b"j"])
        except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
            log.error("dropping unreadable job entry %s on %s", entry_id, stream)
            self.writer.ack(_Ack(stream, entry_id, None))
            return
        log.error("refusing malformed job %s on %s", header.id, stream)
        self.writer.finish(header.reply_to, Failed(
            job=header.id, message="The engine could not read this request (a newer or damaged job).",
            code="malformed_job", status=400, type="invalid_request_error", attempt=attempt, seq=1),
            _Ack(stream, entry_id, self.keys.job(model, header.id), self._share_of(model, header.tenant, header.id),
                 release_command(self.keys, model, header.id, len(fields[b"j"]), header.tenant)))

    async def _run_job(self, run: _Running) -> None:
        job = run.job
        out = _Output(self, run)
        started = time.perf_counter()
        # Attributes are built only for a sampled trace (most are not, at a 10% ratio).
        span = self._span(run) if self.tracing is not None and is_sampled(job.traceparent) else None
        outcome = "interrupted"
        try:
            await self.backend.run(job, out)
            if not run.finished:
                outcome = "error"
                log.error("job %s: the backend ended it without a result (traceparent %s)", job.id,
                          job.traceparent or "-")
                self.metrics.job_finished(job.model, "error")
                self.finish(run, Failed(job=job.id, message="The engine ended the job without a result.",
                                        attempt=run.attempt, seq=run.next_seq()))
                return
            outcome = "ok"
            # After the event writer's turn: metrics must not delay the final flush.
            asyncio.get_running_loop().call_soon(self.metrics.job_finished, job.model, "ok",
                                                 time.perf_counter() - started)
        except JobRejected as exc:
            outcome = "rejected"
            self.metrics.job_finished(job.model, "rejected")
            self.finish(run, Failed(job=job.id, message=exc.message, code=exc.code, status=exc.status,
                                    type=exc.type, param=exc.param, attempt=run.attempt, seq=run.next_seq()))
        except asyncio.CancelledError:
            if self._stopping.is_set() and job.id not in self._cancelled:
                raise  # drain timed out: left pending (unacked), so another engine reclaims it
            outcome = "cancelled"
            self.metrics.job_finished(job.model, "cancelled")
            if not run.finished:  # the client is gone: ack without a final event
                run.finished = True
                self.writer.ack(self._ack_of(run))
        except Exception:
            outcome = "error"
            log.exception("job %s failed (traceparent %s)", job.id, job.traceparent or "-")
            self.metrics.job_finished(job.model, "error")
            self.finish(run, Failed(job=job.id, message="The engine failed while running the request.",
                                    attempt=run.attempt, seq=run.next_seq()))
        finally:
            self._release(run)
            if span is not None:
                _end_span(span, run, outcome)

    def _span(self, run: _Running) -> Any:
        """The job's span in its client's trace (None when that trace is not sampled)."""
        job = run.job
        attrs: dict[str, Any] = {"gen_ai.operation.name": OPERATIONS.get(job.kind, job.kind),
                                 "gen_ai.request.model": job.model, "messaging.system": "redis",
                                 "messaging.operation.type": "process", "messaging.destination.name": run.stream,
                                 "messaging.message.id": job.id, "conduit.engine.id": self.engine_id,
                                 "conduit.job.attempt": run.attempt}
        if job.created_ms:
            attrs["conduit.job.queue_wait_s"] = max(now_ms() - job.created_ms, 0) / 1000
        name = f"{attrs['gen_ai.operation.name']} {job.model}"
        return self.tracing.continued(job.traceparent, name, SpanKind.CONSUMER, attrs)  # type: ignore[union-attr]

    def finish(self, run: _Running, final: Done | Failed) -> None:
        """Write the final event; the job is acked once it is in Redis."""
        if run.finished:
            return
        run.finished = True
        self.writer.finish(run.job.reply_to, final, self._ack_of(run))

    def _ack_of(self, run: _Running) -> _Ack:
        job = run.job
        return _Ack(run.stream, run.entry_id, self.keys.job(job.model, job.id),
                    self._share_of(job.model, job.tenant, job.id),
                    release_command(self.keys, job.model, job.id, run.size, job.tenant))

    def _share_of(self, model: str, tenant: str, job_id: str) -> tuple[str, str] | None:
        return (self.keys.tenant_backlog(model, tenant), job_id) if tenant else None

    def _release(self, run: _Running) -> None:
        if self._running.get(run.job.id) is run:
            del self._running[run.job.id]
            self._start_waiting()
            self._slot_free.set()

    # ---- cancellation ------------------------------------------------------------------

    async def _cancel_listener(self) -> None:
        while not self._closed:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.keys.cancel_channel)
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    self.cancel(*parse_cancel(message["data"]))
            except (ConnectionError, OSError, aioredis.RedisError) as exc:
                log.warning("cancel listener lost Redis (%s); resubscribing", exc)
                self.metrics.background_error("cancel-listener")
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("cancel listener failed; resubscribing")
                self.metrics.background_error("cancel-listener")
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()

    def cancel(self, job_id: str, deadline_ms: int | None = None) -> None:
        """Abort a running job, or remember to skip it if it arrives later (until its deadline,
        after which no engine would start it anyway)."""
        now = now_ms()
        self._cancelled[job_id] = deadline_ms if deadline_ms else now + int(self.settings.cancel_memory_s * 1000)
        self._cancelled.move_to_end(job_id)
        while self._cancelled and next(iter(self._cancelled.values())) < now:
            self._cancelled.popitem(last=False)
        if len(self._cancelled) > 100_000:
            self._cancelled.popitem(last=False)
        run = self._running.get(job_id)
        if run is not None and run.task is not None and not run.finished:
            log.info("aborting job %s: client went away", job_id)
            run.task.cancel()

    # ---- heartbeats and reclaiming -----------------------------------------------------

    async def _tick(self) -> None:
        while not self._closed:
            self._loop_tick = time.monotonic()
            await asyncio.sleep(0.25)

    async def _heartbeat_once(self, redis: Any) -> None:
        """Announce this engine and re-claim the jobs it holds (on the heartbeat thread, with its
        own client ``redis``; what it reads of the worker's state it copies first). Not while the
        event loop is wedged: then the engine's entry expires and its jobs are reclaimed."""
        stalled = time.monotonic() - self._loop_tick > self.settings.stall_s
        if stalled != self._stalled:
            self._stalled = stalled
            if stalled:
                log.error("the event loop took no turn for %.0f s: no more heartbeats until it does (other engines "
                          "take this one's jobs)", self.settings.stall_s)
                self.metrics.background_error("stalled")
            else:
                log.warning("the event loop is turning again: heart-beating")
        if stalled:
            return
        now = now_ms()
        pipe = redis.pipeline(transaction=False)
        pipe.zadd(self.keys.engines, {self.engine_id: now + int(self.settings.engine_ttl_s * 1000)})
        pipe.hset(self.keys.engine_info, self.engine_id, self._info_blob)
        for model in self.backend.models:
            pipe.hset(self.keys.models_seen, model, now)
        by_stream: dict[str, list[bytes]] = {}
        for stream, entry_id in self._held():
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            # Re-claiming our own jobs resets their idle time: only a dead engine's jobs age.
            pipe.xclaim(stream, ENGINE_GROUP, self.engine_id, 0, ids, justid=True)
        await pipe.execute()
        self._heartbeat_ok = time.monotonic()

    def _heartbeat_failed(self, exc: BaseException) -> None:
        if isinstance(exc, (ConnectionError, OSError, aioredis.RedisError, TimeoutError)):
            log.warning("heartbeat: redis unavailable (%s)", exc)
        else:
            log.error("heartbeat failed; carrying on", exc_info=exc)
        self.metrics.background_error("heartbeat")

    def _held(self) -> Iterator[tuple[str, bytes]]:
        """(job stream, entry id) of every job this engine holds: running, read but waiting for
        a slot, or finished but not yet acked. Read from the heartbeat thread too: each collection
        is copied whole first (one C call, under the GIL), never iterated while it may change."""
        for run in list(self._running.values()):
            yield run.stream, run.entry_id
        for stream, entry_id, _ in list(self._waiting):
            yield stream, entry_id
        for entry_id, stream in list(self.writer.unacked.items()):
            yield stream, entry_id

    async def _reclaim_once(self) -> None:
        """Take over the jobs of engines that stopped heart-beating.

        Only entries idle for ``reclaim_idle_ms`` whose consumer is gone from the registry (or
        overdue by ``reclaim_grace_ms``) are taken, so a Redis stall that ages every entry
        does not move running jobs between live engines. Entries of this engine that it does
        not hold (a read whose reply was lost) are taken back too.
        """
        if self._stopping.is_set():
            return  # a draining engine takes on nothing new
        now = now_ms()
        live = {e.decode() for e in await self.redis.zrangebyscore(
            self.keys.engines, now - self.settings.reclaim_grace_ms, "+inf")}
        live.add(self.engine_id)
        for stream, model in self._streams.items():
            free = self._free()
            if free <= 0:
                return
            pending = await self.redis.xpending_range(stream, ENGINE_GROUP, min="-", max="+", count=max(free * 4, 16),
                                                      idle=self.settings.reclaim_idle_ms)
            held = {entry_id for _, entry_id in self._held()}
            orphans = {p["message_id"]: int(p["times_delivered"]) for p in pending
                       if (p["consumer"].decode() not in live
                           or (p["consumer"].decode() == self.engine_id and p["message_id"] not in held))}
            if not orphans:
                continue
            claimed = await self.redis.xclaim(stream, ENGINE_GROUP, self.engine_id, self.settings.reclaim_idle_ms,
                                              list(orphans)[:free])
            for entry_id, fields in claimed:
                if fields:
                    # XCLAIM counted this delivery: the attempt is the count before it plus one.
                    await self._retry_claimed(stream, model, entry_id, fields, orphans.get(entry_id, 1) + 1)

    async def _retry_claimed(self, stream: str, model: str, entry_id: bytes, fields: dict[bytes, bytes],
                             attempt: int) -> None:
        self.metrics.job_reclaimed(model)
        try:
            job = self.codec.decode_job(fields[b"j"])
        except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
            self._refuse_malformed(stream, model, entry_id, fields, attempt)
            return
        run = _Running(job=job, stream=stream, entry_id=entry_id, attempt=attempt, size=len(fields[b"j"]))
        if await self.redis.get(self.keys.job(model, job.id)) == OUTPUT_STARTED:
            log.warning("job %s was lost mid-output by its engine; failing it", job.id)
            self.metrics.job_finished(model, "lost")
            self.finish(run, Failed(job=job.id, message="The engine serving this request stopped after output began; "
                                    "retry the request.", code="engine_lost", status=502, attempt=attempt,
                                    seq=run.next_seq()))
            return
        if attempt > self.settings.max_attempts:
            log.error("job %s failed %d attempts; dead-lettering it", job.id, attempt - 1)
            await self.redis.xadd(self.keys.dead_letters(model), {b"j": fields[b"j"], b"attempts": attempt - 1},
                                  maxlen=self.settings.dead_letter_maxlen, approximate=True)
            self.metrics.job_finished(model, "dead_letter")
            self.finish(run, Failed(job=job.id, message=f"The request failed on {attempt - 1} engines in a row.",
                                    code="engine_failed", status=502, attempt=attempt, seq=run.next_seq()))
            return
        log.info("retrying job %s (attempt %d)", job.id, attempt)
        self._accept(stream, entry_id, fields, attempt=attempt)


def _end_span(span: Any, run: _Running, outcome: str) -> None:
    span.set_attribute("conduit.job.outcome", outcome)
    if run.usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", run.usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", run.usage.completion_tokens)
    if outcome == "error":
        span.set_status(Status(StatusCode.ERROR, "the engine failed while running the job"))
    span.end()


def parse_cancel(data: bytes) -> tuple[str, int | None]:
    """A cancel message: ``job_id`` (older gateways) or ``job_id deadline_ms``."""
    job_id, _, deadline = data.decode().partition(" ")
    return job_id, int(deadline) if deadline.isdigit() else None
