"""``POST /v1/completions`` (legacy text completions): OpenAI's ``text_completion`` objects from
engine events, and the handler."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency

from engines.contract.messages import Delta, SampledLogprob, Usage
from gateway.apispec import GENERATION, JOB_ERRORS, RATELIMIT, STORED, Operation, documented
from gateway.common.generation import ChoiceState, ChunkRenderer, StreamState, chunk_usage, finish_reason, usage_of
from gateway.completions.protocol import (
    COMPLETION_FINISH_REASONS,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from gateway.errors import ErrorEnvelope
from gateway.services import Services


def completion_logprobs(items: list[SampledLogprob] | None) -> CompletionLogprobs | None:
    if items is None:
        return None
    return CompletionLogprobs(text_offset=[i.text_offset for i in items], token_logprobs=[i.logprob for i in items],
                              tokens=[i.token for i in items],
                              top_logprobs=[{t.token: t.logprob for t in i.top} for i in items])


class CompletionRenderer(ChunkRenderer):
    """Text completion objects; streamed chunks share the shape of the full response."""

    chunk_type = CompletionChunk
    request = CompletionRequest
    kind = "completion"
    id_prefix = "cmpl"

    def full(self, rid: str, created: int, model: str, choices: list[ChoiceState], usage: Usage) -> bytes:
        out = [CompletionChoice(finish_reason=finish_reason(c.finish_reason, COMPLETION_FINISH_REASONS),
                                index=c.index, logprobs=completion_logprobs(c.logprobs), text="".join(c.text))
               for c in choices]
        return self._enc.encode(Completion(id=rid, choices=out, created=created, model=model, usage=usage_of(usage)))

    def chunks(self, rid: str, created: int, model: str, delta: Delta, out: bytearray, state: StreamState) -> None:
        enc = self._enc.encode
        usage = chunk_usage(delta, state)
        for c in delta.choices:
            reason = None if c.finish_reason is None else finish_reason(c.finish_reason, COMPLETION_FINISH_REASONS)
            chunk = CompletionChunk(id=rid, created=created, model=model, usage=usage, choices=[
                CompletionChunkChoice(finish_reason=reason, index=c.index, logprobs=completion_logprobs(c.logprobs),
                                      text=c.text)])
            out += b"data: "
            out += enc(chunk)
            out += b"\n\n"


CREATE_COMPLETION = Operation(
    "createCompletion", "Create a text completion (legacy)", "Completions",
    {**JOB_ERRORS, 422: "`unprocessable_entity`."}, body=CompletionRequest, json=Completion,
    stream=(("message", (CompletionChunk, ErrorEnvelope)),), stream_done=True,
    description="Streamed as server-sent events when `stream` is true, ending with `data: [DONE]`.",
    parameters=GENERATION, ok_headers=RATELIMIT, replayed=STORED)


@post("/v1/completions", status_code=200, opt=documented(CREATE_COMPLETION))
async def completions(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    """Legacy text completion, streamed as SSE when ``stream`` is true."""
    return await services.flow.respond(request, services.completion)
