"""The gateway's settings: small objects per concern, built at the entrypoint and passed down.

Each component takes the concern it needs (the request decoder :class:`RequestBounds`, the limiter
and the guard :class:`TenancySettings`, ...); :class:`GatewaySettings` holds them all for the entrypoint.
Every field has one flat name across the concerns, so configuration stays flat: ``CONDUIT_<NAME>``
variables, and a TOML/JSON file of ``name = value`` lines (or of one table per concern, ``[queue]``).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import msgspec

from engines.contract.lane import connect, redacted

ENV_PREFIX = "CONDUIT_"


class ServerSettings(msgspec.Struct, kw_only=True, frozen=True):
    """The HTTP edge of one gateway process."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: HTTP workers (processes) for ``conduit gateway``.
    workers: int = 1
    #: Bodies larger than this get a 413.
    max_body_bytes: int = 8 * 1024 * 1024
    #: A request line and headers larger than this get a 431 (``gateway.server``).
    max_header_bytes: int = 65_536
    #: Proxies (addresses or CIDRs, ``10.0.0.0/8``) whose forwarded client address is believed, for the
    #: failed-authentication limit and the request log (``gateway.proxies``). Empty: nobody's; the
    #: TCP peer is the client.
    trusted_proxies: list[str] = []
    #: Proxies in front of the gateway that each add the address they saw to the header: the client
    #: is at most this many entries from its right end, and only trusted ones are stepped over.
    proxy_hops: int = 1
    #: The header those proxies write: ``x-forwarded-for`` or ``forwarded`` (RFC 7239).
    proxy_header: str = "x-forwarded-for"


class RedisSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Where the queue, keys, limits and images live."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: The Redis ACL user (``gateway`` in the deployments, compose/redis/users.acl) and its
    #: password, where the URL carries none: the URL stays free of secrets and of escaping.
    redis_username: str = ""
    redis_password: str = ""
    #: Talk to a Redis Cluster (also chosen by a ``redis+cluster://`` URL).
    redis_cluster: bool = False
    key_prefix: str = "conduit"

    def __repr__(self) -> str:  # the password never reaches a log or a traceback
        return (f"RedisSettings(redis_url={redacted(self.redis_url)!r}, redis_username={self.redis_username!r}, "
                f"redis_password={'***' if self.redis_password else ''!r}, redis_cluster={self.redis_cluster!r}, "
                f"key_prefix={self.key_prefix!r})")

    def connect(self, **kwargs: Any) -> Any:
        """A client of this Redis (``engines.contract.lane.connect``) as this user."""
        return connect(self.redis_url, cluster=self.redis_cluster, username=self.redis_username,
                       password=self.redis_password, **kwargs)


class QueueSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Jobs: their deadlines, the backlog's bounds, how gateways watch them (``gateway.dispatch``)."""

    #: A request not finished after this many seconds gets a 504 and is cancelled.
    request_timeout_s: float = 600.0
    #: Jobs queued or running per model above which new requests get a 429.
    max_backlog: int = 1024
    #: Bytes those jobs may hold in Redis (their encoded size, bodies included) per model; a key
    #: holds at most its ``backlog_share`` of them. Beyond it a 429 ``model_overloaded`` (a job
    #: larger than a key's whole share: 413), so a full backlog never fills Redis.
    max_backlog_bytes: int = 128 * 1024 * 1024
    #: Retry-After sent with a 429.
    retry_after_s: int = 1
    #: How often the live-engine view is refreshed from Redis.
    registry_refresh_s: float = 0.5
    #: How often waiting requests check that Redis still holds their job (a job found gone at
    #: every check for 2 s, twice at least, with no answer, is submitted again or failed).
    job_check_s: float = 1.0
    #: How often one request's job may be submitted again after Redis lost it.
    max_resubmits: int = 2
    #: Models a client may name even while no engine serves them (they get 503, not 404; or,
    #: with ``cold_start_timeout_s``, they are *cold*: their requests wait for an engine).
    models: list[str] = []
    #: How long a request for one of ``models`` waits while no engine of it is live (a *cold*
    #: model: its jobs queue as usual, bounded as usual, and ``conduit.gateway.requests.cold``
    #: tells an autoscaler to start one); past it, a 503 ``model_unavailable`` with Retry-After and
    #: its job withdrawn, so no engine starting later runs it. 0: a 503 at once. At most
    #: ``request_timeout_s``.
    cold_start_timeout_s: float = 0.0
    #: Default fraction of a model's ``max_backlog`` one key may hold (``KeyLimits.backlog_share``).
    key_backlog_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.cold_start_timeout_s <= self.request_timeout_s:
            raise ValueError(f"cold_start_timeout_s ({self.cold_start_timeout_s:g}) must be between 0 and "
                             f"request_timeout_s ({self.request_timeout_s:g})")


class RequestBounds(msgspec.Struct, kw_only=True, frozen=True):
    """Bounds on one request's work: beyond them a 400 naming the field.

    Each of these inputs multiplies what a request costs the gateway or an engine (choices allocated and
    generated, work per sampled token, chat-template items, fetched images, grammar compilation) far beyond
    its size in bytes, so ``max_body_bytes`` alone does not bound it. Where OpenAI enforces a limit the
    default is OpenAI's, so every request OpenAI accepts is accepted here too.
    """

    #: Sequences one request may generate: chat ``n``; completions max(``n``, ``best_of``) x
    #: prompts. 128 is OpenAI's ceiling on ``n``, so any single prompt passes; a batch of
    #: prompts shares it, and no request holds more than a fraction of an engine's batch.
    max_choices: int = 128
    #: Entries in a completions ``prompt`` list. Each prompt costs at least one choice, so this
    #: only binds below ``max_choices``; it exists so a long list is refused naming ``prompt``.
    max_prompts: int = 128
    #: The most one request may make an engine generate and the gateway relay: every choice's
    #: tokens, each with its logprob candidates (chat: ``n`` x ``max_tokens`` x (1 +
    #: ``top_logprobs``); completions: max(``n``, ``best_of``) x prompts x ``max_tokens`` x (1 +
    #: ``logprobs``), plus what ``echo`` and ``prompt_logprobs`` return of the prompts). Without
    #: ``max_tokens`` a choice may run to the model's context. A non-streaming answer holds all of
    #: it in the gateway's memory (about 100-300 bytes a candidate), and the engine's process
    #: renders every candidate.
    max_output_work: int = 524_288
    #: Tokens and logprob candidates one request may make per engine step: chat ``n`` x (1 +
    #: ``top_logprobs``), completions max(``n``, ``best_of``) x prompts x (1 + ``logprobs``). An
    #: engine renders every one on the event loop that also serves its other jobs (measured on the
    #: tiny model: ~30 us a candidate, 85 ms a step for 128 x 21, 3-5x the model's own step time,
    #: so vLLM ran ahead and every other request waited behind its backlog).
    max_step_candidates: int = 256
    #: Share of an engine's batch (the sequences it runs at once, ``EngineInfo.max_sequences``)
    #: one request may take with its ``n`` (or prompts x ``best_of``): the rest serve other requests.
    max_batch_share: float = 0.5
    #: Token ids in one token-id prompt. Engines refuse prompts longer than the model's
    #: context anyway; this keeps them (Python ints, ~8x their JSON size) off the gateway.
    #: 256 Ki covers nearly every served model's context; raise it for longer ones.
    max_prompt_tokens: int = 262_144
    #: An embeddings request's inputs, their tokens (text estimated), its answer's floats: OpenAI's.
    max_embedding_inputs: int = 2048
    max_embedding_tokens: int = 300_000
    max_embedding_floats: int = 2048 * 3072
    #: Messages in a chat request (OpenAI's limit).
    max_messages: int = 2048
    #: Content parts in one message: 500, so that one message can carry all of ``max_images``.
    max_content_parts: int = 500
    #: Image parts in a chat request (OpenAI's limit); an engine fetches and encodes each one.
    max_images: int = 500
    #: Hosts whose http(s) image URLs engines may fetch (``media.example.com``; ``*.example.com``
    #: for the names under it); empty, the default: none, only ``data:`` URLs. Never an address that
    #: is not public, whatever a name resolves to (``engines.contract.media``). Engines take the
    #: same list (``--media-domains``) and check again.
    media_domains: list[str] = []
    #: Tools in a chat request (OpenAI's limit); each is rendered into the prompt and may be
    #: compiled into a grammar.
    max_tools: int = 128
    #: Tool calls in one assistant message; entries in ``logit_bias``, applied to every sampled token
    #: of every choice (OpenAI's limits).
    max_tool_calls: int = 128
    max_logit_bias: int = 300
    #: JSON nesting depth of a tool's ``parameters`` and of a ``json_schema`` response format, which
    #: engines compile into a grammar. OpenAI's structured outputs allow 10 levels of schema nesting, 2
    #: to 3 JSON levels each. (Elsewhere msgspec refuses nesting deeper than ~1000 as invalid JSON.)
    max_json_depth: int = 64
    #: Characters in an image ``prompt`` / ``negative_prompt`` (OpenAI's limit).
    max_image_prompt_chars: int = 32_000
    #: Pixels (width x height) of one requested image, or of an edit's picture (on its header, before
    #: it is decoded); engines hold their models' own limits.
    max_image_pixels: int = 4096 * 4096
    #: Bytes of an image edit's body, its pictures included (they stay in the blob store until it ends).
    max_edit_bytes: int = 64 * 1024 * 1024
    #: Denoising steps one image may ask for (``num_inference_steps``); engines may allow fewer.
    max_image_steps: int = 500
    #: Output tokens a chat or completions request without ``max_tokens`` is reckoned to ask for
    #: when its tokens-per-minute reservation is made (``gateway.tenancy.cost``) and its work bounded.
    default_max_tokens_estimate: int = 1024


class ImageSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Generated images: where they are kept, for how long, how they are answered."""

    #: Where engines put images and gateways read them (``engines.contract.store``): ``redis`` or a
    #: directory every gateway and engine mounts. Engines must be configured alike.
    image_store: str = "redis"
    #: How long a ``url`` image stays downloadable (OpenAI: 60 minutes).
    image_url_ttl_s: float = 3600.0
    #: ``response_format`` when a request names none (OpenAI's default is ``url``).
    image_response_format: str = "url"
    #: Base of image URLs (``https://api.example.com``); empty: the request's own scheme and host.
    public_url: str = ""


class TenancySettings(msgspec.Struct, kw_only=True, frozen=True):
    """API keys, limits, usage and idempotency (``gateway/tenancy``)."""

    #: Require an API key (``Authorization: Bearer``) on every ``/v1`` route. Off: every
    #: request runs as the anonymous principal, with no per-key limits.
    auth: bool = True
    #: argon2id hash of the admin credential for ``/admin/*`` (``conduit keys hash-admin``);
    #: empty: the admin API is off.
    admin_key_hash: str = ""
    #: Days a key's daily usage counters are kept in Redis.
    usage_ttl_days: int = 400
    #: How often the keys version is read: a revoked, disabled or changed key stops working on
    #: every gateway within this (plus a Redis round trip).
    keys_poll_s: float = 0.25
    #: argon2 verifications at once (threads); a key is verified once per gateway, then cached.
    auth_threads: int = 2
    #: Failed authentications per client address (``trusted_proxies``; IPv6: per /64) per minute before it gets 429s ...
    auth_failures: int = 20
    #: ... for this long (keys it already used successfully keep working).
    auth_block_s: float = 60.0
    #: Whether ``/metrics`` needs the metrics credential (``metrics_key_hash``); the gateway refuses
    #: to start with it on and no hash, rather than serve ``/metrics`` open. A hash set is enough.
    metrics_auth: bool = False
    #: argon2id hash of the metrics credential (``conduit keys hash-metrics``): what Prometheus
    #: sends for ``/metrics``, which it opens and nothing else. The admin credential never does.
    metrics_key_hash: str = ""

    def __post_init__(self) -> None:
        if self.metrics_auth and not self.metrics_key_hash:
            raise ValueError("metrics_auth is on but metrics_key_hash is empty: set it to the hash of Prometheus's "
                             "credential (`conduit keys hash-metrics`); the admin credential does not open /metrics")

    @property
    def metrics_protected(self) -> bool:
        """Whether ``/metrics`` needs the metrics credential."""
        return bool(self.metrics_auth or self.metrics_key_hash)


class IdempotencySettings(msgspec.Struct, kw_only=True, frozen=True):
    """Requests retried with an ``Idempotency-Key`` (``gateway/tenancy/idempotency.py``)."""

    #: How long a finished request's response is kept for retries with its ``Idempotency-Key``.
    idempotency_ttl_s: float = 86_400.0
    #: Lease of a request that holds an ``Idempotency-Key`` while it runs, refreshed by its
    #: gateway every third of it: a gateway that died releases its keys within this time.
    idempotency_lease_s: float = 10.0
    #: Longest ``Idempotency-Key`` accepted (400 beyond).
    idempotency_max_key_chars: int = 255
    #: Responses larger than this are not stored for replay (a retry runs again). Each stored
    #: response stays in Redis ``idempotency_ttl_s``, so this times a key's requests in a day is
    #: what its retries may keep there. 1 MiB holds a text answer of ordinary size (about 250,000
    #: characters) and an image answer as ``url``; larger ones (many choices with logprobs, images
    #: as ``b64_json``, often a megabyte each) run again when retried.
    idempotency_max_response_bytes: int = 1024 * 1024
    #: Bytes of responses one API key may store per ``idempotency_ttl_s`` window (a counter that
    #: starts at the window's first store and expires with it); past it, a success is answered but
    #: not stored (its retry runs again). A stored response outlives its window by at most one TTL,
    #: so one key holds at most twice this in Redis. Negative: no budget.
    idempotency_max_stored_bytes: int = 64 * 1024 * 1024
    #: Duplicates of one API key that one gateway holds waiting for their first request's answer
    #: (beyond: 429). Each holds a connection and a task; a key's ``concurrency`` limit, if lower,
    #: bounds them across gateways too.
    idempotency_max_waiters: int = 16


class ResponseSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Stored and background responses (``gateway/responses/store.py``, ``records.py``)."""

    #: How long a stored response (and its input items) is kept: OpenAI's 30 days.
    response_ttl_s: float = 30 * 86_400.0
    #: Bytes of stored responses one API key may hold (a ledger of its live records: a deletion or an
    #: expiry gives their bytes back). While it holds this much, a request that would store its response
    #: is a 400 ``response_store_full`` (delete stored responses, or send ``store: false``); a key holds at
    #: most this plus one record (``response_max_record_bytes``). Negative: no bound per key.
    response_max_stored_bytes: int = 64 * 1024 * 1024
    #: Bytes of stored responses all API keys together may hold (a gateway-wide ledger, the same
    #: rules). Records live in the job queue's Redis, which must never evict: size it into the Redis
    #: ``maxmemory`` with room for the queue. Negative: no bound.
    response_store_max_bytes: int = 1024 * 1024 * 1024
    #: The largest stored response (with its input items: a chained one's whole conversation); a larger
    #: one is answered, not stored. Also what a ``previous_response_id`` loads before admission.
    response_max_record_bytes: int = 4 * 1024 * 1024
    #: How long a background response's result record (its job's events, ``Keys.result``) is kept once
    #: the response has ended (and at most this past its deadline, ``request_timeout_s``): its stream can
    #: be resumed (``starting_after``) that long. Its final response is stored ``response_ttl_s``.
    response_events_keep_s: float = 600.0
    #: Background responses' streams a gateway serves at once, and per key (a Redis connection each).
    response_max_streams: int = 1024
    response_max_streams_per_key: int = 16

    def __post_init__(self) -> None:
        if self.response_ttl_s <= 0:
            raise ValueError(f"response_ttl_s ({self.response_ttl_s:g}) must be positive")
        if self.response_max_record_bytes <= 0:
            raise ValueError(f"response_max_record_bytes ({self.response_max_record_bytes}) must be positive")


class TelemetrySettings(msgspec.Struct, kw_only=True, frozen=True):
    """Metrics, traces and logs (``telemetry/``)."""

    #: Record and serve metrics (``/metrics``). Off: no per-request metric work, ``/metrics`` is 404.
    metrics: bool = True
    #: OTLP/HTTP collector for traces (``http://collector:4318``); empty: tracing off.
    otlp_endpoint: str = ""
    #: Share of new traces recorded (an authenticated client's ``traceparent`` decides for its own trace).
    trace_sample_ratio: float = 0.1
    log_level: str = "info"
    #: ``text`` (people) or ``json`` (one object a line, for log collectors).
    log_format: str = "text"
    #: One JSON line per finished request (``telemetry.logs.RequestRecord``) on stderr.
    log_requests: bool = True
    #: Put each generation request's ``messages`` / ``prompt`` in its log line. Off by default:
    #: prompts are the users' data.
    log_prompts: bool = False
    #: Characters of a logged prompt (the rest is cut).
    log_prompt_chars: int = 2000


#: The concerns, by their attribute of :class:`GatewaySettings` (a file's table names).
CONCERNS: dict[str, type[msgspec.Struct]] = {
    "server": ServerSettings, "redis": RedisSettings, "queue": QueueSettings, "bounds": RequestBounds,
    "images": ImageSettings, "tenancy": TenancySettings, "idempotency": IdempotencySettings,
    "responses": ResponseSettings,
    "telemetry": TelemetrySettings,
}
#: Each setting's flat name (``CONDUIT_<NAME>``) -> its concern.
CONCERN_OF: dict[str, str] = {f.name: concern for concern, cls in CONCERNS.items()
                              for f in msgspec.structs.fields(cls)}
#: Settings that are lists: a variable holds them comma-separated.
_LISTS = {f.name for cls in CONCERNS.values() for f in msgspec.structs.fields(cls) if f.type == list[str]}


class GatewaySettings(msgspec.Struct, kw_only=True, frozen=True):
    """Everything a gateway process is configured with, one object per concern.

    Built from a TOML/JSON file and/or ``CONDUIT_*`` environment variables by
    :meth:`from_env`; environment variables win.
    """

    #: Names this process's reply stream; must be unique among live gateway processes.
    gateway_id: str = ""
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    queue: QueueSettings = msgspec.field(default_factory=QueueSettings)
    bounds: RequestBounds = msgspec.field(default_factory=RequestBounds)
    images: ImageSettings = msgspec.field(default_factory=ImageSettings)
    tenancy: TenancySettings = msgspec.field(default_factory=TenancySettings)
    idempotency: IdempotencySettings = msgspec.field(default_factory=IdempotencySettings)
    responses: ResponseSettings = msgspec.field(default_factory=ResponseSettings)
    telemetry: TelemetrySettings = msgspec.field(default_factory=TelemetrySettings)

    def with_gateway_id(self) -> GatewaySettings:
        """A copy with a unique ``gateway_id`` (each worker process needs its own)."""
        gid = self.gateway_id or "gw"
        return msgspec.structs.replace(self, gateway_id=f"{gid}-{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, file: str | None = None, **overrides: Any) -> GatewaySettings:
        """Settings from an optional file, then ``CONDUIT_*`` variables, then explicit overrides
        (flat names: ``GatewaySettings.from_env({}, max_backlog=8)``)."""
        return load_settings(environ, file, overrides)


def setting_names() -> list[str]:
    """Every setting's flat name (``CONDUIT_<NAME>`` upper-cased), ``gateway_id`` included."""
    return ["gateway_id", *CONCERN_OF]


def load_settings(environ: dict[str, str] | None, file: str | None, overrides: dict[str, Any]) -> GatewaySettings:
    """Build the settings from file < environment < overrides, validating types."""
    env = os.environ if environ is None else environ
    flat: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {concern: {} for concern in CONCERNS}
    if file:
        with open(file, "rb") as f:
            data = f.read()
        if file.endswith(".toml"):
            import tomllib

            raw = tomllib.loads(data.decode())
        else:
            raw = msgspec.json.decode(data)
        for name, value in raw.items():
            if name in CONCERNS and isinstance(value, dict):
                for setting in value:
                    if CONCERN_OF.get(setting) != name:
                        where = f"[{CONCERN_OF[setting]}]" if setting in CONCERN_OF else "no table: it is unknown"
                        raise ValueError(f"{file}: `{setting}` is not a setting of [{name}] (it belongs in {where})")
                nested[name].update(value)
            else:
                flat[name] = value
    for name in setting_names():
        value = env.get(ENV_PREFIX + name.upper())
        if value is None:
            continue
        flat[name] = [v.strip() for v in value.split(",") if v.strip()] if name in _LISTS else value
    flat.update({k: v for k, v in overrides.items() if v is not None})
    top: dict[str, Any] = {}
    for name, value in flat.items():
        if name in CONCERN_OF:
            nested[CONCERN_OF[name]][name] = value
        elif name == "gateway_id":
            top[name] = value
    return msgspec.convert({**top, **nested}, GatewaySettings, strict=False)

