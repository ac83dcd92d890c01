"""What the OpenAI wire schemas of chat and text completions share (OpenAI's field order).

Requests are validated at the door so a bad body gets a 400 naming the field before it costs a
queue slot; so are the inputs that would make one request's work or memory grow far beyond
its size in bytes (bounded by settings: ``max_choices``, ``max_messages``, ...), and, once the
model's engines are known, what the request may generate (``gateway.common.bounds``). The
validated body travels to the engine unchanged (vLLM's own protocol classes build engine
parameters from it).

Every field has one decided outcome. OpenAI's fields are typed in each endpoint's
``protocol.py`` (or passed to the engine, which ignores what it does not use:
``tests/unit/test_openai_agreement.py`` lists them). vLLM's extensions (``top_k``, ``min_p``,
``bad_words``, ``structured_outputs``, ...) are named here with bounds (:class:`VllmSampling`,
marked ``x-conduit-extension``), or refused with a 400 naming them (:data:`REFUSED`:
request-supplied chat templates, scheduling priority, transfer parameters, ...). Any other field
is ignored: the vLLM engine forwards only the fields named here and in the endpoints' requests
(``engines.vllm_engine.REQUEST_FIELDS``). Responses are built from engine events and carry
exactly the shapes of OpenAI's OpenAPI spec: no ``null`` where the spec has an array or object.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.common.bounds import at_most, nested_at_most
from gateway.errors import InvalidRequest
from gateway.settings import RequestBounds

#: Marks a field OpenAI's API does not define: ``x-conduit-extension`` (whose it is) in Conduit's
#: OpenAPI document (``gateway.openapi``). Decoding ignores it.
VLLM_EXTENSION = Meta(extra_json_schema={"x-conduit-extension": "vllm"})
#: A vLLM extension Conduit refuses (any value: ``not: {}``); the reason is in :data:`REFUSED`.
_REFUSED = Meta(extra_json_schema={
    "x-conduit-extension": "vllm", "not": {},
    "description": "Refused by Conduit with a 400 (see gateway.common.protocol.REFUSED)."})
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


Probability = Annotated[float, Meta(ge=0, le=1)]
Temperature = Annotated[float, Meta(ge=0, le=2)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, Meta(ge=1)]
Stop = str | Annotated[list[str], Meta(max_length=4)] | None


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

    def check_extensions(self, limits: RequestBounds) -> None:
        """Refused fields, then the bounds a type cannot say."""
        given = self._refused_values(self)  # one C call for every refused field (each UNSET unless sent)
        if given.count(UNSET) != len(given):
            name = next(n for n, v in zip(self._refused, given, strict=True) if v is not UNSET)
            raise InvalidRequest(f"Unsupported parameter: '{name}' is not supported by this server: "
                                 f"{REFUSED[name]}.", param=name, code="unsupported_parameter")
        if self.allowed_token_ids is not None:
            at_most("allowed_token_ids", "token ids", len(self.allowed_token_ids), limits.max_prompt_tokens)
        so = self.structured_outputs
        if so is not None and isinstance(so.json, dict):
            nested_at_most("structured_outputs.json", so.json, limits.max_json_depth)

    #: The refused fields this request type has, and a getter of their values (set by :func:`refusing`).
    _refused: ClassVar[tuple[str, ...]] = ()
    _refused_values: ClassVar[Callable[[Any], tuple[Any, ...]]]


class Sampling(VllmSampling, kw_only=True, forbid_unknown_fields=False):
    """OpenAI's sampling fields chat and completions both take (each request type adds its own),
    on vLLM's extensions, and the checks on them."""

    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    user: str | None = None

    def check_sampling(self, limits: RequestBounds) -> None:
        """:meth:`VllmSampling.check_extensions`, then the bounds and rules of the shared fields."""
        self.check_extensions(limits)
        if self.logit_bias is not None:
            at_most("logit_bias", "entries", len(self.logit_bias), limits.max_logit_bias)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("`stream_options` is only allowed when `stream` is true.", param="stream_options")


# ---- responses -------------------------------------------------------------------------


class PromptTokensDetails(Struct):
    cached_tokens: int


class CompletionUsage(Struct, omit_defaults=True):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def refusing(request: type[VllmSampling]) -> None:
    """Set a request type's refused fields (those of :data:`REFUSED` it has) and their getter:
    called once per request type, after its class is made."""
    request._refused = tuple(f for f in request.__struct_fields__ if f in REFUSED)
    request._refused_values = staticmethod(operator.attrgetter(*request._refused))  # type: ignore[assignment]
