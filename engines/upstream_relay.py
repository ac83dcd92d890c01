"""What the upstream engine sends and how it reads the answer: the request body (the client's, through
the kind's allowlist), and its stream relayed as events (its errors mapped and its reads bounded:
``engines.upstream_reads``).

The upstream speaks OpenAI's chat and completions API (vLLM's, SGLang's and TGI's servers, OpenAI
itself, another Conduit gateway), so its stream chunks are the ones ``engines.vllm_chunks`` reads for
the in-process vLLM engine: the same shapes and the same mapping to ``ChoiceDelta`` and ``Usage``.
No I/O here (``engines.upstream`` owns the connection).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import msgspec

from engines.backend import JobOutput, JobRejected
from engines.contract.messages import ChoiceDelta, Generated, Usage
from engines.upstream_reads import MAX_LINE_BYTES, Retryable, clipped, error_body, mapped_error
from engines.vllm_chunks import (
    UNFINISHED,
    ChatChoice,
    ChatMessage,
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


#: A request asking for any of these is streamed from the upstream even when its client does not
#: stream: its answer may be large (a logprob entry a token), and a stream's lines are each bounded.
_LARGE_ANSWER = ("logprobs", "top_logprobs", "prompt_logprobs")
#: The most of one whole (not streamed) answer read: far over any answer without logprobs.
ANSWER_BYTES = 32 * 1024 * 1024


def streams_from_upstream(body: dict[str, Any]) -> bool:
    """Whether the upstream is asked to stream: when the client streams, or asks for logprobs. A
    client that does not stream otherwise gets one whole answer forwarded: one body to read and one
    delta a choice, not a chunk (and an event) a token."""
    return bool(body.get("stream")) or any(body.get(k) for k in _LARGE_ANSWER)


def upstream_request(body: dict[str, Any], kind: str, model: str) -> dict[str, Any]:
    """The client's request as the upstream gets it: only :data:`REQUEST_FIELDS`, ``model`` the
    upstream's name, streamed as :func:`streams_from_upstream` says, and a stream always with usage at
    the end. ``stream_options`` is built, never copied (and never sent without a stream: vLLM refuses
    it): ``include_usage``, and vLLM's ``continuous_usage_stats`` only when the client asked for usage
    on every chunk (:func:`wants_continuous_usage`, the gateway's and vLLM's rule), so an upstream without
    that extension never sees it unasked and no other key the client put there leaves Conduit."""
    fields = REQUEST_FIELDS[kind]
    sent = {k: v for k, v in body.items() if k in fields and k != "stream_options"}
    if not streams_from_upstream(body):
        return {**sent, "model": model, "stream": False}
    options: dict[str, bool] = {"include_usage": True}
    if wants_continuous_usage(body):
        options["continuous_usage_stats"] = True
    return {**sent, "model": model, "stream": True, "stream_options": options}


def choices_asked(body: dict[str, Any], kind: str) -> int:
    """The choices a request makes: ``n`` (chat), ``n`` a prompt (completions: a list of texts or of
    token lists is that many prompts; one list of token ids, one)."""
    n = body.get("n")
    n = n if isinstance(n, int) and n > 0 else 1
    prompt = body.get("prompt")
    if kind == "completion" and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return n * len(prompt)
    return n


def wants_continuous_usage(body: dict[str, Any]) -> bool:
    """Whether the client asked for usage on every chunk (vLLM's rule: only with ``include_usage``)."""
    options = body.get("stream_options")
    if not isinstance(options, dict):
        return False
    return bool(options.get("include_usage") and options.get("continuous_usage_stats"))


#: The most tokens an upstream's usage may report for a prompt (beyond any model's context: a larger
#: count is a lie or a bug, clamped and logged; it would lock the key out of its token limit).
MAX_REPORTED_TOKENS = 1 << 24

#: Characters per token of the tokenizer-free estimate (the gateway's admission rule, ``cost.py``).
CHARS_PER_TOKEN = 4


def estimated_prompt_tokens(body: dict[str, Any], kind: str) -> int:
    """The prompt's tokens when the upstream never says (a stream that ends without usage): the
    characters of its ``messages`` (chat) or ``prompt`` (completions) as compact JSON, divided by
    :data:`CHARS_PER_TOKEN`, rounded up."""
    prompt = body.get("messages" if kind == "chat" else "prompt") or ""
    chars = len(prompt) if isinstance(prompt, str) else len(json.dumps(prompt, separators=(",", ":")))
    return -(-chars // CHARS_PER_TOKEN)


def _chunk_failure(error: ChunkError, model: str) -> Exception:
    """An error chunk before any output (vLLM's ``code`` is the HTTP status it would have answered)."""
    return mapped_error(error.code or 500, msgspec.json.encode({"error": error}), {}, model)


# ---- the relay --------------------------------------------------------------------------
class StreamBroke(JobRejected):
    """The upstream's stream failed after output reached the job: never retried, a clean error event."""

    def __init__(self, why: str) -> None:
        log.warning("the upstream failed after output began: %s", why)
        super().__init__(f"The model's upstream server failed after output began ({why}); retry the request.",
                         status=502, code="engine_error", type="server_error")


_CHAT = msgspec.json.Decoder(Chunk[ChatChoice])
_COMPLETION = msgspec.json.Decoder(Chunk[CompletionChoice])


class _ChatAnswerChoice(ChatChoice):
    """A whole chat answer's choice: its ``message`` is read as a stream choice's ``delta``."""

    message: ChatMessage | None = None


_CHAT_ANSWER = msgspec.json.Decoder(Chunk[_ChatAnswerChoice])
_COMPLETION_ANSWER = _COMPLETION  # a whole completion's choices have a stream chunk's shape


class Relay:
    """One job's upstream stream, relayed as its events: deltas with the job's usage so far, then
    ``Done`` with the upstream's usage, or with the counted usage when the stream ends without one.

    Counting (when the upstream gives no usage): each chunk's choice delta counts its logprobs
    entries when it has them (one per token), else one token when it carries text, reasoning or
    tool-call arguments (servers stream one token a chunk; a server that sends more per chunk is
    charged less); the prompt is :func:`estimated_prompt_tokens`.
    """

    __slots__ = ("out", "chat", "continuous", "n", "prompt_estimate", "produced", "usage", "counted", "counts",
                 "prompts", "generated", "prompt", "max_completion", "choices", "_decode", "_model")

    def __init__(self, out: JobOutput, client: dict[str, Any], kind: str, model: str) -> None:
        self.out = out
        self.chat = kind == "chat"
        self.continuous = wants_continuous_usage(client)
        self.n = int(client.get("n") or 1)
        self.prompt_estimate = estimated_prompt_tokens(client, kind)
        #: Choice indexes run from 0 to this (an upstream's other index is refused, never relayed).
        self.choices = choices_asked(client, kind)
        #: The most completion tokens the request allows (``max_tokens`` for each choice), if it says.
        most = client.get("max_completion_tokens") or client.get("max_tokens")
        self.max_completion = most * self.n if isinstance(most, int) and most > 0 else None
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
            log.warning("the upstream sent an unreadable chunk (%s): %s", exc, clipped(payload, 200))
            raise self.broken("an unreadable chunk") from None
        if chunk.error is not None:
            if self.produced:
                raise self.failed_mid_stream(chunk.error.message)
            raise _chunk_failure(chunk.error, self._model)
        self._chunk(chunk)
        return True

    def answer(self, data: bytes) -> None:
        """Relay one whole (not streamed) answer: each choice's output as one delta, then ``done`` with
        the upstream's usage, or without it the output's characters / 4 (a token count never seen)."""
        try:
            answer = (_CHAT_ANSWER if self.chat else _COMPLETION_ANSWER).decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("the upstream sent an unreadable answer (%s): %s", exc, clipped(data.decode(errors="replace"),
                                                                                        200))
            raise self.broken("an unreadable answer") from None
        if answer.error is not None:
            raise _chunk_failure(answer.error, self._model)
        if self.chat:
            for c in answer.choices:
                c.delta = c.message
                for i, t in enumerate(c.delta.tool_calls or () if c.delta is not None else ()):
                    t.index = i  # a whole answer's calls carry no index: each keeps its place
        self._check(answer.choices)
        to_delta = chat_delta if self.chat else completion_delta
        deltas: list[ChoiceDelta] = [d for c in answer.choices if (d := to_delta(c)) is not None]
        estimate = 0
        for d in deltas:
            out = d.text + d.reasoning + "".join((t.name or "") + t.arguments for t in d.tool_calls)
            self.counted += len(d.logprobs) if d.logprobs else 1 if out else 0
            estimate += len(d.logprobs) if d.logprobs else -(-len(out) // CHARS_PER_TOKEN)
        if answer.usage is not None:
            self.usage = self.clamped(usage_of(answer.usage))
        else:
            self.usage = Usage(prompt_tokens=self.prompt_estimate, completion_tokens=estimate)
        if deltas:
            self.produced = True
            self.out.started()
            self.out.delta(deltas, None, Generated(self.usage.prompt_tokens, self.usage.completion_tokens))
        self.finish()

    def failed_mid_stream(self, message: str | None) -> StreamBroke:
        """An error event after output: the upstream's message logged (clipped), never relayed."""
        log.warning("the upstream sent an error event mid-stream: %s", clipped(message))
        return StreamBroke("it sent an error event")

    def too_long(self, why: str = f"a stream line over {MAX_LINE_BYTES // 1024} KiB") -> JobRejected:
        """A line of the stream over :data:`MAX_LINE_BYTES` (or an answer over :data:`ANSWER_BYTES`):
        never retried (the same request would bring the same), a clean error whether or not output began."""
        if self.produced:
            return StreamBroke(why)
        log.warning("the upstream sent %s", why)
        return JobRejected(f"The model's upstream server sent {why}.", status=502, code="engine_error",
                           type="server_error")

    def broken(self, why: str) -> Exception:
        return StreamBroke(why) if self.produced else Retryable(JobRejected(
            f"The model's upstream server sent {why}.", status=502, code="engine_error", type="server_error"))

    def _check(self, choices: list[Any]) -> None:
        for c in choices:
            if not 0 <= c.index < self.choices:
                raise self.broken(f"choice index {c.index} (the request makes {self.choices})")
            if c.finish_reason in UNFINISHED:
                raise self.broken(f"choice {c.index} ended with finish_reason {c.finish_reason!r}")

    def _chunk(self, chunk: Chunk[Any]) -> None:
        self._check(chunk.choices)
        to_delta = chat_delta if self.chat else completion_delta
        deltas: list[ChoiceDelta] = [d for c in chunk.choices if (d := to_delta(c)) is not None]
        u = chunk.usage
        shown = None if u is None else self.clamped(usage_of(u))
        if shown is not None and chunk.choices:  # continuous usage: the counts of this chunk's choices
            for c in chunk.choices:
                now = shown.completion_tokens
                self.generated += now - self.counts.get(c.index, 0)
                self.counts[c.index] = now
                group = c.index // self.n
                self.prompt += shown.prompt_tokens - self.prompts.get(group, 0)
                self.prompts[group] = shown.prompt_tokens
        if shown is not None and not chunk.choices:  # the final usage chunk
            self.usage = shown
        for d in deltas:
            if d.logprobs:
                self.counted += len(d.logprobs)
            elif d.text or d.reasoning or any(t.arguments or t.name for t in d.tool_calls):
                self.counted += 1
        if deltas:
            if not self.produced:
                self.produced = True  # started with the first output: a failure before keeps its status
                self.out.started()
            self.out.delta(deltas, shown if self.continuous else None, self.total())

    def total(self) -> Generated:
        """The job's usage so far (what it is charged if it never ends with ``done``)."""
        if self.counts:
            return Generated(max(self.prompt, 0), max(self.generated, 0))
        return Generated(self.prompt_estimate, self.counted)

    @staticmethod
    def clamped(usage: Usage) -> Usage:
        """An upstream's counts within what any answer could have: none negative, a prompt of at most
        :data:`MAX_REPORTED_TOKENS` (the upstream is the operator's; a lie still must not credit a
        key's bill or lock it out of its token limit)."""
        prompt = min(max(usage.prompt_tokens, 0), MAX_REPORTED_TOKENS)
        completion = min(max(usage.completion_tokens, 0), MAX_REPORTED_TOKENS)
        cached = None if usage.cached_tokens is None else min(max(usage.cached_tokens, 0), prompt)
        fixed = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
        if fixed != usage:
            log.warning("the upstream reported impossible usage %s; counted as %s", usage, fixed)
        return fixed

    def final_usage(self, usage: Usage) -> Usage:
        """The upstream's final counts, and never fewer completion tokens than were relayed nor more
        than the request allows (``max_tokens`` x ``n``)."""
        completion = max(usage.completion_tokens, self.counted)
        if self.max_completion is not None:
            completion = min(completion, self.max_completion)
        if completion != usage.completion_tokens:
            log.warning("the upstream reported %d completion tokens; %d relayed, %s allowed: charged %d",
                        usage.completion_tokens, self.counted, self.max_completion, completion)
        return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=completion, cached_tokens=usage.cached_tokens)

    def finish(self) -> None:
        """The stream ended: ``done`` with the upstream's usage, or the counted one."""
        if self.usage is None:
            total = self.total()
            self.usage = Usage(prompt_tokens=total.prompt_tokens, completion_tokens=total.completion_tokens)
        else:
            self.usage = self.final_usage(self.usage)
        self.out.started()
        self.out.done(self.usage)
