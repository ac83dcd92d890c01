"""The objects ``/v1/responses`` answers with: the ``Response``, its output items and usage, and
the input tokens count (OpenAI's field order; the shapes of OpenAI's OpenAPI spec, which the
tests validate every body and streamed event against)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from engines.contract.messages import SampledLogprob, Usage
from gateway.responses.protocol import Effort, Summary, TextFormat, Verbosity

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


class UrlCitation(Struct, tag="url_citation", tag_field="type"):
    """(Never made: no tool here cites. Typed so the document says what ``annotations`` may hold.)"""

    url: str
    start_index: int
    end_index: int
    title: str


class SummaryText(Struct, tag="summary_text", tag_field="type"):
    """(Never made: there is no summariser; typed for the document.)"""

    text: str


class OutputText(Struct, tag="output_text", tag_field="type"):
    text: str
    #: Always empty: nothing is cited.
    annotations: Annotated[list[UrlCitation], Meta(max_length=0)]
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
    #: Always empty: reasoning comes back as its text (``content``), never summarised.
    summary: Annotated[list[SummaryText], Meta(max_length=0)]
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
    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


class ReasoningConfig(Struct):
    effort: Effort | None = None
    summary: Summary | None = None


class TextConfig(Struct):
    format: TextFormat
    verbosity: Verbosity = "medium"


class ToolChoiceFunction(Struct, tag="function", tag_field="type"):
    name: str


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
    max_tool_calls: Annotated[int, Meta(ge=0)] | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    prompt_cache_key: str | None
    reasoning: ReasoningConfig
    safety_identifier: Annotated[str, Meta(max_length=64)] | None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast", "ultrafast"] = "default"
    temperature: Annotated[float, Meta(ge=0, le=2)]
    text: TextConfig
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction
    tools: list[FunctionToolEcho]
    top_logprobs: Annotated[int, Meta(ge=0, le=20)]
    top_p: Annotated[float, Meta(ge=0, le=1)]
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
