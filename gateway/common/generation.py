"""What chat and text completions share in the request flow: choices collected from deltas, the
stream's state, and :class:`TextGeneration`, the :class:`~gateway.flow.Endpoint` both are.

An endpoint of text supplies a :class:`Renderer` (how its OpenAI objects look); everything else
about its requests is the same for both.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Protocol

import msgspec
from msgspec import UNSET, UnsetType
from litestar import Request, Response

from engines.contract.messages import ChoiceDelta, Delta, Event, SampledLogprob, Started, Usage
from gateway.common.bounds import ModelContext
from gateway.common.decoding import RequestDecoder
from gateway.common.protocol import CompletionUsage, PromptTokensDetails
from gateway.dispatch import JobKind
from gateway.errors import ConduitError
from gateway.flow import DONE, sse_error
from gateway.run import JobRun, Restarted
from gateway.settings import RequestBounds


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


def finish_reason(reason: str | None, allowed: frozenset[str]) -> Any:
    """OpenAI's finish reason (one of ``allowed``, the endpoint's) for an engine's: vLLM's "abort" or
    "error" must not leak through."""
    return reason if reason in allowed else "stop"


def with_max_tokens(body: bytes, cap: int) -> bytes:
    """A validated JSON object ``body`` (which names no ``max_tokens``) with ``max_tokens: cap`` added."""
    end = body.rindex(b"}")
    return b"%s,\"max_tokens\":%d%s" % (body[:end], cap, body[end:])


def usage_of(u: Usage) -> CompletionUsage:
    details = PromptTokensDetails(cached_tokens=u.cached_tokens) if u.cached_tokens is not None else None
    return CompletionUsage(completion_tokens=u.completion_tokens, prompt_tokens=u.prompt_tokens,
                           total_tokens=u.prompt_tokens + u.completion_tokens, prompt_tokens_details=details)


def chunk_usage(delta: Delta, state: StreamState) -> CompletionUsage | None | UnsetType:
    """A chunk's ``usage``: absent without ``include_usage``; with it null, or the usage so far
    when the engine reports it on every delta (``continuous_usage_stats``, vLLM's extension)."""
    if not state.include_usage:
        return UNSET
    return usage_of(delta.usage) if delta.usage is not None else None


class StreamState:
    """Per-stream rendering state: which choices have had their first chunk."""

    __slots__ = ("seen", "include_usage")

    def __init__(self, include_usage: bool) -> None:
        self.seen: set[int] = set()
        self.include_usage = include_usage


class Renderer(Protocol):
    """How one endpoint's OpenAI objects look."""

    def full(self, rid: str, created: int, model: str, choices: list[ChoiceState], usage: Usage) -> bytes: ...

    def chunks(self, rid: str, created: int, model: str, delta: Delta, out: bytearray, state: StreamState) -> None:
        """Append the SSE events for one delta to ``out``."""

    def usage_chunk(self, rid: str, created: int, model: str, usage: Usage) -> bytes: ...


class ChunkRenderer:
    """What both renderers share: an encoder, and the last chunk of ``include_usage``
    (an empty ``choices`` and the usage) in the endpoint's own chunk type."""

    #: The endpoint's chunk Struct (``id``, ``created``, ``model``, ``choices``, ``usage``).
    chunk_type: ClassVar[type[Any]]
    #: The endpoint's request Struct, its job kind and its answers' id prefix.
    request: ClassVar[type[Any]]
    kind: ClassVar[str]
    id_prefix: ClassVar[str]

    def __init__(self) -> None:
        self._enc = msgspec.json.Encoder()

    @classmethod
    def endpoint(cls, bounds: RequestBounds) -> TextGeneration:
        """The endpoint of the shared request flow this renderer answers for."""
        return TextGeneration(cls.kind, cls.id_prefix, RequestDecoder(cls.request, bounds), cls())

    def usage_chunk(self, rid: str, created: int, model: str, usage: Usage) -> bytes:
        chunk = self.chunk_type(id=rid, created=created, model=model, choices=[], usage=usage_of(usage))
        return b"data: " + self._enc.encode(chunk) + b"\n\n"


class _Choices:
    """A collected answer: its choices, made as their output arrives."""

    __slots__ = ("renderer", "choices")

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        self.choices: list[ChoiceState] = []

    def add(self, run: JobRun, event: Event | Restarted) -> None:
        if type(event) is Delta:
            if run.ttft is None:
                run.ttft = time.perf_counter() - run.started_at
            choices = self.choices
            for c in event.choices:
                while c.index >= len(choices):
                    choices.append(ChoiceState(len(choices)))
                choices[c.index].add(c)
        elif type(event) is Restarted:
            self.choices.clear()  # another attempt runs the job from scratch

    async def answer(self, run: JobRun, created: int, usage: Usage) -> Response[Any]:
        return Response(content=self.renderer.full(run.rid, created, run.model, self.choices, usage),
                        media_type="application/json")


class _Chunks:
    """A streamed answer: each delta's chunks, then the usage (``include_usage``) and ``[DONE]``."""

    __slots__ = ("renderer", "created", "state")

    error_prefix = b"data: "

    def __init__(self, renderer: Renderer, created: int, include_usage: bool) -> None:
        self.renderer = renderer
        self.created = created
        self.state = StreamState(include_usage)

    def add(self, run: JobRun, event: Event | Restarted, out: bytearray) -> None:
        if type(event) is Delta:
            if run.ttft is None:
                run.ttft = time.perf_counter() - run.started_at
            self.renderer.chunks(run.rid, self.created, run.model, event, out, self.state)

    def failed(self, run: JobRun, exc: ConduitError) -> bytes:
        return sse_error(self.error_prefix, exc) + DONE

    def done(self, run: JobRun, event: Any, out: bytearray) -> None:
        if self.state.include_usage:
            out += self.renderer.usage_chunk(run.rid, self.created, run.model, event.usage)
        out += DONE


class TextGeneration:
    """Chat or text completions as an endpoint of the shared flow (``gateway.flow``)."""

    __slots__ = ("job_kind", "decoder", "renderer")

    resolve = None  # nothing to read before the job: the request is whole
    read = None
    stage = None  # the client always waits for its answer

    def __init__(self, kind: str, id_prefix: str, decoder: RequestDecoder[Any], renderer: Renderer) -> None:
        self.job_kind = JobKind(kind, id_prefix)
        self.decoder = decoder
        self.renderer = renderer

    def prepare(self, req: Any, body: bytes, model: ModelContext, bounds: RequestBounds) -> bytes:
        cap = req.fits(model, bounds)
        if cap is not None:  # it named no max_tokens and could generate more than a request may
            body = with_max_tokens(body, cap)
        return body

    def collector(self, req: Any, request: Request[Any, Any, Any]) -> _Choices:
        return _Choices(self.renderer)

    def writer(self, req: Any, first: Event) -> _Chunks:
        created = first.created if isinstance(first, Started) and first.created else int(time.time())
        return _Chunks(self.renderer, created, bool(req.stream_options and req.stream_options.include_usage))
