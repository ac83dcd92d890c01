"""The wire contract between gateways and engines: job and event messages, Redis names.

Both sides import this module and nothing else of each other. It imports no ML library
(a test proves it), so a gateway never pulls in torch and an engine never pulls in Litestar.

Messages are msgspec Structs encoded as msgpack. Schema evolution follows msgspec's rules:
a new field always gets a default, so gateways and engines can be upgraded one at a time.
Events are a tagged union (``t``) decoded by one decoder built once.
"""

from __future__ import annotations

from typing import Literal

import msgspec

#: Consumer group every engine of a model joins on that model's job stream.
ENGINE_GROUP = "engines"


class Keys:
    """Every Redis key and channel name Conduit uses, in one place.

    Names carry a hash tag (``{...}``) so that keys that are used together land in the
    same Redis Cluster slot.
    """

    def __init__(self, prefix: str = "conduit") -> None:
        self.prefix = prefix
        #: ZSET engine_id -> heartbeat expiry (ms since epoch).
        self.engines = f"{prefix}:{{registry}}:engines"
        #: HASH engine_id -> msgpack EngineInfo.
        self.engine_info = f"{prefix}:{{registry}}:engine-info"
        #: HASH model -> last time (ms) any engine served it; tells "down" from "unknown".
        self.models_seen = f"{prefix}:{{registry}}:models-seen"
        #: Pub/Sub channel: job ids whose client went away.
        self.cancel_channel = f"{prefix}:cancel"

    def jobs(self, model: str) -> str:
        """The job stream of one model (one consumer group, every engine of it consumes)."""
        return f"{self.prefix}:jobs:{{{model}}}"

    def dead_letters(self, model: str) -> str:
        """Jobs that failed too many attempts, kept for inspection."""
        return f"{self.prefix}:dead:{{{model}}}"

    def replies(self, gateway_id: str) -> str:
        """The reply stream of one gateway process; its single reader demultiplexes it."""
        return f"{self.prefix}:replies:{{{gateway_id}}}"

    def output_started(self, model: str, job_id: str) -> str:
        """Set when a job's first output is written: a reclaimed job must not be re-run."""
        return f"{self.prefix}:out:{{{model}}}:{job_id}"


class Job(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """One request for an engine, written to ``Keys.jobs(model)``.

    ``body`` is the client's OpenAI request as JSON, already validated by the gateway;
    the engine builds its own request model from it (vLLM's protocol classes), so every
    parameter the gateway let through reaches the engine unchanged.
    """

    id: str
    kind: Literal["chat", "completion"]
    model: str
    body: bytes
    reply_to: str
    #: Epoch milliseconds after which the job must not be started.
    deadline_ms: int
    created_ms: int = 0
    #: W3C trace context of the gateway span, so engine spans join the request's trace.
    traceparent: str = ""


class TokenLogprob(msgspec.Struct, array_like=True):
    """One sampled or candidate token with its log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class SampledLogprob(msgspec.Struct, array_like=True):
    """A sampled token, its candidates, and its offset in the text (completions)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top: list[TokenLogprob] = []
    text_offset: int = 0


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    """A piece of a tool call, as OpenAI streams them (merge by ``index``)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ChoiceDelta(msgspec.Struct, omit_defaults=True):
    """New output of one choice (``n`` > 1 gives several per step)."""

    index: int = 0
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = []
    logprobs: list[SampledLogprob] | None = None
    finish_reason: str | None = None
    #: The stop string or token that ended the choice, when a stop sequence did.
    stop_reason: str | int | None = None


class Usage(msgspec.Struct, omit_defaults=True):
    """Token counts of the whole job, all choices together."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None


class Started(msgspec.Struct, tag="s", tag_field="t", omit_defaults=True):
    """The engine accepted the job (the request is valid and generation began)."""

    job: str
    engine: str = ""
    attempt: int = 1
    created: int = 0


class Delta(msgspec.Struct, tag="d", tag_field="t", omit_defaults=True):
    """New output for one job."""

    job: str
    choices: list[ChoiceDelta] = []
    attempt: int = 1
    #: The usage so far, only when the client asked for it on every chunk (vLLM's
    #: ``continuous_usage_stats``); vLLM counts the completion tokens of this delta's choice.
    usage: Usage | None = None


class Done(msgspec.Struct, tag="f", tag_field="t", omit_defaults=True):
    """The job finished; nothing follows."""

    job: str
    usage: Usage = msgspec.field(default_factory=Usage)
    attempt: int = 1


class Failed(msgspec.Struct, tag="e", tag_field="t", omit_defaults=True):
    """The job ended in an error; nothing follows.

    ``status`` is the HTTP status the gateway should answer with when nothing was sent
    yet; ``code`` is OpenAI's string error code.
    """

    job: str
    message: str
    code: str = "engine_error"
    status: int = 500
    type: str = "server_error"
    param: str | None = None
    attempt: int = 1


Event = Started | Delta | Done | Failed
"""Everything an engine writes to a reply stream."""


class EngineInfo(msgspec.Struct, omit_defaults=True):
    """What an engine announces in its heartbeat."""

    id: str
    kind: str
    models: list[str]
    max_concurrency: int = 1
    host: str = ""
    pid: int = 0
    started_ms: int = 0
    #: Longest prompt + output the engine's model takes, when known.
    max_model_len: int | None = None


class Codec:
    """Encoders/decoders built once per process (msgspec reuses their internal state)."""

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._job = msgspec.msgpack.Decoder(Job)
        self._events = msgspec.msgpack.Decoder(list[Event])
        self._info = msgspec.msgpack.Decoder(EngineInfo)

    def encode(self, obj: object) -> bytes:
        return self._enc.encode(obj)

    def decode_job(self, data: bytes) -> Job:
        return self._job.decode(data)

    def decode_events(self, data: bytes) -> list[Event]:
        """Reply-stream entries carry a batch of events (one engine flush) in one blob."""
        return self._events.decode(data)

    def decode_info(self, data: bytes) -> EngineInfo:
        return self._info.decode(data)
