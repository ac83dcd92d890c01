"""``POST /v1/embeddings``: OpenAI's request, checked before anything is queued, and its answer.

``input`` is a string, a list of strings, a list of token ids, or a list of token-id lists (at most
``max_embedding_inputs``, OpenAI's 2,048; none empty); ``encoding_format`` ``float`` (the default) or
``base64`` (the vector's little-endian float32 bytes, as the SDK decodes them); ``dimensions`` for
models that truncate (Matryoshka: their engine refuses it otherwise, naming ``dimensions``); ``user``.
What a request may make an engine read is bounded: its inputs, each against the model's context
(a 400 before queueing, as OpenAI answers), and all of them together (``max_embedding_tokens``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from gateway.common import bounds
from gateway.common.bounds import ModelContext
from gateway.errors import InvalidRequest
from gateway.settings import RequestBounds
from gateway.tenancy.cost import Cost, tokens_of

# A string, a batch of strings, a token list, or a batch of token lists (msgspec takes one list type
# per union, so the element kinds are checked in ``check``).
Input = str | list[str | int | list[int]]
#: What LangChain's ``OpenAIEmbeddings`` sends unless told otherwise: its tokens (tiktoken's cl100k).
LANGCHAIN_HINT = ("LangChain's OpenAIEmbeddings sends tiktoken token ids by default: construct it with "
                  "check_embedding_ctx_length=False to send the text")


class EmbeddingRequest(Struct, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/embeddings`` (fields named nowhere are ignored, as for the other endpoints)."""

    model: str
    input: Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    #: (Not echoed: bounded by the body's size only, as OpenAI's.)
    user: str | None = None

    #: Never streamed (what the request flow asks).
    stream = False

    def check(self, limits: RequestBounds) -> None:
        """The inputs' shape and bounds: sizes before any loop."""
        given = self.input
        if isinstance(given, str) and not given:
            raise InvalidRequest("'input' cannot be an empty string.", param="input")
        if not isinstance(given, str):
            self._check_list(given, limits)
        total = self.tokens()
        if total > limits.max_embedding_tokens:
            raise InvalidRequest(f"This request's inputs are {total} tokens or more; an embeddings request may have "
                                 f"at most {limits.max_embedding_tokens} in all.", param="input",
                                 code="invalid_value")

    def _check_list(self, given: list[Any], limits: RequestBounds) -> None:
        if not given:
            raise InvalidRequest("'input' cannot be an empty list.", param="input")
        if isinstance(given[0], int):
            if not all(type(i) is int for i in given):
                raise _mixture()
            bounds.at_most("input", "token ids", len(given), limits.max_prompt_tokens)
            return
        bounds.at_most("input", "inputs", len(given), limits.max_embedding_inputs)
        kind = type(given[0])
        for i, item in enumerate(given):
            if type(item) is not kind:
                raise _mixture()
            if not item:
                raise InvalidRequest(f"'input[{i}]' cannot be empty.", param=f"input[{i}]")
            if kind is list:
                bounds.at_most(f"input[{i}]", "token ids", len(item), limits.max_prompt_tokens)  # type: ignore[arg-type]
                if not all(type(t) is int for t in item):  # type: ignore[union-attr]
                    raise InvalidRequest(f"'input[{i}]' must be a list of token ids (integers).", param=f"input[{i}]")

    def inputs(self) -> list[Any]:
        """Each input: a string or a list of token ids."""
        given = self.input
        return [given] if isinstance(given, str) or isinstance(given[0], int) else given  # type: ignore[list-item]

    def token_ids(self) -> bool:
        """Whether the inputs are token ids."""
        return not isinstance(self.input, str) and not isinstance(self.input[0], str)

    def tokens(self) -> int:
        """The inputs' tokens: exact for token ids, estimated for text (``tokens_of``)."""
        return sum(len(i) if isinstance(i, list) else tokens_of(len(i)) for i in self.inputs())

    def cost(self, limits: RequestBounds) -> Cost:
        """What admission takes from the key's budgets: the inputs' tokens (nothing is generated)."""
        return Cost(tokens=self.tokens())

    def fits(self, model: ModelContext, limits: RequestBounds) -> None:
        """Each input against the model's context (a 400 naming ``input``, before queueing): a text of
        ``c`` characters is at least ``c / max_chars_per_token`` tokens; token ids count exactly. An
        input of exactly the context fits (nothing is generated). And the answer's size: inputs x
        dimensions at most ``max_embedding_floats``."""
        size = self.dimensions or model.embedding_size
        count = len(self.inputs())
        if size and count * size > limits.max_embedding_floats:
            raise InvalidRequest(f"This request asks for {count} vectors of {size} dimensions, {count * size} numbers; "
                                 f"an answer may hold at most {limits.max_embedding_floats}. Send fewer inputs"
                                 f"{' or fewer dimensions' if self.dimensions else ''}.", param="input",
                                 code="invalid_value")
        context = model.max_model_len
        if context is None:
            return
        per_token = model.max_chars_per_token
        for i in self.inputs():
            tokens = len(i) if isinstance(i, list) else -(-len(i) // per_token) if per_token else 0
            if tokens > context:
                raise InvalidRequest(f"This model's maximum context length is {context} tokens. However, you "
                                     f"requested {'' if isinstance(i, list) else 'at least '}{tokens} tokens in the "
                                     "input for embedding. Please reduce your input.", param="input",
                                     code="context_length_exceeded")


def _mixture() -> InvalidRequest:
    return InvalidRequest("`input` must be a string, a list of strings, a list of token ids, or a list of token-id "
                          "lists, not a mixture.", param="input")


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class Embedding(Struct):
    """One input's vector: floats, or base64 of its little-endian float32s."""

    index: int
    embedding: list[float] | str
    object: Literal["embedding"] = "embedding"


class EmbeddingList(Struct):
    """OpenAI's ``CreateEmbeddingResponse``."""

    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"
