"""``POST /v1/chat/completions``: OpenAI's chat objects from engine events."""

from __future__ import annotations

import msgspec
from msgspec import UNSET

from engines.contract.messages import Delta, SampledLogprob, Usage
from gateway.protocol import (
    CHAT_FINISH_REASONS,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatFinishReason,
    ChatLogprobs,
    ChatTokenLogprob,
    ChunkChoice,
    ChunkDelta,
    ChunkFunction,
    ChunkToolCall,
    ResponseFunction,
    ResponseMessage,
    ResponseToolCall,
    TopLogprob,
)
from gateway.serving import ChoiceState, StreamState, usage_of


def finish_reason(reason: str | None) -> ChatFinishReason:
    """OpenAI's finish reason for an engine's (vLLM's "abort" or "error" must not leak through)."""
    return reason if reason in CHAT_FINISH_REASONS else "stop"  # type: ignore[return-value]


def chat_logprobs(items: list[SampledLogprob] | None) -> ChatLogprobs | None:
    if items is None:
        return None
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=i.token, logprob=i.logprob, bytes=i.bytes,
                         top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in i.top])
        for i in items])


class ChatRenderer:
    """Chat completion objects: ``chat.completion`` and ``chat.completion.chunk``."""

    id_prefix = "chatcmpl"

    def __init__(self) -> None:
        self._enc = msgspec.json.Encoder()

    def full(self, rid: str, created: int, model: str, choices: list[ChoiceState], usage: Usage) -> bytes:
        out = []
        for c in choices:
            tool_calls = [ResponseToolCall(id=t.id or f"call_{rid[-12:]}_{c.index}_{i}", type="function",
                                           function=ResponseFunction(name=t.name, arguments="".join(t.arguments)))
                          for i, t in sorted(c.tool_calls.items())]
            text = "".join(c.text)
            message = ResponseMessage(content=text if text or not tool_calls else None, refusal=None,
                                      role="assistant", tool_calls=tool_calls,
                                      reasoning_content="".join(c.reasoning) or None)
            out.append(ChatChoice(finish_reason=finish_reason(c.finish_reason), index=c.index, message=message,
                                  logprobs=chat_logprobs(c.logprobs)))
        return self._enc.encode(ChatCompletion(id=rid, choices=out, created=created, model=model,
                                               usage=usage_of(usage)))

    def chunks(self, rid: str, created: int, model: str, delta: Delta, out: bytearray, state: StreamState) -> None:
        enc = self._enc.encode
        usage = None if state.include_usage else UNSET
        if state.include_usage and delta.usage is not None:  # continuous_usage_stats (vLLM's extension)
            usage = usage_of(delta.usage)
        for c in delta.choices:
            tool_calls = [ChunkToolCall(index=t.index, id=t.id, type="function" if t.id else None,
                                        function=ChunkFunction(name=t.name, arguments=t.arguments))
                          for t in c.tool_calls] or None
            role = None
            if c.index not in state.seen:  # a choice's first chunk names the role, as OpenAI's does
                state.seen.add(c.index)
                role = "assistant"
            # Content only when there is some (or on the role chunk, as OpenAI's first chunk has "").
            content = c.text if c.text or (role and not (tool_calls or c.reasoning)) else None
            body = ChunkDelta(role=role, content=content,
                              reasoning_content=c.reasoning or None, tool_calls=tool_calls)
            reason = finish_reason(c.finish_reason) if c.finish_reason is not None else None
            chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                ChunkChoice(delta=body, finish_reason=reason, index=c.index, logprobs=chat_logprobs(c.logprobs))],
                usage=usage)
            out += b"data: "
            out += enc(chunk)
            out += b"\n\n"

    def usage_chunk(self, rid: str, created: int, model: str, usage: Usage) -> bytes:
        chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage_of(usage))
        return b"data: " + self._enc.encode(chunk) + b"\n\n"
