"""The one request flow every generation endpoint uses: decode, admit, run the job, answer.

An endpoint (chat, completions, images) supplies only its specifics as an :class:`Endpoint`:
how its body decodes and validates, what the job carries once the model's engines are known,
and how its events become an answer (a :class:`Collector` for one JSON response, a
:class:`StreamWriter` for server-sent events). :class:`RequestFlow` does the rest, the same way
for all of them: the model checked (404/503), the request's cost asked of its request type
once, the job submitted through the dispatcher (``gateway.dispatch``), then either collected
into one response or streamed after the engine accepted it (so a request the engine refuses
still gets its 4xx status), a failure after the 200 sent as one error event, and a client that
goes away, streaming or not, answered 499 with its job cancelled on the engines.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from litestar import Request, Response
from litestar.response import Stream

from engines.contract.messages import Done, Event, Failed, Started, Usage
from gateway.common.bounds import ModelContext
from gateway.common.decoding import RequestDecoder
from gateway.context import RequestContext, context_of
from gateway.dispatch import Dispatcher, JobKind
from gateway.errors import ConduitError, encode_error, from_exception
from gateway.observe import note_prompt
from gateway.run import ClientDisconnected, JobRun, Restarted, engine_failure
from gateway.settings import RequestBounds, TelemetrySettings

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
_NOTHING = Usage()


class Collector(Protocol):
    """One request's answer, collected from its job's events (non-streaming)."""

    def add(self, run: JobRun, event: Event | Restarted) -> None:
        """Take an output event, or :data:`~gateway.run.RESTARTED`: drop what was collected."""

    async def answer(self, run: JobRun, created: int, usage: Usage) -> Response[Any]:
        """The response, once the job is done (``run`` has ended)."""


class StreamWriter(Protocol):
    """One request's event stream, written as its job's events arrive."""

    def add(self, run: JobRun, event: Event | Restarted, out: bytearray) -> Awaitable[None] | None:
        """Append the SSE events for an output event (or a restart) to ``out``; an awaitable when
        there is something to read first (images read their previews from the store)."""

    def done(self, run: JobRun, event: Done, out: bytearray) -> Awaitable[None] | None:
        """Append the stream's last events (the answer's end), as :meth:`add`."""

    def failed(self, run: JobRun, exc: ConduitError) -> bytes:
        """The stream's end when it fails after its 200: the error as the endpoint's stream says it."""


class Endpoint(Protocol):
    """What one generation endpoint supplies to the flow."""

    #: The job's kind, id prefix and stored output's lifetime.
    job_kind: JobKind
    decoder: RequestDecoder[Any]
    #: None, or a step after decoding that reads what the request names from Redis (the Responses API's
    #: ``previous_response_id``): the request as it runs, before its cost is asked.
    resolve: Callable[[Any, RequestContext], Awaitable[Any]] | None
    #: None: the body is JSON, decoded by ``decoder``. Else how the request is read: the request and
    #: the job's body (an image edit's multipart form, whose pictures do not travel in the body).
    read: Callable[[Request[Any, Any, Any]], Awaitable[tuple[Any, bytes]]] | None
    #: None, or a step between the job's making and its submission: names in the job what it needs
    #: from elsewhere (an edit's pictures, written to the blob store once admitted: ``JobRun.staged``),
    #: or takes over a run its client does not wait for (a background response), submitting the job
    #: and answering at once. It answers None for a request the client waits for.
    stage: Callable[[Any, JobRun], Awaitable[Response[Any] | None]] | None

    def prepare(self, req: Any, body: bytes, model: ModelContext, bounds: RequestBounds) -> bytes:
        """The job's body, once the model's engines are known (a 400 for what they cannot do)."""

    def collector(self, req: Any, request: Request[Any, Any, Any]) -> Collector: ...

    def writer(self, req: Any, first: Event) -> StreamWriter: ...


def sse_error(prefix: bytes, exc: Exception) -> bytes:
    """An error as one server-sent event (OpenAI's envelope) after ``prefix``."""
    return prefix + encode_error(from_exception(exc)) + b"\n\n"


def failed_mid_stream(run: JobRun, exc: ConduitError) -> None:
    """A stream that ended in an error after its 200: its code for the request's observer (counted,
    logged, traced there)."""
    run.error = exc.code or "error"


class RequestFlow:
    """Runs one generation request of any endpoint through the engines and answers it."""

    __slots__ = ("dispatcher", "bounds", "telemetry")

    def __init__(self, dispatcher: Dispatcher, bounds: RequestBounds, telemetry: TelemetrySettings) -> None:
        self.dispatcher = dispatcher
        self.bounds = bounds
        self.telemetry = telemetry

    async def respond(self, request: Request[Any, Any, Any], endpoint: Endpoint) -> Response[Any]:
        """The answer to ``request`` (read, decoded and validated here) at ``endpoint``."""
        if endpoint.read is not None:
            try:
                req, body = await endpoint.read(request)
            except ClientDisconnected:  # it left mid-upload
                return Response(content=b"", status_code=499)
        else:
            body = await request.body()
            req = endpoint.decoder.decode(body)
        ctx = context_of(request.scope)
        if endpoint.resolve is not None:
            req = await endpoint.resolve(req, ctx)
        bounds = self.bounds
        note_prompt(ctx, body, self.telemetry)
        cost = req.cost(bounds)
        model, stream = req.model, bool(req.stream)
        kind = endpoint.job_kind
        dispatcher = self.dispatcher
        # The model's engines known (404/503 first), what it may generate is checked against them.
        dispatcher.check_model(model, ctx.principal, kind.name)
        body = endpoint.prepare(req, body, dispatcher.registry.context(model), bounds)
        run = dispatcher.job(kind, model, body, stream=stream, ctx=ctx, cost=cost, receive=request.receive)
        if endpoint.stage is not None:
            answered = await endpoint.stage(req, run)
            if answered is not None:
                return answered
        try:
            if stream:
                # Wait for the engine to accept before committing to 200: a refused job keeps its status.
                first = await run.first_event()
                return Stream(self._sse(run, endpoint.writer(req, first), first), media_type="text/event-stream",
                              headers=SSE_HEADERS)
            return await self._collect(run, endpoint.collector(req, request), kind.charges_tokens)
        except ClientDisconnected:
            # The client left before the answer (leaving the run told the engines to stop).
            return Response(content=b"", status_code=499)

    @staticmethod
    async def _collect(run: JobRun, collector: Collector, charged: bool = True) -> Response[Any]:
        # Output is collected as it arrives: ``n`` costs nothing before the engine answers.
        async with run:
            created = int(time.time())
            while True:
                event = await run.next()
                kind = type(event)
                if kind is Done:
                    # Known when the run ends: its limits and usage are settled with it.
                    run.usage = event.usage if charged else _NOTHING
                    break
                if kind is Failed:
                    raise engine_failure(event)  # type: ignore[arg-type]
                if kind is Started:
                    created = event.created or created  # type: ignore[union-attr]
                else:
                    collector.add(run, event)
        # Its metrics and log line are written by the observer once the response is out.
        return await collector.answer(run, created, event.usage)  # type: ignore[union-attr]

    @staticmethod
    async def _sse(run: JobRun, w: StreamWriter, first: Event) -> AsyncIterator[bytes]:
        pending: list[Any] = [first]
        try:
            batches = run.batches()
            while True:
                out = bytearray()
                for event in pending:
                    kind = type(event)
                    if kind is Done:
                        run.usage = event.usage
                        io = w.done(run, event, out)
                        if io is not None:
                            await io
                        yield bytes(out)
                        return
                    if kind is Failed:
                        run.error = event.code
                        out += w.failed(run, engine_failure(event))
                        yield bytes(out)
                        return
                    io = w.add(run, event, out)
                    if io is not None:
                        await io
                if out:
                    run.shown = True  # from now on the job can only end, never start over
                    yield bytes(out)
                try:
                    pending = await anext(batches)
                except ConduitError as exc:  # deadline passed, or the job was lost, mid-stream
                    failed_mid_stream(run, exc)
                    yield w.failed(run, exc)
                    return
        finally:
            run.close()
