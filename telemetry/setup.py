"""Telemetry set-up for one process: metrics for Prometheus, optional OTLP traces, logging."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

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

    def __init__(self, service: str, instance: str, *, otlp_endpoint: str = "", sample_ratio: float = 0.1) -> None:
        self.resource = Resource.create({"service.name": service, "service.instance.id": instance})
        self.meter = Meter(service.replace("-", "."), self.resource)
        # A registry of our own (not the global one), so several processes' worth of
        # telemetry can live in one test interpreter.
        self.registry = CollectorRegistry(auto_describe=True)
        self._reader = _MeterReader(self.meter, self.registry)
        self.tracing = Tracing(self.resource.attributes, otlp_endpoint, sample_ratio)
        self._server: ThreadingHTTPServer | None = None

    def render(self) -> bytes:
        """The Prometheus text exposition of every instrument."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1", ready: Callable[[], bool] | None = None) -> None:
        """Serve ``/metrics`` on its own port (engines, which have no HTTP server of their own),
        with ``/health`` (200 while the process serves) and ``/ready`` (200 when ``ready()``, else
        503) for probes, from a daemon thread; on ``host`` only (loopback unless told otherwise)."""
        telemetry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, telemetry.render(), CONTENT_TYPE_LATEST)
                elif path == "/health":
                    self._answer(200, b'{"status":"ok"}', "application/json")
                elif path == "/ready":
                    ok = ready is None or ready()
                    self._answer(200 if ok else 503, b'{"status":"ready"}' if ok else b'{"status":"not_ready"}',
                                 "application/json")
                else:
                    self._answer(404, b'{"status":"not_found"}', "application/json")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes and probes are not news
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._server = server

    def shutdown(self) -> None:
        """Flush what is left (spans) and stop exporting."""
        self.tracing.shutdown()
        self._reader.shutdown()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
