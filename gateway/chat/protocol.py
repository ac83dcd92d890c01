"""``POST /v1/chat/completions``: OpenAI's chat request the gateway validates and the chat objects
it answers with (OpenAI's field order; what chat shares with completions is in
``gateway.common.protocol``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from engines.contract.media import MediaPolicy, MediaRefused
from gateway.common.bounds import (
    ModelContext,
    at_most,
    min_tokens_at_most,
    nested_at_most,
    room,
    step_at_most,
    utf8_len,
    work_at_most,
)
from gateway.common.protocol import (
    VLLM_EXTENSION,
    CompletionUsage,
    Ext,
    JsonSchemaResponseFormat,
    PositiveInt,
    Refused,
    ResponseFormat,
    Sampling,
    refusing,
)
from gateway.errors import InvalidRequest
from gateway.settings import RequestBounds
from gateway.tenancy.cost import (
    IMAGE_PART_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    Cost,
    tokens_of,
)

#: Tokens a chat template may add around one message (role markers, separators), reckoned high.
TEMPLATE_TOKENS = 32

_JSON = msgspec.json.Encoder()


class TextPart(Struct, tag="text", tag_field="type"):
    text: str


class ImageUrl(Struct):
    url: str
    detail: str | None = None


class ImagePart(Struct, tag="image_url", tag_field="type"):
    image_url: ImageUrl


class RefusalPart(Struct, tag="refusal", tag_field="type"):
    refusal: str


ContentPart = TextPart | ImagePart | RefusalPart


class FunctionCall(Struct):
    name: str
    arguments: str


class ToolCall(Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(Struct, forbid_unknown_fields=False):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(Struct):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct):
    function: NamedFunction
    type: Literal["function"] = "function"


class ChatCompletionRequest(Sampling, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/chat/completions``. OpenAI's fields, then vLLM's chat extensions (with those of
    :class:`Sampling`); fields named nowhere are ignored."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    model: str
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # ---- vLLM's chat extensions ----
    echo: Annotated[bool | None, Ext] = None
    add_generation_prompt: Annotated[bool | None, Ext] = None
    continue_final_message: Annotated[bool | None, Ext] = None
    include_reasoning: Annotated[bool | None, Ext] = None
    #: Documents for retrieval-augmented chat templates (rendered into the prompt).
    documents: Annotated[Annotated[list[dict[str, str]], Meta(max_length=2048)] | None, Ext] = None
    #: Variables for the model's chat template (``{"enable_thinking": false}``).
    chat_template_kwargs: Annotated[dict[str, Any] | None, Ext] = None
    chat_template: Refused = UNSET
    mm_processor_kwargs: Refused = UNSET
    media_io_kwargs: Refused = UNSET
    return_prompt_text: Refused = UNSET

    def check(self, limits: RequestBounds) -> None:
        """Bounds on the request's work, then rules that span fields (OpenAI answers these with a 400 too)."""
        self.check_sampling(limits)
        min_tokens_at_most(self.min_tokens, self.max_completion_tokens or self.max_tokens)
        if self.chat_template_kwargs is not None:
            nested_at_most("chat_template_kwargs", self.chat_template_kwargs, limits.max_json_depth)
        at_most("messages", "messages", len(self.messages), limits.max_messages)
        images = 0
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                at_most(f"messages[{i}].content", "content parts", len(m.content), limits.max_content_parts)
                images += sum(isinstance(p, ImagePart) for p in m.content)
            if m.tool_calls is not None:
                at_most(f"messages[{i}].tool_calls", "tool calls", len(m.tool_calls), limits.max_tool_calls)
        at_most("messages", "images", images, limits.max_images)
        if images:
            self.check_media(MediaPolicy(limits.media_domains))
        if self.n is not None and self.n > limits.max_choices:
            raise InvalidRequest(f"Invalid 'n': this server generates at most {limits.max_choices} choices per "
                                 f"request, but got {self.n}.", param="n", code="invalid_value")
        if self.tools is not None:
            at_most("tools", "tools", len(self.tools), limits.max_tools)
            for i, t in enumerate(self.tools):
                nested_at_most(f"tools[{i}].function.parameters", t.function.parameters, limits.max_json_depth)
        if isinstance(self.response_format, JsonSchemaResponseFormat):
            nested_at_most("response_format.json_schema.schema", self.response_format.json_schema.schema,
                            limits.max_json_depth)
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise InvalidRequest("`top_logprobs` requires `logprobs` to be true.", param="top_logprobs")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise InvalidRequest("`tool_choice` requires `tools`.", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            if self.tool_choice.function.name not in {t.function.name for t in self.tools}:
                raise InvalidRequest(f"Tool `{self.tool_choice.function.name}` named in `tool_choice` is not in "
                                     "`tools`.", param="tool_choice")

    def check_media(self, policy: MediaPolicy) -> None:
        """Every image URL against the media policy (``engines.contract.media``): before anything
        is queued, so no engine is ever asked to fetch what the policy refuses (engines check again)."""
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if isinstance(part, ImagePart):
                        try:
                            policy.check(part.image_url.url)
                        except MediaRefused as exc:
                            raise InvalidRequest(exc.message, param=f"messages[{i}].content[{j}].image_url.url",
                                                 code=exc.code) from None

    def fits(self, model: ModelContext, limits: RequestBounds) -> int | None:
        """What the request may generate, against the model's context, batch and ``max_output_work``
        (checked once the model's engines are known, before anything is queued). Returns the
        ``max_tokens`` the job must carry when the request named none and could otherwise pass
        ``max_output_work`` (None: as it is)."""
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        most = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        chars = 0
        if model.max_chars_per_token and self.truncate_prompt_tokens is None:
            for m in self.messages:
                content = m.content
                if isinstance(content, str):
                    chars += len(content)
                elif content:
                    chars += sum(len(p.text) for p in content if isinstance(p, TextPart))
        most = room(model, "messages", param, most, chars)
        n = self.n or 1
        top = (self.top_logprobs or 0) if self.logprobs else 0
        echoed = 0
        if self.echo and self.messages[-1].content:  # vLLM starts every choice with the last message
            content = self.messages[-1].content
            echoed += n * (1 + top) * (utf8_len(content) if isinstance(content, str) else
                                       sum(utf8_len(p.text) for p in content if isinstance(p, TextPart)))
        if self.prompt_logprobs is not None:
            # The rendered prompt: at most the context; unknown, everything the request renders from.
            prompt = model.max_model_len or sum(
                utf8_len(m.content) if isinstance(m.content, str) else
                sum(utf8_len(p.text) for p in m.content if isinstance(p, TextPart)) if m.content else 0
                for m in self.messages) + TEMPLATE_TOKENS * len(self.messages)
            echoed += prompt * (1 + self.prompt_logprobs)
        step_at_most(limits, model, n, top, "top_logprobs")
        cap = work_at_most(limits, most, n, top, echoed, param, "top_logprobs",
                           defaulted=self.max_completion_tokens is None and self.max_tokens is None)
        if cap is not None:
            min_tokens_at_most(self.min_tokens, cap)
        return cap

    def cost(self, limits: RequestBounds) -> Cost:
        """What the request takes from its key's limits at admission (``gateway.tenancy.cost``): its
        estimated prompt plus the most it may generate (``default_max_tokens_estimate`` when it names
        no ``max_completion_tokens`` / ``max_tokens``), times its choices."""
        most = self.max_completion_tokens or self.max_tokens or limits.default_max_tokens_estimate
        return Cost(tokens=self.prompt_tokens() + most * (self.n or 1))

    def prompt_tokens(self) -> int:
        """The estimated prompt: its messages, tool calls and tool definitions."""
        chars = 0
        images = 0
        for m in self.messages:
            content = m.content
            if isinstance(content, str):
                chars += len(content)
            elif content:
                for part in content:
                    if isinstance(part, TextPart):
                        chars += len(part.text)
                    elif isinstance(part, RefusalPart):
                        chars += len(part.refusal)
                    elif isinstance(part, ImagePart):
                        images += 1
            for call in m.tool_calls or ():
                chars += len(call.function.name) + len(call.function.arguments)
        for tool in self.tools or ():
            f = tool.function
            chars += len(f.name) + len(f.description or "") + (len(_JSON.encode(f.parameters)) if f.parameters else 0)
        return tokens_of(chars) + images * IMAGE_PART_TOKENS + len(self.messages) * MESSAGE_OVERHEAD_TOKENS


refusing(ChatCompletionRequest)


# ---- responses -------------------------------------------------------------------------
# Literal types name every value the renderer emits (they are checked when encoding only by
# the renderer itself: the OpenAPI document and the tests read them from here).

#: OpenAI's finish reasons: an engine's own (vLLM's "abort", "error") never leak through.
ChatFinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
CHAT_FINISH_REASONS = frozenset(get_args(ChatFinishReason))


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ResponseFunction(Struct):
    name: str
    arguments: str


class ResponseToolCall(Struct):
    id: str
    type: Literal["function"]
    function: ResponseFunction


class ResponseMessage(Struct, omit_defaults=True):
    # content and refusal are required by the spec (null allowed), so they have no default.
    content: str | None
    refusal: str | None
    role: Literal["assistant"]
    tool_calls: list[ResponseToolCall] = []
    #: Present only when the model reasons (vLLM's reasoning parsers).
    reasoning_content: Annotated[str | None, VLLM_EXTENSION] = None


class ChatChoice(Struct):
    finish_reason: ChatFinishReason
    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None


class ChatCompletion(Struct, kw_only=True):
    id: str
    choices: list[ChatChoice]
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    usage: CompletionUsage


class ChunkFunction(Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ChunkToolCall(Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction | None = None


class ChunkDelta(Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: Annotated[str | None, VLLM_EXTENSION] = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(Struct):
    delta: ChunkDelta
    finish_reason: ChatFinishReason | None
    index: int
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(Struct, omit_defaults=True, tag_field="object", tag="chat.completion.chunk"):
    # ``object`` is the tag: always written, even with omit_defaults.
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    # Absent unless include_usage; then null on every chunk but the last (OpenAI's behaviour),
    # or the usage so far on every chunk with continuous_usage_stats (vLLM's).
    usage: CompletionUsage | None | UnsetType = UNSET


