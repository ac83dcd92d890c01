"""An OTLP/HTTP trace receiver for tests and benchmarks: what a collector's ``otlp`` receiver does
on ``POST /v1/traces`` (an ``ExportTraceServiceRequest`` in, binary protobuf or OTLP's JSON
encoding; an ``ExportTraceServiceResponse`` out), decoded with OpenTelemetry's own protocol
classes, which refuse a field the protocol does not have, keeping every span it is sent."""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from google.protobuf import json_format
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

#: OTLP's span kinds (``opentelemetry.proto.trace.v1.Span.SpanKind``) by name.
KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def _from_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP/JSON: protobuf's JSON mapping, except that trace and span ids are hex, not base64
    (the OTLP specification's one deviation, which collectors undo before parsing)."""
    data = json.loads(body)
    for rs in data.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for name in ("traceId", "spanId", "parentSpanId"):
                    if span.get(name):
                        span[name] = base64.b64encode(bytes.fromhex(span[name])).decode()
    return json_format.ParseDict(data, ExportTraceServiceRequest())


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    service: str
    attributes: dict[str, Any]
    start_ns: int
    end_ns: int
    status_code: int
    resource: dict[str, Any] = field(default_factory=dict)


class OtlpReceiver:
    """Listens on ``127.0.0.1:<port>``; ``endpoint`` is what exporters are given.

    ``decode=False`` (benchmarks): spans are counted, not decoded, so the receiver, which shares
    the machine with what it measures, costs next to nothing (a collector runs elsewhere).
    """

    def __init__(self, decode: bool = True) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.counted = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                if not decode:
                    with receiver._lock:
                        receiver.requests += 1
                        receiver.counted += body.count(b'"spanId"')
                elif self.headers.get("Content-Type", "").startswith("application/json"):
                    receiver._receive(_from_json(body))
                else:
                    receiver._receive(ExportTraceServiceRequest.FromString(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _receive(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(ReceivedSpan(
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                        name=s.name, kind=KINDS.get(s.kind, str(s.kind)), service=str(resource.get("service.name")),
                        attributes={a.key: _value(a.value) for a in s.attributes}, start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano, status_code=s.status.code, resource=resource))
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, count: int, timeout: float = 30) -> list[ReceivedSpan]:
        """The spans of ``trace_id`` once at least ``count`` arrived (or what arrived by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            if len(spans) >= count:
                return spans
            time.sleep(0.1)
        return self.trace(trace_id)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
