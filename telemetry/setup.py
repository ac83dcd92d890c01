"""Telemetry set-up for one process: an OpenTelemetry meter provider read by Prometheus."""

from __future__ import annotations

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest, start_http_server


class Telemetry:
    """Owns a process's meter provider and the Prometheus registry it is exported through."""

    def __init__(self, service: str, instance: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # A registry of our own (not the global one), so several processes' worth of
        # telemetry can live in one test interpreter.
        reader = PrometheusMetricReader(disable_target_info=False, registry=self.registry)
        self.provider = MeterProvider(
            metric_readers=[reader],
            resource=Resource.create({"service.name": service, "service.instance.id": instance}),
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every instrument."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on its own port (engines, which have no HTTP server of their own)."""
        start_http_server(port, addr=host, registry=self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()
