"""``POST /v1/responses``: OpenAI's Responses request as the gateway validates it (OpenAI's field
order), and its translation into the chat completions request its job carries.

Every field of OpenAI's ``CreateResponse`` has one decided outcome (``gateway.responses.fields``,
rendered into ``openapi/responses-fields.md``): honoured here, accepted and ignored, or refused
with a 400 naming it. Input items and tools are kept as decoded JSON and read item by item
(:mod:`gateway.responses.convert`), so that an item or tool of a kind Conduit does not serve gets
a 400 naming it (``input[3].type``) rather than a schema error about a union.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.common.bounds import at_most
from gateway.common.protocol import MAX_ID_CHARS, PositiveInt, Probability, Temperature
from gateway.errors import InvalidRequest
from gateway.settings import RequestBounds

#: OpenAI's bounds on ``metadata``.
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
#: Values of ``include`` that concern hosted tools Conduit refuses: nothing to include, accepted.
HOSTED_INCLUDES = frozenset({
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url", "code_interpreter_call.outputs"})
LOGPROBS_INCLUDE = "message.output_text.logprobs"
#: Nothing is encrypted: reasoning items carry their text (see ``fields.py``).
ENCRYPTED_REASONING_INCLUDE = "reasoning.encrypted_content"
INCLUDES = HOSTED_INCLUDES | {LOGPROBS_INCLUDE, ENCRYPTED_REASONING_INCLUDE}


class TextFormatText(Struct, tag="text", tag_field="type"):
    pass


class TextFormatJsonObject(Struct, tag="json_object", tag_field="type"):
    pass


class TextFormatJsonSchema(Struct, tag="json_schema", tag_field="type", kw_only=True, omit_defaults=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    schema: dict[str, Any]
    description: str | UnsetType = UNSET
    strict: bool | None = None


TextFormat = TextFormatText | TextFormatJsonObject | TextFormatJsonSchema


Verbosity = Literal["low", "medium", "high"]
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
Summary = Literal["auto", "concise", "detailed"]


class TextParam(Struct, forbid_unknown_fields=False):
    format: TextFormat | None = None
    #: Ignored: open models' sampling has no equivalent (``fields.py``).
    verbosity: Verbosity | None = None


class ReasoningParam(Struct, forbid_unknown_fields=False):
    #: Passed to the model as chat's ``reasoning_effort`` (templates that know it read it).
    effort: Effort | None = None
    #: Ignored: there is no summariser; reasoning comes back as the model's reasoning text.
    summary: Summary | None = None
    generate_summary: Summary | None = None


class StreamOptionsParam(Struct, forbid_unknown_fields=False):
    #: Ignored: the stream is never padded.
    include_obfuscation: bool | None = None


class ResponseRequest(Struct, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/responses`` (and, less what generates, ``/v1/responses/input_tokens``)."""

    model: str
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    reasoning: ReasoningParam | None = None
    metadata: dict[str, str] | None = None
    #: Echoed in a stream's three lifecycle events, hence bounded (as ``safety_identifier`` is).
    user: Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None = None
    include: list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptionsParam | None = None
    store: bool | None = None
    background: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # ---- accepted and ignored (``fields.py`` says why) ----
    prompt_cache_key: Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    safety_identifier: Annotated[str, Meta(max_length=64)] | None = None
    max_tool_calls: Annotated[int, Meta(ge=0)] | None = None
    #: The stored response this one continues (``gateway.responses.chain``).
    previous_response_id: str | None = None
    # ---- refused when set: they need what Conduit does not keep or run ----
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    context_management: list[Any] | None = None
    moderation: dict[str, Any] | None = None

    def check(self, limits: RequestBounds) -> None:
        """What the schema cannot say: the fields refused, the metadata's and include's bounds."""
        for name, why in _REFUSED_WHEN_SET:
            if getattr(self, name) is not None:
                raise InvalidRequest(f"Unsupported parameter: '{name}' is not supported by this server: {why}.",
                                     param=name, code="unsupported_parameter")
        if self.background and self.store is False:
            raise InvalidRequest("A background response must be stored: its result is read later (send `store: "
                                 "true`, the default, or `background: false`).", param="background",
                                 code="invalid_value")
        if self.truncation == "auto":
            raise InvalidRequest("Unsupported value: 'truncation' 'auto' is not supported by this server: input is "
                                 "never dropped to fit the context; a request that does not fit gets a 400.",
                                 param="truncation", code="unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("`stream_options` is only allowed when `stream` is true.", param="stream_options")
        if self.metadata is not None:
            at_most("metadata", "key-value pairs", len(self.metadata), MAX_METADATA_PAIRS)
            for key, value in self.metadata.items():
                if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
                    raise InvalidRequest(f"Invalid 'metadata': keys are at most {MAX_METADATA_KEY} characters and "
                                         f"values at most {MAX_METADATA_VALUE}.", param="metadata",
                                         code="invalid_value")
        for i, value in enumerate(self.include or ()):
            if value not in INCLUDES:
                raise InvalidRequest(f"Invalid value for 'include[{i}]': {value!r}. Supported values are: "
                                     f"{', '.join(sorted(INCLUDES))}.", param=f"include[{i}]", code="invalid_value")
        if isinstance(self.input, list):
            at_most("input", "input items", len(self.input), limits.max_messages)
        elif not self.input:
            raise InvalidRequest("Missing required parameter: 'input'.", param="input",
                                 code="missing_required_parameter")
        if self.tools is not None:
            at_most("tools", "tools", len(self.tools), limits.max_tools)

    def logprobs(self) -> bool:
        """Whether the answer's text carries logprobs (``include`` asks, or ``top_logprobs`` is set)."""
        return self.top_logprobs is not None or LOGPROBS_INCLUDE in (self.include or ())


#: Fields refused whenever they are set (not null), and why.
_REFUSED_WHEN_SET = (
    ("conversation", "the Conversations API is not served; continue a conversation with `previous_response_id`, "
                     "or send it whole as `input`"),
    ("prompt", "stored prompt templates are not kept by this server; send `instructions` and `input`"),
    ("context_management", "server-side compaction is not done by this server"),
    ("moderation", "moderation is not run by this server"),
)


