"""``POST /v1/completions`` (legacy text completions): OpenAI's ``text_completion`` objects."""

from __future__ import annotations

import msgspec
from msgspec import UNSET

from engines.contract.messages import Delta, SampledLogprob, Usage
from gateway.protocol import (
    COMPLETION_FINISH_REASONS,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionFinishReason,
    CompletionLogprobs,
)
from gateway.serving import ChoiceState, StreamState, usage_of


def finish_reason(reason: str | None) -> CompletionFinishReason:
    """OpenAI's finish reason for an engine's (vLLM's "abort" or "error" must not leak through)."""
    return reason if reason in COMPLETION_FINISH_REASONS else "stop"  # type: ignore[return-value]


def completion_logprobs(items: list[SampledLogprob] | None) -> CompletionLogprobs | None:
    if items is None:
        return None
    return CompletionLogprobs(text_offset=[i.text_offset for i in items], token_logprobs=[i.logprob for i in items],
                              tokens=[i.token for i in items],
                              top_logprobs=[{t.token: t.logprob for t in i.top} for i in items])


class CompletionRenderer:
    """Text completion objects; streamed chunks share the shape of the full response."""

    id_prefix = "cmpl"

    def __init__(self) -> None:
        self._enc = msgspec.json.Encoder()

    def full(self, rid: str, created: int, model: str, choices: list[ChoiceState], usage: Usage) -> bytes:
        out = [CompletionChoice(finish_reason=finish_reason(c.finish_reason), index=c.index,
                                logprobs=completion_logprobs(c.logprobs), text="".join(c.text)) for c in choices]
        return self._enc.encode(Completion(id=rid, choices=out, created=created, model=model, usage=usage_of(usage)))

    def chunks(self, rid: str, created: int, model: str, delta: Delta, out: bytearray, state: StreamState) -> None:
        enc = self._enc.encode
        usage = None if state.include_usage else UNSET
        if state.include_usage and delta.usage is not None:  # continuous_usage_stats (vLLM's extension)
            usage = usage_of(delta.usage)
        for c in delta.choices:
            reason = finish_reason(c.finish_reason) if c.finish_reason is not None else None
            chunk = CompletionChunk(id=rid, created=created, model=model, usage=usage, choices=[
                CompletionChunkChoice(finish_reason=reason, index=c.index, logprobs=completion_logprobs(c.logprobs),
                                      text=c.text)])
            out += b"data: "
            out += enc(chunk)
            out += b"\n\n"

    def usage_chunk(self, rid: str, created: int, model: str, usage: Usage) -> bytes:
        chunk = CompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage_of(usage))
        return b"data: " + self._enc.encode(chunk) + b"\n\n"
