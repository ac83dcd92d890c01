"""Every metric Conduit exports, defined in one place.

Names follow the OpenTelemetry GenAI semantic conventions where they exist
(``gen_ai.server.*``, ``gen_ai.client.token.usage``); Conduit's own are ``conduit.*``.
Instruments are created per process from a meter provider passed in (see
:mod:`telemetry.setup`), never at import time.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.metrics import Meter, MeterProvider, NoOpMeterProvider, Observation

# Seconds buckets that resolve both sub-millisecond gateway work and minute-long generations.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)


def _meter(provider: MeterProvider, name: str) -> Meter:
    return provider.get_meter(name, version="0.1.0")


class GatewayMetrics:
    """Instruments of a gateway process."""

    def __init__(self, provider: MeterProvider) -> None:
        m = _meter(provider, "conduit.gateway")
        self.request_duration = m.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Time from request arrival to its last byte", explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.time_to_first_token = m.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time from request arrival to its first output token",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.token_usage = m.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens per request, by gen_ai.token.type",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.rejections = m.create_counter(
            "conduit.gateway.rejections", unit="{request}", description="Requests answered with an error, by error code")
        self.cancellations = m.create_counter(
            "conduit.gateway.cancellations", unit="{request}", description="Requests whose client went away")
        self.background_errors = m.create_counter(
            "conduit.gateway.background.errors", unit="{error}",
            description="Errors a background duty (reply router, registry, job watch) outlived, by task")
        self.skipped_events = m.create_counter(
            "conduit.gateway.events.skipped", unit="{event}",
            description="Reply events dropped: unknown to this version, undecodable, repeated or of a stale attempt, "
                        "by reason")
        self.resubmissions = m.create_counter(
            "conduit.gateway.resubmissions", unit="{job}",
            description="Jobs submitted again because their first submission was lost (no client output yet)")
        # Per API key, labelled by the key's *name* (never the key): a key's traffic and refusals.
        self.key_requests = m.create_counter(
            "conduit.gateway.key.requests", unit="{request}", description="Requests admitted, by key name and model")
        self.key_tokens = m.create_counter(
            "conduit.gateway.key.tokens", unit="{token}",
            description="Tokens used, by key name, model and gen_ai.token.type (input, output)")
        self.key_images = m.create_counter(
            "conduit.gateway.key.images", unit="{image}", description="Images generated, by key name and model")
        self.key_rate_limited = m.create_counter(
            "conduit.gateway.key.rate_limited", unit="{request}",
            description="Requests refused by a key's rate limit, by key name and limit (requests, tokens, images, "
                        "concurrency)")
        self._meter = m
        self._attrs: dict[tuple[str, str], tuple[dict[str, str], dict[str, str], dict[str, str]]] = {}

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Export the number of requests waiting on an engine, read at scrape time (no per-request cost)."""
        self._meter.create_observable_gauge(
            "conduit.gateway.requests.in_flight", unit="{request}", description="Requests waiting on an engine",
            callbacks=[lambda _options: [Observation(count())]])

    def request_finished(self, model: str, operation: str, status: int, seconds: float, ttft: float | None,
                         prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """Everything recorded about one finished request (called off the response's critical path)."""
        key = (model, operation)
        attrs = self._attrs.get(key)
        if attrs is None:
            base = {"gen_ai.request.model": model, "gen_ai.operation.name": operation}
            attrs = self._attrs[key] = (base, {**base, "gen_ai.token.type": "input"},
                                        {**base, "gen_ai.token.type": "output"})
        base, inp, outp = attrs
        self.request_duration.record(seconds, {**base, "http.response.status_code": status})
        if ttft is not None:
            self.time_to_first_token.record(ttft, base)
        if prompt_tokens is not None:
            self.token_usage.record(prompt_tokens, inp)
        if completion_tokens is not None:
            self.token_usage.record(completion_tokens, outp)

    def key_used(self, key_name: str, model: str, requests: int, prompt_tokens: int, completion_tokens: int,
                 images: int) -> None:
        """A key's usage on one model since the last flush (``gateway.tenancy.usage``)."""
        base = {"conduit.key.name": key_name, "gen_ai.request.model": model}
        self.key_requests.add(requests, base)
        if prompt_tokens:
            self.key_tokens.add(prompt_tokens, {**base, "gen_ai.token.type": "input"})
        if completion_tokens:
            self.key_tokens.add(completion_tokens, {**base, "gen_ai.token.type": "output"})
        if images:
            self.key_images.add(images, base)

    def key_refused(self, key_name: str, limit: str) -> None:
        self.key_rate_limited.add(1, {"conduit.key.name": key_name, "limit": limit})

    def rejected(self, code: str) -> None:
        self.rejections.add(1, {"error.type": code})

    def background_error(self, task: str) -> None:
        self.background_errors.add(1, {"task": task})

    def skipped(self, reason: str, count: int = 1) -> None:
        self.skipped_events.add(count, {"reason": reason})

    @classmethod
    def noop(cls) -> GatewayMetrics:
        return cls(NoOpMeterProvider())


class EngineMetrics:
    """Instruments of an engine process."""

    def __init__(self, provider: MeterProvider) -> None:
        m = self._meter = _meter(provider, "conduit.engine")
        self.jobs = m.create_counter(
            "conduit.engine.jobs", unit="{job}",
            description="Jobs ended, by outcome (ok, rejected, cancelled (client gone while it ran), skipped "
                        "(client gone before it started), expired, error, lost, dead_letter, unsupported, "
                        "malformed)")
        self.job_duration = m.create_histogram(
            "conduit.engine.job.duration", unit="s", description="Time an engine spent on a successful job",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.job_queue_wait = m.create_histogram(
            "conduit.engine.job.queue_wait", unit="s",
            description="Time from the gateway queueing a job to an engine starting it (first attempt)",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.background_errors = m.create_counter(
            "conduit.engine.background.errors", unit="{error}",
            description="Errors a background duty (heartbeat, reclaim, event writer, ...) outlived, by task")
        self.images = m.create_counter(
            "conduit.engine.images", unit="{image}",
            description="Final images generated, by model and whether the image joined a running denoising batch")
        self.denoise_batch_size = m.create_histogram(
            "conduit.engine.denoise.batch_size", unit="{image}", description="Images in one denoising step",
            explicit_bucket_boundaries_advisory=[1, 2, 4, 8, 16, 32, 64])
        self.denoise_steps = m.create_counter(
            "conduit.engine.denoise.steps", unit="{step}", description="Denoising steps (UNet calls) run")

    def watch_backend(self, backend: object) -> None:
        """Export a backend's own counters where it has them (vLLM: unfinished and aborted requests)."""
        m = self._meter
        unfinished = getattr(backend, "unfinished_requests", None)
        if callable(unfinished):
            m.create_observable_gauge(
                "conduit.engine.backend.unfinished_requests", unit="{request}",
                description="Requests the inference engine itself still holds (vLLM's own count)",
                callbacks=[lambda _options: [Observation(unfinished())]])
        if hasattr(backend, "aborted_requests"):
            m.create_observable_counter(
                "conduit.engine.backend.aborted_requests", unit="{request}",
                description="Requests aborted inside the inference engine (client gone)",
                callbacks=[lambda _options: [Observation(backend.aborted_requests)]])  # type: ignore[attr-defined]

    def queue_wait(self, model: str, seconds: float) -> None:
        self.job_queue_wait.record(seconds, {"gen_ai.request.model": model})

    def background_error(self, task: str) -> None:
        self.background_errors.add(1, {"task": task})

    def image_generated(self, model: str, joined: bool) -> None:
        self.images.add(1, {"gen_ai.request.model": model, "joined": "true" if joined else "false"})

    def denoise_step(self, model: str, images: int) -> None:
        """One denoising step over ``images`` images (called from the denoising thread)."""
        attrs = {"gen_ai.request.model": model}
        self.denoise_steps.add(1, attrs)
        self.denoise_batch_size.record(images, attrs)

    def job_finished(self, model: str, outcome: str, seconds: float | None = None) -> None:
        self.jobs.add(1, {"gen_ai.request.model": model, "outcome": outcome})
        if seconds is not None:
            self.job_duration.record(seconds, {"gen_ai.request.model": model})

    @classmethod
    def noop(cls) -> EngineMetrics:
        return cls(NoOpMeterProvider())
