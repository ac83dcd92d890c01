"""An engine's heartbeat on a thread of its own: liveness never waits behind the engine's work.

The worker's event loop also runs the backend (vLLM's output handling and rendering, one job's
chunks after another): a job that keeps it busy for seconds must not let the engine's registry
entry expire (gateways would answer 503 for its model) nor its running jobs look abandoned (other
engines would reclaim them). :class:`HeartbeatThread` runs the beat on its own thread, with its
own event loop and its own Redis connection; Python switches threads every few milliseconds
however busy the main loop is. :class:`Presence` is what each beat says: the engine in the registry,
its models seen, every job it holds re-claimed (so only a dead engine's jobs look idle) and the key
of every job it runs kept (restored if Redis lost it), unless the worker's own event loop is wedged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any


from engines.contract.lane import REDIS_ERRORS
from engines.contract.messages import PROTOCOL_VERSION, EngineInfo
from engines.contract.keys import ENGINE_GROUP, IN_QUEUE, OUTPUT_STARTED
from engines.running import Running, now_ms

if TYPE_CHECKING:
    from engines.worker import Worker

log = logging.getLogger("conduit.engine")


class HeartbeatThread:
    """Calls ``beat(redis)`` every ``interval`` seconds on its own thread and event loop, with a
    Redis client made there by ``connect()``; ``failed(exc)`` hears of each failed beat (which is
    outlived: the next one is tried on time)."""

    def __init__(self, connect: Callable[[], Any], beat: Callable[[Any], Awaitable[None]], interval: float,
                 failed: Callable[[BaseException], None]) -> None:
        self._connect = connect
        self._beat = beat
        self._interval = interval
        self._failed = failed
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def now(self) -> None:
        """Beat now rather than at the next interval (from any thread): an announcement changed."""
        if self._loop is not None and self._wake is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass  # its loop already ended

    def stop(self, timeout: float = 10.0) -> None:
        """Stop beating (a beat under way finishes first) and wait for the thread: no beat follows."""
        self._stopped = True
        if self._loop is not None and self._wake is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass  # its loop already ended
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the heartbeat thread did not stop within %.0f s", timeout)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        redis = self._connect()
        try:
            while not self._stopped:
                try:
                    # A beat that hangs (a frozen Redis) must not hold up the next one for long.
                    await asyncio.wait_for(self._beat(redis), timeout=max(self._interval * 3, 1.0))
                except Exception as exc:  # noqa: BLE001 - logged and counted by ``failed``; the next beat is tried
                    self._failed(exc)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
                except TimeoutError:
                    pass
                if not self._stopped:
                    self._wake.clear()
        finally:
            await redis.aclose()


class Presence:
    """A worker's presence in the registry: what each heartbeat announces, and whether the worker's
    event loop still turns (a wedged one announces nothing, so its jobs go to other engines)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        #: When this engine's heartbeat last reached Redis (monotonic; 0: never).
        self.beat_ok = 0.0
        #: When the event loop last took a turn (monotonic): the heartbeat thread reads it.
        self.loop_tick = time.monotonic()
        self.stalled = False
        self.info_blob = b""  # the encoded EngineInfo, built once the backend has started
        #: The thread beating (set once it runs): :meth:`announce` asks it for a beat at once.
        self.heartbeat: HeartbeatThread | None = None
        #: Ids of the jobs running here whose key Redis lost and a beat restored: each beat renews
        #: their lease (the heartbeat thread's own).
        self.restored: set[str] = set()

    def info(self) -> bytes:
        """The encoded ``EngineInfo`` every heartbeat announces (again when the backend's models change)."""
        w = self._worker
        b = w.backend
        return w.codec.encode(EngineInfo(
            id=w.engine_id, kind=b.kind, models=list(b.models), max_concurrency=b.max_concurrency,
            host=socket.gethostname(), pid=os.getpid(), started_ms=w.started_ms, max_model_len=b.max_model_len,
            max_chars_per_token=b.max_chars_per_token, max_sequences=b.max_sequences, protocol=PROTOCOL_VERSION,
            kinds=sorted(w.kinds), cold=list(getattr(b, "cold_models", ())), results=True,
            token_inputs=list(getattr(b, "token_input_models", ())), embedding_size=getattr(b, "embedding_size", 0) or None))

    def announce(self) -> None:
        """What the engine announces changed (a serverless upstream went cold or warm): the next
        beat, at once, says so."""
        self.info_blob = self.info()
        if self.heartbeat is not None:
            self.heartbeat.now()

    def fresh(self) -> bool:
        """The last beat reached Redis within ``engine_ttl_s`` (gateways see the engine) and the
        event loop is turning."""
        return (self.beat_ok > 0 and not self.stalled
                and time.monotonic() - self.beat_ok < self._worker.settings.engine_ttl_s)

    async def tick(self) -> None:
        """Note every turn of the worker's event loop (at most 0.25 s apart while it turns)."""
        worker = self._worker
        while not worker.closed:
            self.loop_tick = time.monotonic()
            await asyncio.sleep(0.25)

    async def beat(self, redis: Any) -> None:
        """Announce this engine and re-claim the jobs it holds (on the heartbeat thread, with its
        own client ``redis``; what it reads of the worker's state it copies first). Not while the
        event loop is wedged: then the engine's entry expires and its jobs are reclaimed."""
        worker = self._worker
        settings = worker.settings
        keys = worker.keys
        stalled = time.monotonic() - self.loop_tick > settings.stall_s
        if stalled != self.stalled:
            self.stalled = stalled
            if stalled:
                log.error("the event loop took no turn for %.0f s: no more heartbeats until it does (other engines "
                          "take this one's jobs)", settings.stall_s)
                worker.metrics.background_error("stalled")
            else:
                log.warning("the event loop is turning again: heart-beating")
        if stalled:
            return
        now = now_ms()
        pipe = redis.pipeline(transaction=False)
        pipe.zadd(keys.engines, {worker.engine_id: now + int(settings.engine_ttl_s * 1000)})
        pipe.hset(keys.engine_info, worker.engine_id, self.info_blob)
        for model in worker.backend.models:
            pipe.hset(keys.models_seen, model, now)
        by_stream: dict[str, list[bytes]] = {}
        for stream, entry_id in worker.held():
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            # Re-claiming our own jobs resets their idle time: only a dead engine's jobs age.
            pipe.xclaim(stream, ENGINE_GROUP, worker.engine_id, 0, ids, justid=True)
        kept = self._keep_job_keys(pipe, now)
        replies = await pipe.execute(raise_on_error=False)
        ended = redis.pipeline(transaction=False)
        for (run, renewed), reply in zip(kept, replies[len(replies) - len(kept):], strict=True):
            if renewed:
                if reply is None:  # gone again (acked meanwhile, or lost again): the next beat asks anew
                    self.restored.discard(run.job.id)
            elif reply is True:
                self.restored.add(run.job.id)
                if run.finished:  # acked (its key deleted) while this beat was on its way: no key to keep
                    ended.delete(keys.job(run.job.model, run.job.id))
        if len(ended):
            await ended.execute()
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        self.beat_ok = time.monotonic()

    def _keep_job_keys(self, pipe: Any, now: int) -> list[tuple[Running, bool]]:
        """Queue on ``pipe`` the keys of the jobs running here: a key Redis lost (a restart without
        persistence, a failover) is made again, so its gateway, which takes a job whose key is gone
        for lost, keeps waiting for the answer on its way. Nothing backs such a key any more (its
        stream entry went with Redis: no other engine would reclaim the job), so it lives only a
        lease of ``engine_ttl_s`` that every beat renews: if this engine dies, the key lapses and
        the gateway submits the job again (or fails it, if output reached its client). Keys that
        exist are left as they are (``NX``), restored ones only renewed (``XX``: never made again
        after the job's ack deleted it). Returns (job, renewed) of each command, in order (the
        pipeline's last)."""
        worker = self._worker
        lease = int(worker.settings.engine_ttl_s * 1000)
        keys = worker.keys
        running = [r for r in list(worker.running.values()) if not r.finished
                   and not (r.job.deadline_ms and r.job.deadline_ms <= now)]  # past it: its gateway gave up
        restored = self.restored
        restored &= {r.job.id for r in running}
        kept = []
        for run in running:
            renewed = run.job.id in restored
            pipe.set(keys.job(run.job.model, run.job.id), _value(run), px=lease, xx=renewed, nx=not renewed)
            kept.append((run, renewed))
        return kept

    def failed(self, exc: BaseException) -> None:
        """A beat that failed: logged and counted (the next one is tried on time)."""
        if isinstance(exc, REDIS_ERRORS):
            log.warning("heartbeat: redis unavailable (%s)", exc)
        else:
            log.error("heartbeat failed; carrying on", exc_info=exc)
        self._worker.metrics.background_error("heartbeat")


def _value(run: Running) -> bytes:
    """What a running job's key says: whether its output began (``Keys.job``)."""
    return OUTPUT_STARTED if run.output_marked else IN_QUEUE
