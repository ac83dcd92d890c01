"""vLLM's OpenAI stream chunks, as the vLLM backend reads them, and their wire events.

``engines.vllm_engine`` relays the SSE chunks of vLLM's serving classes; this module holds the
shape of those chunks (only the fields Conduit forwards, decoded by msgspec) and their mapping
to Conduit's ``ChoiceDelta``, ``Usage`` and errors (a rejection keeps vLLM's status).
It imports no vLLM.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from engines.backend import JobRejected
from engines.contract.messages import ChoiceDelta, SampledLogprob, TokenLogprob, ToolCallDelta, Usage


# ---- the shape of vLLM's stream chunks (only the fields Conduit forwards) ---------------
class ChunkError(msgspec.Struct):
    """vLLM's error body (``code``: the HTTP status)."""

    message: str = ""
    type: str = ""
    param: str | None = None
    code: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, Any] | None = None


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function = msgspec.field(default_factory=_Function)


class ChatMessage(msgspec.Struct):
    """A chat choice's ``delta`` (a stream's) or ``message`` (a whole answer's)."""

    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None  # older vLLM / other servers' spelling
    tool_calls: list[_ToolCall] | None = None  # (a whole answer's may be null)


class _Candidate(msgspec.Struct):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None


class _ChatToken(_Candidate):
    top_logprobs: list[_Candidate] = []


class _ChatLogprobs(msgspec.Struct):
    content: list[_ChatToken] | None = None


class ChatChoice(msgspec.Struct):
    """One choice of a chat completion chunk."""

    index: int = 0
    delta: ChatMessage | None = None
    logprobs: _ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _CompletionLogprobs(msgspec.Struct):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(msgspec.Struct):
    """One choice of a text completion chunk."""

    index: int = 0
    text: str = ""
    logprobs: _CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


C = TypeVar("C", ChatChoice, CompletionChoice)


class Chunk(msgspec.Struct, Generic[C]):
    """One ``data:`` line of vLLM's stream."""

    choices: list[C] = []
    usage: _Usage | None = None
    #: vLLM reports a failure after the stream began as a chunk with only ``error``.
    error: ChunkError | None = None


#: vLLM's errors carry the HTTP status as ``code``; OpenAI's envelope wants a string.
_CODES = {400: "invalid_request", 404: "model_not_found", 413: "request_too_large",
          422: "unprocessable_entity", 429: "rate_limited", 501: "not_implemented", 503: "overloaded"}


#: vLLM's finish reasons for a choice that did not finish.
UNFINISHED = frozenset({"abort", "error"})


def usage_of(u: _Usage) -> Usage:
    """A chunk's usage as the wire carries it."""
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens or 0,
                 cached_tokens=(u.prompt_tokens_details or {}).get("cached_tokens"))


def failure(error: ChunkError) -> Exception:
    """The exception for a vLLM error: a rejection, or (server faults) a plain error."""
    status = error.code or 400
    if status >= 500 and status != 503:
        return RuntimeError(f"vLLM failed the request: {error.message}")
    return JobRejected(
        error.message, status=status, code=_CODES.get(status, "invalid_request"),
        # vLLM names Python-style types ("BadRequestError"); clients expect OpenAI's.
        type="invalid_request_error" if status < 500 else "server_error", param=error.param)


def chat_delta(c: ChatChoice) -> ChoiceDelta | None:
    """A chat choice's delta (None when it carries nothing to forward)."""
    m = c.delta or ChatMessage()
    calls = [ToolCallDelta(index=t.index, id=t.id, name=t.function.name, arguments=t.function.arguments or "")
             for t in m.tool_calls or ()]
    content = c.logprobs.content if c.logprobs is not None else None
    logprobs = [SampledLogprob(e.token, e.logprob, e.bytes, [TokenLogprob(t.token, t.logprob, t.bytes)
                                                              for t in e.top_logprobs])
                for e in content] if content else None
    text, reasoning = m.content or "", m.reasoning or m.reasoning_content or ""
    if not (text or reasoning or calls or logprobs or c.finish_reason):
        return None  # e.g. the role-only first chunk
    return ChoiceDelta(index=c.index, text=text, reasoning=reasoning, tool_calls=calls, logprobs=logprobs,
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason)


def completion_delta(c: CompletionChoice) -> ChoiceDelta | None:
    """A completion choice's delta (None when it carries nothing to forward)."""
    lp = c.logprobs
    logprobs = [
        # A None logprob (the first prompt token under echo) has no value; vLLM's own
        # stand-in for "impossible" is -9999.
        SampledLogprob(tok, -9999.0 if val is None else val, None,
                       [TokenLogprob(k, v) for k, v in (top or {}).items()], offset)
        for tok, val, top, offset in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset)
    ] if lp is not None and lp.tokens else None
    if not (c.text or logprobs or c.finish_reason):
        return None
    return ChoiceDelta(index=c.index, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason,
                       stop_reason=c.stop_reason)
