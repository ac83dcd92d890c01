"""The vLLM backend: an in-process ``AsyncLLM`` behind vLLM's own OpenAI serving classes.

Jobs carry the client's OpenAI request body, so the backend hands it to vLLM's
``OpenAIServingChat`` / ``OpenAIServingCompletion`` unchanged (forcing only streaming and
the served model name). vLLM then does everything it does behind its own HTTP server:
chat templating, tool-call parsing, structured outputs, logprobs, ``n``, stop strings,
seeds, validation. This module only translates its SSE chunks into wire events.

vLLM is imported in :meth:`VllmBackend.start`, never at import time, so the engine
entrypoint can import this module cheaply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import msgspec

from engines.backend import JobOutput, JobRejected
from engines.wire import ChoiceDelta, Job, SampledLogprob, TokenLogprob, ToolCallDelta, Usage

log = logging.getLogger("conduit.engine.vllm")


class VllmSettings(msgspec.Struct, kw_only=True):
    """How to start vLLM for one model (built at the engine entrypoint, passed in)."""

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
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None
    #: Any other ``AsyncEngineArgs`` field (e.g. ``distributed_executor_backend="uni"``).
    extra_engine_args: dict[str, Any] = {}


# ---- the shape of vLLM's stream chunks (only the fields Conduit forwards) ---------------


class _Error(msgspec.Struct):
    message: str = ""
    type: str = ""
    param: str | None = None
    code: int | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: _PromptDetails | None = None


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None  # older vLLM / other servers' spelling
    tool_calls: list[_ToolCall] = []


class _Candidate(msgspec.Struct):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None


class _ChatToken(_Candidate):
    top_logprobs: list[_Candidate] = []


class _ChatLogprobs(msgspec.Struct):
    content: list[_ChatToken] | None = None


class _ChatChoice(msgspec.Struct):
    index: int = 0
    delta: _Message | None = None
    logprobs: _ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _CompletionLogprobs(msgspec.Struct):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class _CompletionChoice(msgspec.Struct):
    index: int = 0
    text: str = ""
    logprobs: _CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _ChatChunk(msgspec.Struct):
    choices: list[_ChatChoice] = []
    usage: _Usage | None = None
    error: _Error | None = None


class _CompletionChunk(msgspec.Struct):
    choices: list[_CompletionChoice] = []
    usage: _Usage | None = None
    error: _Error | None = None


#: vLLM's errors carry the HTTP status as ``code``; OpenAI's envelope wants a string.
_CODES = {400: "invalid_request", 404: "model_not_found", 413: "request_too_large",
          422: "unprocessable_entity", 429: "rate_limited", 501: "not_implemented", 503: "overloaded"}


def _rejection(error: _Error) -> JobRejected:
    status = error.code or 400
    return JobRejected(
        error.message, status=status, code=_CODES.get(status, "invalid_request" if status < 500 else "engine_error"),
        # vLLM names Python-style types ("BadRequestError"); clients expect OpenAI's.
        type="invalid_request_error" if status < 500 else "server_error", param=error.param)


def _chat_delta(c: _ChatChoice) -> ChoiceDelta | None:
    m = c.delta or _Message()
    calls = [ToolCallDelta(index=t.index, id=t.id, name=t.function.name if t.function else None,
                           arguments=(t.function.arguments or "") if t.function else "") for t in m.tool_calls]
    logprobs = None
    if c.logprobs is not None and c.logprobs.content:
        logprobs = [SampledLogprob(e.token, e.logprob, e.bytes, [TokenLogprob(t.token, t.logprob, t.bytes)
                                                                  for t in e.top_logprobs])
                    for e in c.logprobs.content]
    text, reasoning = m.content or "", m.reasoning or m.reasoning_content or ""
    if not (text or reasoning or calls or logprobs or c.finish_reason):
        return None  # e.g. the role-only first chunk
    return ChoiceDelta(index=c.index, text=text, reasoning=reasoning, tool_calls=calls, logprobs=logprobs,
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason)


def _completion_delta(c: _CompletionChoice) -> ChoiceDelta | None:
    logprobs = None
    lp = c.logprobs
    if lp is not None and lp.tokens:
        logprobs = [
            # A None logprob (the first prompt token under echo) has no value; vLLM's own
            # stand-in for "impossible" is -9999.
            SampledLogprob(tok, -9999.0 if val is None else val, None,
                           [TokenLogprob(k, v) for k, v in (top or {}).items()], offset)
            for tok, val, top, offset in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset)]
    if not (c.text or logprobs or c.finish_reason):
        return None
    return ChoiceDelta(index=c.index, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason,
                       stop_reason=c.stop_reason)


class VllmBackend:
    """Runs chat and completion jobs on one vLLM ``AsyncLLM`` in this process."""

    kind = "vllm"

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self.served_name = settings.served_name or settings.model
        self.models = [self.served_name]
        self.max_concurrency = settings.max_concurrency
        self.max_model_len: int | None = settings.max_model_len
        #: Requests aborted in vLLM because their job was cancelled.
        self.aborted_requests = 0
        self.engine: Any = None
        self._chat: Any = None
        self._completion: Any = None
        self._chat_decoder = msgspec.json.Decoder(_ChatChunk)
        self._completion_decoder = msgspec.json.Decoder(_CompletionChunk)

    async def start(self) -> None:
        """Start the engine and build vLLM's serving objects as its API server does."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers.online_renderer import OnlineRenderer
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        args = AsyncEngineArgs(
            model=s.model, served_model_name=self.served_name, max_model_len=s.max_model_len, dtype=s.dtype,
            enforce_eager=s.enforce_eager, tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization, reasoning_parser=s.reasoning_parser or "",
            **s.extra_engine_args)
        self.engine = engine = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
        self.max_model_len = engine.model_config.max_model_len
        models = OpenAIServingModels(engine_client=engine,
                                     base_model_paths=[BaseModelPath(name=self.served_name, model_path=s.model)])
        tools = dict(enable_auto_tools=s.enable_auto_tool_choice, tool_parser=s.tool_call_parser)
        renderer = OnlineRenderer(engine.model_config, engine.renderer, request_logger=None, chat_template=None,
                                  chat_template_content_format="auto", reasoning_parser=s.reasoning_parser, **tools)
        renderer.warmup()
        self._chat = OpenAIServingChat(
            engine, models, "assistant", online_renderer=renderer, request_logger=None, chat_template=None,
            chat_template_content_format="auto", reasoning_parser=s.reasoning_parser or "",
            enable_prompt_tokens_details=True, **tools)
        self._completion = OpenAIServingCompletion(engine, models, online_renderer=renderer, request_logger=None,
                                                   enable_prompt_tokens_details=True)

    def unfinished_requests(self) -> int:
        """vLLM's own count of requests it still holds (0 once aborts went through)."""
        return self.engine.get_num_unfinished_requests() if self.engine is not None else 0

    async def run(self, job: Job, out: JobOutput) -> None:
        """Run one job through vLLM's serving layer and stream its chunks to ``out``."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        chat = job.kind == "chat"
        try:
            body = json.loads(job.body)
            # The gateway always consumes a stream and rebuilds non-streaming responses
            # itself. The request id is the job id so an abort can name it (see below).
            body.update(model=self.served_name, stream=True, stream_options={"include_usage": True},
                        request_id=job.id)
            if chat:
                result = await self._chat.create_chat_completion(ChatCompletionRequest.model_validate(body))
            else:
                result = await self._completion.create_completion(CompletionRequest.model_validate(body))
        except Exception as exc:  # noqa: BLE001 - vLLM signals bad requests by raising too
            result = create_error_response(exc)
        if isinstance(result, ErrorResponse):
            error = _Error(result.error.message, result.error.type, result.error.param, result.error.code)
            if (error.code or 400) >= 500 and error.code != 503:
                raise RuntimeError(f"vLLM failed the request: {error.message}")
            raise _rejection(error)

        try:
            await self._stream(result, out, chat)
        except asyncio.CancelledError:
            # vLLM's generate() aborts when cancelled mid-await, but not if the cancel lands
            # while its generator is suspended elsewhere; aborting by the external request
            # id is idempotent, so do it always.
            self.aborted_requests += 1
            with contextlib.suppress(Exception):
                await result.aclose()
            await self.engine.abort(self._vllm_request_ids(job.id, body, chat))
            raise

    async def _stream(self, stream: Any, out: JobOutput, chat: bool) -> None:
        decode = self._chat_decoder.decode if chat else self._completion_decoder.decode
        to_delta = _chat_delta if chat else _completion_delta
        usage, produced, started = Usage(), False, False
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
                if not produced:
                    raise _rejection(chunk.error)
                raise RuntimeError(f"vLLM failed mid-stream: {chunk.error.message}")
            if not started:
                started = True
                out.started()
            deltas = [d for c in chunk.choices if (d := to_delta(c)) is not None]  # type: ignore[arg-type]
            if deltas:
                produced = True
                out.delta(deltas)
            if chunk.usage is not None and not chunk.choices:
                u = chunk.usage
                cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else None
                usage = Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens or 0,
                              cached_tokens=cached)
        out.done(usage)

    @staticmethod
    def _vllm_request_ids(job_id: str, body: dict[str, Any], chat: bool) -> list[str]:
        """The external request ids vLLM's serving layer derives from ``request_id``."""
        if chat:
            return [f"chatcmpl-{job_id}"]
        prompt = body.get("prompt")
        # A list of strings or of token lists is a batch of prompts; vLLM numbers them.
        many = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        return [f"cmpl-{job_id}-{i}" for i in range(len(prompt) if many else 1)]

    async def close(self) -> None:
        """Shut the engine down (its core process and background tasks)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
