"""``POST /v1/chat/completions``: OpenAI's chat objects from engine events, and the handler."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency

from engines.contract.messages import Delta, SampledLogprob, Usage
from gateway.apispec import GENERATION, JOB_ERRORS, RATELIMIT, STORED, Operation, documented
from gateway.chat.protocol import (
    CHAT_FINISH_REASONS,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
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
from gateway.common.generation import ChoiceState, ChunkRenderer, StreamState, chunk_usage, finish_reason, usage_of
from gateway.errors import ErrorEnvelope
from gateway.services import Services


def chat_logprobs(items: list[SampledLogprob] | None) -> ChatLogprobs | None:
    if items is None:
        return None
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=i.token, logprob=i.logprob, bytes=i.bytes,
                         top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in i.top])
        for i in items])


class ChatRenderer(ChunkRenderer):
    """Chat completion objects: ``chat.completion`` and ``chat.completion.chunk``."""

    chunk_type = ChatCompletionChunk
    request = ChatCompletionRequest
    kind = "chat"
    id_prefix = "chatcmpl"

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
            out.append(ChatChoice(finish_reason=finish_reason(c.finish_reason, CHAT_FINISH_REASONS), index=c.index,
                                  message=message, logprobs=chat_logprobs(c.logprobs)))
        return self._enc.encode(ChatCompletion(id=rid, choices=out, created=created, model=model,
                                               usage=usage_of(usage)))

    def chunks(self, rid: str, created: int, model: str, delta: Delta, out: bytearray, state: StreamState) -> None:
        enc = self._enc.encode
        usage = chunk_usage(delta, state)
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
            reason = None if c.finish_reason is None else finish_reason(c.finish_reason, CHAT_FINISH_REASONS)
            chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                ChunkChoice(delta=body, finish_reason=reason, index=c.index, logprobs=chat_logprobs(c.logprobs))],
                usage=usage)
            out += b"data: "
            out += enc(chunk)
            out += b"\n\n"


CREATE_CHAT_COMPLETION = Operation(
    "createChatCompletion", "Create a chat completion", "Chat", {**JOB_ERRORS, 422: "`unprocessable_entity`."},
    body=ChatCompletionRequest, json=ChatCompletion,
    stream=(("message", (ChatCompletionChunk, ErrorEnvelope)),), stream_done=True,
    description="Streamed as server-sent events when `stream` is true: `chat.completion.chunk` objects, then "
                "`data: [DONE]`; a failure after the stream began is one error object, then `[DONE]`.",
    parameters=GENERATION, ok_headers=RATELIMIT, replayed=STORED)


@post("/v1/chat/completions", status_code=200, opt=documented(CREATE_CHAT_COMPLETION))
async def chat_completions(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    """Chat completion, streamed as SSE when ``stream`` is true."""
    return await services.flow.respond(request, services.chat)
