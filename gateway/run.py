"""One request's job from submission to its end: :class:`JobRun`, opened by ``Dispatcher.job``.

A ``JobRun`` owns everything between admission and the answer: the idempotent submission
(through its dispatcher), the disconnect watch (from the moment of submission, streaming or
not), the deadline, the cancellation of abandoned jobs, and exactly-once delivery of the
engine's events:

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
from typing import TYPE_CHECKING, Any

from engines.contract.messages import (Delta, Done, Embedded, Event, Failed, Generated, ImageReady, Job, Started,
                                       Unknown)
from gateway.cold import COLD
from gateway.errors import ConduitError, DeadlineExceeded, EngineError, NoEngine
from gateway.tenancy.cost import Cost
from gateway.tenancy.limits import Grant
from gateway.tenancy.principal import ANONYMOUS, Principal
from telemetry.tracing import Span

if TYPE_CHECKING:
    from gateway.dispatch import Dispatcher
    from gateway.tenancy.claims import Claim

log = logging.getLogger("conduit.gateway")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


class Restarted:
    """Returned by :meth:`JobRun.next`: the job is running again from scratch; discard its output so far."""

    __slots__ = ()


RESTARTED = Restarted()

#: Put in a run's queue by the disconnect watcher and the deadline timer; never sent by an engine.
CLIENT_GONE: Any = object()
DEADLINE: Any = object()


def new_id(prefix: str) -> str:
    """A job id of our own: ``prefix-`` and 24 random hex digits."""
    return f"{prefix}-{os.urandom(12).hex()}"


def engine_failure(event: Failed) -> ConduitError:
    """An engine's error event as the exception the client is told about."""
    if event.status == 504:
        return DeadlineExceeded(event.message)
    cls = EngineError if event.status >= 500 else ConduitError
    return cls(event.message, param=event.param, code=event.code, status=event.status, type=event.type,
               headers={"Retry-After": str(event.retry_after_s)} if event.retry_after_s else None)


def cold_failure(run: JobRun) -> ConduitError:
    """What a run whose job was withdrawn at its cold-start deadline (``gateway.cold``) ends with."""
    settings = run.dispatcher.settings
    if run.shown:  # its engine died mid-stream and none came back
        return EngineError("The engine serving this request stopped after output began and no engine of the model "
                           "is live; retry the request.", code="engine_lost")
    if run.output:  # (not streamed) its engine died mid-generation: what it generated is charged
        return EngineError(f"The engine serving this request stopped mid-generation and no engine of the model "
                           f"started within {settings.cold_start_timeout_s:g}s; retry the request.",
                           code="engine_lost")
    waited = min(settings.cold_start_timeout_s, round(time.perf_counter() - run.started_at, 1))
    return NoEngine(run.model, waited_s=waited, retry_after_s=settings.retry_after_s)


class JobRun:
    """One request's job: ``async with dispatcher.job(...) as run`` submits it; leaving the
    block ends it (telling the engines to stop if it had not finished)."""

    __slots__ = ("dispatcher", "job", "rid", "model", "events", "deadline", "started_at", "attempt", "seq", "ended",
                 "closed", "shown", "ttft", "usage", "loop", "timer", "resubmits", "missing", "_receive", "_watcher",
                 "_held", "principal", "cost", "grant", "ratelimit", "queue_span", "error", "generated", "images",
                 "output", "refused", "refund_request", "claim", "entry", "withdrawn", "detached", "staged")

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
        self.attempt, self.seq = 1, 0
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
        #: Who asks (its key's share of the backlog applies to every submission), what the request
        #: costs against the key's limits, what admission took, where the ``x-ratelimit-*`` headers go.
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
        self.claim: Claim | None = None  # its ``Idempotency-Key`` claim: each submission is named in it first
        #: Its stream entry if submitted straight there (b"": it waited; taken back at its cold-start deadline);
        #: whether its job outlives it (a background response's: closing it never cancels the job); what it
        #: stages in the blob store (an edit's pictures, ``gateway.images.edits.Edit``: put once admitted).
        self.entry, self.withdrawn, self.detached, self.staged = b"", False, False, None

    @property
    def job_id(self) -> str:
        return self.job.id

    async def __aenter__(self) -> JobRun:
        await self.dispatcher.submit(self)
        if self._receive is not None and not self.detached:  # (a background response's client is not watched)
            self._watcher = self.loop.create_task(self._watch(self._receive))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _watch(self, receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
        # Only for requests whose body was read in full: the next ASGI message is the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        self.events.put_nowait(CLIENT_GONE)

    async def first_event(self) -> Event:
        """Submit the job and wait for the engine to accept it, for a streaming answer: a job the engine refuses
        raises its error while the status can still say so. The caller's response then owns the run."""
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
            if event is DEADLINE or event is COLD:
                raise cold_failure(self) if event is COLD else DeadlineExceeded(
                    f"The request did not finish within {self.dispatcher.settings.request_timeout_s:g}s.")
            if event is CLIENT_GONE:
                raise ClientDisconnected
            if isinstance(event, Lost):
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
        if kind is ImageReady or kind is Embedded:
            self.output = True
            if kind is ImageReady and event.partial is None:
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
                if event is DEADLINE or event is CLIENT_GONE or event is COLD or isinstance(event, Lost):
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


class Lost:
    """Put in a run's queue when its job key vanished (``Dispatcher.watch_jobs``)."""

    __slots__ = ("job_id",)

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
