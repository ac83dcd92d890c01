"""What the upstream engine sends and how it reads the answer: the request body (the client's, through
the kind's allowlist), the upstream's errors mapped to Conduit's, and its stream relayed as events.

The upstream speaks OpenAI's chat and completions API (vLLM's, SGLang's and TGI's servers, OpenAI
itself, another Conduit gateway), so its stream chunks are the ones ``engines.vllm_chunks`` reads for
the in-process vLLM engine: the same shapes and the same mapping to ``ChoiceDelta`` and ``Usage``.
No I/O here (``engines.upstream`` owns the connection).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from engines.backend import JobOutput, JobRejected
from engines.contract.messages import ChoiceDelta, Generated, Usage
from engines.vllm_chunks import (
    UNFINISHED,
    ChatChoice,
    Chunk,
    ChunkError,
    CompletionChoice,
    chat_delta,
    completion_delta,
    usage_of,
)
from engines.vllm_engine import REQUEST_FIELDS as VLLM_FIELDS

log = logging.getLogger("conduit.engine")

#: The fields of a client's body the upstream gets: the ones the gateway names and bounds (OpenAI's,
#: and vLLM's extensions as ``gateway.common.protocol`` bounds them), exactly the in-process vLLM
#: engine's allowlist, less ``request_id`` (an id the upstream would keep in its own request table:
#: two clients' equal ids would collide there). Anything else a body carries never leaves Conduit:
#: OpenAI-hosted state (``store``, ``metadata``: Conduit keeps all state, never the upstream), other
#: servers' extensions, and every field the gateway did not bound.
REQUEST_FIELDS: dict[str, frozenset[str]] = {kind: fields - {"request_id"} for kind, fields in VLLM_FIELDS.items()}
#: The upstream's paths (relative to its base URL, which ends in ``/v1`` as OpenAI's does) per job kind.
PATHS = {"chat": "chat/completions", "completion": "completions", "image": "images/generations"}


def upstream_request(body: dict[str, Any], kind: str, model: str) -> dict[str, Any]:
    """The client's request as the upstream gets it: only :data:`REQUEST_FIELDS`, ``model`` the
    upstream's name, always streamed, and always with usage at the end. ``stream_options`` is built, never
    copied: ``include_usage``, and vLLM's ``continuous_usage_stats`` only when the client asked for usage
    on every chunk (:func:`wants_continuous_usage`, the gateway's and vLLM's rule), so an upstream without
    that extension never sees it unasked and no other key the client put there leaves Conduit."""
    fields = REQUEST_FIELDS[kind]
    options: dict[str, bool] = {"include_usage": True}
    if wants_continuous_usage(body):
        options["continuous_usage_stats"] = True
    return {**{k: v for k, v in body.items() if k in fields}, "model": model, "stream": True,
            "stream_options": options}


def wants_continuous_usage(body: dict[str, Any]) -> bool:
    """Whether the client asked for usage on every chunk (vLLM's rule: only with ``include_usage``)."""
    options = body.get("stream_options")
    if not isinstance(options, dict):
        return False
    return bool(options.get("include_usage") and options.get("continuous_usage_stats"))


#: Characters per token of the tokenizer-free estimate (the gateway's admission rule, ``cost.py``).
CHARS_PER_TOKEN = 4


def estimated_prompt_tokens(body: dict[str, Any], kind: str) -> int:
    """The prompt's tokens when the upstream never says (a stream that ends without usage): the
    characters of its ``messages`` (chat) or ``prompt`` (completions) as compact JSON, divided by
    :data:`CHARS_PER_TOKEN`, rounded up."""
    prompt = body.get("messages" if kind == "chat" else "prompt") or ""
    chars = len(prompt) if isinstance(prompt, str) else len(json.dumps(prompt, separators=(",", ":")))
    return -(-chars // CHARS_PER_TOKEN)


# ---- errors ------------------------------------------------------------------------------
class Retryable(Exception):
    """The upstream failed in a way worth another try before any output (connection, 5xx, 429, a
    timeout); ``final`` is what the job fails with once the tries (or its deadline) run out."""

    def __init__(self, final: JobRejected, retry_after_s: float | None = None) -> None:
        super().__init__(final.message)
        self.final = final
        self.retry_after_s = retry_after_s


class _ErrorBody(msgspec.Struct):
    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _Envelope(msgspec.Struct):
    error: _ErrorBody | str | None = None
    #: vLLM's older error bodies, and some other servers': the fields at the top level.
    message: str = ""
    param: str | None = None


def error_body(data: bytes) -> _ErrorBody:
    """An upstream's error body, however it spells it (OpenAI's envelope, a bare object, plain text)."""
    try:
        env = msgspec.json.decode(data, type=_Envelope)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return _ErrorBody(message=data[:MESSAGE_CHARS].decode(errors="replace").strip())
    if isinstance(env.error, _ErrorBody):
        return env.error
    return _ErrorBody(message=env.error or env.message, param=env.param)


def retry_after(headers: Any) -> float | None:
    """The upstream's ``Retry-After`` in seconds (only the delta-seconds form), if any."""
    try:
        value = float(headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if 0 <= value < 3600 else None


#: The most of an upstream's error body read (the rest is never read: an upstream cannot make the
#: engine buffer without limit), and the most of its message relayed or logged.
ERROR_BODY_BYTES = 64 * 1024
MESSAGE_CHARS = 500


def clipped(text: str | None, limit: int = MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    text = text or ""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def mapped_error(status: int, data: bytes, headers: Any, model: str) -> Exception:
    """An upstream's error answer as Conduit's (mapped, never copied: the upstream's codes name its
    own clients' problems, not Conduit's clients'): a :class:`JobRejected`, or :class:`Retryable`.

    Only a 400/422 (the client's own mistake) relays the upstream's message and ``param`` (clipped);
    every other status answers Conduit's own message and logs the upstream's (clipped): a 401/403,
    a quota or a 5xx page is about Conduit's account and the upstream's insides, not the client's
    request. A 429 for an exhausted quota (``insufficient_quota``) is not retried and is a 502
    ``engine_error``: no retry, by this engine or the client, cures it, and it is the operator's
    account that is out, as with a refused credential."""
    body = error_body(data)
    upstream = clipped(body.message) or f"(status {status}, no message)"
    if status in (400, 422):
        return JobRejected(clipped(body.message) or f"The model's upstream server refused the request ({status}).",
                           status=400, code="invalid_request", param=clipped(body.param, 128) or None)
    if status == 429 and "insufficient_quota" in (str(body.code), str(body.type)):
        log.error("the upstream says this engine's quota is exhausted (429: %s)", upstream)
        return JobRejected("The model's upstream server refused Conduit's account: its quota is exhausted.",
                           status=502, code="engine_error", type="server_error")
    if status in (401, 403):
        # Conduit's own credential (CONDUIT_UPSTREAM_API_KEY) is wrong: the operator's problem, never
        # the client's invalid_api_key.
        log.error("the upstream refused this engine's credentials (%d: %s): check CONDUIT_UPSTREAM_API_KEY / "
                  "--upstream-api-key-file", status, upstream)
        return JobRejected("The upstream rejected Conduit's credentials.", status=502, code="engine_error",
                           type="server_error")
    log.warning("the upstream answered %d for model %s: %s", status, model, upstream)
    if status == 404:
        return JobRejected(f"The model `{model}` is not available from its upstream server.", status=503,
                           code="model_unavailable", type="server_error")
    if status == 429:
        wait = retry_after(headers)
        return Retryable(JobRejected("The model's upstream server is rate limited.", status=429,
                                     code="model_overloaded", type="rate_limit_error",
                                     retry_after_s=max(1, round(wait or 1))), wait)
    if status == 503:  # the upstream says it cannot serve now (no replica, loading, draining)
        wait = retry_after(headers)
        return Retryable(JobRejected("The model's upstream server is unavailable.", status=503,
                                     code="model_unavailable", type="server_error",
                                     retry_after_s=max(1, round(wait or 1))), wait)
    if status >= 500 or status == 408:
        return Retryable(JobRejected(f"The model's upstream server failed ({status}).", status=502,
                                     code="engine_error", type="server_error"), retry_after(headers))
    return JobRejected(f"The model's upstream server refused the request ({status}).", status=400,
                       code="invalid_request")


def _chunk_failure(error: ChunkError, model: str) -> Exception:
    """An error chunk before any output (vLLM's ``code`` is the HTTP status it would have answered)."""
    return mapped_error(error.code or 500, msgspec.json.encode({"error": error}), {}, model)


# ---- the stream ------------------------------------------------------------------------------
#: The longest line of the upstream's stream read (one chunk: a choice's delta, logprobs and usage;
#: far under this). ``httpx``'s ``aiter_lines`` buffers a line without limit, so :func:`bounded_lines`
#: reads the lines instead.
MAX_LINE_BYTES = 1024 * 1024
_EOL = re.compile(rb"\r\n|\r|\n")


class LineTooLong(Exception):
    """A line of the upstream's stream grew past :data:`MAX_LINE_BYTES` before it ended."""


async def bounded_lines(chunks: AsyncIterator[bytes], limit: int = MAX_LINE_BYTES) -> AsyncIterator[str]:
    """The lines of a byte stream (SSE's line ends: CRLF, LF or CR), none longer than ``limit`` bytes:
    :class:`LineTooLong` as soon as one passes it (never buffering more than ``limit`` plus a chunk)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        start = 0
        for end in _EOL.finditer(chunk):
            piece = chunk[start:end.start()]
            if size + len(piece) > limit:
                raise LineTooLong
            line = b"".join((*parts, piece)) if parts else piece
            parts, size, start = [], 0, end.end()
            yield line.decode(errors="replace")
        rest = chunk[start:]
        if rest:
            size += len(rest)
            if size > limit:
                raise LineTooLong
            parts.append(rest)
    if parts:
        yield b"".join(parts).decode(errors="replace")


async def bounded_body(chunks: AsyncIterator[bytes], limit: int = ERROR_BODY_BYTES) -> bytes:
    """At most ``limit`` bytes of a body (an error answer's); the rest is never read."""
    data = bytearray()
    async for chunk in chunks:
        data += chunk[:limit - len(data)]
        if len(data) >= limit:
            break
    return bytes(data)


# ---- the relay --------------------------------------------------------------------------
class StreamBroke(JobRejected):
    """The upstream's stream failed after output reached the job: never retried, a clean error event."""

    def __init__(self, why: str) -> None:
        log.warning("the upstream failed after output began: %s", why)
        super().__init__(f"The model's upstream server failed after output began ({why}); retry the request.",
                         status=502, code="engine_error", type="server_error")


_CHAT = msgspec.json.Decoder(Chunk[ChatChoice])
_COMPLETION = msgspec.json.Decoder(Chunk[CompletionChoice])


class Relay:
    """One job's upstream stream, relayed as its events: deltas with the job's usage so far, then
    ``Done`` with the upstream's usage, or with the counted usage when the stream ends without one.

    Counting (when the upstream gives no usage): each chunk's choice delta counts its logprobs
    entries when it has them (one per token), else one token when it carries text, reasoning or
    tool-call arguments (servers stream one token a chunk; a server that sends more per chunk is
    charged less); the prompt is :func:`estimated_prompt_tokens`.
    """

    __slots__ = ("out", "chat", "continuous", "n", "prompt_estimate", "produced", "usage", "counted", "counts",
                 "prompts", "generated", "prompt", "_decode", "_model")

    def __init__(self, out: JobOutput, client: dict[str, Any], kind: str, model: str) -> None:
        self.out = out
        self.chat = kind == "chat"
        self.continuous = wants_continuous_usage(client)
        self.n = int(client.get("n") or 1)
        self.prompt_estimate = estimated_prompt_tokens(client, kind)
        #: Output reached the job (a failure from here on is a clean error, never a retry).
        self.produced = False
        self.usage: Usage | None = None
        #: Completion tokens counted from the deltas, all choices together.
        self.counted = 0
        #: Continuous usage: each choice's completion tokens, each prompt's tokens, and their sums.
        self.counts: dict[int, int] = {}
        self.prompts: dict[int, int] = {}
        self.generated = self.prompt = 0
        self._decode = (_CHAT if self.chat else _COMPLETION).decode
        self._model = model

    def line(self, line: str) -> bool:
        """Relay one line of the upstream's SSE stream; False once it said ``[DONE]``."""
        if not line.startswith("data:"):
            return True  # blank lines, comments, `event:` names
        payload = line[5:].strip()
        if payload == "[DONE]":
            return False
        try:
            chunk = self._decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            if payload.startswith('{"error"'):  # another server's error event (a string `code`: OpenAI's, Conduit's)
                error = error_body(payload.encode())
                if self.produced:
                    raise self.failed_mid_stream(error.message) from None
                code = error.code if isinstance(error.code, int) else 500
                raise mapped_error(code, payload.encode(), {}, self._model) from None
            raise self.broken(f"an unreadable chunk ({exc})") from None
        if chunk.error is not None:
            if self.produced:
                raise self.failed_mid_stream(chunk.error.message)
            raise _chunk_failure(chunk.error, self._model)
        self._chunk(chunk)
        return True

    def failed_mid_stream(self, message: str | None) -> StreamBroke:
        """An error event after output: the upstream's message logged (clipped), never relayed."""
        log.warning("the upstream sent an error event mid-stream: %s", clipped(message))
        return StreamBroke("it sent an error event")

    def too_long(self) -> JobRejected:
        """A line of the stream over :data:`MAX_LINE_BYTES`: never retried (the same request would
        bring the same line), a clean error whether or not output began."""
        why = f"a stream line over {MAX_LINE_BYTES // 1024} KiB"
        if self.produced:
            return StreamBroke(why)
        log.warning("the upstream sent %s", why)
        return JobRejected(f"The model's upstream server sent {why}.", status=502, code="engine_error",
                           type="server_error")

    def broken(self, why: str) -> Exception:
        return StreamBroke(why) if self.produced else Retryable(JobRejected(
            f"The model's upstream server sent {why}.", status=502, code="engine_error", type="server_error"))

    def _chunk(self, chunk: Chunk[Any]) -> None:
        for c in chunk.choices:
            if c.finish_reason in UNFINISHED:
                raise self.broken(f"choice {c.index} ended with finish_reason {c.finish_reason!r}")
        to_delta = chat_delta if self.chat else completion_delta
        deltas: list[ChoiceDelta] = [d for c in chunk.choices if (d := to_delta(c)) is not None]
        u = chunk.usage
        if u is not None and chunk.choices:  # continuous usage: the counts of this chunk's choices
            for c in chunk.choices:
                now = u.completion_tokens or 0
                self.generated += now - self.counts.get(c.index, 0)
                self.counts[c.index] = now
                group = c.index // self.n
                self.prompt += u.prompt_tokens - self.prompts.get(group, 0)
                self.prompts[group] = u.prompt_tokens
        if u is not None and not chunk.choices:  # the final usage chunk
            self.usage = usage_of(u)
        for d in deltas:
            if d.logprobs:
                self.counted += len(d.logprobs)
            elif d.text or d.reasoning or any(t.arguments or t.name for t in d.tool_calls):
                self.counted += 1
        if deltas:
            if not self.produced:
                self.produced = True  # started with the first output: a failure before keeps its status
                self.out.started()
            self.out.delta(deltas, usage_of(u) if u is not None and self.continuous else None, self.total())

    def total(self) -> Generated:
        """The job's usage so far (what it is charged if it never ends with ``done``)."""
        if self.counts:
            return Generated(self.prompt, self.generated)
        return Generated(self.prompt_estimate, self.counted)

    def finish(self) -> None:
        """The stream ended: ``done`` with the upstream's usage, or the counted one."""
        if self.usage is None:
            total = self.total()
            self.usage = Usage(prompt_tokens=total.prompt_tokens, completion_tokens=total.completion_tokens)
        self.out.started()
        self.out.done(self.usage)
