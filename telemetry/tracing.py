"""Traces: W3C trace context from the client through the job to the engine, OTLP export.

One trace spans gateway → queue → engine::

    POST /v1/chat/completions      SERVER    gateway: the whole request
    └── queue tiny-llama           PRODUCER  gateway: submitted until an engine started it
        └── chat tiny-llama        CONSUMER  engine: the job, from start to its final event

The client's ``traceparent`` is the parent of the gateway's span; the queue span's context
travels in ``Job.traceparent``, so the engine's span is its child in the same trace.

Sampling is decided once, at the root: a client's ``traceparent`` decides for its trace (its
``sampled`` flag), otherwise ``sample_ratio`` of new traces are recorded. A request that is
not sampled creates no span at all (it costs a random draw), and its job carries the client's
own ``traceparent`` unchanged, so an engine makes no span for it either. Spans go to an OTLP/
HTTP collector in batches from a background thread (the SDK's ``BatchSpanProcessor``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

log = logging.getLogger("conduit.telemetry")

__all__ = ["Span", "SpanKind", "Status", "StatusCode", "Tracing", "format_traceparent", "parse_traceparent"]

_HEX = frozenset("0123456789abcdef")


def parse_traceparent(header: str | None) -> SpanContext | None:
    """The remote span context of a W3C ``traceparent`` header, or None when it is absent or
    invalid (then the request starts a trace of its own, as the W3C recommendation says)."""
    if not header:
        return None
    parts = header.strip().split("-")
    if len(parts) < 4:
        return None
    version, trace_id, span_id, flags = parts[:4]
    if (len(version) != 2 or version == "ff" or len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2
            or not _HEX.issuperset(version + trace_id + span_id + flags) or (version == "00" and len(parts) != 4)):
        return None
    tid, sid = int(trace_id, 16), int(span_id, 16)
    if not tid or not sid:
        return None
    return SpanContext(tid, sid, is_remote=True, trace_flags=TraceFlags(int(flags, 16) & TraceFlags.SAMPLED))


def format_traceparent(context: SpanContext) -> str:
    """``context`` as a W3C ``traceparent`` header value."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def is_sampled(traceparent: str) -> bool:
    """Whether a ``traceparent`` asks for its trace to be recorded (cheap: no parsing beyond the flags)."""
    return len(traceparent) == 55 and traceparent[-1] in "13579bdf"


class Tracing:
    """A process's tracer. Without an ``endpoint`` it is off and every method is a cheap no-op."""

    def __init__(self, resource: Resource, endpoint: str = "", sample_ratio: float = 0.1, *,
                 exporter: Any = None) -> None:
        self.enabled = bool(endpoint) or exporter is not None
        self.sample_ratio = sample_ratio
        self._provider: Any = None
        self._tracer: Any = None
        if not self.enabled:
            return
        # Imported only when tracing is on: the OTLP exporter pulls in protobuf and requests.
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = endpoint.rstrip("/")
            exporter = OTLPSpanExporter(endpoint=url if url.endswith("/v1/traces") else f"{url}/v1/traces")
        # Sampling is decided here (sample()), before any span exists; what reaches the SDK is recorded.
        self._provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("conduit", "0.1.0")

    def sample(self, parent: SpanContext | None) -> bool:
        """Whether a new request's trace is recorded: its parent decides, else ``sample_ratio``."""
        if not self.enabled:
            return False
        if parent is not None:
            return parent.trace_flags.sampled
        return random.random() < self.sample_ratio

    def start(self, name: str, kind: SpanKind, parent: SpanContext | Span | None,
              attributes: Mapping[str, Any] | None = None, start_time: int | None = None) -> Span:
        """A recorded span (only call for a sampled trace), child of ``parent`` (a remote context
        or a span of this process; None: a new trace)."""
        if isinstance(parent, SpanContext):
            parent = NonRecordingSpan(parent)
        context = set_span_in_context(parent) if parent is not None else None
        span: Span = self._tracer.start_span(name, context=context, kind=kind, attributes=attributes,
                                             start_time=start_time)
        return span

    def continued(self, traceparent: str, name: str, kind: SpanKind, attributes: Mapping[str, Any] | None = None,
                  start_time: int | None = None) -> Span | None:
        """A span continuing the trace of ``traceparent`` (a job's), if tracing is on and that
        trace is sampled; else None."""
        if not self.enabled or not is_sampled(traceparent):
            return None
        parent = parse_traceparent(traceparent)
        if parent is None:
            return None
        return self.start(name, kind, parent, attributes, start_time)

    def shutdown(self) -> None:
        """Export the spans still buffered, then stop."""
        if self._provider is not None:
            try:
                self._provider.shutdown()
            except Exception:  # noqa: BLE001 - a collector that is gone must not fail a shutdown
                log.warning("could not flush the last spans", exc_info=True)
            self._provider = None
