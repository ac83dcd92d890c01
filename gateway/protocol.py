"""OpenAI wire schemas the gateway validates and emits (OpenAI's field order).

Requests are validated here so a bad body gets a 400 naming the field before it costs a
queue slot; so are the inputs that would make one request's work or memory grow far beyond
its size in bytes (bounded by settings: ``max_choices``, ``max_messages``, ...). The
validated body travels to the engine unchanged (vLLM's own protocol classes build engine
parameters from it). Unknown fields are let through, as vLLM accepts
its extensions (``top_k``, ``min_p``, ...). Responses are built from engine events and
carry exactly the shapes of OpenAI's OpenAPI spec: no ``null`` where the spec has an array
or object.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.errors import InvalidRequest
from gateway.images.protocol import ImageRequest
from gateway.settings import GatewaySettings

#: Marks a field OpenAI's API does not define: ``x-conduit-extension`` (whose it is) in Conduit's
#: OpenAPI document (``gateway.openapi``). Decoding ignores it.
VLLM_EXTENSION = Meta(extra_json_schema={"x-conduit-extension": "vllm"})

# ---- requests --------------------------------------------------------------------------

Probability = Annotated[float, Meta(ge=0, le=1)]
Temperature = Annotated[float, Meta(ge=0, le=2)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, Meta(ge=1)]
Stop = str | Annotated[list[str], Meta(max_length=4)] | None


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


class StreamOptions(Struct, forbid_unknown_fields=False):
    include_usage: bool | None = None
    continuous_usage_stats: Annotated[bool | None, VLLM_EXTENSION] = None


class JsonSchemaFormat(Struct):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(Struct, tag="text", tag_field="type"):
    pass


class JsonObjectFormat(Struct, tag="json_object", tag_field="type"):
    pass


class JsonSchemaResponseFormat(Struct, tag="json_schema", tag_field="type"):
    json_schema: JsonSchemaFormat


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaResponseFormat


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


class ChatCompletionRequest(Struct, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/chat/completions``. Fields it does not name go to the engine unchanged (vLLM's
    extensions: ``top_k``, ``min_p``, ``ignore_eos``, ...; OpenAI's fields vLLM ignores)."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    model: str
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None

    def check(self, limits: GatewaySettings) -> None:
        """Bounds on the request's work, then rules that span fields (OpenAI answers these with a 400 too)."""
        _at_most("messages", "messages", len(self.messages), limits.max_messages)
        images = 0
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                _at_most(f"messages[{i}].content", "content parts", len(m.content), limits.max_content_parts)
                images += sum(isinstance(p, ImagePart) for p in m.content)
            if m.tool_calls is not None:
                _at_most(f"messages[{i}].tool_calls", "tool calls", len(m.tool_calls), limits.max_tool_calls)
        _at_most("messages", "images", images, limits.max_images)
        if self.n is not None and self.n > limits.max_choices:
            raise InvalidRequest(f"Invalid 'n': this server generates at most {limits.max_choices} choices per "
                                 f"request, but got {self.n}.", param="n", code="invalid_value")
        if self.logit_bias is not None:
            _at_most("logit_bias", "entries", len(self.logit_bias), limits.max_logit_bias)
        if self.tools is not None:
            _at_most("tools", "tools", len(self.tools), limits.max_tools)
            for i, t in enumerate(self.tools):
                _nested_at_most(f"tools[{i}].function.parameters", t.function.parameters, limits.max_json_depth)
        if isinstance(self.response_format, JsonSchemaResponseFormat):
            _nested_at_most("response_format.json_schema.schema", self.response_format.json_schema.schema,
                            limits.max_json_depth)
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise InvalidRequest("`top_logprobs` requires `logprobs` to be true.", param="top_logprobs")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("`stream_options` is only allowed when `stream` is true.", param="stream_options")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise InvalidRequest("`tool_choice` requires `tools`.", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            if self.tool_choice.function.name not in {t.function.name for t in self.tools}:
                raise InvalidRequest(f"Tool `{self.tool_choice.function.name}` named in `tool_choice` is not in "
                                     "`tools`.", param="tool_choice")


# A string, a batch of strings, a token list, or a batch of token lists (msgspec takes one
# list type per union, so the element kinds are checked in ``check``).
Prompt = str | Annotated[list[str | int | Annotated[list[int], Meta(min_length=1)]], Meta(min_length=1)]


class CompletionRequest(Struct, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/completions``. Fields it does not name go to the engine unchanged (vLLM's extensions)."""

    model: str
    prompt: Prompt
    best_of: Annotated[int, Meta(ge=1, le=20)] | None = None
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    user: str | None = None

    def check(self, limits: GatewaySettings) -> None:
        """Bounds on the request's work, then rules that span fields; sizes are checked before any loop."""
        prompts = 1
        if isinstance(self.prompt, list):
            if isinstance(self.prompt[0], int):  # one prompt given as token ids
                _at_most("prompt", "token ids", len(self.prompt), limits.max_prompt_tokens)
            else:
                prompts = len(self.prompt)
                _at_most("prompt", "prompts", prompts, limits.max_prompts)
            kinds = {type(p) for p in self.prompt}
            if len(kinds) > 1:
                raise InvalidRequest("`prompt` must be a string, a list of strings, a list of token ids, or a list "
                                     "of token-id lists, not a mixture.", param="prompt")
            if list in kinds:
                for i, ids in enumerate(self.prompt):
                    _at_most(f"prompt[{i}]", "token ids", len(ids), limits.max_prompt_tokens)  # type: ignore[arg-type]
        if self.logit_bias is not None:
            _at_most("logit_bias", "entries", len(self.logit_bias), limits.max_logit_bias)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("`stream_options` is only allowed when `stream` is true.", param="stream_options")
        if self.best_of is not None and self.n is not None and self.best_of < self.n:
            raise InvalidRequest("`best_of` must be greater than or equal to `n`.", param="best_of")
        if self.stream and self.best_of is not None and self.best_of > (self.n or 1):
            raise InvalidRequest("`best_of` cannot be used with streaming.", param="best_of")
        # Every prompt is sampled max(n, best_of) times; all of it is one request's work.
        n, best_of = self.n or 1, self.best_of or 1
        if max(n, best_of) * prompts > limits.max_choices:
            param, per_prompt = ("best_of", best_of) if best_of > n else ("n", n)
            raise InvalidRequest(f"Invalid '{param}': this request asks for {per_prompt * prompts} choices "
                                 f"({param}={per_prompt} x {prompts} prompts), but this server generates at most "
                                 f"{limits.max_choices} choices per request.", param=param, code="invalid_value")


def _at_most(param: str, what: str, count: int, limit: int) -> None:
    if count > limit:
        raise InvalidRequest(f"Invalid '{param}': too many {what}. This server accepts at most {limit}, but got "
                             f"{count}.", param=param, code="invalid_value")


def _nested_at_most(param: str, value: Any, limit: int) -> None:
    """Refuse decoded JSON nested deeper than ``limit`` objects/arrays (``{}`` is 1 deep).

    Level by level, without recursion; ``type() is`` rather than ``isinstance`` keeps it to
    about 60 ns a node (decoding the node cost more).
    """
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise InvalidRequest(f"Invalid '{param}': nested too deeply. This server accepts JSON nested at most "
                                 f"{limit} levels deep.", param=param, code="invalid_value")
        below: list[Any] = []
        append = below.append
        for v in level:
            for c in (v.values() if type(v) is dict else v):
                if type(c) is dict or type(c) is list:
                    append(c)
        level = below


# ---- responses -------------------------------------------------------------------------
# Literal types name every value the renderers emit (they are checked when encoding only by
# the renderers themselves: the OpenAPI document and the tests read them from here).

#: OpenAI's finish reasons: an engine's own (vLLM's "abort", "error") never leak through.
ChatFinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
CompletionFinishReason = Literal["stop", "length", "content_filter"]
CHAT_FINISH_REASONS = frozenset(get_args(ChatFinishReason))
COMPLETION_FINISH_REASONS = frozenset(get_args(CompletionFinishReason))


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


class PromptTokensDetails(Struct):
    cached_tokens: int


class CompletionUsage(Struct, omit_defaults=True):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


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


class CompletionLogprobs(Struct):
    text_offset: list[int]
    token_logprobs: list[float]
    tokens: list[str]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(Struct):
    finish_reason: CompletionFinishReason
    index: int
    logprobs: CompletionLogprobs | None
    text: str


class CompletionChunkChoice(Struct):
    """A streamed choice: as :class:`CompletionChoice`, with no finish reason until it ends."""

    finish_reason: CompletionFinishReason | None
    index: int
    logprobs: CompletionLogprobs | None
    text: str


class Completion(Struct, tag_field="object", tag="text_completion"):
    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    usage: CompletionUsage


class CompletionChunk(Struct, omit_defaults=True, tag_field="object", tag="text_completion"):
    """A streamed ``text_completion`` (OpenAI's stream sends the full response's shape, but with
    ``finish_reason: null`` until a choice ends, and ``usage: null`` with ``include_usage``)."""

    id: str
    choices: list[CompletionChunkChoice]
    created: int
    model: str
    usage: CompletionUsage | None | UnsetType = UNSET


class Model(Struct):
    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str = "conduit"


class ModelList(Struct):
    data: list[Model]
    object: Literal["list"] = "list"


# ---- Conduit's own endpoints -------------------------------------------------------------


class Health(Struct):
    """``GET /health``: the process is alive."""

    status: Literal["ok"] = "ok"


class Readiness(Struct):
    """``GET /ready``: whether Redis answers and at least one engine is live."""

    status: Literal["ready", "not_ready"]
    redis: bool
    engines: int
    #: Models with a live engine now.
    models: list[str]


# ---- decoding --------------------------------------------------------------------------


def _param_from_path(message: str) -> tuple[str, str | None]:
    """msgspec says ``Expected `int`, got `str` - at `$.messages[0].role```; OpenAI names the field."""
    head, sep, path = message.rpartition(" - at `")
    if not sep:
        return message, None
    path = path.rstrip("`")
    param = path[2:] if path.startswith("$.") else path.lstrip("$") or None
    return head, param


def _missing_field(message: str) -> str | None:
    # "Object missing required field `model` - at `$.messages[0]`"
    if message.startswith("Object missing required field `"):
        return message.split("`")[1]
    return None


class RequestDecoder:
    """Decodes and validates request bodies; every failure is an :class:`InvalidRequest`.

    ``limits`` supplies the bounds on one request's work (``max_choices``, ``max_messages``, ...).
    """

    def __init__(self, limits: GatewaySettings | None = None) -> None:
        self._limits = limits if limits is not None else GatewaySettings()
        self._chat = msgspec.json.Decoder(ChatCompletionRequest)
        self._completion = msgspec.json.Decoder(CompletionRequest)
        self._image = msgspec.json.Decoder(ImageRequest)

    def chat(self, body: bytes) -> ChatCompletionRequest:
        req = self._decode(self._chat, body)
        req.check(self._limits)
        return req

    def completion(self, body: bytes) -> CompletionRequest:
        req = self._decode(self._completion, body)
        req.check(self._limits)
        return req

    def image(self, body: bytes) -> ImageRequest:
        req = self._decode(self._image, body)
        req.check(self._limits)
        return req

    @staticmethod
    def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
        if not body.strip():
            raise InvalidRequest("The request body is empty; expected a JSON object.")
        try:
            return decoder.decode(body)
        except msgspec.ValidationError as exc:
            text, param = _param_from_path(str(exc))
            missing = _missing_field(text)
            if missing is not None:
                param = f"{param}.{missing}" if param else missing
                text = f"Missing required parameter: '{param}'."
            elif param:
                text = f"Invalid value for '{param}': {text}."
            raise InvalidRequest(text, param=param, code="invalid_value" if missing is None else
                                 "missing_required_parameter") from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidRequest(f"We could not parse the JSON body of your request ({exc}). Send a valid JSON "
                                 "object.", code="invalid_json") from None
