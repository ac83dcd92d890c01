"""Admission and the job lifecycle: the only way an endpoint reaches the engines.

:class:`Dispatcher` admits requests (404/503 for the model, the key's rate limits, the
backlog's 429s) and opens :class:`~gateway.run.JobRun`\\ s, which own each job from submission
to its end; it submits and resubmits their jobs, settles what admission took when a run ends,
routes cancellations to the engines and finds jobs Redis lost (:meth:`Dispatcher.watch_jobs`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import msgspec

from engines.contract.lane import REDIS_ERRORS
from engines.contract.messages import Job
from gateway.context import RequestContext
from gateway.cold import ColdStarts
from gateway.errors import ConduitError, ModelNotFound, ModelNotSupported, NoEngine, Overloaded, PayloadTooLarge
from gateway.queue import BacklogFull, BytesFull, JobQueue, JobTooLarge, ReplyRouter, ShareFull
from gateway.registry import EngineRegistry, outliving
from gateway.run import DEADLINE, JobRun, Lost, new_id
from gateway.settings import QueueSettings
from gateway.tenancy.cost import Cost
from gateway.tenancy.limits import Grant, Limiter
from gateway.tenancy.principal import ANONYMOUS, Principal
from gateway.tenancy.usage import UsageLog
from telemetry.instruments import GatewayMetrics
from telemetry.tracing import SpanKind, Tracing, format_traceparent

log = logging.getLogger("conduit.gateway")

#: How long job checks must find a job's key gone (at two checks at least) before the job counts
#: as lost: longer than an engine takes to restore the key of a job it still runs
#: (``engines.heartbeat``: every beat, each second), so a job Redis lost but its engine did not
#: is never given up (its stream failed, its work done twice).
LOST_AFTER_S = 2.0


@dataclass(frozen=True, slots=True)
class JobKind:
    """What every job of one endpoint shares: its kind (the engines' name for it), the prefix of
    its ids (the first is the id the client sees: ``chatcmpl-...``) and how long an engine keeps
    what it stores readable (images; 0: nothing stored)."""

    name: str
    id_prefix: str
    output_ttl_ms: int = 0
    #: Whether the tokens its engine reports are charged (False: counting tokens, which generates
    #: nothing, is charged as a request only).
    charges_tokens: bool = True


class Dispatcher:
    """Admits requests, hands their jobs to engines and delivers the engines' events."""

    def __init__(self, settings: QueueSettings, registry: EngineRegistry, queue: JobQueue,
                 router: ReplyRouter, metrics: GatewayMetrics, *, limiter: Limiter | None = None,
                 usage: UsageLog | None = None, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing
        self.limiter = limiter
        self.usage = usage
        self.registry = registry
        self.queue = queue
        self.router = router
        self.metrics = metrics
        self._runs: dict[str, JobRun] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Ends :meth:`watch_jobs`.
        self.closed = False
        #: Requests waiting for a cold model (declared, no live engine): ``gateway.cold``.
        self.cold = ColdStarts(settings, registry, queue, metrics, runs=self._runs.values)
        metrics.watch_in_flight(lambda: len(self._runs))

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def check_model(self, model: str, principal: Principal = ANONYMOUS, kind: str | None = None) -> None:
        """404 for a model nobody serves or configured, or that the key may not use, or whose live engines announce
        no job of ``kind`` (an engine that cannot run a job it gets still answers 501: a fleet of mixed
        versions); 503 for one whose engines are all gone (or it waits: ``gateway.cold``)."""
        if not principal.allows(model):
            raise ModelNotFound(model)
        if self.registry.is_live(model):
            if kind is not None and not self.registry.runs(model, kind):
                raise ModelNotSupported(model, kind)
            return
        if self.cold.admits(model):
            # A kind its engines never ran cannot be what one starts for (nor an autoscaler's demand).
            if kind is not None and not self.registry.may_run(model, kind):
                raise ModelNotSupported(model, kind)
            return
        if self.registry.is_known(model):
            raise NoEngine(model)
        raise ModelNotFound(model)

    def job(self, kind: JobKind, model: str, body: bytes, *, stream: bool, ctx: RequestContext | None = None,
            cost: Cost | None = None, receive: Callable[[], Awaitable[MutableMapping[str, Any]]] | None = None
            ) -> JobRun:
        """A request's job (the caller checked its model: :meth:`check_model`), submitted when its ``async with``
        block is entered. Its id is our own (a client's x-request-id need not be unique).

        ``ctx`` (the request's context) gives who asks (``principal``: its key id is the job's tenant in fair
        queueing), the request's span (a sampled trace: the job's queue span hangs under it and its context
        replaces the client's ``traceparent`` in the job, so the engine's span joins the trace) and the dict the
        ``x-ratelimit-*`` headers go into; it gets the run (the request's observer records its metrics and log
        line from it). ``cost``: what the request takes from the key's limits (its request type's ``cost``);
        ``receive`` (the request's ASGI receive) lets the run notice a client that leaves."""
        now_ms = int(time.time() * 1000)
        job_id = new_id(kind.id_prefix)
        principal, traceparent, queue_span, request_id = ANONYMOUS, "", None, ""
        if ctx is not None:
            principal, traceparent = ctx.principal, ctx.traceparent
            request_id = ctx.request_id.decode("latin-1")
            if principal.key_id and ctx.ratelimit is None:
                ctx.ratelimit = {}
            if ctx.span is not None and self.tracing is not None:
                queue_span = self.tracing.start(
                    f"queue {model}", SpanKind.PRODUCER, ctx.span,
                    {"messaging.system": "redis", "messaging.operation.type": "send",
                     "messaging.destination.name": self.queue.stream_of(model), "messaging.message.id": job_id})
                traceparent = format_traceparent(queue_span.get_span_context())
        job = Job(id=job_id, kind=kind.name, model=model, body=body, reply_to=self.router.stream,
                  deadline_ms=now_ms + int(self.settings.request_timeout_s * 1000), created_ms=now_ms,
                  traceparent=traceparent, stream=stream, output_ttl_ms=kind.output_ttl_ms,
                  tenant=principal.key_id, priority=principal.limits.priority, request_id=request_id)
        run = JobRun(self, job, receive, principal=principal, cost=cost,
                     ratelimit=ctx.ratelimit if ctx is not None else None, queue_span=queue_span)
        if ctx is not None:
            ctx.run = run
            run.claim = ctx.claim
        return run

    async def submit(self, run: JobRun) -> None:
        """Queue a run's job and start its deadline; raises the right error when it cannot be queued."""
        try:
            await self._admit(run)
            if run.staged is not None:  # an edit's pictures, once admitted (a refused request writes none)
                await run.staged.put(run.job.deadline_ms)
            await self._queue(run)
        except BaseException as exc:  # refused (ConduitError), or interrupted (a shutdown's cancel)
            run.closed = True
            if run.staged is not None:
                run.staged.drop()
            run.end_queue_span(None)
            self._forget_id(run.job_id)
            if not isinstance(exc, ConduitError) or exc.code == "queue_unavailable":
                # It may have been queued before the interruption or the lost reply: engines skip it.
                self._publish_cancel(run.job_id, run.job.deadline_ms)
            if run.grant is not None:  # admitted, never queued: every reserved token back (the request too,
                # unless the key's own share of the backlog refused it)
                self._spawn(self._release(run.grant, 0, refused=run.refund_request))
            raise
        loop = self.loop
        run.deadline = loop.time() + max(run.job.deadline_ms / 1000 - time.time(), 0)
        # One timer per request wakes its waiter at the deadline (no timeout context per wait).
        run.timer = loop.call_at(run.deadline, run.events.put_nowait, DEADLINE)
        self.cold.track(run, loop.time())  # (a cold model's: no engine, or its engines announce it cold)

    async def _admit(self, run: JobRun) -> None:
        """The key's rate limits (429 taking nothing when one is reached); no-op without limits."""
        if self.limiter is None or not run.principal.key_id:
            return
        try:
            run.grant = await self.limiter.admit(run.principal, run.rid, run.cost, run.job.deadline_ms, run.ratelimit)
        except REDIS_ERRORS as exc:
            log.warning("could not check rate limits: %s", exc)
            raise ConduitError("The rate limiter is unavailable; retry shortly.", status=503,
                               code="queue_unavailable") from None

    def settle(self, run: JobRun) -> None:
        """A keyed run ended: free what admission took (reconciling its tokens with what it used), off the
        response's path, and count its usage (in memory, flushed every second).

        What it used: its final usage, or, for a run that ended without one (client gone, deadline, engine lost,
        an error after output), what its engine reported generating so far and the images it made. A run the
        engine refused (a 4xx before any output) gets its tokens back; it keeps its request (rpm) slot: the
        engine did work on it, and a key must not send engines refused requests without limit."""
        if run.withdrawn and not run.output and run.usage is None:  # answered 503 at its cold-start deadline,
            # nothing of it generated (an engine that died mid-way: charged below, as for engine_lost)
            if run.grant is not None and self.limiter is not None:  # nothing charged, everything back
                self._spawn(self._release(run.grant, 0, refused=True))
            return
        u = run.usage
        images = run.cost.images if u is not None else run.images
        u = u if u is not None else run.generated
        prompt, completion = (u.prompt_tokens, u.completion_tokens) if u is not None else (0, 0)
        if self.usage is not None and not run.detached:  # (a background response's: charged when stored)
            self.usage.add(run.principal.key_id, run.principal.name, run.model, prompt_tokens=prompt,
                           completion_tokens=completion, images=images)
        if run.grant is not None and self.limiter is not None:
            used = 0 if run.refused else prompt + completion if u is not None else None
            self._spawn(self._release(run.grant, used))

    async def _release(self, grant: Grant, used_tokens: int | None, refused: bool = False) -> None:
        try:
            await self.limiter.release(grant, used_tokens, refused)  # type: ignore[union-attr]
        except REDIS_ERRORS as exc:
            # The slot expires at the request's deadline anyway; the usage of this request is lost.
            log.warning("could not release rate limits / record usage: %s", exc)
            self.metrics.background_error("limits-release")

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def resubmit(self, run: JobRun) -> None:
        """Queue ``run``'s job again under a new id, same deadline (its old incarnation is cancelled)."""
        old = run.job
        self._forget_id(old.id)
        self._publish_cancel(old.id, old.deadline_ms)
        run.job = msgspec.structs.replace(old, id=new_id(old.id.partition("-")[0]))
        run.attempt, run.seq, run.missing = 1, 0, 0
        if old.options is not None and old.options.result and not await self.queue.announce(old.options.result,
                                                                                           run.job.id):
            raise ConduitError("The request queue is unavailable; retry shortly.", status=503, code="queue_unavailable")
        run.generated, run.images, run.output = None, 0, False
        await self._queue(run)

    async def _queue(self, run: JobRun) -> None:
        job = run.job
        run.refund_request = True  # unless the key's own share refuses it (below)
        if run.claim is not None:
            # Named in the request's Idempotency-Key claim before it can exist: a retry that takes
            # the claim over then waits for this job to be gone, or makes sure it never is queued.
            await run.claim.bind(job)
        # Listening before the job exists: no event can come before its waiter.
        self.router.open(job.id, run.events)
        self._runs[job.id] = run
        share = run.principal.limits.backlog_share
        share = self.settings.key_backlog_share if share is None else share
        try:
            run.entry = await self.queue.submit(job, share=share)
        except BacklogFull as exc:
            raise Overloaded(f"The model `{job.model}` has {exc.backlog} requests waiting, its limit; retry after "
                             f"{self.settings.retry_after_s}s.", self.settings.retry_after_s) from None
        except ShareFull as exc:
            run.refund_request = False
            raise Overloaded(f"This API key has {exc.held} requests queued or running on the model `{job.model}`, "
                             f"its share ({share:.0%} of the model's backlog of {self.settings.max_backlog}); retry "
                             f"after {self.settings.retry_after_s}s.", self.settings.retry_after_s) from None
        except BytesFull as exc:
            run.refund_request = not exc.tenant
            whose = (f"This API key's requests queued or running on the model `{job.model}` hold {exc.held} bytes, "
                     f"its share ({share:.0%})" if exc.tenant else
                     f"The requests queued or running on the model `{job.model}` hold {exc.held} bytes")
            raise Overloaded(f"{whose} of the {exc.limit if exc.tenant else self.queue.max_backlog_bytes} bytes its "
                             f"backlog may hold; retry after {self.settings.retry_after_s}s.",
                             self.settings.retry_after_s) from None
        except JobTooLarge as exc:
            run.refund_request = False
            raise PayloadTooLarge(f"This request is {exc.size} bytes as a job, more than one API key may have queued "
                                  f"on a model ({exc.limit} bytes).") from None
        except REDIS_ERRORS as exc:
            log.warning("could not queue a job: %s", exc)
            raise ConduitError("The request queue is unavailable; retry shortly.", status=503,
                               code="queue_unavailable") from None

    def _forget_id(self, job_id: str) -> None:
        self.router.close(job_id)
        self._runs.pop(job_id, None)

    def forget(self, run: JobRun) -> None:
        """A run ended: stop routing its events, drop what it staged; an unfinished job is cancelled on the
        engines (unless it outlives its run: ``JobRun.detached``)."""
        self._forget_id(run.job_id)
        if run.staged is not None: run.staged.drop()
        if not run.ended and not run.detached:
            if not run.withdrawn:  # (a withdrawn job's client did not leave: it was answered 503)
                self.metrics.cancellations.add(1)
                self.cold.left(run)
            self._publish_cancel(run.job_id, run.job.deadline_ms)

    def _publish_cancel(self, job_id: str, deadline_ms: int) -> None:
        self._spawn(self.queue.cancel(job_id, deadline_ms))

    async def watch_jobs(self) -> None:
        """Find jobs Redis lost (a restart without persistence, a failover, a refused write): every
        ``job_check_s``, a run older than that whose job key is gone at every check for :data:`LOST_AFTER_S`
        and that got no final event is woken to start over (or fail, if its client saw output)."""
        interval = self.settings.job_check_s
        lost_after = max(2, 1 + math.ceil(LOST_AFTER_S / interval))  # checks in a row
        while not self.closed:
            await asyncio.sleep(interval)
            await outliving("job-check", self._check_jobs(time.perf_counter() - interval, lost_after), self.metrics)

    async def _check_jobs(self, older_than: float, lost_after: int) -> None:
        checked = [(r, r.job_id) for r in self._runs.values() if r.started_at < older_than and not r.ended]
        if not checked:
            return
        gone = await self.queue.missing([(r.model, job_id) for r, job_id in checked])
        for (run, job_id), missing in zip(checked, gone, strict=True):
            if run.job_id != job_id:
                continue  # submitted again while we asked
            run.missing = run.missing + 1 if missing else 0
            if run.missing == lost_after:
                run.events.put_nowait(Lost(job_id))
