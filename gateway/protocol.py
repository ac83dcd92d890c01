"""OpenAI wire schemas the gateway validates and emits (OpenAI's field order).

Requests are validated here so a bad body gets a 400 naming the field before it costs a
queue slot; so are the inputs that would make one request's work or memory grow far beyond
its size in bytes (bounded by settings: ``max_choices``, ``max_messages``, ...), and, once the
model's engines are known, what the request may generate: ``fits`` checks the prompt against
the model's context and bounds ``n`` x ``max_tokens`` x (1 + logprob candidates) by
``max_output_work``. The validated body travels to the engine unchanged (vLLM's own protocol
classes build engine parameters from it).

Every field has one decided outcome. OpenAI's fields are typed here (or passed to the engine,
which ignores what it does not use: ``tests/unit/test_openai_agreement.py`` lists them). vLLM's
extensions (``top_k``, ``min_p``, ``bad_words``, ``structured_outputs``, ...) are named here
with bounds (:class:`VllmSampling`, marked ``x-conduit-extension``), or refused with a 400
naming them (:data:`REFUSED`: request-supplied chat templates, scheduling priority, transfer
parameters, ...). Any other field is ignored: the vLLM engine forwards only the fields named
here (``engines.vllm_engine.REQUEST_FIELDS``). Responses are built from engine events and
carry exactly the shapes of OpenAI's OpenAPI spec: no ``null`` where the spec has an array
or object.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, get_args

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.errors import InvalidRequest
from gateway.images.protocol import ImageRequest
from gateway.settings import GatewaySettings

#: Marks a field OpenAI's API does not define: ``x-conduit-extension`` (whose it is) in Conduit's
#: OpenAPI document (``gateway.openapi``). Decoding ignores it.
VLLM_EXTENSION = Meta(extra_json_schema={"x-conduit-extension": "vllm"})
#: A vLLM extension Conduit refuses (any value: ``not: {}``); the reason is in :data:`REFUSED`.
_REFUSED = Meta(extra_json_schema={"x-conduit-extension": "vllm", "not": {},
                                   "description": "Refused by Conduit with a 400 (see gateway.protocol.REFUSED)."})
Refused = Annotated[msgspec.Raw, _REFUSED] | UnsetType

#: vLLM's extensions Conduit refuses, and why (a 400 ``unsupported_parameter`` naming the field).
REFUSED: dict[str, str] = {
    "chat_template": "a request's own chat template is code the engine would run; the model's own template applies",
    "priority": "scheduling priority is the server's to set (fair queueing weighs API keys)",
    "use_beam_search": "beam search is not served through Conduit",
    "length_penalty": "it applies to beam search only, which is not served through Conduit",
    "logprob_token_ids": "logprobs of chosen token ids are not relayed; use `logprobs` / `top_logprobs`",
    "prompt_embeds": "prompt embeddings are not accepted from clients",
    "mm_processor_kwargs": "multimodal processing options are the server's to set",
    "media_io_kwargs": "media loading options are the server's to set",
    "mm_payload": "pre-processed multimodal payloads are not accepted from clients",
    "kv_transfer_params": "KV-cache transfer is internal to a deployment",
    "ec_transfer_params": "encoder-cache transfer is internal to a deployment",
    "vllm_xargs": "custom logits-processor arguments are not accepted from clients",
    "routed_experts_prompt_start": "expert routing data is not relayed",
    "return_token_ids": "token ids are not relayed; use `return_tokens_as_token_ids` with logprobs",
    "return_token_offsets": "token offsets are not relayed",
    "return_prompt_text": "the rendered prompt is not relayed",
    "return_mm_kwargs": "multimodal processor outputs are not relayed",
    "repetition_detection": "not served through Conduit",
    "watermarking": "not served through Conduit",
    "session_id": "sessions are not served through Conduit",
    "stream_interval": "Conduit relays output as the engine produces it",
}

#: Bounds on vLLM's extensions (a 400 naming the field beyond them).
MAX_STOP_TOKEN_IDS = 64
MAX_BAD_WORDS, MAX_BAD_WORD_CHARS = 128, 256
MAX_GUIDED_CHOICES = 1024
#: Characters of a structured-output regex, grammar or structural tag: the engine compiles each
#: into a grammar for the request.
MAX_GRAMMAR_CHARS = 65_536
MAX_ID_CHARS = 256

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


Ext = VLLM_EXTENSION
TokenIds = list[int]


class StructuredOutputs(Struct, forbid_unknown_fields=True):
    """vLLM's ``structured_outputs``: constrain the output to a JSON schema, regex, choice or grammar
    (compiled into a grammar per request, hence the bounds)."""

    json: Annotated[dict[str, Any] | str | None, Ext] = None
    regex: Annotated[Annotated[str, Meta(max_length=MAX_GRAMMAR_CHARS)] | None, Ext] = None
    choice: Annotated[Annotated[list[Annotated[str, Meta(max_length=MAX_GRAMMAR_CHARS)]],
                                Meta(max_length=MAX_GUIDED_CHOICES)] | None, Ext] = None
    grammar: Annotated[Annotated[str, Meta(max_length=MAX_GRAMMAR_CHARS)] | None, Ext] = None
    json_object: Annotated[bool | None, Ext] = None
    disable_any_whitespace: Annotated[bool | None, Ext] = None
    disable_additional_properties: Annotated[bool | None, Ext] = None
    whitespace_pattern: Annotated[Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None, Ext] = None
    structural_tag: Annotated[Annotated[str, Meta(max_length=MAX_GRAMMAR_CHARS)] | None, Ext] = None


class VllmSampling(Struct, kw_only=True, forbid_unknown_fields=False):
    """vLLM's extensions both chat and completions take, as Conduit bounds them, and those it refuses."""

    top_k: Annotated[int | None, Ext] = None
    min_p: Annotated[Probability | None, Ext] = None
    repetition_penalty: Annotated[Annotated[float, Meta(gt=0)] | None, Ext] = None
    stop_token_ids: Annotated[Annotated[TokenIds, Meta(max_length=MAX_STOP_TOKEN_IDS)] | None, Ext] = None
    include_stop_str_in_output: Annotated[bool | None, Ext] = None
    ignore_eos: Annotated[bool | None, Ext] = None
    #: At most the request's ``max_tokens`` (vLLM refuses more).
    min_tokens: Annotated[Annotated[int, Meta(ge=0)] | None, Ext] = None
    skip_special_tokens: Annotated[bool | None, Ext] = None
    spaces_between_special_tokens: Annotated[bool | None, Ext] = None
    truncate_prompt_tokens: Annotated[Annotated[int, Meta(ge=-1)] | None, Ext] = None
    truncation_side: Annotated[Literal["left", "right"] | None, Ext] = None
    #: Counted in ``max_prompt_tokens`` (a list of a vocabulary's ids at most).
    allowed_token_ids: Annotated[TokenIds | None, Ext] = None
    #: Candidates per prompt token (counted in ``max_output_work``); vLLM's -1 (the whole vocabulary) is refused.
    prompt_logprobs: Annotated[Annotated[int, Meta(ge=0, le=20)] | None, Ext] = None
    bad_words: Annotated[Annotated[list[Annotated[str, Meta(max_length=MAX_BAD_WORD_CHARS)]],
                                   Meta(max_length=MAX_BAD_WORDS)] | None, Ext] = None
    add_special_tokens: Annotated[bool | None, Ext] = None
    structured_outputs: Annotated[StructuredOutputs | None, Ext] = None
    #: The engine names the request by its job id; a client's own is accepted and not used.
    request_id: Annotated[Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None, Ext] = None
    return_tokens_as_token_ids: Annotated[bool | None, Ext] = None
    cache_salt: Annotated[Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None, Ext] = None
    thinking_token_budget: Annotated[Annotated[int, Meta(ge=-1)] | None, Ext] = None

    use_beam_search: Refused = UNSET
    length_penalty: Refused = UNSET
    priority: Refused = UNSET
    logprob_token_ids: Refused = UNSET
    mm_payload: Refused = UNSET
    kv_transfer_params: Refused = UNSET
    ec_transfer_params: Refused = UNSET
    vllm_xargs: Refused = UNSET
    routed_experts_prompt_start: Refused = UNSET
    return_token_ids: Refused = UNSET
    return_token_offsets: Refused = UNSET
    return_mm_kwargs: Refused = UNSET
    repetition_detection: Refused = UNSET
    watermarking: Refused = UNSET
    session_id: Refused = UNSET
    stream_interval: Refused = UNSET

    def check_extensions(self, limits: GatewaySettings) -> None:
        """Refused fields, then the bounds a type cannot say."""
        given = self._refused_values(self)  # one C call for every refused field (each UNSET unless sent)
        if given.count(UNSET) != len(given):
            name = next(n for n, v in zip(self._refused, given, strict=True) if v is not UNSET)
            raise InvalidRequest(f"Unsupported parameter: '{name}' is not supported by this server: "
                                 f"{REFUSED[name]}.", param=name, code="unsupported_parameter")
        if self.allowed_token_ids is not None:
            _at_most("allowed_token_ids", "token ids", len(self.allowed_token_ids), limits.max_prompt_tokens)
        so = self.structured_outputs
        if so is not None and isinstance(so.json, dict):
            _nested_at_most("structured_outputs.json", so.json, limits.max_json_depth)

    #: The refused fields this request type has, and a getter of their values (set per class below).
    _refused: ClassVar[tuple[str, ...]] = ()
    _refused_values: ClassVar[Callable[[Any], tuple[Any, ...]]]


class ChatCompletionRequest(VllmSampling, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/chat/completions``. OpenAI's fields, then vLLM's chat extensions (with those of
    :class:`VllmSampling`); fields named nowhere are ignored."""

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

    def check(self, limits: GatewaySettings) -> None:
        """Bounds on the request's work, then rules that span fields (OpenAI answers these with a 400 too)."""
        self.check_extensions(limits)
        _min_tokens_at_most(self.min_tokens, self.max_completion_tokens or self.max_tokens)
        if self.chat_template_kwargs is not None:
            _nested_at_most("chat_template_kwargs", self.chat_template_kwargs, limits.max_json_depth)
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

    def fits(self, model: ModelContext, limits: GatewaySettings) -> int | None:
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
        most = _room(model, "messages", param, most, chars)
        n = self.n or 1
        top = (self.top_logprobs or 0) if self.logprobs else 0
        echoed = 0
        if self.echo and self.messages[-1].content:  # vLLM starts every choice with the last message
            content = self.messages[-1].content
            echoed += n * (1 + top) * (_utf8_len(content) if isinstance(content, str) else
                                       sum(_utf8_len(p.text) for p in content if isinstance(p, TextPart)))
        if self.prompt_logprobs is not None:
            # The rendered prompt: at most the context; unknown, everything the request renders from.
            prompt = model.max_model_len or sum(
                _utf8_len(m.content) if isinstance(m.content, str) else
                sum(_utf8_len(p.text) for p in m.content if isinstance(p, TextPart)) if m.content else 0
                for m in self.messages) + _TEMPLATE_TOKENS * len(self.messages)
            echoed += prompt * (1 + self.prompt_logprobs)
        _step_at_most(limits, model, n, top, "top_logprobs")
        cap = _work_at_most(limits, most, n, top, echoed, param, "top_logprobs",
                            defaulted=self.max_completion_tokens is None and self.max_tokens is None)
        if cap is not None:
            _min_tokens_at_most(self.min_tokens, cap)
        return cap


# A string, a batch of strings, a token list, or a batch of token lists (msgspec takes one
# list type per union, so the element kinds are checked in ``check``).
Prompt = str | Annotated[list[str | int | Annotated[list[int], Meta(min_length=1)]], Meta(min_length=1)]


class CompletionRequest(VllmSampling, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/completions``. OpenAI's fields, then vLLM's completion extensions (with those of
    :class:`VllmSampling`); fields named nowhere are ignored."""

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
    # ---- vLLM's completion extensions ----
    response_format: Annotated[ResponseFormat | None, Ext] = None
    prompt_embeds: Refused = UNSET

    def check(self, limits: GatewaySettings) -> None:
        """Bounds on the request's work, then rules that span fields; sizes are checked before any loop."""
        self.check_extensions(limits)
        _min_tokens_at_most(self.min_tokens, self.max_tokens if self.max_tokens is not None else COMPLETION_MAX_TOKENS)
        if isinstance(self.response_format, JsonSchemaResponseFormat):
            _nested_at_most("response_format.json_schema.schema", self.response_format.json_schema.schema,
                            limits.max_json_depth)
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

    def fits(self, model: ModelContext, limits: GatewaySettings) -> int | None:
        """What the request may generate (every prompt sampled max(``n``, ``best_of``) times, and what
        ``echo`` and ``prompt_logprobs`` return of the prompts), against the model's context, batch
        and ``max_output_work``. An unset ``max_tokens`` is 16, as OpenAI's and vLLM's. Returns None
        (the job as it is), as :meth:`ChatCompletionRequest.fits` may not."""
        prompt = self.prompt
        prompts: list[Any] = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        shortest = 0
        if model.max_model_len is not None and self.truncate_prompt_tokens is None:
            per_token = model.max_chars_per_token
            lengths = [len(p) if not isinstance(p, str) else -(-len(p) // per_token) if per_token else 0
                       for p in prompts]
            longest = max(lengths)
            if longest >= model.max_model_len:
                _context_exceeded(model.max_model_len, longest, "prompt", exact=not isinstance(prompts[0], str))
            shortest = min(lengths)
        most = _room(model, "prompt", "max_tokens",
                     self.max_tokens if self.max_tokens is not None else COMPLETION_MAX_TOKENS, 0,
                     prompt_tokens=shortest)
        top = self.logprobs or 0
        sequences = max(self.n or 1, self.best_of or 1) * len(prompts)
        echoed = 0
        if self.echo or self.prompt_logprobs is not None:
            tokens = sum(len(p) if not isinstance(p, str) else _utf8_len(p) + 1 for p in prompts)
            if self.echo:
                echoed += tokens * max(self.n or 1, self.best_of or 1) * (1 + top)
            if self.prompt_logprobs is not None:
                echoed += tokens * (1 + self.prompt_logprobs)
        _step_at_most(limits, model, sequences, top, "logprobs")
        return _work_at_most(limits, most, sequences, top, echoed, "max_tokens", "logprobs", defaulted=False)


class ModelContext(NamedTuple):
    """What the live engines of a model announce (``EngineInfo``; None: not announced)."""

    #: Tokens of prompt and output together (the smallest of the model's engines).
    max_model_len: int | None = None
    #: The most characters one token of the model's vocabulary spells (its longest entry): a text
    #: of ``c`` characters is at least ``c / max_chars_per_token`` tokens, as vLLM reckons too.
    max_chars_per_token: int | None = None
    #: Sequences an engine of the model runs at once (its batch; the smallest of its engines).
    max_sequences: int | None = None


#: Tokens a chat template may add around one message (role markers, separators), reckoned high.
_TEMPLATE_TOKENS = 32
#: A completion's ``max_tokens`` when it names none (OpenAI's default, and vLLM's).
COMPLETION_MAX_TOKENS = 16


def _utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8: the most tokens it can be (byte-level vocabularies)."""
    return len(text) if text.isascii() else len(text.encode())


def _context_exceeded(context: int, tokens: int, param: str, *, exact: bool) -> None:
    what = "your messages resulted in" if param == "messages" else "your prompt contains"
    raise InvalidRequest(f"This model's maximum context length is {context} tokens. However, {what} "
                         f"{'' if exact else 'at least '}{tokens} tokens. Please reduce the length of the {param}.",
                         param=param, code="context_length_exceeded")


def _room(model: ModelContext, prompt_param: str, param: str, most: int | None, chars: int,
          prompt_tokens: int = 0) -> int | None:
    """The most tokens one choice may generate: ``most`` (the request's ``max_tokens``) within the
    model's context less the prompt (``chars`` of text, or ``prompt_tokens`` known), as vLLM clamps it.
    Refuses a ``max_tokens`` over the whole context and a prompt that fills it (as vLLM would, but
    before the request costs a queue slot and a tokenisation)."""
    context = model.max_model_len
    if context is None:
        return most
    if most is not None and most > context:
        raise InvalidRequest(f"{param} is too large: {most}. This model supports at most {context} completion "
                             f"tokens, whereas you provided {most}.", param=param, code="invalid_value")
    if chars and model.max_chars_per_token:
        prompt_tokens = -(-chars // model.max_chars_per_token)
        if prompt_tokens >= context:
            _context_exceeded(context, prompt_tokens, prompt_param, exact=False)
    room = context - prompt_tokens
    return room if most is None else min(most, room)


def _step_at_most(limits: GatewaySettings, model: ModelContext, sequences: int, top: int, top_param: str) -> None:
    """Refuse a request that would take more than ``max_batch_share`` of an engine's batch, or whose
    every engine step makes more than ``max_step_candidates`` tokens and logprob candidates: an
    engine renders each of them on the loop that also serves every other request."""
    if model.max_sequences is not None:
        share = max(int(model.max_sequences * limits.max_batch_share), 1)
        if sequences > share:
            raise InvalidRequest(f"Invalid 'n': this request asks for {sequences} sequences at once, but this model's "
                                 f"engines run {model.max_sequences} at a time and one request may take at most "
                                 f"{share}.", param="n", code="invalid_value")
    per_step = sequences * (1 + top)
    if per_step > limits.max_step_candidates:
        raise InvalidRequest(f"Invalid '{top_param if top else 'n'}': this request makes {per_step} tokens and logprob "
                             f"candidates a step ({sequences} sequences x (1 + {top} candidates)), but this server "
                             f"allows at most {limits.max_step_candidates}. Lower `n` or `{top_param}`.",
                             param=top_param if top else "n", code="invalid_value")


def _work_at_most(limits: GatewaySettings, most: int | None, sequences: int, top: int, echoed: int, param: str,
                  top_param: str, *, defaulted: bool) -> int | None:
    """Refuse a request whose output (tokens of every choice with their logprob candidates, plus what
    ``echo`` / ``prompt_logprobs`` return) may pass ``max_output_work``; for one that named no
    ``max_tokens`` (``defaulted``), the largest ``max_tokens`` that fits instead (None: it fits)."""
    per_choice = most if most is not None else limits.default_max_tokens_estimate
    work = sequences * per_choice * (1 + top) + echoed
    if work <= limits.max_output_work:
        return None
    if defaulted:  # as a model's own output limit caps a request that names none (OpenAI's too)
        cap = (limits.max_output_work - echoed) // (sequences * (1 + top))
        if cap >= 1:
            return cap
    unset = (f" (`{param}` is unset: the model's context less the prompt)" if most is not None else
             f" (`{param}` is unset)") if defaulted else ""
    factors = [f"{sequences} choices", f"{per_choice} tokens each{unset}"]
    if top:
        factors.append(f"1 + {top} logprob candidates per token")
    if echoed:
        factors.append(f"plus {echoed} tokens and candidates echoed from the prompt")
    raise InvalidRequest(f"Invalid '{param}': this request may generate up to {work} tokens and logprob candidates "
                         f"({', '.join(factors)}), but this server allows at most {limits.max_output_work} per "
                         f"request. Lower `n`, `{param}` or `{top_param}`.", param=param, code="invalid_value")


for _request in (ChatCompletionRequest, CompletionRequest):
    _request._refused = tuple(f for f in _request.__struct_fields__ if f in REFUSED)
    _request._refused_values = staticmethod(operator.attrgetter(*_request._refused))  # type: ignore[assignment]


def _min_tokens_at_most(min_tokens: int | None, most: int | None) -> None:
    """vLLM's own rule, here so that an engine is not asked (an engine's refusal is charged a request)."""
    if min_tokens and most is not None and min_tokens > most:
        raise InvalidRequest(f"Invalid 'min_tokens': it must be at most `max_tokens` ({most}), but got {min_tokens}.",
                             param="min_tokens", code="invalid_value")


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
