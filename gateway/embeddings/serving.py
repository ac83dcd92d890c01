"""``POST /v1/embeddings`` as an endpoint of the shared request flow (``gateway.flow``): one
``embedding`` job per request, all its inputs together (the engine lets vLLM batch them with every
other job's); its ``Embedded`` events become OpenAI's ``CreateEmbeddingResponse``.

A vector arrives as little-endian float32 bytes: ``base64`` answers encode those bytes as they are
(what the SDK, which asks for base64 by default, decodes), ``float`` answers read them once.
"""

from __future__ import annotations

import asyncio
import base64
from array import array
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency

from engines.contract.messages import Embedded, Event, Usage
from gateway.apispec import GENERATION, JOB_ERRORS, RATELIMIT, STORED, Operation, documented
from gateway.common.bounds import ModelContext
from gateway.common.decoding import RequestDecoder
from gateway.dispatch import JobKind
from gateway.embeddings.protocol import (
    LANGCHAIN_HINT,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)
from gateway.errors import EngineError, InvalidRequest
from gateway.run import JobRun, Restarted
from gateway.services import Services
from gateway.settings import RequestBounds

_ENC = msgspec.json.Encoder()
_LITTLE = array("f", b"\x00\x00\x80\x3f").tolist() == [1.0]  # (float32 as this machine stores it)
#: Vectors rendered between turns given to the event loop (~25 ms for 1,024-float vectors).
_YIELD_EVERY = 256


def floats(vector: bytes) -> list[float]:
    """A little-endian float32 vector as floats."""
    values = array("f", vector)
    if not _LITTLE:  # pragma: no cover: every platform Conduit runs on is little-endian
        values.byteswap()
    return values.tolist()


class _Vectors:
    """A request's vectors, by input, as their events arrive; then the answer."""

    __slots__ = ("req", "vectors")

    def __init__(self, req: EmbeddingRequest) -> None:
        self.req = req
        self.vectors: dict[int, bytes] = {}

    def add(self, run: JobRun, event: Event | Restarted) -> None:
        if type(event) is Embedded:
            self.vectors[event.index] = event.vector
        elif type(event) is Restarted:
            self.vectors.clear()

    async def answer(self, run: JobRun, created: int, usage: Usage) -> Response[Any]:
        vectors = self.vectors
        if sorted(vectors) != list(range(len(self.req.inputs()))) or any(len(v) % 4 for v in vectors.values()):
            raise EngineError("The engine answered with vectors that do not match the request's inputs; retry the "
                              "request.")
        b64 = self.req.encoding_format == "base64"
        parts, enc = [], _ENC.encode
        for i in range(len(vectors)):
            v = vectors[i]
            parts.append(enc(Embedding(index=i, embedding=base64.b64encode(v).decode() if b64 else floats(v))))
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a large answer is rendered in turns with the other requests
        tokens = usage.prompt_tokens
        tail = enc(EmbeddingList(data=[], model=self.req.model, usage=EmbeddingUsage(tokens, tokens)))
        return Response(content=b'{"data":[' + b",".join(parts) + b"]," + tail[tail.index(b'"data":[]') + 10:],
                        media_type="application/json")


class EmbeddingEndpoint:
    """``/v1/embeddings``: job kind ``embedding`` (a model whose engines run none is a 404
    ``model_not_supported``)."""

    __slots__ = ("decoder", "registry")

    job_kind = JobKind("embedding", "embd")
    resolve = None  # nothing to read before the job: the request is whole
    read = None
    stage = None  # the client waits for its answer

    def __init__(self, bounds: RequestBounds, registry: Any) -> None:
        self.decoder = RequestDecoder(EmbeddingRequest, bounds)
        self.registry = registry

    def prepare(self, req: EmbeddingRequest, body: bytes, model: ModelContext, bounds: RequestBounds) -> bytes:
        req.fits(model, bounds)
        if req.token_ids() and not self.registry.takes_token_inputs(req.model):
            raise InvalidRequest(f"The model `{req.model}` takes text only: token ids are another vocabulary's "
                                 f"unless its engines are told they are its own. {LANGCHAIN_HINT}.", param="input",
                                 code="invalid_value")
        return body

    def collector(self, req: EmbeddingRequest, request: Request[Any, Any, Any]) -> _Vectors:
        return _Vectors(req)

    def writer(self, req: EmbeddingRequest, first: Event) -> Any:
        raise AssertionError("embeddings never stream")  # pragma: no cover: stream is always false


CREATE_EMBEDDING = Operation(
    "createEmbedding", "Create embeddings", "Embeddings", {**JOB_ERRORS, 422: "`unprocessable_entity`."},
    body=EmbeddingRequest, json=EmbeddingList,
    description="One vector per input, in input order, from an engine of the model that embeds (vLLM's pooling "
                "runner; a model whose engines do not is a 404 `model_not_supported`). `input`: a string, a list "
                "of strings, a list of token ids or a list of token-id lists (token ids only for models whose "
                "engines take them: a 400 otherwise, naming LangChain's `check_embedding_ctx_length=False`). "
                "`encoding_format` `float` or `base64` (little-endian float32s); `dimensions` for models that "
                "truncate (Matryoshka), a 400 naming it otherwise. Charged the inputs' tokens.",
    parameters=GENERATION, ok_headers=RATELIMIT, replayed=STORED)


@post("/v1/embeddings", status_code=200, opt=documented(CREATE_EMBEDDING))
async def create_embedding(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    """Embeddings of the request's inputs."""
    return await services.flow.respond(request, services.embeddings)
