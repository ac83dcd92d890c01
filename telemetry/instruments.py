"""Conduit's metrics: the conventions they all follow, and a gateway's (:class:`GatewayMetrics`).

Every metric is defined, with its name, unit, description and attributes, in one of two modules:
this one (a gateway's, and the buckets, attribute names and declaring helpers every process
shares: :func:`seconds`, :func:`count`, :func:`background_errors`) and
:mod:`telemetry.engine_instruments` (an engine's, and vLLM's own statistics).

Names follow the OpenTelemetry semantic conventions where they exist (``gen_ai.server.*``,
``gen_ai.client.token.usage``, ``http.server.request.duration``, ``hw.gpu.memory.*``);
Conduit's own are ``conduit.*``. Attribute values are model names, key *names*, operations,
outcomes, error codes and routes: never an API key, a prompt or any other request content
(``tests/integration/test_telemetry.py`` checks the exposition for both).

Instruments are made per process from a :class:`~telemetry.aggregate.Meter` passed in (see
:mod:`telemetry.setup`), never at import time. Hot paths bind their attribute sets once
(``Histogram.bind``) so that a record costs well under a microsecond.

Prometheus names: dots become underscores, the unit is appended (``_seconds``, ``_bytes``,
none for ``1`` and ``{...}`` units) and counters end in ``_total``, so
``gen_ai.server.time_to_first_token`` is ``gen_ai_server_time_to_first_token_seconds``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import groupby
from operator import itemgetter
from typing import Any

from telemetry.aggregate import (
    Counter,
    CounterSeries,
    Histogram,
    HistogramSeries,
    Meter,
    Observations,
)

# Seconds buckets that resolve both sub-millisecond gateway work and minute-long generations.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Time per output token / between tokens: 1 ms to 2.5 s.
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                      0.3, 0.5, 1, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: ``gen_ai.operation.name`` of each job kind.
OPERATIONS = {"chat": "chat", "completion": "text_completion", "image": "image_generation"}

#: Background duties of a gateway (``background.errors``'s ``task``) and the reasons it drops a
#: reply event (``events.skipped``): their series exist at 0 from the start.
GATEWAY_TASKS = ("reply-router", "engine-registry", "job-check", "limits-release", "usage-flush", "cold-starts")
SKIP_REASONS = ("unknown_type", "undecodable_entry", "duplicate", "gap", "stale_attempt", "stale_submission",
                "registry_entry")

#: Requests a gateway keeps before folding them into its histograms (``GatewayMetrics.request``).
REQUESTS_FOLD_AT = 4096
_HTTP_KEY = itemgetter(0, 1, 2)
_GEN_KEY = itemgetter(4, 5, 2)
_SECONDS = itemgetter(3)

MODEL = "gen_ai.request.model"
OPERATION = "gen_ai.operation.name"
TOKEN_TYPE = "gen_ai.token.type"


class _Generation:
    """The bound series of one (model, operation): a finished request records into these."""

    __slots__ = ("ttft", "tpot", "input", "output", "by_status", "_metrics", "_attrs")

    def __init__(self, metrics: GatewayMetrics, model: str, operation: str) -> None:
        attrs = {MODEL: model, OPERATION: operation}
        self._metrics = metrics
        self._attrs = attrs
        self.ttft = metrics.time_to_first_token.bind(attrs)
        self.tpot = metrics.time_per_output_token.bind(attrs)
        self.input = metrics.token_usage.bind({**attrs, TOKEN_TYPE: "input"})
        self.output = metrics.token_usage.bind({**attrs, TOKEN_TYPE: "output"})
        self.by_status: dict[int, HistogramSeries] = {}

    def duration(self, status: int) -> HistogramSeries:
        series = self.by_status.get(status)
        if series is None:
            series = self.by_status[status] = self._metrics.request_duration.bind(
                {**self._attrs, "http.response.status_code": status})
        return series


def seconds(meter: Meter, name: str, description: str, bounds: Sequence[float] = DURATION_BUCKETS) -> Histogram:
    """A histogram of durations: unit ``s``, :data:`DURATION_BUCKETS` unless ``bounds`` says otherwise."""
    return meter.histogram(name, unit="s", bounds=bounds, description=description)


def count(meter: Meter, name: str, thing: str, description: str) -> Counter:
    """A counter of ``thing``: its unit the annotation ``{thing}`` (no unit suffix in Prometheus)."""
    return meter.counter(name, unit=f"{{{thing}}}", description=description)


def background_errors(meter: Meter, name: str, duties: str, tasks: Iterable[str]) -> Counter:
    """A process's counter of errors its background duties (``duties``, in words) outlived, by
    ``task``: each of ``tasks`` has its series at 0 from the start."""
    counter = count(meter, name, "error", f"Errors a background duty ({duties}) outlived, by task")
    for task in tasks:
        counter.bind({"task": task})
    return counter


def _fold(series: HistogramSeries, values: list[float]) -> None:
    if values:
        series.pending.extend(values)
        series.fold()


class GatewayMetrics:
    """Instruments of a gateway process."""

    def __init__(self, meter: Meter) -> None:
        m = self.meter = meter
        # ---- every HTTP request --------------------------------------------------------
        self.http_duration = seconds(
            m, "http.server.request.duration",
            "Every HTTP request, by http.route, http.request.method and http.response.status_code (refusals at the "
            "door included: 401, 404, 413, 429)")
        # ---- generation requests (chat, completions, images) ---------------------------
        self.request_duration = seconds(m, "gen_ai.server.request.duration",
                                        "Time from a generation request's arrival to its last byte")
        self.time_to_first_token = seconds(
            m, "gen_ai.server.time_to_first_token",
            "Time from request arrival to its first output token (first image for image requests)")
        self.time_per_output_token = seconds(
            m, "gen_ai.server.time_per_output_token",
            "Time per output token after the first: (duration - time to first token) / (tokens - 1)",
            TOKEN_TIME_BUCKETS)
        self.token_usage = m.histogram(
            "gen_ai.client.token.usage", unit="{token}", bounds=TOKEN_BUCKETS,
            description="Tokens per request, by gen_ai.token.type (input, output)")
        self.rejections = count(
            m, "conduit.gateway.rejections", "request",
            "Requests answered with an error, by error.type (the OpenAI error code: invalid_api_key, "
            "rate_limit_exceeded, model_overloaded, model_not_found, ...)")
        self.cancellations = count(m, "conduit.gateway.cancellations", "request", "Requests whose client went away")
        self.background_errors = background_errors(m, "conduit.gateway.background.errors",
                                                   "reply router, registry, job watch", GATEWAY_TASKS)
        self.skipped_events = count(
            m, "conduit.gateway.events.skipped", "event",
            "Reply events dropped: unknown to this version, undecodable, repeated or of a stale attempt, by reason")
        self.resubmissions = count(
            m, "conduit.gateway.resubmissions", "job",
            "Jobs submitted again because their first submission was lost (no client output yet)")
        # ---- per API key, labelled by the key's *name* (never the key) ----------------------
        self.key_requests = count(m, "conduit.gateway.key.requests", "request",
                                  "Requests admitted, by key name and model")
        self.key_tokens = count(m, "conduit.gateway.key.tokens", "token",
                                "Tokens used, by key name, model and gen_ai.token.type (input, output)")
        self.key_images = count(m, "conduit.gateway.key.images", "image", "Images generated, by key name and model")
        self.key_rate_limited = count(
            m, "conduit.gateway.key.rate_limited", "request",
            "Requests refused by a key's rate limit, by key name and limit (requests, tokens, images, concurrency)")
        self._generations: dict[tuple[str, str], _Generation] = {}
        self._http: dict[tuple[str, str, int], HistogramSeries] = {}
        #: Finished requests not yet folded into the histograms (see :meth:`request`).
        self._requests: list[tuple[Any, ...]] = []
        meter.before_collect.append(self.fold_requests)
        self._rejections: dict[str, CounterSeries] = {}
        # Series that exist from the start, so that a rate of them is 0 rather than "no data".
        for code in ("invalid_api_key", "rate_limit_exceeded", "model_overloaded"):
            self._rejections[code] = self.rejections.bind({"error.type": code})
        for reason in SKIP_REASONS:
            self.skipped_events.bind({"reason": reason})
        self.cancellations.bind()
        self.resubmissions.bind()

    # ---- read at scrape time (no per-request cost) ------------------------------------

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Export the number of requests waiting on an engine."""
        self.meter.gauge("conduit.gateway.requests.in_flight", unit="{request}",
                         description="Requests waiting on an engine", callback=lambda: [(count(), None)])

    def watch_queue(self, backlog: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        """Export each model's backlog from ``backlog()``: (model, queued or running, waiting)."""
        self.meter.gauge("conduit.queue.backlog", unit="{job}",
                         description="Jobs of a model queued or running (its stream) plus those waiting their key's "
                                     "turn; the same value from every gateway (read from Redis)",
                         callback=lambda: [(q + w, {MODEL: m}) for m, q, w in backlog()])
        self.meter.gauge("conduit.queue.waiting", unit="{job}",
                         description="Jobs of a model waiting in fair queueing's per-key lists (every engine slot "
                                     "busy)",
                         callback=lambda: [(w, {MODEL: m}) for m, _, w in backlog()])

    def watch_cold(self, cold: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Export each known model's requests waiting while it is cold (no engine of it is live, or all
        its live engines announce it cold): (model, requests)."""
        self.meter.gauge("conduit.gateway.requests.cold", unit="{request}",
                         description="Requests of this gateway waiting for a model no engine serves (a cold model: "
                                     "declared, scaled to zero or its engines gone), until one is live, they end or "
                                     "their cold-start deadline passes, or for a model whose engines announce it "
                                     "cold (a serverless upstream waking), until their first output; the demand to "
                                     "start an engine on (sum over gateways)",
                         callback=lambda: [(n, {MODEL: m}) for m, n in cold()])

    def watch_engines(self, engines: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        """Export the live engines of every known model from ``engines()``: (model, engines, slots)."""
        self.meter.gauge("conduit.gateway.engines.live", unit="{engine}",
                         description="Engines heart-beating for a model (0: a known model no engine serves)",
                         callback=lambda: [(n, {MODEL: m}) for m, n, _ in engines()])
        self.meter.gauge("conduit.gateway.engines.slots", unit="{job}",
                         description="Jobs the live engines of a model run at once (sum of their max concurrency)",
                         callback=lambda: [(s, {MODEL: m}) for m, _, s in engines()])

    # ---- recorded as things happen ------------------------------------------------------

    def request(self, route: str, method: str, status: int, seconds: float, model: str | None = None,
                operation: str = "", ttft: float | None = None, prompt_tokens: int | None = None,
                completion_tokens: int | None = None) -> None:
        """One finished HTTP request (``model``: of a generation request, with its time to first
        token and token counts). Kept as one tuple and folded into ``http.server.request.duration``
        and the ``gen_ai.*`` histograms in C-level loops at the next scrape (or every
        :data:`REQUESTS_FOLD_AT` requests): a request costs the gateway one append here."""
        requests = self._requests
        requests.append((route, method, status, seconds, model, operation, ttft, prompt_tokens, completion_tokens))
        if len(requests) >= REQUESTS_FOLD_AT:
            self.fold_requests()

    def fold_requests(self) -> None:
        """Fold the requests kept by :meth:`request` into the histograms."""
        items, self._requests = self._requests, []
        if not items:
            return
        items.sort(key=_HTTP_KEY)
        for (route, method, status), group in groupby(items, _HTTP_KEY):
            series = self._http.get((route, method, status))
            if series is None:
                series = self._http[(route, method, status)] = self.http_duration.bind(
                    {"http.route": route, "http.request.method": method, "http.response.status_code": status})
            series.pending.extend(map(_SECONDS, group))
            series.fold()
        generations = [r for r in items if r[4] is not None]
        generations.sort(key=_GEN_KEY)
        for (model, operation, status), grouped in groupby(generations, _GEN_KEY):
            g = self.generation(model, operation)
            rows = list(grouped)
            _fold(g.duration(status), [r[3] for r in rows])
            _fold(g.ttft, [r[6] for r in rows if r[6] is not None])
            _fold(g.tpot, [max(r[3] - r[6], 0.0) / (r[8] - 1) for r in rows
                           if r[6] is not None and r[8] is not None and r[8] > 1])
            _fold(g.input, [r[7] for r in rows if r[7] is not None])
            _fold(g.output, [r[8] for r in rows if r[8] is not None])

    def generation(self, model: str, operation: str) -> _Generation:
        """The bound series of one (model, operation)."""
        key = (model, operation)
        g = self._generations.get(key)
        if g is None:
            g = self._generations[key] = _Generation(self, model, operation)
        return g

    def key_used(self, key_name: str, model: str, requests: int, prompt_tokens: int, completion_tokens: int,
                 images: int) -> None:
        """A key's usage on one model since the last flush (``gateway.tenancy.usage``)."""
        base = {"conduit.key.name": key_name, MODEL: model}
        self.key_requests.add(requests, base)
        if prompt_tokens:
            self.key_tokens.add(prompt_tokens, {**base, TOKEN_TYPE: "input"})
        if completion_tokens:
            self.key_tokens.add(completion_tokens, {**base, TOKEN_TYPE: "output"})
        if images:
            self.key_images.add(images, base)

    def key_refused(self, key_name: str, limit: str) -> None:
        self.key_rate_limited.add(1, {"conduit.key.name": key_name, "limit": limit})

    def rejected(self, code: str) -> None:
        series = self._rejections.get(code)
        if series is None:
            series = self._rejections[code] = self.rejections.bind({"error.type": code})
        series.add(1)

    def background_error(self, task: str) -> None:
        self.background_errors.add(1, {"task": task})

    def skipped(self, reason: str, count: int = 1) -> None:
        self.skipped_events.add(count, {"reason": reason})

    @classmethod
    def noop(cls) -> GatewayMetrics:
        """Instruments nobody exports (components used on their own, in tests and tools)."""
        return cls(Meter("conduit.gateway"))


__all__ = ["DURATION_BUCKETS", "OPERATIONS", "TOKEN_BUCKETS", "GatewayMetrics", "Observations", "background_errors",
           "count", "seconds"]
