"""The engine runtime: pulls jobs from Redis Streams, runs them on a backend, writes events.

Independent of the engine kind. One worker per engine process:

* joins the consumer group of each model's job stream and keeps up to
  ``backend.max_concurrency`` jobs in flight (so vLLM's continuous batching sees them together);
* batches the events of all jobs into one pipelined round trip per flush, one stream
  entry per reply stream, and acks a job in the same round trip as its final event;
* heart-beats its presence (a TTL'd registry entry) and its in-flight jobs (XCLAIM resets
  their idle time), so only jobs of a dead engine look idle;
* reclaims idle jobs of dead engines (XAUTOCLAIM): retried if no output reached the client,
  failed cleanly if some did, dead-lettered after ``max_attempts``;
* aborts jobs whose client went away (Pub/Sub cancel channel) and never starts a job whose
  deadline passed;
* drains on SIGTERM: stops reading, finishes what it holds, deregisters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from engines.backend import Backend, JobRejected
from engines.lane import RedisLane, stream_entries
from engines.wire import (
    ENGINE_GROUP,
    ChoiceDelta,
    Codec,
    Delta,
    Done,
    EngineInfo,
    Event,
    Failed,
    Job,
    Keys,
    Started,
    Usage,
)
from telemetry.instruments import EngineMetrics

log = logging.getLogger("conduit.engine")


class WorkerSettings(msgspec.Struct, kw_only=True):
    """Settings of one engine process's worker (built at the entrypoint, passed down)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "conduit"
    engine_id: str = ""
    heartbeat_s: float = 1.0
    #: An engine not heard from for this long is gone (registry entry expires).
    engine_ttl_s: float = 5.0
    #: A pending job idle this long belongs to a dead engine and is reclaimed.
    reclaim_idle_ms: int = 5000
    max_attempts: int = 3
    drain_timeout_s: float = 30.0
    reply_maxlen: int = 100_000
    dead_letter_maxlen: int = 10_000


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


class _Batch:
    __slots__ = ("events", "acks", "markers")

    def __init__(self) -> None:
        self.events: dict[str, list[Event]] = {}
        #: (job stream, entry id, "output started" key of a job that had output, else None)
        self.acks: list[tuple[str, bytes, str | None]] = []
        #: entry id -> ("output started" key, expiry in epoch ms) of jobs whose output began.
        self.markers: dict[bytes, tuple[str, int]] = {}


class EventWriter:
    """Collects events from every running job and writes them in one pipelined round trip.

    While one flush is on the wire the next batch accumulates, so under load the deltas of
    one engine step (and of many jobs) share a round trip and a stream entry.
    """

    def __init__(self, redis: aioredis.Redis, codec: Codec, settings: WorkerSettings) -> None:
        self.lane = RedisLane(redis, "events")
        self._codec = codec
        self._settings = settings
        self._batch = _Batch()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def emit(self, reply_to: str, event: Event) -> None:
        self._batch.events.setdefault(reply_to, []).append(event)
        self._idle.clear()
        self._wake.set()

    def mark_output(self, entry_id: bytes, key: str, expire_at_ms: int) -> None:
        """Record, with the next flush, that a job's output began (so it is never re-run).

        The marker is deleted when the job is acked; its expiry (the job's deadline) only
        cleans up after an engine that died holding it.
        """
        self._batch.markers[entry_id] = (key, expire_at_ms)

    def ack(self, stream: str, entry_id: bytes, marker: str | None = None) -> None:
        """Ack (and delete) a job after the events emitted before this call are written;
        ``marker`` is its "output started" key, if its output began."""
        self._batch.acks.append((stream, entry_id, marker))
        self._idle.clear()
        self._wake.set()

    async def wait_flushed(self) -> None:
        await self._idle.wait()

    async def run(self) -> None:
        while True:  # ends by cancellation only: a flush must never be cut short by a flag
            await self._wake.wait()
            self._wake.clear()
            batch, self._batch = self._batch, _Batch()
            while True:
                try:
                    await self._write(batch)
                    break
                except (ConnectionError, OSError, aioredis.RedisError) as exc:
                    # Keep the batch: events must not be lost to a Redis blip.
                    log.warning("writing events failed (%s); retrying", exc)
                    await asyncio.sleep(0.2)
            if not self._wake.is_set():
                self._idle.set()

    async def _write(self, batch: _Batch) -> None:
        markers = batch.markers
        done_markers: list[str] = []
        for _, entry_id, marker in batch.acks:
            # A job acked in the round trip that marks it needs no marker at all; one marked
            # earlier has its marker deleted with the ack.
            if markers.pop(entry_id, None) is None and marker is not None:
                done_markers.append(marker)
        cmds: list[tuple[object, ...]] = [("SET", key, b"1", "PXAT", at) for key, at in markers.values()]
        maxlen = self._settings.reply_maxlen
        encode = self._codec.encode
        cmds.extend(("XADD", reply_to, "MAXLEN", "~", maxlen, "*", b"e", encode(events))
                    for reply_to, events in batch.events.items())
        for stream, entry_id, _ in batch.acks:
            cmds.append(("XACK", stream, ENGINE_GROUP, entry_id))
            cmds.append(("XDEL", stream, entry_id))
        if done_markers:
            cmds.append(("DEL", *done_markers))
        for reply in await self.lane.round_trip(cmds):
            if isinstance(reply, Exception):
                log.error("redis refused an event write: %s", reply)


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
            job = self._run.job
            self._worker.writer.emit(
                job.reply_to,
                Started(job=job.id, engine=self._worker.engine_id, attempt=self._run.attempt, created=int(time.time())),
            )

    def delta(self, choices: list[ChoiceDelta], usage: Usage | None = None) -> None:
        self.started()
        run = self._run
        if not run.output_marked:
            run.output_marked = True
            job = run.job
            self._worker.writer.mark_output(run.entry_id, self._worker.keys.output_started(job.model, job.id),
                                            job.deadline_ms + 60_000)
        self._worker.writer.emit(run.job.reply_to,
                                 Delta(job=run.job.id, choices=choices, attempt=run.attempt, usage=usage))

    def done(self, usage: Usage) -> None:
        self.started()
        self._worker.finish(self._run, Done(job=self._run.job.id, usage=usage, attempt=self._run.attempt))


class Worker:
    """Runs one backend against the job streams of its models."""

    def __init__(self, backend: Backend, settings: WorkerSettings, metrics: EngineMetrics | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.codec = Codec()
        self.engine_id = settings.engine_id or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.metrics = metrics or EngineMetrics.noop()
        self.redis: aioredis.Redis = aioredis.from_url(settings.redis_url, decode_responses=False)
        self.writer = EventWriter(self.redis, self.codec, settings)
        self._started_ms = now_ms()
        self._info_blob = b""  # the encoded EngineInfo, built once the backend has started
        self._running: dict[str, _Running] = {}
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        # Background loops end on this flag, not on cancellation alone: a cancellation that
        # lands inside a Redis call can be swallowed by the client library.
        self._closed = False
        self._streams = {self.keys.jobs(m): m for m in backend.models}

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
            started_ms=self._started_ms, max_model_len=self.backend.max_model_len))
        await self._create_groups()
        await self._heartbeat_once()
        tasks = [
            asyncio.create_task(self.writer.run(), name="event-writer"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._cancel_listener(), name="cancel-listener"),
            asyncio.create_task(self._reclaim_loop(), name="reclaim"),
        ]
        log.info("engine %s serving %s (%s, up to %d jobs at once)", self.engine_id,
                 ", ".join(self.backend.models), self.backend.kind, self.backend.max_concurrency)
        try:
            await self._read_loop()
            await self._drain()
        finally:
            await self._deregister()
            self._closed = True
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=5)
            if stuck:
                log.warning("background tasks did not stop: %s", ", ".join(t.get_name() for t in stuck))
            await self.writer.lane.close()
            await self.backend.close()
            await self.redis.aclose()

    async def _create_groups(self) -> None:
        """Join (creating if needed) the consumer group of every model's job stream."""
        for stream in self._streams:
            try:
                await self.redis.xgroup_create(stream, ENGINE_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _drain(self) -> None:
        pending = [r.task for r in self._running.values() if r.task is not None]
        if pending:
            log.info("draining %d in-flight jobs", len(pending))
            done, not_done = await asyncio.wait(pending, timeout=self.settings.drain_timeout_s)
            for t in not_done:
                # Left unacked: another engine reclaims them once this one's heartbeat stops.
                t.cancel()
        await asyncio.wait_for(self.writer.wait_flushed(), timeout=10)

    async def _deregister(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(self.keys.engines, self.engine_id)
            pipe.hdel(self.keys.engine_info, self.engine_id)
            await pipe.execute()
        except (ConnectionError, OSError, aioredis.RedisError):
            log.warning("could not deregister from Redis")

    # ---- reading jobs ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        read_cmd = ("XREADGROUP", "GROUP", ENGINE_GROUP, self.engine_id, "COUNT")
        tail = ("BLOCK", 1000, "STREAMS", *self._streams, *(">" for _ in self._streams))
        lane = RedisLane(self.redis, "jobs", blocking=True)  # its own connection: XREADGROUP blocks
        try:
            while not self._stopping.is_set():
                free = self.backend.max_concurrency - len(self._running)
                if free <= 0:
                    self._slot_free.clear()
                    await self._slot_free.wait()  # set by a finishing job, and by stop()
                    continue
                try:
                    # A read blocks at most a second, so a stop takes effect within one; it is
                    # never cut short, so no job is left half-read.
                    (reply,) = await lane.round_trip([(*read_cmd, free, *tail)])
                    if isinstance(reply, Exception):
                        raise reply
                except (ConnectionError, OSError, aioredis.RedisError) as exc:
                    log.warning("reading jobs failed (%s); retrying", exc)
                    await asyncio.sleep(0.5)
                    if "NOGROUP" in str(exc):
                        # Redis lost its data (restarted without persistence): rejoin.
                        await self._try(self._create_groups())
                    continue
                for stream_key, entries in stream_entries(reply):
                    stream = stream_key.decode()
                    for entry_id, fields in entries:
                        self._accept(stream, entry_id, dict(zip(fields[::2], fields[1::2], strict=True)),
                                     attempt=1)
        finally:
            await lane.close()

    async def _try(self, op: Coroutine[Any, Any, None]) -> None:
        try:
            await op
        except (ConnectionError, OSError, aioredis.RedisError) as exc:
            log.warning("redis still unavailable: %s", exc)

    def _accept(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], attempt: int) -> None:
        try:
            job = self.codec.decode_job(fields[b"j"])
        except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
            log.error("dropping malformed job entry %s on %s", entry_id, stream)
            self.writer.ack(stream, entry_id)
            return
        run = _Running(job=job, stream=stream, entry_id=entry_id, attempt=attempt)
        if job.deadline_ms and now_ms() >= job.deadline_ms:
            self.metrics.job_finished(job.model, "expired")
            self.finish(run, Failed(job=job.id, message="The request's deadline passed before an engine could start it.",
                                    code="deadline_exceeded", status=504, type="timeout_error", attempt=attempt))
            return
        if job.id in self._cancelled:
            self.metrics.job_finished(job.model, "cancelled")
            self.writer.ack(stream, entry_id)
            return
        self._running[job.id] = run
        run.task = asyncio.create_task(self._run_job(run), name=f"job-{job.id}")

    async def _run_job(self, run: _Running) -> None:
        job = run.job
        out = _Output(self, run)
        started = time.perf_counter()
        try:
            await self.backend.run(job, out)
            if not run.finished:
                self.finish(run, Failed(job=job.id, message="The engine ended the job without a result.", attempt=run.attempt))
            # After the event writer's turn: metrics must not delay the final flush.
            asyncio.get_running_loop().call_soon(self.metrics.job_finished, job.model, "ok",
                                                 time.perf_counter() - started)
        except JobRejected as exc:
            self.metrics.job_finished(job.model, "rejected")
            self.finish(run, Failed(job=job.id, message=exc.message, code=exc.code, status=exc.status,
                                    type=exc.type, param=exc.param, attempt=run.attempt))
        except asyncio.CancelledError:
            if self._stopping.is_set() and job.id not in self._cancelled:
                raise  # drain timed out: left pending (unacked), so another engine reclaims it
            self.metrics.job_finished(job.model, "cancelled")
            if not run.finished:  # the client is gone: ack without a final event
                run.finished = True
                self.writer.ack(run.stream, run.entry_id, self._marker(run))
        except Exception:
            log.exception("job %s failed", job.id)
            self.metrics.job_finished(job.model, "error")
            self.finish(run, Failed(job=job.id, message="The engine failed while running the request.",
                                    attempt=run.attempt))
        finally:
            self._release(run)

    def finish(self, run: _Running, final: Done | Failed) -> None:
        """Write the final event and ack the job in the same round trip."""
        if run.finished:
            return
        run.finished = True
        self.writer.emit(run.job.reply_to, final)
        self.writer.ack(run.stream, run.entry_id, self._marker(run))

    def _marker(self, run: _Running) -> str | None:
        return self.keys.output_started(run.job.model, run.job.id) if run.output_marked else None

    def _release(self, run: _Running) -> None:
        if self._running.get(run.job.id) is run:
            del self._running[run.job.id]
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
                    self.cancel(message["data"].decode())
            except (ConnectionError, OSError, aioredis.RedisError) as exc:
                log.warning("cancel listener lost Redis (%s); resubscribing", exc)
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()

    def cancel(self, job_id: str) -> None:
        """Abort a running job, or remember to skip it if it arrives later."""
        now = time.monotonic()
        self._cancelled[job_id] = now
        while self._cancelled and next(iter(self._cancelled.values())) < now - 600:
            self._cancelled.popitem(last=False)
        if len(self._cancelled) > 100_000:
            self._cancelled.popitem(last=False)
        run = self._running.get(job_id)
        if run is not None and run.task is not None and not run.finished:
            log.info("aborting job %s: client went away", job_id)
            run.task.cancel()

    # ---- heartbeats and reclaiming -----------------------------------------------------

    async def _heartbeat_once(self) -> None:
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.engines, {self.engine_id: now + int(self.settings.engine_ttl_s * 1000)})
        pipe.hset(self.keys.engine_info, self.engine_id, self._info_blob)
        for model in self.backend.models:
            pipe.hset(self.keys.models_seen, model, now)
        by_stream: dict[str, list[bytes]] = {}
        for run in self._running.values():
            by_stream.setdefault(run.stream, []).append(run.entry_id)
        for stream, ids in by_stream.items():
            # Re-claiming our own jobs resets their idle time: only a dead engine's jobs age.
            pipe.xclaim(stream, ENGINE_GROUP, self.engine_id, 0, ids, justid=True)
        await pipe.execute()

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self._heartbeat_once()
            except (ConnectionError, OSError, aioredis.RedisError) as exc:
                log.warning("heartbeat failed: %s", exc)

    async def _reclaim_loop(self) -> None:
        interval = max(self.settings.reclaim_idle_ms / 2000, 0.2)
        while not self._closed:
            await asyncio.sleep(interval)
            if self._stopping.is_set():
                continue
            try:
                await self._reclaim_once()
            except (ConnectionError, OSError, aioredis.RedisError) as exc:
                log.warning("reclaiming failed: %s", exc)

    async def _reclaim_once(self) -> None:
        for stream, model in self._streams.items():
            free = self.backend.max_concurrency - len(self._running)
            if free <= 0:
                return
            _, claimed, _ = await self.redis.xautoclaim(
                stream, ENGINE_GROUP, self.engine_id, self.settings.reclaim_idle_ms, "0-0", count=free)
            for entry_id, fields in claimed:
                if not fields:
                    continue
                await self._retry_claimed(stream, model, entry_id, fields)

    async def _retry_claimed(self, stream: str, model: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        info = await self.redis.xpending_range(stream, ENGINE_GROUP, min=entry_id, max=entry_id, count=1)
        attempt = int(info[0]["times_delivered"]) if info else 2
        try:
            job = self.codec.decode_job(fields[b"j"])
        except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
            self.writer.ack(stream, entry_id)
            return
        run = _Running(job=job, stream=stream, entry_id=entry_id, attempt=attempt)
        if await self.redis.exists(self.keys.output_started(model, job.id)):
            log.warning("job %s was lost mid-output by its engine; failing it", job.id)
            self.metrics.job_finished(model, "lost")
            run.output_marked = True  # so finishing deletes the dead engine's marker
            self.finish(run, Failed(job=job.id, message="The engine serving this request stopped after output began; "
                                    "retry the request.", code="engine_lost", status=502, attempt=attempt))
            return
        if attempt > self.settings.max_attempts:
            log.error("job %s failed %d attempts; dead-lettering it", job.id, attempt - 1)
            await self.redis.xadd(self.keys.dead_letters(model), {b"j": fields[b"j"], b"attempts": attempt - 1},
                                  maxlen=self.settings.dead_letter_maxlen, approximate=True)
            self.metrics.job_finished(model, "dead_letter")
            self.finish(run, Failed(job=job.id, message=f"The request failed on {attempt - 1} engines in a row.",
                                    code="engine_failed", status=502, attempt=attempt))
            return
        log.info("retrying job %s (attempt %d)", job.id, attempt)
        self._accept(stream, entry_id, fields, attempt=attempt)
