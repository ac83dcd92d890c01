"""The upstream engine kind: jobs forwarded to an OpenAI-compatible server that already runs.

A worker on the same runtime as every engine (job streams, heartbeat, reclaim, fair queueing,
drain) whose backend sends each chat, completions or image job (``--upstream-kinds``: those the
upstream serves) to the upstream over one keep-alive pool as large as the jobs in flight
(``engines.upstream_http``: aiohttp's HTTP/1.1, or with ``--upstream-http2`` httpx's HTTP/2 where the
upstream's TLS offers it), chat and completions streamed when the client streams (or asks for
logprobs), else one whole answer (one body, one delta a choice: ``Relay.answer``; its silence may last
the job's deadline), and relays the upstream's chunks as the job's events (``engines.upstream_relay``; images: ``engines.upstream_images``). Stateless: nothing
of a job stays in the upstream.

Failures before any output that another try may cure (a connection refused or cut, a timeout, a
5xx, a 429) are tried again on this engine with backoff, never past the job's deadline; after
output the job ends with a clean error. A job whose client left is cancelled, which closes its
upstream request. ``--models auto`` announces what the upstream's ``/v1/models`` lists, re-read
every ``models_refresh_s`` (``engines.worker.Worker.announce`` follows the changes), bounded and
checked by ``engines.upstream_models``. What the upstream sends is read with bounds: an error body
up to 64 KiB, a stream line up to 1 MiB (``engines.upstream_relay``). ``--upstream-serverless``: an
endpoint that scales to zero, announced cold while it is believed asleep and waited for while it
wakes (``engines.upstream_wake``; ``run`` consults it for its tries, ``_forward`` for the first byte).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from typing import Any

import msgspec

from engines.backend import JobOutput, JobRejected
from engines.contract.messages import Job
from engines.upstream_http import Transport, TransportFailed, transport
from engines.upstream_images import ImageRelay, image_request
from engines.upstream_models import ModelList
from engines.upstream_reads import LineTooLong, Retryable, bounded_body, bounded_lines, mapped_error
from engines.upstream_relay import ANSWER_BYTES, PATHS, Relay, StreamBroke, upstream_request
from engines.upstream_wake import Wake

log = logging.getLogger("conduit.engine")

#: The most of a ``/v1/models`` answer read (a list of a few hundred models is far under it).
MODELS_BODY_BYTES = 4 * 1024 * 1024


class UpstreamSettings(msgspec.Struct, kw_only=True):
    """Where the upstream is and how to talk to it (built at the engine entrypoint, passed in)."""

    #: The upstream's OpenAI base URL, ``/v1`` included (``http://vllm:8000/v1``).
    base_url: str
    #: The model names clients use (one, unless ``models_auto``).
    served_names: list[str] = []
    #: The upstream's name of the model ("": the served name).
    upstream_model: str = ""
    #: Announce what the upstream's ``/v1/models`` lists (served name = upstream name), re-read.
    models_auto: bool = False
    models_refresh_s: float = 30.0
    #: The most models ``models_auto`` serves (each has its own read loop and Redis connection).
    models_max: int = 32
    #: Sent as ``Authorization: Bearer``; from CONDUIT_UPSTREAM_API_KEY or a file, never a flag.
    api_key: str = ""
    #: Extra request headers (``--upstream-header 'Name: value'``, ``--upstream-header-file``).
    headers: dict[str, str] = {}
    connect_timeout_s: float = 10.0
    #: Longest silence between two chunks of the upstream's stream.
    read_timeout_s: float = 120.0
    verify_tls: bool = True
    #: A CA bundle (PEM) to verify the upstream's certificate with ("": the system's).
    ca_bundle: str = ""
    #: Jobs in flight (and the connection pool's size).
    max_concurrency: int = 64
    #: Talk to the upstream through httpx with h2 (HTTP/2 where its TLS offers it) instead of aiohttp's
    #: HTTP/1.1 (``--upstream-http2``).
    http2: bool = False
    #: Tries after the first for a failure before output (each waits ``backoff_s`` doubling, jittered,
    #: or the upstream's ``Retry-After``); none past the job's deadline.
    retries: int = 3
    backoff_s: float = 0.5
    #: A serverless endpoint that scales to zero (``engines.upstream_wake``): its models announced
    #: cold while it is believed asleep, its wake waited for up to ``cold_start_s``.
    serverless: bool = False
    cold_start_s: float = 300.0
    #: No answer for this long: the endpoint is taken to have scaled down (cold again).
    idle_s: float = 300.0
    #: The job kinds the upstream serves (``--upstream-kinds``), announced as the engine's: a
    #: chat-only upstream must never be sent images (the gateway routes by what engines announce).
    kinds: list[str] = msgspec.field(default_factory=lambda: ["chat", "completion"])

    def __repr__(self) -> str:  # the key never reaches a log or a traceback
        return f"UpstreamSettings(base_url={self.base_url!r}, served_names={self.served_names!r}, ...)"


class UpstreamBackend:
    """Runs chat, completion and image jobs (those its settings name) on an OpenAI-compatible upstream server."""

    kind = "upstream"

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        # Never ``input_tokens``: an OpenAI-compatible upstream may have no tokenizer endpoint (OpenAI's
        # own counts Responses requests only; vLLM's /tokenize is its own), and a guess from characters
        # is no count. Such a job is answered 501 ``unsupported_job_kind`` by the worker (``Intake``).
        self.kinds = frozenset(settings.kinds) & PATHS.keys()
        self.models = list(settings.served_names)
        self.max_concurrency = settings.max_concurrency
        self.max_model_len: int | None = None
        self.max_chars_per_token: int | None = None
        self.max_sequences: int | None = None
        #: Upstream requests closed because their job was cancelled (the client left): exported as
        #: ``conduit.engine.backend.aborted_requests``, as the vLLM engine's aborts are.
        self.aborted_requests = 0
        self._open = 0
        self.client: Transport | None = None
        self._refresh: asyncio.Task[None] | None = None
        #: Called with the new list when ``--models auto`` sees the upstream's models change.
        self.on_models: Any = None
        self.model_list = ModelList(settings.models_max)
        #: A serverless endpoint's wake state (None: an upstream that is always up).
        self.wake = Wake(settings.cold_start_s, settings.idle_s) if settings.serverless else None
        self._idle: asyncio.Task[None] | None = None
        #: Called when :attr:`cold_models` changes (the worker announces it at once).
        self.on_cold: Any = None
        if self.wake is not None:
            self.wake.on_change = self._cold_changed

    @property
    def cold_models(self) -> list[str]:
        """The models announced cold (``EngineInfo.cold``): all of them while a serverless endpoint sleeps."""
        return list(self.models) if self.wake is not None and self.wake.cold else []

    def _cold_changed(self) -> None:
        if self.on_cold is not None:
            self.on_cold()

    async def start(self) -> None:
        """Open the connection pool; with ``models_auto``, read the upstream's models (and keep reading)."""
        # httpx (--upstream-http2) logs every request's URL at INFO (a query or userinfo in it would
        # reach the logs).
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = transport(self.settings)
        if self.settings.models_auto:
            if not self.models:
                self.models = self.model_list.next([], await self.upstream_models())
            self._refresh = asyncio.create_task(self._refresh_models(), name="upstream-models")
        if self.wake is not None:
            self._idle = asyncio.create_task(self.wake.watch(lambda: self._open > 0), name="upstream-idle")

    async def upstream_models(self) -> list[Any]:
        """The ids the upstream's ``/v1/models`` lists (unchecked: ``ModelList`` checks them)."""
        assert self.client is not None
        s = self.settings
        # One bound on the whole read (a slow drip within each read's timeout would hold start or the refresh).
        async with asyncio.timeout(s.connect_timeout_s + s.read_timeout_s), self.client.stream("GET", "models") as r:
            data = await bounded_body(r.aiter_bytes(), MODELS_BODY_BYTES)
            if r.status_code != 200:
                raise mapped_error(r.status_code, data, r.headers, "*")
        listed = json.loads(data).get("data", [])
        return [m.get("id") for m in listed if isinstance(m, dict)]

    async def _refresh_models(self) -> None:
        while True:
            await asyncio.sleep(self.settings.models_refresh_s)
            try:
                models = await self.upstream_models()
            except Exception as exc:  # noqa: BLE001 - an upstream down keeps the last list
                log.warning("reading the upstream's models failed (%s); keeping %s", exc, self.models)
                continue
            models = self.model_list.next(self.models, models)
            if models != self.models:
                log.info("the upstream's models changed: %s -> %s", self.models, models)
                before, self.models = self.models, models
                try:
                    if self.on_models is not None:
                        await self.on_models(models)
                except Exception:  # noqa: BLE001 - (Redis away) the next read tries again
                    log.exception("following the upstream's models failed; trying again at the next read")
                    self.models = before

    async def close(self) -> None:
        for task in (self._refresh, self._idle):
            if task is not None:
                task.cancel()
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def unfinished_requests(self) -> int:
        """Requests open to the upstream now (``conduit.engine.backend.unfinished_requests``)."""
        return self._open

    def upstream_model(self, model: str) -> str:
        """The upstream's name for a served model."""
        return self.settings.upstream_model or model

    async def run(self, job: Job, out: JobOutput) -> None:
        """Forward one job, trying again before output while the job's deadline allows."""
        if job.kind not in self.kinds:
            raise JobRejected(f"The upstream engine does not run `{job.kind}` jobs.", status=501,
                              code="unsupported_job_kind")
        client = json.loads(job.body)
        model = self.upstream_model(job.model)
        image = job.kind == "image"
        body = image_request(client, model) if image else upstream_request(client, job.kind, model)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(job.deadline_ms / 1000 - time.time(), 0)
        # A serverless endpoint asleep is waited for up to its wake's window (engines.upstream_wake).
        window = self.wake.window(loop.time()) if self.wake is not None else deadline
        for attempt in itertools.count():
            relay = ImageRelay(out, client, model) if image else Relay(out, client, job.kind, model)
            try:
                async with asyncio.timeout_at(deadline):
                    # A whole answer comes at once: its silence may last the job's deadline.
                    read_s = window if body.get("stream", True) else deadline
                    await self._forward(job.kind, body, relay, model, read_s - loop.time())
                return
            except Retryable as exc:
                failure: JobRejected = exc.final
                wait = exc.retry_after_s
            except TimeoutError:  # the job's deadline
                if relay.produced:
                    raise StreamBroke("the upstream did not finish within the request's deadline") from None
                raise JobRejected("The model's upstream server did not answer within the request's deadline.",
                                  status=504, code="deadline_exceeded", type="server_error") from None
            except TransportFailed as exc:
                if relay.produced:
                    raise StreamBroke(f"the upstream connection failed mid-stream: {exc}") from None
                failure = JobRejected(f"The model's upstream server is unreachable ({exc}).",
                                      status=503, code="model_unavailable", type="server_error", retry_after_s=1)
                wait = None
            except asyncio.CancelledError:
                self.aborted_requests += 1  # leaving _forward's `async with` closed the upstream request
                raise
            pause = self._pause(attempt, failure, wait, deadline - loop.time(), window - loop.time())
            log.warning("job %s: the upstream failed before output (%s); trying again in %.2f s", job.id,
                        failure.message, pause)
            await asyncio.sleep(pause)

    def _pause(self, attempt: int, failure: JobRejected, wait: float | None, deadline_s: float,
               window_s: float) -> float:
        """The pause before the next try after ``failure`` (before output); raises the failure when
        no try is left. A sleeping serverless endpoint's "not up yet" is tried until its wake's
        window or the job's deadline (seconds left: ``window_s``, ``deadline_s``) runs out, every
        other failure ``retries`` times within the deadline."""
        s = self.settings
        if self.wake is not None and self.wake.not_up_yet(failure, attempt, s.retries):
            pause = self.wake.pause(attempt, s.backoff_s, wait)
            if pause < min(deadline_s, window_s):
                return pause
            raise failure if deadline_s <= window_s else self._not_woken(failure)
        if attempt >= s.retries:
            raise failure
        pause = wait if wait is not None else s.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0)
        if pause >= deadline_s:
            raise failure
        return pause

    def _not_woken(self, failure: JobRejected) -> JobRejected:
        return JobRejected(f"The model's serverless upstream did not wake within {self.settings.cold_start_s:g} s; "
                           "retry the request.", status=503, code="model_unavailable", type="server_error",
                           retry_after_s=max(failure.retry_after_s, 1))

    async def _forward(self, kind: str, body: dict[str, Any], relay: Relay | ImageRelay, model: str,
                       read_s: float) -> None:
        assert self.client is not None
        wake = self.wake
        # While a serverless endpoint sleeps, its first byte may take the wake's whole window.
        whole = not body.get("stream", True)  # a chat or completions answer not streamed
        cold = wake is not None and wake.cold
        extra = {"read_timeout_s": max(read_s, 0.001)} if cold or whole else {}
        self._open += 1
        try:
            async with self.client.stream("POST", PATHS[kind], json=body, **extra) as r:
                if r.status_code != 200:
                    raise mapped_error(r.status_code, await bounded_body(r.aiter_bytes()), r.headers, model)
                if wake is not None:
                    wake.answered()
                if isinstance(relay, ImageRelay):  # one JSON body, or an SSE stream of images
                    await relay.read(r.aiter_bytes(), r.headers.get("content-type", ""))
                    return
                if whole and not r.headers.get("content-type", "").startswith("text/event-stream"):
                    # (an upstream that streams though asked not to is read as the stream it is)
                    data = await bounded_body(r.aiter_bytes(), ANSWER_BYTES + 1)
                    if len(data) > ANSWER_BYTES:
                        raise relay.too_long(f"an answer over {ANSWER_BYTES // 2**20} MiB")
                    relay.answer(data)
                    if wake is not None:
                        wake.answered()
                    return
                try:
                    async for line in bounded_lines(r.aiter_bytes()):
                        if not relay.line(line):
                            relay.finish()
                            if wake is not None:
                                wake.answered()
                            return
                except LineTooLong:
                    raise relay.too_long() from None
        finally:
            self._open -= 1
        raise relay.broken("a stream that ended without [DONE]")
