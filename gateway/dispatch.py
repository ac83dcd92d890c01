"""One request's job from submission to its end: the only way an endpoint reaches the engines.

:class:`Dispatcher` admits requests (404/503/429) and opens :class:`JobRun`\\ s; a ``JobRun``
owns everything between: the idempotent submission, the disconnect watch (from the moment
of submission, streaming or not), the deadline, the cancellation of abandoned jobs, and
exactly-once delivery of the engine's events:

* events of an attempt that was given up are dropped, a repeated event (same ``seq``) is
  dropped, a gap in the numbering means events were lost;
* a job that must start over (an engine died, events were lost, Redis lost the job) is run
  again — a new attempt by an engine, or a new submission by the gateway — as long as none
  of its output reached the client; the caller sees :data:`RESTARTED` and discards what
  it collected. Once output reached the client the request ends with a clean error instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import msgspec
import redis.asyncio as aioredis

from engines.contract.messages import Delta, Done, Event, Failed, Generated, ImageReady, Job, Started, Unknown
from gateway.errors import (
    ConduitError,
    DeadlineExceeded,
    EngineError,
    ModelNotFound,
    ModelNotSupported,
    NoEngine,
    Overloaded,
    PayloadTooLarge,
)
from gateway.queue import BacklogFull, BytesFull, JobQueue, JobTooLarge, ReplyRouter, ShareFull
from gateway.registry import EngineRegistry
from gateway.settings import GatewaySettings
from gateway.tenancy.cost import Cost
from gateway.tenancy.limits import Grant, Limiter
from gateway.tenancy.principal import ANONYMOUS, Principal
from gateway.tenancy.usage import UsageLog
from telemetry.instruments import GatewayMetrics
from telemetry.tracing import Span, SpanKind, Tracing, format_traceparent

log = logging.getLogger("conduit.gateway")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


class Restarted:
    """Returned by :meth:`JobRun.next`: the job is running again from scratch; discard its output so far."""

    __slots__ = ()


RESTARTED = Restarted()

# Put in a run's queue by the disconnect watcher, the deadline timer and the job watch; never sent by an engine.
_CLIENT_GONE: Any = object()
_DEADLINE: Any = object()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


def engine_failure(event: Failed) -> ConduitError:
    """An engine's error event as the exception the client is told about."""
    if event.status == 504:
        return DeadlineExceeded(event.message)
    cls = EngineError if event.status >= 500 else ConduitError
    return cls(event.message, param=event.param, code=event.code, status=event.status, type=event.type)


class JobRun:
    """One request's job: ``async with dispatcher.job(...) as run`` submits it; leaving the
    block ends it (telling the engines to stop if it had not finished)."""

    __slots__ = ("dispatcher", "job", "rid", "model", "events", "deadline", "started_at", "attempt", "seq", "ended",
                 "closed", "shown", "ttft", "usage", "loop", "timer", "resubmits", "missing", "_receive", "_watcher",
                 "_held", "principal", "cost", "grant", "ratelimit", "queue_span", "error", "generated", "images",
                 "output", "refused", "refund_request")

    def __init__(self, dispatcher: Dispatcher, job: Job, receive: Callable[[], Awaitable[MutableMapping[str, Any]]]
                 | None, *, principal: Principal = ANONYMOUS, cost: Cost | None = None,
                 ratelimit: dict[str, str] | None = None, queue_span: Span | None = None) -> None:
        self.dispatcher = dispatcher
        self.job = job
        #: The id the client sees (the first job id: a resubmitted job gets a new one).
        self.rid = job.id
        self.model = job.model
        self.loop = dispatcher.loop  # kept: on Python 3.11 every get_running_loop() is a getpid() syscall
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.deadline = 0.0  # loop time
        self.started_at = time.perf_counter()
        #: The attempt whose events are accepted, and the number of its last event.
        self.attempt = 1
        self.seq = 0
        #: A final event (Done/Failed) was taken; nothing is left to cancel.
        self.ended = False
        self.closed = False
        #: Some output reached the client: the job can no longer start over silently.
        self.shown = False
        #: Seconds to the first output, and the final usage: recorded once the answer is out.
        self.ttft: float | None = None
        self.usage: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.resubmits = 0
        #: Consecutive job checks that found the job's key gone (see Dispatcher.watch_jobs).
        self.missing = 0
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._held: Any = None  # an event, or _GAP
        #: Who asks, what the request costs against the key's limits, what admission took,
        #: and where admission puts the ``x-ratelimit-*`` headers.
        #: Who the request runs as (its key's share of the backlog applies to every submission).
        self.principal = principal
        self.cost = cost or Cost()
        self.grant: Grant | None = None
        self.ratelimit = ratelimit
        #: The trace's span from submission until an engine starts the job (sampled requests only).
        self.queue_span = queue_span
        #: The error code a stream ended with after its 200 (for the request's log line).
        self.error = ""
        #: What the current attempt generated so far (its latest ``Delta.total``) and its final
        #: images: what the key is charged if the run ends without its ``Done``.
        self.generated: Generated | None = None
        self.images = 0
        #: The current attempt produced output (a delta or an image).
        self.output = False
        #: The engine refused the job (a 4xx before any output): the key gets its tokens back.
        self.refused = False
        #: A refusal at the queue that is not the key's own doing (the model's whole backlog is
        #: full, Redis is unavailable): the key gets its request back too.
        self.refund_request = False

    @property
    def job_id(self) -> str:
        return self.job.id

    async def __aenter__(self) -> JobRun:
        await self.dispatcher.submit(self)
        if self._receive is not None:
            self._watcher = self.loop.create_task(self._watch(self._receive))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _watch(self, receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
        # Only for requests whose body was read in full: the next ASGI message is the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        self.events.put_nowait(_CLIENT_GONE)

    async def first_event(self) -> Event:
        """Submit the job and wait for the engine to accept it, for a streaming answer: a job
        the engine refuses raises its error while the status can still say so. From the event
        returned on, the caller's response owns the run (watches the connection, closes it)."""
        await self.__aenter__()
        try:
            first = await self.next()
            while isinstance(first, Restarted):
                first = await self.next()
            if isinstance(first, Failed):
                raise engine_failure(first)
        except BaseException:
            self.close()
            raise
        self.stop_watching()
        return first

    def stop_watching(self) -> None:
        """The streaming response watches the connection from here on (one reader of ``receive``)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def next(self) -> Event | Restarted:
        """The next event the client should see, or :data:`RESTARTED`.

        Raises :class:`DeadlineExceeded` past the deadline, :class:`ClientDisconnected` when
        the client left, :class:`EngineError` when the job was lost after output reached the client.
        """
        held = self._held
        if held is not None:
            self._held = None
            if held is _GAP:
                await self._start_over("events were lost")
            else:
                admitted = self._admit(held)
                if admitted is not None:
                    return admitted
        while True:
            event = await self.events.get()
            if event is _DEADLINE:
                raise DeadlineExceeded(f"The request did not finish within "
                                       f"{self.dispatcher.settings.request_timeout_s:g}s.")
            if event is _CLIENT_GONE:
                raise ClientDisconnected
            if isinstance(event, _Lost):
                if event.job_id == self.job_id and not self.ended:
                    await self._start_over("Redis lost the job")
                    return RESTARTED
                continue
            admitted = self._admit(event)
            if admitted is not None:
                return admitted

    def _admit(self, event: Event) -> Event | Restarted | None:
        """The exactly-once filter: the event to deliver, None to drop it, or RESTARTED (what
        follows is held for the next call to :meth:`next`)."""
        if event.job != self.job.id:  # the job's previous submission, given up
            self.dispatcher.metrics.skipped("stale_submission")
            return None
        if event.attempt != self.attempt:
            if event.attempt < self.attempt:  # a given-up attempt's engine still talking
                self.dispatcher.metrics.skipped("stale_attempt")
                return None
            self.attempt = event.attempt
            self.seq = 0
            if isinstance(event, Failed):  # the job's new owner only reports its end
                self.ended = True  # (what the lost attempt generated stays charged)
                return event
            if self.shown:
                raise EngineError("The engine serving this request stopped after output began; retry the request.",
                                  code="engine_lost")
            self._held = event  # another engine runs it from scratch
            self.generated, self.images, self.output = None, 0, False  # only the answering attempt is charged
            return RESTARTED
        if event.seq:  # 0: an engine that does not number its events
            if event.seq <= self.seq:
                self.dispatcher.metrics.skipped("duplicate")
                return None
            if event.seq != self.seq + 1:
                log.warning("job %s: events %d..%d lost", self.job_id, self.seq + 1, event.seq - 1)
                self.dispatcher.metrics.skipped("gap")
                if self.shown:
                    raise EngineError("Part of this request's output was lost on its way from the engine; retry "
                                      "the request.", code="output_lost")
                self._held = _GAP
                return RESTARTED
            self.seq = event.seq
        kind = type(event)
        if kind is Delta:  # the common case first
            self.output = True
            total = event.total
            if total is not None:  # (an engine of protocol < 4 counts nothing: the reservation stands)
                self.generated = total
            if self.queue_span is not None:
                self.end_queue_span(event)
            return event
        if kind is Unknown:
            return None  # counted by the router; its number is accounted for
        if kind is ImageReady:
            self.output = True
            if event.partial is None:
                self.images += 1
        elif isinstance(event, (Done, Failed)):
            self.ended = True
            if isinstance(event, Failed) and 400 <= event.status < 500 and not self.output:
                self.refused = True  # before any output of its attempt
        if self.queue_span is not None:
            self.end_queue_span(event)
        return event

    def end_queue_span(self, event: Event | None) -> None:
        """The job left the queue: an engine's first event arrived (or the run ended without one)."""
        span, self.queue_span = self.queue_span, None
        if span is None:
            return
        if isinstance(event, Started) and event.engine:
            span.attributes["conduit.engine.id"] = event.engine
        if self.attempt > 1:  # another engine took the job over
            span.attributes["conduit.job.attempt"] = self.attempt
        if self.resubmits:  # Redis lost it and the gateway submitted it again
            span.attributes["conduit.job.resubmits"] = self.resubmits
        span.end()

    async def batches(self) -> AsyncIterator[list[Event | Restarted]]:
        """Events in batches: everything already delivered comes together (one write to the client)."""
        q = self.events
        while True:
            batch = [await self.next()]
            while not q.empty() and self._held is None:
                event = q.get_nowait()
                if event is _DEADLINE or event is _CLIENT_GONE or isinstance(event, _Lost):
                    q.put_nowait(event)  # handled by the next next(), after this batch is out
                    break
                admitted = self._admit(event)
                if admitted is not None:
                    batch.append(admitted)
                    if admitted is RESTARTED:
                        break  # what follows it is held for the next next()
            yield batch

    async def _start_over(self, why: str) -> None:
        """Submit the job again under a new id (nothing of it reached the client), or fail."""
        if self.shown:
            raise EngineError(f"This request's job was lost after output began ({why}); retry the request.",
                              code="job_lost")
        if self.resubmits >= self.dispatcher.settings.max_resubmits:
            raise EngineError(f"This request's job was lost {self.resubmits + 1} times ({why}); retry the request.",
                              code="job_lost")
        self.resubmits += 1
        log.warning("job %s: %s; submitting it again", self.job_id, why)
        self.dispatcher.metrics.resubmissions.add(1)
        await self.dispatcher.resubmit(self)

    def close(self) -> None:
        """Stop listening; if the job had not ended, tell the engines to drop it."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.stop_watching()
        if self.queue_span is not None:
            self.end_queue_span(None)
        self.dispatcher.forget(self)
        if self.principal.key_id:
            self.dispatcher.settle(self)


class _Gap:
    """Held by a run whose events had a gap: its next call to ``next`` starts the job over."""


_GAP: Any = _Gap()


class _Lost:
    """Put in a run's queue when its job key vanished (``Dispatcher.watch_jobs``)."""

    __slots__ = ("job_id",)

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


class Dispatcher:
    """Admits requests, hands their jobs to engines and delivers the engines' events."""

    def __init__(self, settings: GatewaySettings, registry: EngineRegistry, queue: JobQueue,
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
        metrics.watch_in_flight(lambda: len(self._runs))

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def check_model(self, model: str, principal: Principal = ANONYMOUS, kind: str | None = None) -> None:
        """404 for a model nobody serves or configured, or that the key may not use, or whose live
        engines announce no job of ``kind`` (an engine that cannot run a job it gets still answers
        501: a fleet of mixed versions); 503 for one whose engines are all gone."""
        if not principal.allows(model):
            raise ModelNotFound(model)
        if self.registry.is_live(model):
            if kind is not None and not self.registry.runs(model, kind):
                raise ModelNotSupported(model, kind)
            return
        if self.registry.is_known(model):
            raise NoEngine(model)
        raise ModelNotFound(model)

    def job(self, kind: str, model: str, body: bytes, *, job_id: str, stream: bool,
            receive: Callable[[], Awaitable[MutableMapping[str, Any]]] | None = None,
            traceparent: str = "", output_ttl_ms: int = 0, principal: Principal = ANONYMOUS,
            cost: Cost | None = None, ratelimit: dict[str, str] | None = None,
            state: dict[str, Any] | None = None) -> JobRun:
        """A request's job, submitted when its ``async with`` block is entered.

        ``state`` (the request's ``scope["state"]``) gets the run (``"run"``: the request's
        observer records its metrics and log line from it) and gives the request's span
        (``"span"``, a sampled trace): the job's queue span hangs under it and its context
        replaces ``traceparent`` (the client's) in the job, so the engine's span joins the trace.
        ``receive`` (the request's ASGI receive) lets the run notice a client that leaves;
        ``output_ttl_ms``: how long the engine keeps what it stores (images) readable;
        ``principal``: who asks (its key id is the job's tenant in fair queueing); ``cost``: what it
        takes from the key's limits (``gateway.tenancy.cost.estimate``); ``ratelimit``: gets the
        ``x-ratelimit-*`` headers.
        """
        self.check_model(model, principal, kind)
        now_ms = int(time.time() * 1000)
        span = state.get("span") if state is not None else None
        queue_span = None
        if span is not None and self.tracing is not None:
            queue_span = self.tracing.start(
                f"queue {model}", SpanKind.PRODUCER, span,
                {"messaging.system": "redis", "messaging.operation.type": "send",
                 "messaging.destination.name": self.queue.stream_of(model), "messaging.message.id": job_id})
            traceparent = format_traceparent(queue_span.get_span_context())
        job = Job(id=job_id, kind=kind, model=model, body=body, reply_to=self.router.stream,
                  deadline_ms=now_ms + int(self.settings.request_timeout_s * 1000), created_ms=now_ms,
                  traceparent=traceparent, stream=stream, output_ttl_ms=output_ttl_ms,
                  tenant=principal.key_id, priority=principal.limits.priority)
        run = JobRun(self, job, receive, principal=principal, cost=cost, ratelimit=ratelimit, queue_span=queue_span)
        if state is not None:
            state["run"] = run
        return run

    async def submit(self, run: JobRun) -> None:
        """Queue a run's job and start its deadline; raises the right error when it cannot be queued."""
        try:
            await self._admit(run)
            await self._queue(run)
        except BaseException as exc:  # refused (ConduitError), or interrupted (a shutdown's cancel)
            run.closed = True
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
        run.timer = loop.call_at(run.deadline, run.events.put_nowait, _DEADLINE)

    async def _admit(self, run: JobRun) -> None:
        """The key's rate limits (429 taking nothing when one is reached); no-op without limits."""
        if self.limiter is None or not run.principal.key_id:
            return
        try:
            run.grant = await self.limiter.admit(run.principal, run.rid, run.cost, run.job.deadline_ms, run.ratelimit)
        except (ConnectionError, OSError, aioredis.RedisError) as exc:
            log.warning("could not check rate limits: %s", exc)
            raise ConduitError("The rate limiter is unavailable; retry shortly.", status=503,
                               code="queue_unavailable") from None

    def settle(self, run: JobRun) -> None:
        """A keyed run ended: free what admission took (reconciling its tokens with what it used),
        off the response's path, and count its usage (in memory, flushed every second).

        What it used: its final usage, or, for a run that ended without one (client gone, deadline,
        engine lost, an error after output), what its engine reported generating so far and the
        images it made. A run the engine refused (a 4xx before any output) gets its tokens back;
        it keeps its request (rpm) slot: the engine did work on it, and a key must not be able to
        send engines refused requests without limit."""
        u = run.usage
        images = run.cost.images if u is not None else run.images
        if u is None:
            u = run.generated
        prompt, completion = (u.prompt_tokens, u.completion_tokens) if u is not None else (0, 0)
        if self.usage is not None:
            self.usage.add(run.principal.key_id, run.principal.name, run.model, prompt_tokens=prompt,
                           completion_tokens=completion, images=images)
        if run.grant is not None and self.limiter is not None:
            used = 0 if run.refused else prompt + completion if u is not None else None
            self._spawn(self._release(run.grant, used))

    async def _release(self, grant: Grant, used_tokens: int | None, refused: bool = False) -> None:
        try:
            await self.limiter.release(grant, used_tokens, refused)  # type: ignore[union-attr]
        except (ConnectionError, OSError, aioredis.RedisError) as exc:
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
        run.generated, run.images, run.output = None, 0, False
        await self._queue(run)

    async def _queue(self, run: JobRun) -> None:
        job = run.job
        # Listening before the job exists: no event can come before its waiter.
        self.router.open(job.id, run.events)
        self._runs[job.id] = run
        share = run.principal.limits.backlog_share
        share = self.settings.key_backlog_share if share is None else share
        run.refund_request = True  # unless the key's own share refuses it (below)
        try:
            await self.queue.submit(job, share=share)
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
        except (ConnectionError, OSError, aioredis.RedisError) as exc:
            log.warning("could not queue a job: %s", exc)
            raise ConduitError("The request queue is unavailable; retry shortly.", status=503,
                               code="queue_unavailable") from None

    def _forget_id(self, job_id: str) -> None:
        self.router.close(job_id)
        self._runs.pop(job_id, None)

    def forget(self, run: JobRun) -> None:
        """A run ended: stop routing its events; an unfinished job is cancelled on the engines."""
        self._forget_id(run.job_id)
        if not run.ended:
            self.metrics.cancellations.add(1)
            self._publish_cancel(run.job_id, run.job.deadline_ms)

    def _publish_cancel(self, job_id: str, deadline_ms: int) -> None:
        self._spawn(self.queue.cancel(job_id, deadline_ms))

    async def watch_jobs(self) -> None:
        """Find jobs Redis lost (a restart without persistence, a failover, a refused write):
        every ``job_check_s``, a run older than that whose job key is gone twice in a row and
        that got no final event is woken to start over (or fail, if its client saw output)."""
        interval = self.settings.job_check_s
        while not self.closed:
            await asyncio.sleep(interval)
            try:
                await self._check_jobs(time.perf_counter() - interval)
            except (ConnectionError, OSError, aioredis.RedisError) as exc:
                log.warning("job check: redis unavailable (%s)", exc)
                self.metrics.background_error("job-check")
            except Exception:
                log.exception("job check failed; carrying on")
                self.metrics.background_error("job-check")

    async def _check_jobs(self, older_than: float) -> None:
        checked = [(r, r.job_id) for r in self._runs.values() if r.started_at < older_than and not r.ended]
        if not checked:
            return
        gone = await self.queue.missing([(r.model, job_id) for r, job_id in checked])
        for (run, job_id), missing in zip(checked, gone, strict=True):
            if run.job_id != job_id:
                continue  # submitted again while we asked
            run.missing = run.missing + 1 if missing else 0
            if run.missing == 2:
                run.events.put_nowait(_Lost(job_id))
