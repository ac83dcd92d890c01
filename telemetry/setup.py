"""Telemetry set-up for one process: metrics for Prometheus, optional OTLP traces, logging."""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from telemetry.aggregate import Meter
from telemetry.tracing import Tracing


class _MeterReader(PrometheusMetricReader):
    """OpenTelemetry's Prometheus reader, fed by a :class:`~telemetry.aggregate.Meter` at each scrape
    (the role the OpenTelemetry specification gives a *MetricProducer*)."""

    def __init__(self, meter: Meter, registry: CollectorRegistry) -> None:
        super().__init__(disable_target_info=False, registry=registry)
        self._meter = meter

    def collect(self, timeout_millis: float = 10_000) -> None:
        self._receive_metrics(self._meter.produce(), timeout_millis=timeout_millis)


class Telemetry:
    """Owns a process's meter, the Prometheus registry it is exported through, and its tracer.

    ``otlp_endpoint`` (an OTLP/HTTP collector, e.g. ``http://collector:4318``) turns tracing
    on; ``sample_ratio`` is the share of new traces recorded (a client's ``traceparent``
    decides for its own).
    """

    def __init__(self, service: str, instance: str, *, otlp_endpoint: str = "", sample_ratio: float = 0.1,
                 tracing_options: dict[str, Any] | None = None) -> None:
        self.resource = Resource.create({"service.name": service, "service.instance.id": instance})
        self.meter = Meter(service.replace("-", "."), self.resource)
        # A registry of our own (not the global one), so several processes' worth of
        # telemetry can live in one test interpreter.
        self.registry = CollectorRegistry(auto_describe=True)
        self._reader = _MeterReader(self.meter, self.registry)
        self.tracing = Tracing(self.resource.attributes, otlp_endpoint, sample_ratio, **(tracing_options or {}))

    def render(self) -> bytes:
        """The Prometheus text exposition of every instrument."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on its own port (engines, which have no HTTP server of their own)."""
        start_http_server(port, addr=host, registry=self.registry)

    def shutdown(self) -> None:
        """Flush what is left (spans) and stop exporting."""
        self.tracing.shutdown()
        self._reader.shutdown()
