"""The wire contract between gateways and engines: job and event messages, Redis names.

Both sides import this module and nothing else of each other. It imports no ML library
(a test proves it), so a gateway never pulls in torch and an engine never pulls in Litestar.

Messages are msgspec Structs encoded as msgpack. Schema evolution follows msgspec's rules:
a new field always gets a default, so gateways and engines can be upgraded one at a time.
Events are a tagged union (``t``) decoded by one decoder built once.
"""

from __future__ import annotations

import msgspec

#: Version of this contract, announced in :class:`EngineInfo`. 1: no event sequence numbers,
#: no job keys; 2: events numbered per attempt, jobs keyed for idempotent submission;
#: 3: image jobs and :class:`ImageReady` events; 4: :attr:`Delta.total` on every delta.
PROTOCOL_VERSION = 4

#: The job kinds this version of the contract defines. An engine answers any other kind it
#: meets with a ``Failed`` (501), so a gateway can add kinds before every engine knows them; each
#: engine announces the kinds it runs in ``EngineInfo.kinds``. ``input_tokens``
#: (``/v1/responses/input_tokens``): the body is a chat completions request JSON, as a ``chat``
#: job's (messages, tools, tool_choice, response_format, chat_template_kwargs...); nothing is
#: generated: the engine answers ``Started``, then ``Done(usage=Usage(prompt_tokens=N,
#: completion_tokens=0))``, N the prompt tokens a ``chat`` job of that body would report (a prompt
#: over the model's context is still counted), and a bad body a ``Failed`` 400 (``JobRejected``).
#: The Responses API (``/v1/responses``) has no kind of its own: the gateway translates it into
#: ``chat`` jobs. ``embedding`` (``/v1/embeddings``): :class:`Embedded` events. ``image_edit``
#: (``/v1/images/edits`` and ``/variations``): the body is an image request's fields plus ``images``
#: (and ``mask``), each ``input:<i>`` (:attr:`JobOptions.inputs` ``[i]``, in the blob store) or an
#: http(s) URL the engine fetches under its media policy, and ``strength``; answered with
#: :class:`ImageReady` as ``image`` is (``engines.image_edit`` reads it).
JOB_KINDS = frozenset({"chat", "completion", "image", "input_tokens", "embedding", "image_edit"})


class BlobRef(msgspec.Struct, omit_defaults=True):
    """A large input of a job, in the blob store rather than in the job's body (an image to edit,
    its mask): the gateway writes it (``store.new_input_ref``) before it queues the job, the engine
    reads it, and it expires with the job."""

    ref: str
    media_type: str = "application/octet-stream"
    #: Its length in bytes (the gateway counts it in the job's cost and bounds).
    size: int = 0


class JobOptions(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """A job's affinity, adapter, inputs by reference and result record (``Job.options``)."""

    #: The engine this job is addressed to ("": any engine of the model). An addressed job is
    #: written to that engine's own stream (``Keys.engine_jobs``), which only an engine announcing
    #: ``EngineInfo.addressable`` reads: for prefix-aware dispatch and for LoRA adapters loaded on
    #: some engines only.
    engine: str = ""
    #: The LoRA adapter the job runs with ("": the base model); one of ``EngineInfo.adapters``.
    adapter: str = ""
    #: Inputs too large for ``body``, by reference into the blob store (image edits' images).
    inputs: list[BlobRef] = []
    #: The stream the engine also appends every event of this job to (``Keys.result``: a background
    #: response's result record), in order and encoded as its reply stream's entries, so any gateway
    #: can read a job whose submitting gateway is gone. The gateway creates it, with its expiry, before
    #: it queues the job: an engine never makes a stream it has not seen (``engines.contract.replies``),
    #: so the events of a job whose record is missing are dropped there. The job is acked only once its
    #: final event is in this stream too; a cancelled job ends with a ``Failed`` 499 ``cancelled`` in
    #: both streams (a job without a record is acked silently). "": no record (today's jobs).
    result: str = ""


class Job(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """One request for an engine, written to ``Keys.jobs(model)``.

    ``body`` is the client's OpenAI request as JSON, already validated by the gateway;
    the engine builds its own request model from it (vLLM's protocol classes), so every
    parameter the gateway let through reaches the engine unchanged.
    """

    id: str
    #: One of :data:`JOB_KINDS` (a plain string on the wire: an engine that does not know a
    #: kind still decodes the job and answers it with a ``Failed``).
    kind: str
    model: str
    body: bytes
    reply_to: str
    #: Epoch milliseconds after which the job must not be started.
    deadline_ms: int
    #: Epoch milliseconds when the gateway queued the job (engines measure queue wait).
    created_ms: int = 0
    #: W3C trace context of the client's request, so engine logs and spans join its trace.
    traceparent: str = ""
    #: Whether the client sees output as it is produced. A non-streaming job's partial output
    #: never reached anyone, so a job lost mid-output is retried rather than failed. Older
    #: gateways do not send it: True is the safe reading.
    stream: bool = True
    #: How long outputs an engine stores rather than sends (images) must stay readable, in
    #: milliseconds (0: the engine's default). The gateway serves ``url`` images that long.
    output_ttl_ms: int = 0
    #: The API key id the job runs for ("" when authentication is off): fair queueing serves
    #: the keys with work waiting in turn.
    tenant: str = ""
    #: The key's weight in fair queueing.
    priority: int = 1
    #: What the next endpoints add to a job (:class:`JobOptions`); None for today's jobs, which so
    #: stay byte for byte what they were (13 fields: msgpack's one-byte map header; 16 would need
    #: three, and the backlog's byte bound counts every job's encoded size).
    options: JobOptions | None = None
    #: The client's request id (``x-request-id``, or the gateway's own), so engine logs name the
    #: request a job serves. Empty from older gateways (14 fields: still one map header byte).
    request_id: str = ""


class JobHeader(msgspec.Struct, forbid_unknown_fields=False):
    """The fields needed to answer a job that cannot be decoded as a :class:`Job`."""

    id: str
    reply_to: str
    #: Whose backlog share the job holds (released with its ack).
    tenant: str = ""


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


class Generated(msgspec.Struct, array_like=True):
    """A job's tokens so far, all choices together (``Delta.total``; a two-number array on the wire:
    it rides on every delta)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Started(msgspec.Struct, tag="s", tag_field="t", omit_defaults=True):
    """The engine accepted the job (the request is valid and generation began)."""

    job: str
    engine: str = ""
    attempt: int = 1
    created: int = 0
    #: Position of this event among its attempt's events, from 1 (0: an engine that does not
    #: number its events). A gateway drops a number it already had and fails on a gap.
    seq: int = 0


class Delta(msgspec.Struct, tag="d", tag_field="t", omit_defaults=True):
    """New output for one job."""

    job: str
    choices: list[ChoiceDelta] = []
    attempt: int = 1
    seq: int = 0
    #: The usage so far, only when the client asked for it on every chunk (vLLM's
    #: ``continuous_usage_stats``); vLLM counts the completion tokens of this delta's choice.
    usage: Usage | None = None
    #: The job's usage so far, every choice together (protocol 4): what the job's key is charged
    #: if the job ends without its ``Done`` (client gone, deadline, engine lost).
    total: Generated | None = None


class Done(msgspec.Struct, tag="f", tag_field="t", omit_defaults=True):
    """The job finished; nothing follows."""

    job: str
    usage: Usage = msgspec.field(default_factory=Usage)
    attempt: int = 1
    seq: int = 0


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
    seq: int = 0
    #: Seconds the client should wait before retrying, sent as ``Retry-After`` with ``status`` (an
    #: upstream engine's 429); 0: none. Older gateways ignore it (an unknown field).
    retry_after_s: int = 0


class ImageReady(msgspec.Struct, tag="i", tag_field="t", omit_defaults=True):
    """One image of an image job (final, or a partial preview) is in the image store.

    Events carry the image's reference, never its bytes: the engine writes each image once
    (``ImageStore``) and the gateway serves ``url`` and ``b64_json`` answers from that copy.
    """

    job: str
    #: The image's name in the store (unguessable; it ends in the format's extension).
    ref: str
    #: Which of the request's ``n`` images.
    index: int = 0
    #: ``png``, ``jpeg`` or ``webp``.
    format: str = "png"
    width: int = 0
    height: int = 0
    #: The seed of the image's own generator: the same seed gives the same image.
    seed: int = 0
    #: For a partial preview, its number (0-based, ``partial_image_index``); None: the final image.
    partial: int | None = None
    #: The image joined a denoising batch that was already running (continuous batching).
    joined: bool = False
    #: The largest denoising batch (images per step) the image ran in.
    batch: int = 1
    attempt: int = 1
    seq: int = 0


class Embedded(msgspec.Struct, tag="v", tag_field="t", omit_defaults=True):
    """One input's embedding (an ``embedding`` job sends one per input, then ``Done`` with usage)."""

    job: str
    #: Which of the request's inputs.
    index: int = 0
    #: The vector as little-endian float32s (4 bytes a dimension; the gateway answers ``float`` or
    #: ``base64`` from these bytes without decoding them twice).
    vector: bytes = b""
    attempt: int = 1
    seq: int = 0


Event = Started | Delta | ImageReady | Embedded | Done | Failed
"""Everything an engine writes to a reply stream."""


class Unknown(msgspec.Struct, forbid_unknown_fields=False):
    """An event this version cannot read (a newer type, a damaged one), kept only for its place:
    its number still counts, so skipping it is not mistaken for lost events."""

    job: str = ""
    attempt: int = 1
    seq: int = 0


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
    #: Characters of the longest entry of the model's vocabulary, when known: a text of ``c``
    #: characters is at least ``c / max_chars_per_token`` tokens (gateways refuse prompts
    #: beyond the context before queueing them).
    max_chars_per_token: int | None = None
    #: Sequences the engine's model runs at once (vLLM's ``max_num_seqs``), when it batches so.
    max_sequences: int | None = None
    #: The wire contract version the engine speaks (absent: 1).
    protocol: int = 1
    #: Job kinds the engine runs (absent: chat and completion, all that version 1 had).
    kinds: list[str] = msgspec.field(default_factory=lambda: ["chat", "completion"])
    #: The engine reads its own stream (``Keys.engine_jobs``) as well as its model's: gateways may
    #: address jobs to it (:attr:`JobOptions.engine`). Absent: it reads only the model's stream.
    addressable: bool = False
    #: LoRA adapters the engine has loaded (:attr:`JobOptions.adapter` names one).
    adapters: list[str] = []
    #: The engine writes result records for jobs with :attr:`JobOptions.result` (``Keys.result``), and
    #: ends such a job, when it is cancelled, with a ``Failed`` 499 ``cancelled``.
    results: bool = False
    #: Models of :attr:`models` the engine announces *cold*: it takes their jobs at once, but its
    #: first output may take a cold start (an upstream engine whose serverless endpoint is scaled to
    #: zero). A gateway counts their requests in its demand gauge until their first output. Absent:
    #: none (an older engine).
    cold: list[str] = []
    #: Models of :attr:`models` whose ``embedding`` jobs may give ``input`` as token ids (the engine
    #: was started with ``--embed-token-inputs``); any other model's token-id input is refused with a
    #: 400 naming ``input``, by the gateway before queueing and by the engine. Absent: none.
    token_inputs: list[str] = []
    #: The length of the vectors of an embedding engine's model (what ``dimensions`` is at most); the
    #: gateway bounds an answer's size with it. Absent: none (not an embedding engine, or an older one).
    embedding_size: int | None = None


class Codec:
    """Encoders/decoders built once per process (msgspec reuses their internal state)."""

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._job = msgspec.msgpack.Decoder(Job)
        self._header = msgspec.msgpack.Decoder(JobHeader)
        self._events = msgspec.msgpack.Decoder(list[Event])
        self._raw_events = msgspec.msgpack.Decoder(list[msgspec.Raw])
        self._event = msgspec.msgpack.Decoder(Event)  # type: ignore[arg-type]
        self._unknown = msgspec.msgpack.Decoder(Unknown)
        self._info = msgspec.msgpack.Decoder(EngineInfo)

    def encode(self, obj: object) -> bytes:
        return self._enc.encode(obj)

    def decode_job(self, data: bytes) -> Job:
        return self._job.decode(data)

    def decode_job_header(self, data: bytes) -> JobHeader:
        """Just enough of a job to answer it (raises like :meth:`decode_job`)."""
        return self._header.decode(data)

    def decode_events(self, data: bytes) -> tuple[list[Event | Unknown], int]:
        """The events of one reply-stream entry (one engine flush), and how many it could not read.

        The whole batch is decoded at once when every event is one this version knows;
        otherwise event by event: one it cannot read (an unknown type from a newer engine, a
        damaged one) becomes an :class:`Unknown` holding its job and number, if those can be
        read, and never costs its neighbours. Raises only when the entry is not a list at all.
        """
        try:
            return self._events.decode(data), 0  # type: ignore[return-value]
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
        events: list[Event | Unknown] = []
        skipped = 0
        for raw in self._raw_events.decode(data):
            try:
                events.append(self._event.decode(raw))
            except (msgspec.ValidationError, msgspec.DecodeError):
                skipped += 1
                try:
                    unknown = self._unknown.decode(raw)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    continue
                if unknown.job:
                    events.append(unknown)
        return events, skipped

    def decode_info(self, data: bytes) -> EngineInfo:
        return self._info.decode(data)
