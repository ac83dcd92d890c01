"""An engine process's metrics (``conduit.engine.*``, ``hw.gpu.memory.*``) and vLLM's own
statistics (``conduit.engine.vllm.*``).

The names, units and conventions of :mod:`telemetry.instruments` hold here too (the buckets,
attribute names and declaring helpers come from it); instruments are made per process from a
:class:`~telemetry.aggregate.Meter` passed in, never at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from telemetry.aggregate import Attributes, CounterSeries, HistogramSeries, Meter
from telemetry.instruments import (
    BATCH_BUCKETS,
    MODEL,
    TOKEN_TIME_BUCKETS,
    TOKEN_TYPE,
    background_errors,
    count,
    seconds,
)

#: Every outcome an engine reports for a job (``conduit.engine.jobs``).
JOB_OUTCOMES = ("ok", "rejected", "cancelled", "skipped", "expired", "error", "lost", "dead_letter", "unsupported",
                "malformed")

#: Background duties of an engine (``background.errors``'s ``task``): their series exist at 0 from
#: the start.
ENGINE_TASKS = ("event-writer", "heartbeat", "reclaim", "read-jobs", "promote", "cancel-listener")


class EngineMetrics:
    """Instruments of an engine process."""

    def __init__(self, meter: Meter) -> None:
        m = self.meter = meter
        self.jobs = count(
            m, "conduit.engine.jobs", "job",
            "Jobs ended, by outcome (ok, rejected, cancelled (client gone while it ran), skipped (client gone before "
            "it started), expired, error, lost, dead_letter, unsupported, malformed)")
        self.job_duration = seconds(m, "conduit.engine.job.duration", "Time an engine spent on a successful job")
        self.job_queue_wait = seconds(
            m, "conduit.engine.job.queue_wait",
            "Time from the gateway queueing a job (its created_ms) to an engine starting it (first attempt)")
        self.reclaimed = count(
            m, "conduit.engine.jobs.reclaimed", "job",
            "Jobs taken over from an engine that stopped heart-beating (retried, failed cleanly or dead-lettered)")
        self.background_errors = background_errors(m, "conduit.engine.background.errors",
                                                   "heartbeat, reclaim, event writer, ...", ENGINE_TASKS)
        self.images = count(
            m, "conduit.engine.images", "image",
            "Final images generated, by model and whether the image joined a running denoising batch")
        self.denoise_batch_size = m.histogram(
            "conduit.engine.denoise.batch_size", unit="{image}", bounds=BATCH_BUCKETS,
            description="Images in one denoising step")
        self.denoise_steps = count(m, "conduit.engine.denoise.steps", "step", "Denoising steps (UNet calls) run")
        self._outcomes: dict[tuple[str, str], CounterSeries] = {}
        self._durations: dict[str, HistogramSeries] = {}
        self._waits: dict[str, HistogramSeries] = {}

    def serving(self, models: Iterable[str]) -> None:
        """Create the per-model series at 0 (a rate of dead letters exists before the first one)."""
        for model in models:
            for outcome in JOB_OUTCOMES:
                self._outcome(model, outcome)
            self.reclaimed.bind({MODEL: model})

    def watch_jobs(self, in_flight: Callable[[], Iterable[tuple[str, int]]], max_concurrency: int) -> None:
        """Export the jobs running now per model (``in_flight()``: (model, jobs)) and the slots."""
        self.meter.gauge("conduit.engine.jobs.in_flight", unit="{job}",
                         description="Jobs this engine is running now (the batch it hands its model)",
                         callback=lambda: [(n, {MODEL: m}) for m, n in in_flight()])
        self.meter.gauge("conduit.engine.jobs.max", unit="{job}",
                         description="Jobs this engine runs at once at most (--max-concurrency)",
                         callback=lambda: [(max_concurrency, None)])

    def watch_backend(self, backend: object) -> None:
        """Export a backend's own counters where it has them (vLLM: unfinished and aborted requests)."""
        m = self.meter
        unfinished = getattr(backend, "unfinished_requests", None)
        if callable(unfinished):
            m.gauge("conduit.engine.backend.unfinished_requests", unit="{request}",
                    description="Requests the inference engine itself still holds (vLLM's own count)",
                    callback=lambda: [(unfinished(), None)])
        if hasattr(backend, "aborted_requests"):
            m.observable_counter("conduit.engine.backend.aborted_requests", unit="{request}",
                                 description="Requests aborted inside the inference engine (client gone)",
                                 callback=lambda: [(backend.aborted_requests, None)])  # type: ignore[attr-defined]

    def watch_gpus(self, read: Callable[[], Iterable[tuple[str, str, int, int]]]) -> None:
        """Export GPU memory from ``read()``: (device id, name, used bytes, total bytes) per device."""
        self.meter.gauge("hw.gpu.memory.usage", unit="By", description="GPU memory in use (the whole device)",
                         callback=lambda: [(used, {"hw.id": i, "hw.name": n}) for i, n, used, _ in read()])
        self.meter.gauge("hw.gpu.memory.limit", unit="By", description="GPU memory size",
                         callback=lambda: [(total, {"hw.id": i, "hw.name": n}) for i, n, _, total in read()])

    def _outcome(self, model: str, outcome: str) -> CounterSeries:
        key = (model, outcome)
        series = self._outcomes.get(key)
        if series is None:
            series = self._outcomes[key] = self.jobs.bind({MODEL: model, "outcome": outcome})
        return series

    def queue_wait(self, model: str, seconds: float) -> None:
        series = self._waits.get(model)
        if series is None:
            series = self._waits[model] = self.job_queue_wait.bind({MODEL: model})
        series.record(seconds)

    def job_reclaimed(self, model: str) -> None:
        self.reclaimed.add(1, {MODEL: model})

    def background_error(self, task: str) -> None:
        self.background_errors.add(1, {"task": task})

    def image_generated(self, model: str, joined: bool) -> None:
        self.images.add(1, {MODEL: model, "joined": "true" if joined else "false"})

    def denoise_step(self, model: str, images: int) -> None:
        """One denoising step over ``images`` images (called from the denoising thread)."""
        attrs = {MODEL: model}
        self.denoise_steps.add(1, attrs)
        self.denoise_batch_size.record(images, attrs)

    def job_finished(self, model: str, outcome: str, seconds: float | None = None) -> None:
        self._outcome(model, outcome).add(1)
        if seconds is not None:
            series = self._durations.get(model)
            if series is None:
                series = self._durations[model] = self.job_duration.bind({MODEL: model})
            series.record(seconds)

    @classmethod
    def noop(cls) -> EngineMetrics:
        """Instruments nobody exports (a worker built without telemetry)."""
        return cls(Meter("conduit.engine"))


class VllmMetrics:
    """vLLM's own engine statistics, as vLLM's OpenAI server exports them (read through a stat
    logger: ``engines.vllm_stats``). Attributes: the served model name."""

    def __init__(self, meter: Meter, model: str) -> None:
        m = meter
        attrs: Attributes = {MODEL: model}
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        m.gauge("conduit.engine.vllm.requests.running", unit="{request}",
                description="Requests in vLLM's running batch", callback=lambda: [(self.running, attrs)])
        m.gauge("conduit.engine.vllm.requests.waiting", unit="{request}",
                description="Requests waiting in vLLM's scheduler", callback=lambda: [(self.waiting, attrs)])
        m.gauge("conduit.engine.vllm.kv_cache.usage", unit="1",
                description="Fraction of vLLM's KV-cache blocks in use (0-1)",
                callback=lambda: [(self.kv_cache_usage, attrs)])
        self.batch_size = m.histogram(
            "conduit.engine.vllm.batch_size", unit="{request}", bounds=BATCH_BUCKETS,
            description="Requests in each vLLM engine step").bind(attrs)
        self.time_to_first_token = seconds(
            m, "conduit.engine.vllm.time_to_first_token",
            "vLLM's time to first token (arrival in vLLM to first token)").bind(attrs)
        self.inter_token_latency = seconds(
            m, "conduit.engine.vllm.inter_token_latency", "Time between consecutive output tokens in vLLM",
            TOKEN_TIME_BUCKETS).bind(attrs)
        self.queue_time = seconds(m, "conduit.engine.vllm.request.queue_time",
                                  "Time a request waited in vLLM's scheduler before running").bind(attrs)
        self.e2e = seconds(m, "conduit.engine.vllm.request.duration", "vLLM's end-to-end request latency").bind(attrs)
        tokens = count(
            m, "conduit.engine.vllm.tokens", "token",
            "Tokens vLLM processed, by gen_ai.token.type (input: prefilled prompt tokens; output: generated)")
        self.prompt_tokens = tokens.bind({**attrs, TOKEN_TYPE: "input"})
        self.generation_tokens = tokens.bind({**attrs, TOKEN_TYPE: "output"})
        self.preemptions = count(m, "conduit.engine.vllm.preemptions", "request",
                                 "Requests vLLM preempted (KV cache exhausted)").bind(attrs)


__all__ = ["ENGINE_TASKS", "JOB_OUTCOMES", "EngineMetrics", "VllmMetrics"]
