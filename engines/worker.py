"""The engine runtime: pulls jobs from Redis Streams, runs them on a backend, writes events.

Independent of the engine kind. One worker per engine process; :class:`Worker` coordinates the
collaborators it owns, each in a module of its own:

* ``engines.intake``: joins the consumer group of each model's job stream and keeps up to
  ``backend.max_concurrency`` jobs in flight (so vLLM's continuous batching sees them together),
  promoting waiting jobs (fair queueing); answers jobs it cannot read or run (unknown kind) with
  a ``Failed`` and never starts a job whose deadline passed;
* ``engines.running``: runs each job on the backend and numbers its attempt's events (``seq``);
* ``engines.events``: batches the events of all jobs into one pipelined round trip per flush,
  one stream entry per reply stream; acks a job only once its final event is in Redis, and
  retries refused writes in order;
* ``engines.heartbeat``: heart-beats its presence (a TTL'd registry entry) and its jobs (XCLAIM
  resets their idle time), so only jobs of a dead engine look idle;
* ``engines.reclaim``: reclaims idle jobs of engines gone from the registry: retried unless a
  streaming job's output may have reached its client (then failed cleanly), dead-lettered after
  ``max_attempts``;
* ``engines.cancel``: aborts jobs whose client went away (Pub/Sub cancel channel);
* ``engines.media``: checks a job's media URLs against the media policy before the backend sees
  it, and fetches the ones the policy allows itself (the backend gets ``data:`` URLs only);

and drains on SIGTERM itself: stops reading, finishes what it holds, deregisters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from engines.backend import Backend
from engines.cancel import Cancellations
from engines.contract.backlog import release_command
from engines.contract.keys import ENGINE_GROUP, Keys
from engines.contract.lane import REDIS_ERRORS, connect, redacted
from engines.contract.media import MediaPolicy
from engines.contract.messages import JOB_KINDS, Codec, Done, Failed
from engines.contract.reach import login_refused
from engines.contract.store import open_image_store
from engines.events import Ack, EventWriter
from engines.heartbeat import HeartbeatThread, Presence
from engines.intake import Intake
from engines.media import MediaGate
from engines.reclaim import Reclaimer
from engines.running import JobRunner, Running, now_ms
from telemetry.engine_instruments import EngineMetrics
from telemetry.tracing import Tracing

log = logging.getLogger("conduit.engine")


class WorkerSettings(msgspec.Struct, kw_only=True):
    """Settings of one engine process's worker (built at the entrypoint, passed down)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: The Redis ACL user (``engine`` in the deployments) and its password, where the URL has none.
    redis_username: str = ""
    redis_password: str = ""
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
    #: Dead letters (jobs that failed ``max_attempts`` times, without their bodies) kept per model ...
    dead_letter_maxlen: int = 10_000
    #: ... and for how long; the stream itself goes this long after its newest entry.
    dead_letter_max_age_s: float = 7 * 86_400.0
    #: How long a cancellation is remembered when its message carries no deadline (older gateways).
    cancel_memory_s: float = 600.0
    #: Where images go (``engines.contract.store``): ``redis`` or a directory every gateway reads too.
    image_store: str = "redis"
    #: How long a stored image stays readable when its job does not say (``Job.output_ttl_ms``).
    image_ttl_s: float = 3600.0
    #: Hosts whose http(s) image URLs this engine fetches (``engines.contract.media``: a name, or
    #: ``*.example.com``); empty, the default: none, only ``data:`` URLs. Give gateways the same list.
    media_domains: list[str] = []
    #: Bytes one job's fetched images may total, and how long fetching one may take.
    media_max_bytes: int = 50 * 1024 * 1024
    media_timeout_s: float = 10.0

    def __repr__(self) -> str:  # the password never reaches a log or a traceback
        return f"WorkerSettings(redis_url={redacted(self.redis_url)!r}, redis_username={self.redis_username!r}, ...)"

    def connect(self) -> Any:
        """A new client of the engines' Redis, as the engine's user."""
        return connect(self.redis_url, cluster=self.redis_cluster, username=self.redis_username,
                       password=self.redis_password)


class Worker:
    """Runs one backend against the job streams of its models.

    It owns what its collaborators share (the Redis client, the event writer, the jobs running,
    the stop and close flags) and its collaborators, each of which holds the worker: ``intake``,
    ``runner``, ``cancellations``, ``presence`` (the heartbeat's) and ``reclaimer``.
    """

    def __init__(self, backend: Backend, settings: WorkerSettings, metrics: EngineMetrics | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.codec = Codec()
        if settings.stall_s < 1:
            raise ValueError(f"stall_s must be at least 1 s (the event loop's tick is 0.25 s), got {settings.stall_s}")
        self.engine_id = settings.engine_id or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.redis: Any = settings.connect()
        self.writer = EventWriter(self.redis, self.codec, settings)
        self.images = open_image_store(settings.image_store, self.redis, self.keys)
        self.media = MediaGate(MediaPolicy(settings.media_domains), max_bytes=settings.media_max_bytes,
                               timeout_s=settings.media_timeout_s)
        self.metrics = metrics or EngineMetrics.noop()
        #: Continues the traces gateways sampled (``Job.traceparent``); None: no spans.
        self.tracing: Tracing | None = None
        self.started_ms = now_ms()
        #: Job kinds this engine runs (``Job.kind``).
        self.kinds = frozenset(backend.kinds) & JOB_KINDS
        #: job id -> the job's run, for every job started and not yet released.
        self.running: dict[str, Running] = {}
        self.slot_free = asyncio.Event()
        self.stopping = asyncio.Event()
        # Background loops end on this flag, not on cancellation alone: a cancellation that
        # lands inside a Redis call can be swallowed by the client library.
        self.closed = False
        #: job stream -> its model.
        self.streams = {self.keys.jobs(m): m for m in backend.models}
        self.intake = Intake(self)
        self.runner = JobRunner(self)
        self.cancellations = Cancellations(self)
        self.presence = Presence(self)
        self.reclaimer = Reclaimer(self)

    @property
    def metrics(self) -> EngineMetrics:
        return self._metrics

    @metrics.setter
    def metrics(self, value: EngineMetrics) -> None:
        self._metrics = self.writer.metrics = value

    # ---- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Begin draining: read no new jobs, finish the ones held, then return from run()."""
        self.stopping.set()
        self.slot_free.set()

    async def run(self) -> None:
        """Serve until :meth:`stop`; then drain and deregister."""
        await self.backend.start()
        self.kinds = frozenset(self.backend.kinds) & JOB_KINDS  # (a backend may learn what it runs as it starts)
        if hasattr(self.backend, "on_models"):  # a backend whose models change (upstream --models auto)
            self.backend.on_models = self.intake.follow
        if hasattr(self.backend, "on_cold"):  # a backend announcing models cold (upstream --upstream-serverless)
            self.backend.on_cold = self.presence.announce
        self.streams = {self.keys.jobs(m): m for m in self.backend.models}  # (known once started)
        self.presence.info_blob = self.presence.info()
        self.metrics.serving(self.backend.models)
        if not await self._join():
            await self._close()
            return
        # Its own thread, loop and connection: a job that keeps this loop busy cannot stop it.
        heartbeat = HeartbeatThread(self.settings.connect,
                                    self.presence.beat, self.settings.heartbeat_s, self.presence.failed)
        heartbeat.start()
        self.presence.heartbeat = heartbeat
        tasks = [
            asyncio.create_task(self.presence.tick(), name="loop-tick"),
            asyncio.create_task(self.writer.run(), name="event-writer"),
            asyncio.create_task(self.cancellations.listen(), name="cancel-listener"),
            asyncio.create_task(self._every(max(self.settings.reclaim_idle_ms / 2000, 0.2),
                                            self.reclaimer.reclaim_once, "reclaim"), name="reclaim"),
        ]
        for t in tasks:
            t.add_done_callback(self._died)
        log.info("engine %s serving %s (%s, up to %d jobs at once)", self.engine_id,
                 ", ".join(self.backend.models), self.backend.kind, self.backend.max_concurrency)
        try:
            # One reader per job stream: a blocking read stays within one Redis Cluster slot.
            for stream in self.streams:
                self.intake.read(stream)
            await self.stopping.wait()
            await asyncio.gather(*self.intake.readers)  # a reader's error (a bug) ends the engine, as before
            await self._drain()
        finally:
            await asyncio.to_thread(heartbeat.stop)  # no beat may re-register it after this
            await self._deregister()
            self.closed = True
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=5)
            if stuck:
                log.warning("background tasks did not stop: %s", ", ".join(t.get_name() for t in stuck))
            await self._close()

    def _died(self, task: asyncio.Task[Any]) -> None:
        """A background task ended on its own (a bug): without it the engine would go on heart-beating
        and claiming its jobs while none of them could end (no events written, no cancellations
        heard). It exits at once instead, so its jobs go to other engines and its supervisor starts it
        again."""
        if task.cancelled() or self.closed:
            return
        log.critical("the engine's %s task ended (%r): exiting (status 70)", task.get_name(), task.exception())
        logging.shutdown()
        os._exit(70)

    async def _join(self) -> bool:
        """Join the consumer groups and announce this engine, waiting for Redis as long as it
        takes (it may start after the engine, or be restarting): a loaded model is not thrown
        away over it. False if stopped first."""
        delay = 0.5
        while not self.stopping.is_set():
            # This loop is turning (loading the model or waiting for Redis took it, no stall).
            self.presence.loop_tick = time.monotonic()
            try:
                await self.create_groups()
                await self.presence.beat(self.redis)
                return True
            except REDIS_ERRORS as exc:
                what = "refused this engine's login" if login_refused(exc) else "not reachable"  # (a changed ACL)
                log.warning("Redis at %s %s (%s); retrying in %.1f s", redacted(self.settings.redis_url), what, exc, delay)
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)
        return False

    async def _close(self) -> None:
        await self.writer.lane.close()
        await self.media.close()
        await self.backend.close()
        await self.redis.aclose()

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``step`` every ``interval`` seconds until closed; an error is logged, counted and
        outlived (bad data or a Redis outage must not end a background duty for good)."""
        while not self.closed:
            await asyncio.sleep(interval)
            try:
                await step()
            except REDIS_ERRORS as exc:
                log.warning("%s: redis unavailable (%s)", name, exc)
                self.metrics.background_error(name)
            except Exception:
                log.exception("%s failed; carrying on", name)
                self.metrics.background_error(name)

    async def create_groups(self) -> None:
        """Join (creating if needed) the consumer group of every model's job stream."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, ENGINE_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _drain(self) -> None:
        # Jobs read but never started go back to the group: another engine reclaims them.
        self.intake.waiting.clear()
        pending = [r.task for r in self.running.values() if r.task is not None]
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
        except REDIS_ERRORS:
            log.warning("could not deregister from Redis")

    # ---- the jobs held ------------------------------------------------------------------

    def ready(self) -> bool:
        """Serving: the model is loaded, the engine joined its job streams and its heartbeat
        reached Redis within ``engine_ttl_s`` (so gateways see it), and it is not draining."""
        return not self.stopping.is_set() and self.presence.fresh()

    def in_flight(self) -> list[tuple[str, int]]:
        """(model, jobs running now) for each model this engine serves."""
        counts = dict.fromkeys(self.backend.models, 0)
        for run in list(self.running.values()):  # read from the metrics server's thread
            counts[run.job.model] = counts.get(run.job.model, 0) + 1
        return list(counts.items())

    def held(self) -> Iterator[tuple[str, bytes]]:
        """(job stream, entry id) of every job this engine holds: running, read but waiting for
        a slot, or finished but not yet acked. Read from the heartbeat thread too: each collection
        is copied whole first (one C call, under the GIL), never iterated while it may change."""
        for run in list(self.running.values()):
            yield run.stream, run.entry_id
        for stream, entry_id, _ in list(self.intake.waiting):
            yield stream, entry_id
        for entry_id, stream in list(self.writer.unacked.items()):
            yield stream, entry_id

    def finish(self, run: Running, final: Done | Failed) -> None:
        """Write the final event; the job is acked once it is in Redis."""
        if run.finished:
            return
        run.finished = True
        self.writer.finish(run.job.reply_to, final, self.ack_of(run), run.result)

    def ack_of(self, run: Running) -> Ack:
        """The ack of a job held: its entry, its job key, its backlog share and bytes."""
        job = run.job
        return Ack(run.stream, run.entry_id, self.keys.job(job.model, job.id),
                   self.share_of(job.model, job.tenant, job.id),
                   release_command(self.keys, job.model, job.id, run.size, job.tenant))

    def share_of(self, model: str, tenant: str, job_id: str) -> tuple[str, str] | None:
        """(``Keys.tenant_backlog``, job id) of a job that has a tenant, else None."""
        return (self.keys.tenant_backlog(model, tenant), job_id) if tenant else None

    def release(self, run: Running) -> None:
        """A job's run ended: its slot goes to the next job waiting."""
        if self.running.get(run.job.id) is run:
            del self.running[run.job.id]
            self.intake.start_waiting()
            self.slot_free.set()

    def cancel(self, job_id: str, deadline_ms: int | None = None) -> None:
        """Abort a running job, or remember to skip it if it arrives later (until its deadline,
        after which no engine would start it anyway)."""
        self.cancellations.remember(job_id, deadline_ms)
        run = self.running.get(job_id)
        if run is not None and run.task is not None and not run.finished:
            log.info("aborting job %s: client went away", job_id)
            run.task.cancel()
