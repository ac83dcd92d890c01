"""The request flow shared by chat and text completions, streaming or not.

An endpoint supplies a :class:`Renderer` (how its OpenAI objects look); this module runs
the job: submit, wait for the engine to accept (so a request the engine refuses still
gets its 4xx status), then either collect everything into one response or stream chunks,
with a failure after the 200 sent as one error event followed by ``[DONE]``. A client that
goes away, streaming or not, cancels the job on the engine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from litestar import Request, Response
from litestar.response import Stream

from engines.contract.messages import ChoiceDelta, Delta, Done, Event, Failed, SampledLogprob, Started, Usage
from gateway.dispatch import ClientDisconnected, Dispatcher, JobRun, Restarted, engine_failure, new_id
from gateway.errors import ConduitError, encode_error, from_exception
from gateway.protocol import ChatCompletionRequest, CompletionRequest, CompletionUsage, PromptTokensDetails
from gateway.tenancy.cost import Cost
from gateway.tenancy.guard import principal_of
from gateway.tenancy.principal import Principal

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


def with_max_tokens(body: bytes, cap: int) -> bytes:
    """A validated JSON object ``body`` (which names no ``max_tokens``) with ``max_tokens: cap`` added."""
    end = body.rindex(b"}")
    return b"%s,\"max_tokens\":%d%s" % (body[:end], cap, body[end:])


def tenancy(request: Request[Any, Any, Any]) -> tuple[Principal, dict[str, str] | None]:
    """Who the request runs as (put there by the auth guard), and the dict its ``x-ratelimit-*``
    headers go into (``scope["state"]["ratelimit"]``, sent by the guard; None without a key)."""
    principal = principal_of(request.scope)
    state = request.scope.setdefault("state", {})  # type: ignore[typeddict-item]
    return principal, (state.setdefault("ratelimit", {}) if principal.key_id else None)


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

    id_prefix: str

    def full(self, rid: str, created: int, model: str, choices: list[ChoiceState], usage: Usage) -> bytes: ...

    def chunks(self, rid: str, created: int, model: str, delta: Delta, out: bytearray, state: StreamState) -> None:
        """Append the SSE events for one delta to ``out``."""

    def usage_chunk(self, rid: str, created: int, model: str, usage: Usage) -> bytes: ...


class Generation:
    """Runs one request's job through the engines and answers it."""

    def __init__(self, dispatcher: Dispatcher, renderer: Renderer, kind: str) -> None:
        self.dispatcher = dispatcher
        self.renderer = renderer
        self.kind = kind

    async def respond(self, request: Request[Any, Any, Any], req: ChatCompletionRequest | CompletionRequest,
                      body: bytes, *, cost: Cost | None = None) -> Response[Any]:
        principal, ratelimit = tenancy(request)
        model, stream = req.model, bool(req.stream)
        include_usage = bool(stream and req.stream_options and req.stream_options.include_usage)
        dispatcher = self.dispatcher
        # The model's engines known (404/503 first), what it may generate is checked against them.
        dispatcher.check_model(model, principal, self.kind)
        cap = req.fits(dispatcher.registry.context(model), dispatcher.settings)
        if cap is not None:  # it named no max_tokens and could generate more than a request may
            body = with_max_tokens(body, cap)
        # Job ids are always our own: a client's x-request-id need not be unique.
        run = dispatcher.job(self.kind, model, body, job_id=new_id(self.renderer.id_prefix), stream=stream,
                                  receive=request.receive,
                                  traceparent=request.scope["state"].get("traceparent", ""), principal=principal,
                                  cost=cost, ratelimit=ratelimit, state=request.scope["state"])
        try:
            if stream:
                return await self._stream(run, include_usage)
            return await self._collect(run)
        except ClientDisconnected:
            # The client left before the answer (leaving the run told the engines to stop).
            return Response(content=b"", status_code=499)

    # ---- non-streaming -----------------------------------------------------------------

    async def _collect(self, run: JobRun) -> Response[Any]:
        async with run:
            content = await self._answer(run)
        # Its metrics and log line are written by the observer once the response is out.
        return Response(content=content, media_type="application/json")

    async def _answer(self, run: JobRun) -> bytes:
        # Choices are made as their output arrives: ``n`` costs nothing before the engine answers.
        choices: list[ChoiceState] = []
        created = int(time.time())
        while True:
            event = await run.next()
            if isinstance(event, Delta):
                if run.ttft is None:
                    run.ttft = time.perf_counter() - run.started_at
                for c in event.choices:
                    while c.index >= len(choices):
                        choices.append(ChoiceState(len(choices)))
                    choices[c.index].add(c)
            elif isinstance(event, Done):
                run.usage = event.usage
                return self.renderer.full(run.rid, created, run.model, choices, event.usage)
            elif isinstance(event, Failed):
                raise engine_failure(event)
            elif isinstance(event, Started):
                if event.created:
                    created = event.created
            elif isinstance(event, Restarted):
                choices.clear()  # another attempt runs the job from scratch

    # ---- streaming ---------------------------------------------------------------------

    async def _stream(self, run: JobRun, include_usage: bool) -> Response[Any]:
        # Wait for the engine to accept before committing to 200: a refused job keeps its status.
        first = await run.first_event()
        return Stream(self._sse(run, first, include_usage), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _sse(self, run: JobRun, first: Event, include_usage: bool) -> AsyncIterator[bytes]:
        r = self.renderer
        created = first.created if isinstance(first, Started) and first.created else int(time.time())
        pending: list[Event | Restarted] = [first]
        state = StreamState(include_usage)
        try:
            batches = run.batches()
            while True:
                out = bytearray()
                for event in pending:
                    if isinstance(event, Delta):
                        if run.ttft is None:
                            run.ttft = time.perf_counter() - run.started_at
                        r.chunks(run.rid, created, run.model, event, out, state)
                    elif isinstance(event, Done):
                        run.usage = event.usage
                        if include_usage:
                            out += r.usage_chunk(run.rid, created, run.model, event.usage)
                        out += DONE
                        yield bytes(out)
                        return
                    elif isinstance(event, Failed):
                        run.error = event.code
                        out += _error_event(engine_failure(event))
                        out += DONE
                        yield bytes(out)
                        return
                if out:
                    run.shown = True  # from now on the job can only end, never start over
                    yield bytes(out)
                try:
                    pending = await anext(batches)
                except ConduitError as exc:  # deadline passed, or the job was lost, mid-stream
                    failed_mid_stream(run, exc)
                    yield _error_event(exc) + DONE
                    return
        finally:
            run.close()


def failed_mid_stream(run: JobRun, exc: ConduitError) -> None:
    """A stream that ended in an error after its 200: its code for the request's observer (counted,
    logged, traced there)."""
    run.error = exc.code or "error"


def _error_event(exc: ConduitError | Exception) -> bytes:
    return b"data: " + encode_error(from_exception(exc)) + b"\n\n"
