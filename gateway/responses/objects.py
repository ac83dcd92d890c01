"""The objects ``/v1/responses`` answers with: the ``Response``, its output items and usage, and
the input tokens count (OpenAI's field order; the shapes of OpenAI's OpenAPI spec, which the
tests validate every body and streamed event against)."""

from __future__ import annotations

from typing import Any, Literal

from msgspec import UNSET, Struct, UnsetType

from engines.contract.messages import SampledLogprob, Usage

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]


class TopLogProb(Struct):
    token: str
    logprob: float
    bytes: list[int]


class LogProb(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogProb]


def logprobs_of(items: list[SampledLogprob] | None) -> list[LogProb]:
    if not items:
        return []
    return [LogProb(token=i.token, logprob=i.logprob, bytes=i.bytes if i.bytes is not None else list(i.token.encode()),
                    top_logprobs=[TopLogProb(token=t.token, logprob=t.logprob,
                                             bytes=t.bytes if t.bytes is not None else list(t.token.encode()))
                                  for t in i.top])
            for i in items]


class OutputText(Struct, tag="output_text", tag_field="type"):
    text: str
    annotations: list[Any]
    logprobs: list[LogProb]


class ReasoningText(Struct, tag="reasoning_text", tag_field="type"):
    text: str


class MessageItem(Struct, tag="message", tag_field="type"):
    id: str
    status: ItemStatus
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class FunctionCallItem(Struct, tag="function_call", tag_field="type"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class ReasoningItem(Struct, tag="reasoning", tag_field="type"):
    id: str
    summary: list[Any]
    content: list[ReasoningText]
    status: ItemStatus


OutputItem = MessageItem | FunctionCallItem | ReasoningItem


class ResponseInputTokensDetails(Struct):
    cached_tokens: int
    cache_write_tokens: int = 0


class ResponseOutputTokensDetails(Struct):
    reasoning_tokens: int


class ResponseUsage(Struct):
    input_tokens: int
    input_tokens_details: ResponseInputTokensDetails
    output_tokens: int
    output_tokens_details: ResponseOutputTokensDetails
    total_tokens: int


def usage_of(u: Usage) -> ResponseUsage:
    return ResponseUsage(input_tokens=u.prompt_tokens, input_tokens_details=ResponseInputTokensDetails(u.cached_tokens or 0),
                         output_tokens=u.completion_tokens, output_tokens_details=ResponseOutputTokensDetails(0),
                         total_tokens=u.prompt_tokens + u.completion_tokens)


class IncompleteDetails(Struct):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(Struct):
    code: str
    message: str


class ReasoningConfig(Struct):
    effort: str | None = None
    summary: str | None = None


class TextConfig(Struct):
    format: dict[str, Any]
    verbosity: str = "medium"


class FunctionToolEcho(Struct, tag="function", tag_field="type"):
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool | None


class ResponseObject(Struct, kw_only=True):
    """OpenAI's ``Response``: what the request asked (echoed), then its output, status and usage."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    background: bool = False
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None = None
    prompt_cache_key: str | None
    reasoning: ReasoningConfig
    safety_identifier: str | None
    service_tier: str = "default"
    #: Nothing is stored yet (the Responses API's part 2): always false.
    store: bool = False
    temperature: float
    text: TextConfig
    tool_choice: Any
    tools: list[FunctionToolEcho]
    top_logprobs: int
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    #: Absent until the response ends (the spec's ``usage`` is an object, never null).
    usage: ResponseUsage | UnsetType = UNSET
    #: Absent unless the request named one (the spec's ``user`` is a string, never null).
    user: str | UnsetType = UNSET
    metadata: dict[str, str]


class InputTokens(Struct):
    """``POST /v1/responses/input_tokens``'s answer."""

    input_tokens: int
    object: Literal["response.input_tokens"] = "response.input_tokens"


class ResponseEvent(Struct, omit_defaults=True):
    """One streamed event (the OpenAPI document's shape of all of them; each event has the fields
    OpenAI's spec gives its ``type``): ``response.created`` ... ``response.completed``, ``error``."""

    type: str
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    item: OutputItem | None = None
    item_id: str | None = None
    content_index: int | None = None
    part: OutputText | ReasoningText | None = None
    delta: str | None = None
    text: str | None = None
    arguments: str | None = None
    name: str | None = None
    logprobs: list[LogProb] | None = None
    code: str | None = None
    message: str | None = None
    param: str | None = None
