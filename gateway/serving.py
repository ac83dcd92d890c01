"""The request flow shared by chat and text completions, streaming or not.

An endpoint supplies a :class:`Renderer` (how its OpenAI objects look); this module runs
the job: submit, wait for the engine to accept (so a request the engine refuses still
gets its 4xx status), then either collect everything into one response or stream chunks,
with a failure after the 200 sent as one error event followed by ``[DONE]``. A client that
goes away, streaming or not, cancels the job on the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from engines.wire import ChoiceDelta, Delta, Done, Failed, SampledLogprob, Started, Usage
from gateway.dispatch import ClientDisconnected, Dispatcher, Ticket, engine_failure, new_id
from gateway.errors import ConduitError, DeadlineExceeded, encode_error, from_exception
from gateway.protocol import CompletionUsage, PromptTokensDetails

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


class ToolCallState:
    __slots__ = ("id", "name", "arguments")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []


class ChoiceState:
    """Everything one choice produced, for a non-streaming response."""

    __slots__ = ("index", "text", "reasoning", "tool_calls", "logprobs", "finish_reason", "stop_reason")

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, ToolCallState] = {}
        self.logprobs: list[SampledLogprob] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    def add(self, d: ChoiceDelta) -> None:
        if d.text:
            self.text.append(d.text)
        if d.reasoning:
            self.reasoning.append(d.reasoning)
        for tc in d.tool_calls:
            state = self.tool_calls.get(tc.index)
            if state is None:
                state = self.tool_calls[tc.index] = ToolCallState()
            if tc.id:
                state.id = tc.id
            if tc.name:
                state.name += tc.name
            if tc.arguments:
                state.arguments.append(tc.arguments)
        if d.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(d.logprobs)
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason
            self.stop_reason = d.stop_reason


def usage_of(u: Usage) -> CompletionUsage:
    details = PromptTokensDetails(cached_tokens=u.cached_tokens) if u.cached_tokens is not None else None
    return CompletionUsage(completion_tokens=u.completion_tokens, prompt_tokens=u.prompt_tokens,
                           total_tokens=u.prompt_tokens + u.completion_tokens, prompt_tokens_details=details)


class StreamState:
    """Per-stream rendering state: which choices have had their first chunk."""

    __slots__ = ("seen", "include_usage")

    def __init__(self, include_usage: bool) -> None:
        self.seen: set[int] = set()
        self.include_usage = include_usage


class Renderer(Protocol):
    """How one endpoint's OpenAI objects look."""

    operation: str
    id_prefix: str

    def full(self, rid: str, created: int, model: str, choices: list[ChoiceState], usage: Usage) -> bytes: ...

    def chunks(self, rid: str, created: int, model: str, delta: Delta, out: bytearray, state: StreamState) -> None:
        """Append the SSE events for one delta to ``out``."""

    def usage_chunk(self, rid: str, created: int, model: str, usage: Usage) -> bytes: ...


class Generation:
    """Runs one request's job through the engines and answers it."""

    def __init__(self, dispatcher: Dispatcher, renderer: Renderer, kind: Literal["chat", "completion"]) -> None:
        self.dispatcher = dispatcher
        self.renderer = renderer
        self.kind = kind

    async def respond(self, request: Request[Any, Any, Any], model: str, body: bytes, *, stream: bool,
                      include_usage: bool, n: int) -> Response[Any]:
        # Job ids are always our own: a client's x-request-id need not be unique.
        ticket = await self.dispatcher.submit(self.kind, model, body, new_id(self.renderer.id_prefix))
        if stream:
            return await self._stream(request, ticket, include_usage)
        return await self._collect_or_disconnect(request, ticket, n)

    # ---- non-streaming -----------------------------------------------------------------

    async def _collect_or_disconnect(self, request: Request[Any, Any, Any], ticket: Ticket, n: int) -> Response[Any]:
        watcher = self.dispatcher.watch_disconnect(ticket, request.receive)
        try:
            content = await self._collect(ticket, n)
        except ClientDisconnected:
            # The client left before the answer: abort the engine's work.
            self.dispatcher.close(ticket, abandoned=True)
            return Response(content=b"", status_code=499)
        except DeadlineExceeded:
            self._end(ticket, abandoned=True, status=None)  # the engine may still be working on it
            raise
        except ConduitError:
            self._end(ticket, abandoned=False, status=None)  # the engine itself ended the job
            raise
        finally:
            watcher.cancel()
        self.dispatcher.close(ticket, abandoned=False)
        # Metrics are recorded after the response went out: off the latency's critical path.
        return Response(content=content, media_type="application/json",
                        background=BackgroundTask(self._record_later, ticket, 200))

    async def _collect(self, ticket: Ticket, n: int) -> bytes:
        d = self.dispatcher
        choices = [ChoiceState(i) for i in range(n)]
        created = int(time.time())
        first = True
        while True:
            event = await d.next_event(ticket)
            if isinstance(event, Delta):
                if first:
                    first = False
                    ticket.ttft = time.perf_counter() - ticket.started_at
                for c in event.choices:
                    while c.index >= len(choices):
                        choices.append(ChoiceState(len(choices)))
                    choices[c.index].add(c)
            elif isinstance(event, Done):
                ticket.usage = event.usage
                return self.renderer.full(ticket.job_id, created, ticket.model, choices, event.usage)
            elif isinstance(event, Failed):
                raise engine_failure(event)
            elif isinstance(event, Started) and event.created:
                created = event.created

    # ---- streaming ---------------------------------------------------------------------

    async def _stream(self, request: Request[Any, Any, Any], ticket: Ticket, include_usage: bool) -> Response[Any]:
        d = self.dispatcher
        # Wait for the engine to accept before committing to 200: a refused job keeps its status.
        try:
            first = await d.next_event(ticket)
        except DeadlineExceeded:
            self._end(ticket, abandoned=True, status=None)
            raise
        except asyncio.CancelledError:
            d.close(ticket, abandoned=True)
            raise
        if isinstance(first, Failed):
            self._end(ticket, abandoned=False, status=None)
            raise engine_failure(first)
        return Stream(self._sse(ticket, first, include_usage), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _sse(self, ticket: Ticket, first: Any, include_usage: bool) -> AsyncIterator[bytes]:
        d = self.dispatcher
        r = self.renderer
        created = first.created if isinstance(first, Started) and first.created else int(time.time())
        abandoned = True
        pending = [first]
        saw_output = False
        state = StreamState(include_usage)
        try:
            batches = d.events(ticket)
            while True:
                out = bytearray()
                for event in pending:
                    if isinstance(event, Delta):
                        if not saw_output:
                            saw_output = True
                            ticket.ttft = time.perf_counter() - ticket.started_at
                        r.chunks(ticket.job_id, created, ticket.model, event, out, state)
                    elif isinstance(event, Done):
                        ticket.usage = event.usage
                        if include_usage:
                            out += r.usage_chunk(ticket.job_id, created, ticket.model, event.usage)
                        out += DONE
                        abandoned = False
                        yield bytes(out)
                        return
                    elif isinstance(event, Failed):
                        out += _error_event(engine_failure(event))
                        out += DONE
                        abandoned = False
                        yield bytes(out)
                        return
                if out:
                    yield bytes(out)
                try:
                    pending = await anext(batches)
                except DeadlineExceeded as exc:  # deadline passed mid-stream (abandoned stays True)
                    d.metrics.rejected(exc.code or "error")
                    yield _error_event(exc) + DONE
                    return
        finally:
            self._end(ticket, abandoned=abandoned, status=200)

    def _end(self, ticket: Ticket, *, abandoned: bool, status: int | None) -> None:
        self.dispatcher.close(ticket, abandoned=abandoned)
        if status is not None:
            self._record(ticket, status)

    async def _record_later(self, ticket: Ticket, status: int) -> None:
        # A coroutine on purpose: Litestar runs a plain function's background task in a thread.
        self._record(ticket, status)

    def _record(self, ticket: Ticket, status: int) -> None:
        u = ticket.usage
        self.dispatcher.metrics.request_finished(
            ticket.model, self.renderer.operation, status, time.perf_counter() - ticket.started_at, ticket.ttft,
            u.prompt_tokens if u else None, u.completion_tokens if u else None)


def _error_event(exc: ConduitError | Exception) -> bytes:
    return b"data: " + encode_error(from_exception(exc)) + b"\n\n"
