"""Requests for *cold* models: declared in the settings (``models``) while no engine of them is live.

With ``cold_start_timeout_s`` > 0 such a request is not refused: its job is queued like any other
(the model's backlog bound, the key's share, its bytes: the submit script's bounds, nothing
more), so the job stream and the wait lists hold it where an engine that starts finds it, and
:class:`ColdStarts` counts it in ``conduit.gateway.requests.cold`` (the demand an autoscaler
starts an engine on). The count falls as soon as an engine of the model is live (the request is
then served as any other) or when the request ends. A request still waiting at its cold-start
deadline has its job withdrawn (``engines.contract.withdraw``): only once that succeeds is it
answered 503 ``model_unavailable`` with Retry-After (:data:`COLD`, raised by ``JobRun.next``),
and its key is charged nothing. A job an engine already holds is left to that engine.

Requests whose model *goes* cold (its last engine died or left while they waited) are counted
from that moment and get the same deadline: a job held by a dead engine is withdrawn too (no
reclaimer would retry it before an engine starts), and a request whose engine had generated
output (streamed or not) ends with ``engine_lost`` instead, charged what was generated.

A model can also be live and cold: every live engine of it announces it cold (``EngineInfo.cold``:
an upstream engine whose serverless endpoint is scaled to zero). Its requests are admitted and
queued as any live model's, and its engine takes them at once: that request is what wakes the
endpoint. They count in the same gauge until their first output (or the model is announced warm,
or they end), and are never withdrawn: a live engine holds them and answers them, by their
request deadline at the latest. Should its last engine go, they are counted as cold from then on,
with a cold-start deadline, as above.

A request that ends unanswered while it waits (its client left) has its job withdrawn as well,
tried again every :data:`RECHECK_S` until that is settled (``WITHDRAWN`` or ``GONE``) or the job's
deadline passes. A Redis outage makes every due withdrawal fail: one warning a look, not one a run.

A cold-start deadline never outlasts the request's own (it ends :data:`MARGIN_S` before it): a
request that waits out both gets the cold answer (503, nothing charged), never a 504 that keeps its
token reservation. A gateway that begins to shut down (:meth:`ColdStarts.drain`, from the server's
graceful shutdown) answers every request waiting for a cold model at once, its job withdrawn, rather
than holding it through the grace period and leaving its job queued for an engine that starts later
to run for nobody; the lifespan's end makes one :meth:`ColdStarts.last_look` for jobs still leaving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from engines.contract.withdraw import GONE, TAKEN, WITHDRAWN
from gateway.queue import JobQueue
from gateway.registry import EngineRegistry, outliving
from gateway.settings import QueueSettings
from telemetry.instruments import GatewayMetrics

if TYPE_CHECKING:
    from gateway.run import JobRun

log = logging.getLogger("conduit.gateway")


class ColdTimeout:
    """Put in a run's queue once its job was withdrawn at its cold-start deadline."""

    __slots__ = ()


COLD: Any = ColdTimeout()

#: How soon a job past its cold-start deadline that could not be withdrawn is tried again.
RECHECK_S = 1.0
#: How long before its request's deadline a cold request's job is withdrawn at the latest (a Redis
#: round trip and a tick: the 503 comes before the request's own deadline would answer 504).
MARGIN_S = 0.5


class ColdStarts:
    """The requests of this gateway waiting for a cold model, and their cold-start deadlines."""

    def __init__(self, settings: QueueSettings, registry: EngineRegistry, queue: JobQueue, metrics: GatewayMetrics,
                 *, runs: Callable[[], Iterable[JobRun]], tick_s: float = 0.1) -> None:
        #: Every run of the gateway in flight.
        self._runs = runs
        self.timeout_s = settings.cold_start_timeout_s
        self.registry = registry
        self.queue = queue
        self.metrics = metrics
        self._tick_s = tick_s
        #: model -> run -> its cold-start deadline (event-loop time).
        self._waiting: dict[str, dict[JobRun, float]] = {}
        #: Runs that ended unanswered while cold (client gone, request deadline) -> when their job's
        #: withdrawal is tried next: until WITHDRAWN or GONE, or the job's own deadline passes.
        self._leaving: dict[JobRun, float] = {}
        #: The models live at the last look (those that leave it went cold).
        self._live: set[str] = set()
        #: model -> runs of a live model that all its engines announce cold (a serverless upstream
        #: waking), counted until their first output; never withdrawn (a live engine holds them).
        self._waking: dict[str, set[JobRun]] = {}
        #: The models live and announced cold at the last look.
        self._live_cold: set[str] = set()
        #: Ends :meth:`watch`.
        self.closed = False
        #: The gateway is shutting down: every cold request is due now (:meth:`drain`).
        self.draining = False
        metrics.watch_cold(self.counts)

    def admits(self, model: str) -> bool:
        """Whether a request for ``model``, which no engine serves now, may wait for one."""
        return self.timeout_s > 0 and self.registry.is_declared(model)

    def track(self, run: JobRun, now: float) -> None:
        """Count ``run`` (just submitted, or its model just went cold) as waiting for a cold model: one
        no engine serves, until ``now`` + the cold-start timeout (at the latest :data:`MARGIN_S` before the
        request's own deadline; at once while draining); one its live engines announce cold, until its
        first output."""
        if self.registry.is_live(run.model):
            if run.model in self.registry.cold and not run.output:
                self._waking.setdefault(run.model, set()).add(run)
        elif self.admits(run.model):
            due = now if self.draining else min(now + self.timeout_s, run.deadline - MARGIN_S)
            self._waiting.setdefault(run.model, {}).setdefault(run, due)

    def drain(self) -> None:
        """The gateway began to shut down: every request waiting for a cold model is answered at the
        next look (503 with Retry-After, its job withdrawn), and so is any that comes now."""
        if self.draining:
            return
        self.draining = True
        for waiting in self._waiting.values():
            for run in waiting:
                waiting[run] = 0.0

    async def last_look(self) -> None:
        """At the lifespan's end (:meth:`watch` stopped): one more try for every job still to withdraw."""
        if self.timeout_s <= 0:
            return
        self.drain()
        for run in self._leaving:
            self._leaving[run] = 0.0
        await self._look(asyncio.get_running_loop().time())

    def left(self, run: JobRun) -> None:
        """``run`` ended unanswered while it waited for a cold model (its client left, its request
        deadline passed): its job is taken back too, at the next look and again until that is
        settled. An engine that starts later never heard its cancellation, so it would otherwise
        run it for nobody. (A run whose withdrawal is on its way is kept by :meth:`_look` itself.)"""
        self._waking.get(run.model, set()).discard(run)  # (its engine is live: it heard the cancellation)
        waiting = self._waiting.get(run.model)
        if waiting is not None and waiting.pop(run, None) is not None:
            self._leaving[run] = 0.0

    def counts(self) -> Iterable[tuple[str, int]]:
        """(model, requests waiting for it while it is cold) for every known model (0 for most: a
        series from the start, as ``conduit.gateway.engines.live`` has)."""
        models = self.registry.known() | set(self._waiting) | set(self._waking)
        return [(m, len(self._waiting.get(m, ())) + len(self._waking.get(m, ()))) for m in sorted(models)]

    async def watch(self) -> None:
        """Every tick until :attr:`closed`: count the runs of models that went cold, forget those
        served or ended, withdraw the jobs of those past their deadline. (Also without a cold-start
        timeout: the runs of models announced cold are counted all the same.)"""
        loop = asyncio.get_running_loop()
        while not self.closed:
            await asyncio.sleep(self._tick_s)
            await outliving("cold-starts", self._look(loop.time()), self.metrics)

    async def _look(self, now: float) -> None:
        live = set(self.registry.models) if self.registry.redis_ok else self._live
        live_cold = (self.registry.cold if self.registry.redis_ok else self._live_cold) & live
        went_cold = (self._live - live) | (live_cold - self._live_cold)
        self._live, self._live_cold = live, live_cold
        if went_cold:
            for run in self._runs():
                if run.model in went_cold and not run.ended and not run.closed:
                    self.track(run, now)
        self._forget_woken(live_cold)
        due: list[JobRun] = []
        for model, waiting in list(self._waiting.items()):
            if model in live:  # an engine is live: served as any request is
                del self._waiting[model]
                continue
            for run, deadline in list(waiting.items()):
                if run.closed or run.ended:
                    del waiting[run]
                elif now >= deadline:
                    due.append(run)
                    del waiting[run]
            if not waiting:
                del self._waiting[model]
        leaving = self._due_leaving(now)
        if not due and not leaving:
            return
        runs = due + leaving
        jobs = [r.job for r in runs]
        outcomes = await asyncio.gather(*(self.queue.withdraw(j, r.entry) for r, j in zip(runs, jobs, strict=True)),
                                        return_exceptions=True)
        failed: list[tuple[str, BaseException]] = []
        cancels: list[Awaitable[None]] = []
        for run, job, outcome in zip(runs, jobs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failed.append((job.id, outcome))
            if run.ended:  # its engine answered it (a final event taken while the withdrawal was on its way)
                self._leaving.pop(run, None)
                continue
            if run.closed:  # ended unanswered (here, or while its withdrawal was on its way): until settled
                if outcome in (WITHDRAWN, GONE) or time.time() * 1000 >= job.deadline_ms:
                    self._leaving.pop(run, None)
                else:
                    self._leaving[run] = now + RECHECK_S
                    if outcome == TAKEN:  # the engine holding it may have started after the client left
                        cancels.append(self.queue.cancel(job.id, job.deadline_ms))
                continue
            if outcome == WITHDRAWN and run.job is job:  # (not submitted again meanwhile: Redis lost it)
                run.withdrawn = True
                run.events.put_nowait(COLD)
                continue
            # TAKEN: an engine holds it (one that started a moment ago: it will be live; one that
            # dies: its job ages until it can be withdrawn); GONE: answered (the run ends), or Redis
            # lost it (the job check submits it again). Asked again shortly while the model stays cold.
            self._waiting.setdefault(run.model, {})[run] = now + RECHECK_S
        # Said again at each try: the engine never heard the cancellation its job's client's leaving
        # made (or none: a cold run is taken back rather than cancelled), so it would run it for nobody.
        await asyncio.gather(*cancels)
        if failed:  # one line a look, however many runs are due (a Redis outage fails them all)
            log.warning("cold start: could not withdraw %d job(s) (%s: %r, ...); tried again shortly",
                        len(failed), *failed[0])
            self.metrics.background_error("cold-starts")

    def _forget_woken(self, live_cold: set[str]) -> None:
        """Stop counting the runs of models announced cold that got output or ended, and all of a
        model's once it is warm (or no engine of it is live: then they wait with a deadline)."""
        for model, runs in list(self._waking.items()):
            if model in live_cold:
                runs -= {r for r in runs if r.output or r.ended or r.closed}
            if model not in live_cold or not runs:
                del self._waking[model]

    def _due_leaving(self, now: float) -> list[JobRun]:
        return [run for run, at in self._leaving.items() if now >= at]
