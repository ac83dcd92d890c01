"""From a validated request to engine events: admission, submission, waiting, cancelling."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Literal

import redis.asyncio as aioredis

from engines.wire import Event, Failed, Job, Usage
from gateway.errors import ConduitError, DeadlineExceeded, EngineError, ModelNotFound, NoEngine, Overloaded
from gateway.queue import BacklogFull, JobQueue, ReplyRouter
from gateway.registry import EngineRegistry
from gateway.settings import GatewaySettings
from telemetry.instruments import GatewayMetrics


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


# Put in a ticket's queue by the disconnect watcher and the deadline timer; never sent by an engine.
_CLIENT_GONE: Any = object()
_DEADLINE: Any = object()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


class Ticket:
    """One submitted job, as seen by the request waiting on it."""

    __slots__ = ("job_id", "model", "events", "deadline", "started_at", "attempt", "closed", "ttft", "usage",
                 "loop", "timer")

    def __init__(self, job_id: str, model: str, events: asyncio.Queue[Event], deadline: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # kept: on Python 3.11 every get_running_loop() is a getpid() syscall
        self.job_id = job_id
        self.model = model
        self.events = events
        self.deadline = deadline  # loop time
        self.started_at = time.perf_counter()
        self.attempt = 1
        self.closed = False
        #: Seconds to the first output, and the final usage: recorded once the answer is out.
        self.ttft: float | None = None
        self.usage: Usage | None = None
        self.timer: asyncio.TimerHandle | None = None

    def accept(self, event: Event) -> bool:
        """False for an event of an abandoned attempt (a retried job's slow first engine)."""
        if event.attempt < self.attempt:
            return False
        self.attempt = event.attempt
        return True


def engine_failure(event: Failed) -> ConduitError:
    """An engine's error event as the exception the client is told about."""
    if event.status == 504:
        return DeadlineExceeded(event.message)
    cls = EngineError if event.status >= 500 else ConduitError
    return cls(event.message, param=event.param, code=event.code, status=event.status, type=event.type)


class Dispatcher:
    """Admits requests, hands their jobs to engines and delivers the engines' events."""

    def __init__(self, settings: GatewaySettings, registry: EngineRegistry, queue: JobQueue,
                 router: ReplyRouter, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.registry = registry
        self.queue = queue
        self.router = router
        self.metrics = metrics
        self._background: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        metrics.watch_in_flight(lambda: router.waiting)

    def check_model(self, model: str) -> None:
        """404 for a model nobody serves or configured, 503 for one whose engines are all gone."""
        if self.registry.is_live(model):
            return
        if self.registry.is_known(model):
            raise NoEngine(model)
        raise ModelNotFound(model)

    async def submit(self, kind: Literal["chat", "completion"], model: str, body: bytes, job_id: str) -> Ticket:
        """Queue a job; raises the right error when it cannot be queued."""
        self.check_model(model)
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        timeout = self.settings.request_timeout_s
        events = self.router.open(job_id)
        now_ms = int(time.time() * 1000)
        job = Job(id=job_id, kind=kind, model=model, body=body, reply_to=self.router.stream,
                  deadline_ms=now_ms + int(timeout * 1000), created_ms=now_ms)
        try:
            await self.queue.submit(job)
        except BacklogFull as exc:
            self.router.close(job_id)
            raise Overloaded(f"The model `{model}` has {exc.backlog} requests waiting, its limit; retry after "
                             f"{self.settings.retry_after_s}s.", self.settings.retry_after_s) from None
        except (ConnectionError, OSError, aioredis.RedisError):
            self.router.close(job_id)
            raise ConduitError("The request queue is unavailable; retry shortly.", status=503,
                               code="queue_unavailable") from None
        ticket = Ticket(job_id, model, events, loop.time() + timeout, loop)
        # One timer per request wakes its waiter at the deadline (no timeout context per wait).
        ticket.timer = loop.call_at(ticket.deadline, events.put_nowait, _DEADLINE)
        return ticket

    async def next_event(self, ticket: Ticket) -> Event:
        """The next event of the current attempt; :class:`DeadlineExceeded` past the deadline."""
        while True:
            event = await ticket.events.get()
            if event is _DEADLINE:
                raise DeadlineExceeded(f"The request did not finish within {self.settings.request_timeout_s:g}s.")
            if event is _CLIENT_GONE:
                raise ClientDisconnected
            if ticket.accept(event):
                return event

    def watch_disconnect(self, ticket: Ticket,
                         receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> asyncio.Task[None]:
        """Wake the request waiting on ``ticket`` with :class:`ClientDisconnected` if its client leaves.

        Only for requests whose body was read in full: the next ASGI message is then the disconnect.
        """

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            ticket.events.put_nowait(_CLIENT_GONE)

        return ticket.loop.create_task(watch())

    async def events(self, ticket: Ticket) -> AsyncIterator[list[Event]]:
        """Events in batches: everything already delivered comes together (one write)."""
        q = ticket.events
        while True:
            batch = [await self.next_event(ticket)]
            while not q.empty():
                event = q.get_nowait()
                if event is _DEADLINE or event is _CLIENT_GONE:
                    q.put_nowait(event)  # raised by the next next_event, after this batch is out
                    break
                if ticket.accept(event):
                    batch.append(event)
            yield batch

    def close(self, ticket: Ticket, *, abandoned: bool) -> None:
        """Stop listening for ``ticket``; if the client left early, tell the engines to abort."""
        if ticket.closed:
            return
        ticket.closed = True
        if ticket.timer is not None:
            ticket.timer.cancel()
        self.router.close(ticket.job_id)
        if abandoned:
            self.metrics.cancellations.add(1)
            task = ticket.loop.create_task(self.queue.cancel(ticket.job_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
