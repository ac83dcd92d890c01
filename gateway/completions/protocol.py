"""``POST /v1/completions`` (legacy text completions): OpenAI's request the gateway validates and
the ``text_completion`` objects it answers with (what it shares with chat is in
``gateway.common.protocol``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.common import bounds
from gateway.common.bounds import ModelContext
from gateway.common.protocol import (
    CompletionUsage,
    Ext,
    JsonSchemaResponseFormat,
    Refused,
    ResponseFormat,
    Sampling,
    refusing,
)
from gateway.errors import InvalidRequest
from gateway.settings import RequestBounds
from gateway.tenancy.cost import Cost, tokens_of

#: A completion's ``max_tokens`` when it names none (OpenAI's default, and vLLM's).
COMPLETION_MAX_TOKENS = 16

# A string, a batch of strings, a token list, or a batch of token lists (msgspec takes one
# list type per union, so the element kinds are checked in ``check``).
Prompt = str | Annotated[list[str | int | Annotated[list[int], Meta(min_length=1)]], Meta(min_length=1)]


class CompletionRequest(Sampling, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/completions``. OpenAI's fields, then vLLM's completion extensions (with those of
    :class:`Sampling`); fields named nowhere are ignored."""

    model: str
    prompt: Prompt
    best_of: Annotated[int, Meta(ge=1, le=20)] | None = None
    echo: bool | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    suffix: str | None = None
    # ---- vLLM's completion extensions ----
    response_format: Annotated[ResponseFormat | None, Ext] = None
    prompt_embeds: Refused = UNSET

    def check(self, limits: RequestBounds) -> None:
        """Bounds on the request's work, then rules that span fields; sizes are checked before any loop."""
        self.check_sampling(limits)
        most = self.max_tokens if self.max_tokens is not None else COMPLETION_MAX_TOKENS
        bounds.min_tokens_at_most(self.min_tokens, most)
        if isinstance(self.response_format, JsonSchemaResponseFormat):
            bounds.nested_at_most("response_format.json_schema.schema", self.response_format.json_schema.schema,
                                  limits.max_json_depth)
        prompts = 1
        if isinstance(self.prompt, list):
            if isinstance(self.prompt[0], int):  # one prompt given as token ids
                bounds.at_most("prompt", "token ids", len(self.prompt), limits.max_prompt_tokens)
            else:
                prompts = len(self.prompt)
                bounds.at_most("prompt", "prompts", prompts, limits.max_prompts)
            kinds = {type(p) for p in self.prompt}
            if len(kinds) > 1:
                raise InvalidRequest("`prompt` must be a string, a list of strings, a list of token ids, or a list "
                                     "of token-id lists, not a mixture.", param="prompt")
            if list in kinds:
                for i, ids in enumerate(self.prompt):
                    bounds.at_most(f"prompt[{i}]", "token ids", len(ids),  # type: ignore[arg-type]
                                   limits.max_prompt_tokens)
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

    def fits(self, model: ModelContext, limits: RequestBounds) -> int | None:
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
                bounds.context_exceeded(model.max_model_len, longest, "prompt",
                                        exact=not isinstance(prompts[0], str))
            shortest = min(lengths)
        most = bounds.room(model, "prompt", "max_tokens",
                           self.max_tokens if self.max_tokens is not None else COMPLETION_MAX_TOKENS, 0,
                           prompt_tokens=shortest)
        top = self.logprobs or 0
        sequences = max(self.n or 1, self.best_of or 1) * len(prompts)
        echoed = 0
        if self.echo or self.prompt_logprobs is not None:
            tokens = sum(len(p) if not isinstance(p, str) else bounds.utf8_len(p) + 1 for p in prompts)
            if self.echo:
                echoed += tokens * max(self.n or 1, self.best_of or 1) * (1 + top)
            if self.prompt_logprobs is not None:
                echoed += tokens * (1 + self.prompt_logprobs)
        bounds.step_at_most(limits, model, sequences, top, "logprobs")
        return bounds.work_at_most(limits, most, sequences, top, echoed, "max_tokens", "logprobs", defaulted=False)


    def cost(self, limits: RequestBounds) -> Cost:
        """What the request takes from its key's limits at admission (``gateway.tenancy.cost``): its
        estimated prompts plus the most it may generate (``max_tokens``, 16 unset, as the engines
        default it) times the sequences it asks for (max(``n``, ``best_of``) per prompt)."""
        most = self.max_tokens if self.max_tokens is not None else COMPLETION_MAX_TOKENS  # OpenAI's and vLLM's default
        sequences = max(self.n or 1, self.best_of or 1) * self.prompt_count()
        return Cost(tokens=self.prompt_tokens() + most * sequences)

    def prompt_tokens(self) -> int:
        """The estimated prompts (token-id prompts count exactly)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return tokens_of(len(prompt))
        total = 0
        for p in prompt:
            if isinstance(p, str):
                total += tokens_of(len(p))
            elif isinstance(p, int):
                total += 1
            else:
                total += len(p)
        return total

    def prompt_count(self) -> int:
        """How many prompts the request has (a list of token ids is one)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return 1
        if all(isinstance(p, int) for p in prompt):
            return 1  # one prompt given as token ids
        return len(prompt)


refusing(CompletionRequest)


# ---- responses -------------------------------------------------------------------------

#: OpenAI's finish reasons: an engine's own (vLLM's "abort", "error") never leak through.
CompletionFinishReason = Literal["stop", "length", "content_filter"]
COMPLETION_FINISH_REASONS = frozenset(get_args(CompletionFinishReason))


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


