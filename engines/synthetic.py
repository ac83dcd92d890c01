"""A synthetic engine: a configured number of tokens at a configured rate, no model.

For benchmarks (the gateway path at zero delay) and for tests that need exact timing.
Never the default engine. It honours ``n``, ``max_tokens`` / ``max_completion_tokens``
and ``stream_options``-independent usage, so the gateway's accounting is exercised, plus
usage on every delta under ``stream_options.continuous_usage_stats`` (vLLM's extension).
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from engines.backend import JobOutput, JobRejected
from engines.contract.messages import ChoiceDelta, Generated, Job, ToolCallDelta, Usage


class _Message(msgspec.Struct):
    content: str | list[dict[str, object]] | None = None
    role: str = ""


class _Function(msgspec.Struct):
    name: str = ""


class _Tool(msgspec.Struct):
    function: _Function = msgspec.field(default_factory=_Function)


class _NamedChoice(msgspec.Struct):
    function: _Function = msgspec.field(default_factory=_Function)


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _Body(msgspec.Struct):
    n: int | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    stream_options: _StreamOptions | None = None


# One body per job kind: a field the other kind defines is, to this one, an unknown field the
# gateway let through unchecked (a chat request's `prompt` may be any JSON).
class _ChatBody(_Body):
    messages: list[_Message] = []
    max_completion_tokens: int | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | _NamedChoice | None = None


class _CompletionBody(_Body):
    prompt: str | list[object] = ""


def chat_prompt_tokens(messages: list[_Message]) -> int:
    """A chat prompt's tokens as this engine counts them, for chat and ``input_tokens`` jobs alike:
    a string content's whitespace-separated words, 1 for any other content (parts, none)."""
    return sum(len(m.content.split()) if isinstance(m.content, str) else 1 for m in messages)


class SyntheticSettings(msgspec.Struct, kw_only=True):
    models: list[str] = msgspec.field(default_factory=lambda: ["synthetic"])
    #: Tokens per choice when the request sets no limit.
    tokens: int = 16
    #: Seconds between tokens (0: as fast as the event loop allows).
    token_delay_s: float = 0.0
    #: Seconds before the first token.
    first_token_delay_s: float = 0.0
    max_concurrency: int = 256
    #: The text of every token.
    token_text: str = "tok "
    #: Token i's text is ``"<i> "`` instead (i = 0, 1, ... per choice): a client can check an
    #: answer for duplicated or missing tokens (the fault suite does).
    numbered: bool = False
    #: Seconds a job blocks the engine's event loop before its first token (a wedged backend: the
    #: fault tests' engine that must be failed over). 0: never.
    block_s: float = 0.0
    #: Tool calling, scripted (agent clients' round trips): a chat job that offers ``tools`` and
    #: whose last message is not a tool result is answered with one call of the tool ``tool_choice``
    #: names (else the first), with :attr:`tool_arguments`; one whose last message is a tool result
    #: is answered with ``"tool said: <its content>"`` as text. Off: tools are ignored.
    tool_calls: bool = False
    tool_arguments: str = "{}"


class SyntheticBackend:
    """Emits ``tokens`` deltas per choice, ``token_delay_s`` apart."""

    kind = "synthetic"
    kinds = frozenset({"chat", "completion", "input_tokens"})

    def __init__(self, settings: SyntheticSettings) -> None:
        self.settings = settings
        self.models = list(settings.models)
        self.max_concurrency = settings.max_concurrency
        self.max_model_len: int | None = None
        self.max_chars_per_token: int | None = None
        self.max_sequences: int | None = None
        self._chat = msgspec.json.Decoder(_ChatBody)
        self._completion = msgspec.json.Decoder(_CompletionBody)
        self._calls = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def run(self, job: Job, out: JobOutput) -> None:
        s = self.settings
        body: _Body
        if job.kind == "input_tokens":  # a chat body, counted as its chat job counts it; nothing generated
            try:
                messages = self._chat.decode(job.body).messages
            except msgspec.DecodeError as exc:  # ValidationError included
                raise JobRejected(f"The request body is not a chat request this engine reads: {exc}") from None
            out.done(Usage(prompt_tokens=chat_prompt_tokens(messages), completion_tokens=0))
            return
        if job.kind == "chat":
            body = chat = self._chat.decode(job.body)
            prompt_tokens = chat_prompt_tokens(chat.messages)
            limit = chat.max_completion_tokens or chat.max_tokens
        else:
            body = completion = self._completion.decode(job.body)
            prompt_tokens = len(str(completion.prompt).split())
            limit = completion.max_tokens
        if body.min_tokens is not None and limit is not None and body.min_tokens > limit:
            # vLLM's own check (the gateway lets it through): its 400, so tests see an engine's refusal.
            raise JobRejected(f"min_tokens must be less than or equal to max_tokens={limit}, got {body.min_tokens}.",
                              param="min_tokens")
        count = min(limit, s.tokens) if limit is not None else s.tokens
        n = body.n or 1
        so = body.stream_options
        continuous = so is not None and bool(so.include_usage and so.continuous_usage_stats)
        out.started()
        if s.tool_calls and job.kind == "chat":
            script = self._scripted(chat)
            if script is not None:
                out.delta([script], None, Generated(prompt_tokens, 1))
                out.done(Usage(prompt_tokens=prompt_tokens, completion_tokens=1))
                return
        if s.block_s:
            time.sleep(s.block_s)  # on purpose: the whole event loop stops
        if s.first_token_delay_s:
            await asyncio.sleep(s.first_token_delay_s)
        for i in range(count):
            last = i == count - 1
            reason = ("length" if limit is not None and count == limit else "stop") if last else None
            text = f"{i} " if s.numbered else s.token_text
            # Usage on every delta as vLLM counts it: each choice has produced i + 1 tokens.
            out.delta([ChoiceDelta(index=c, text=text, finish_reason=reason) for c in range(n)],
                      Usage(prompt_tokens=prompt_tokens, completion_tokens=i + 1) if continuous else None,
                      Generated(prompt_tokens, (i + 1) * n))
            # At zero delay every token exists at once (like a backend that answers instantly):
            # they go out together. With a delay, tokens trickle like a real model's steps.
            if s.token_delay_s:
                await asyncio.sleep(s.token_delay_s)
        out.done(Usage(prompt_tokens=prompt_tokens, completion_tokens=count * n))

    def _scripted(self, chat: _ChatBody) -> ChoiceDelta | None:
        """The scripted answer of a tool-calling round trip (:attr:`SyntheticSettings.tool_calls`), or
        None when the job is no part of one (it offers no tools and answers no call)."""
        last = chat.messages[-1] if chat.messages else None
        if last is not None and last.role == "tool":
            content = last.content if isinstance(last.content, str) else msgspec.json.encode(last.content).decode()
            return ChoiceDelta(text=f"tool said: {content}", finish_reason="stop")
        if not chat.tools or chat.tool_choice == "none":
            return None
        choice = chat.tool_choice
        name = choice.function.name if isinstance(choice, _NamedChoice) else chat.tools[0].function.name
        self._calls += 1
        call = ToolCallDelta(index=0, id=f"call_synthetic_{self._calls}", name=name,
                             arguments=self.settings.tool_arguments)
        return ChoiceDelta(tool_calls=[call], finish_reason="tool_calls")
