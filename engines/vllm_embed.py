"""The vLLM embedding backend: an ``AsyncLLM`` on vLLM's pooling runner behind vLLM's own
``ServingEmbedding``, in-process.

An ``embedding`` job's body is the client's OpenAI embeddings request; its ``input`` (a string, a list
of strings, a list of token ids or a list of token-id lists) and ``dimensions`` go to vLLM's serving
class, which validates them (Matryoshka ``dimensions``, each input against the context), tokenizes,
and submits every input as its own engine request (vLLM's scheduler batches them with every other
job's). The engine answers one ``Embedded`` event per input, in index order, its vector as
little-endian float32 bytes whatever the client's ``encoding_format`` (the gateway's business), then
``Done`` with the prompt tokens. vLLM is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import numpy as np

from engines.backend import JobOutput, JobRejected
from engines.contract.messages import Job, Usage
from engines.vllm_chunks import ChunkError, failure
from engines.vllm_engine import ModelSettings, check_vllm_version, installed_vllm_version, open_engine
from telemetry.engine_instruments import EngineMetrics

#: Why token-id input is refused unless the engine opts in (``--embed-token-inputs``).
TOKEN_INPUT_REFUSED = (
    "Token-id input is not accepted for this model: token ids are only meaningful in the model's own "
    "vocabulary. LangChain's OpenAIEmbeddings sends tiktoken (cl100k) ids by default, which would give "
    "silently wrong vectors: pass check_embedding_ctx_length=False to send the text instead.")


class EmbedSettings(ModelSettings, kw_only=True):
    """How to start vLLM's pooling runner for one embedding model (built at the entrypoint, passed in)."""

    #: The model's Matryoshka dimensions (``dimensions`` may truncate to these); empty: what the
    #: model's own config says (most models: none, so ``dimensions`` is refused).
    matryoshka_dimensions: list[int] = []
    #: Accept input as token ids (the model's own vocabulary); off: refused with a 400.
    token_inputs: bool = False
    #: Any other ``AsyncEngineArgs`` field (e.g. ``distributed_executor_backend="uni"``).
    extra_engine_args: dict[str, Any] = {}


def is_token_input(value: object) -> bool:
    """Whether an embeddings ``input`` is token ids (a list of ints, or a list of such lists)."""
    if not isinstance(value, list) or not value:
        return False
    first = value[0]
    return isinstance(first, int) or (isinstance(first, list) and (not first or isinstance(first[0], int)))


def input_count(value: object) -> int:
    """How many inputs (so vectors) an embeddings ``input`` holds: one string or one token-id list is one."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


def _checked_input(value: object, token_inputs: bool) -> object:
    """The body's ``input`` when this engine takes it, else the 400 naming ``input``."""
    if isinstance(value, str):
        if not value:
            raise JobRejected("'input' must not be an empty string.", param="input")
        return value
    if not isinstance(value, list) or not value:
        raise JobRejected("'input' must be a non-empty string, list of strings or list of token ids.",
                          param="input")
    if is_token_input(value):
        if not token_inputs:
            raise JobRejected(TOKEN_INPUT_REFUSED, param="input")
        if isinstance(value[0], list) and not all(isinstance(v, list) and v for v in value):
            raise JobRejected("'input' must not hold an empty list of token ids.", param="input")
        return value
    if not all(isinstance(v, str) for v in value):
        raise JobRejected("'input' must be a string, a list of strings or token ids.", param="input")
    if not all(value):
        raise JobRejected("'input' must not hold an empty string.", param="input")
    return value


@functools.cache
def _serving_class() -> Any:
    """vLLM's ``ServingEmbedding`` answering with its serving context (the per-input outputs) instead
    of an HTTP response: the vectors go out as wire events, not JSON."""
    from vllm.entrypoints.pooling.embed.serving import ServingEmbedding

    class EmbeddingOutputs(ServingEmbedding):  # type: ignore[misc]
        def _build_response(self, ctx: Any) -> Any:
            return ctx

    return EmbeddingOutputs


class VllmEmbedBackend:
    """Runs embedding jobs on one vLLM ``AsyncLLM`` (pooling runner) in this process."""

    kind = "vllm-embed"
    kinds = frozenset({"embedding"})

    def __init__(self, settings: EmbedSettings) -> None:
        self.settings = settings
        self.served_name = settings.served_name or settings.model
        self.models = [self.served_name]
        #: Models whose jobs may give token ids (``EngineInfo.token_inputs``).
        self.token_input_models = [self.served_name] if settings.token_inputs else []
        self.max_concurrency = settings.max_concurrency
        self.max_model_len: int | None = settings.max_model_len
        self.max_chars_per_token: int | None = None
        self.max_sequences: int | None = None
        #: Length of the model's vectors (vLLM's ``embedding_size``), once started.
        self.embedding_size = 0
        #: Jobs whose vLLM requests were aborted because the job was cancelled.
        self.aborted_requests = 0
        #: Set by the engine entrypoint before start(): vLLM's own statistics go to its meter.
        self.metrics = EngineMetrics.noop()
        self.engine: Any = None
        self._serving: Any = None

    async def start(self) -> None:
        """Start the pooling engine and build vLLM's embedding serving object as its API server does."""
        check_vllm_version(installed_vllm_version())  # before loading anything
        from vllm.renderers.chat_utils import ChatTemplateConfig

        s = self.settings
        overrides: dict[str, Any] = {"matryoshka_dimensions": list(s.matryoshka_dimensions)} \
            if s.matryoshka_dimensions else {}
        engine, models = open_engine(self, runner="pooling", convert="embed", hf_overrides=overrides)
        self.engine = engine
        self.embedding_size = engine.model_config.embedding_size
        self._serving = _serving_class()(engine, models, request_logger=None,
                                         chat_template_config=ChatTemplateConfig())
        del engine, models  # see VllmBackend.start: close() must really free the engine

    def unfinished_requests(self) -> int:
        """vLLM's own count of requests it still holds (0 once aborts went through)."""
        return self.engine.get_num_unfinished_requests() if self.engine is not None else 0

    async def run(self, job: Job, out: JobOutput) -> None:
        """Embed every input of one job: one ``Embedded`` per input in index order, then ``Done``."""
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        try:
            client = json.loads(job.body)
        except ValueError:
            raise JobRejected("The request body is not JSON.") from None
        if not isinstance(client, dict):
            raise JobRejected("The request body must be a JSON object.")
        inputs = _checked_input(client.get("input"), self.settings.token_inputs)
        body = {"model": self.served_name, "input": inputs, "dimensions": client.get("dimensions"),
                "user": client.get("user"), "request_id": job.id}
        try:
            ctx = await self._serving(EmbeddingCompletionRequest.model_validate(body))
        except asyncio.CancelledError:
            # Each input is its own vLLM request, named by ServingEmbedding from the job id; aborting
            # names that were never submitted (or already ended) is a no-op.
            self.aborted_requests += 1
            await self.engine.abort([f"{self._serving.request_id_prefix}-{job.id}-{i}"
                                     for i in range(input_count(inputs))])
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM signals bad requests by raising too
            error = create_error_response(exc).error
            # Only these two parameters reach vLLM from the body; it names neither (a context error
            # names its own "input_tokens"), so the parameter is read from what it says.
            param = "dimensions" if error.param == "dimensions" or "dimensions" in error.message else "input"
            raise failure(ChunkError(error.message, error.type, param, error.code)) from None
        vectors = [result.outputs.data.float().numpy().astype("<f4", copy=False) for result in ctx.final_res_batch]
        if not all(np.isfinite(v).all() for v in vectors):  # (JSON has no NaN: the job fails, not the answer)
            raise RuntimeError(f"the model made a vector that is not finite (job {job.id})")
        out.started()
        for index, vector in enumerate(vectors):
            out.embedded(index, vector.tobytes())
        out.done(Usage(prompt_tokens=sum(len(r.prompt_token_ids) for r in ctx.final_res_batch), completion_tokens=0))

    async def close(self) -> None:
        """Shut the engine down (its core process and background tasks)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = self._serving = None
