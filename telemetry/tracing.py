"""Traces: W3C trace context from the client through the job to the engine, OTLP export.

One trace spans gateway → queue → engine::

    POST /v1/chat/completions      SERVER    gateway: the whole request
    └── queue tiny-llama           PRODUCER  gateway: submitted until an engine started it
        └── chat tiny-llama        CONSUMER  engine: the job, from start to its final event

The client's ``traceparent`` is the parent of the gateway's span; the queue span's context
travels in ``Job.traceparent``, so the engine's span is its child in the same trace.

Sampling is decided once, at the root: a client's ``traceparent`` decides for its trace (its
``sampled`` flag; the gateway honours it only for authenticated requests, ``gateway.observe``),
otherwise ``sample_ratio`` of new traces are recorded. A request that is
not sampled creates no span at all (it costs a random draw), and its job carries the client's
own ``traceparent`` unchanged, so an engine makes no span for it either.

Spans are plain objects here and go to any OpenTelemetry collector as OTLP/HTTP with the JSON
encoding of the OTLP protocol, in batches from a background thread. The OpenTelemetry SDK's
spans and protobuf exporter cost ~130 µs per sampled request (two spans made, encoded, sent);
these cost ~15 µs, which keeps tracing within the gateway's overhead budget
(``benchmarks/telemetry_overhead.py``).
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from enum import IntEnum
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import msgspec

log = logging.getLogger("conduit.telemetry")

__all__ = ["Span", "SpanContext", "SpanKind", "Status", "StatusCode", "Tracing", "format_traceparent",
           "is_sampled", "parse_traceparent"]

_HEX = frozenset("0123456789abcdef")


class SpanKind(IntEnum):
    """OTLP's ``Span.SpanKind``."""

    INTERNAL = 1
    SERVER = 2
    CLIENT = 3
    PRODUCER = 4
    CONSUMER = 5


class StatusCode(IntEnum):
    """OTLP's ``Status.StatusCode``."""

    UNSET = 0
    OK = 1
    ERROR = 2


class Status(NamedTuple):
    code: StatusCode
    message: str | None = None


class SpanContext(NamedTuple):
    """What a ``traceparent`` carries: ids, the sampled flag, and whether it came from elsewhere."""

    trace_id: int
    span_id: int
    sampled: bool
    is_remote: bool = False


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
    return SpanContext(tid, sid, bool(int(flags, 16) & 1), is_remote=True)


def format_traceparent(context: SpanContext) -> str:
    """``context`` as a W3C ``traceparent`` header value."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{'01' if context.sampled else '00'}"


def trace_id_of(traceparent: str) -> str:
    """The trace id (32 hex digits) of a valid ``traceparent``; "" for none or an invalid one."""
    context = parse_traceparent(traceparent)
    return f"{context.trace_id:032x}" if context is not None else ""


def is_sampled(traceparent: str) -> bool:
    """Whether a ``traceparent`` asks for its trace to be recorded (cheap: no parsing beyond the flags)."""
    return len(traceparent) == 55 and traceparent[-1] in "13579bdf"


class Span:
    """One recorded span (only sampled traces make them). ``end()`` hands it to the exporter."""

    __slots__ = ("name", "kind", "context", "parent_id", "start_ns", "end_ns", "attributes", "status", "_exporter")

    def __init__(self, exporter: _Exporter, name: str, kind: SpanKind, context: SpanContext, parent_id: int,
                 attributes: Mapping[str, Any] | None, start_ns: int) -> None:
        self.name = name
        self.kind = kind
        self.context = context
        self.parent_id = parent_id
        self.start_ns = start_ns
        self.end_ns = 0
        self.attributes: dict[str, Any] = dict(attributes) if attributes else {}
        self.status = Status(StatusCode.UNSET)
        self._exporter = exporter

    def get_span_context(self) -> SpanContext:
        return self.context

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_status(self, status: Status) -> None:
        self.status = status

    def end(self, end_time: int | None = None) -> None:
        if self.end_ns:
            return
        self.end_ns = end_time or time.time_ns()
        self._exporter.add(self)


class Tracing:
    """A process's tracer. Without an ``endpoint`` it is off and every method is a cheap no-op.

    ``exporter``: anything with ``add(span)`` and ``shutdown()`` in place of the OTLP one.
    """

    def __init__(self, resource: Mapping[str, Any], endpoint: str = "", sample_ratio: float = 0.1, *,
                 exporter: Any = None) -> None:
        self.enabled = bool(endpoint) or exporter is not None
        self.sample_ratio = sample_ratio
        self._exporter: Any = exporter
        if exporter is None and endpoint:
            self._exporter = _Exporter(endpoint, resource)
        self._random = random.Random()

    def sample(self, parent: SpanContext | None) -> bool:
        """Whether a new request's trace is recorded: its parent decides, else ``sample_ratio``."""
        if not self.enabled:
            return False
        if parent is not None:
            return parent.sampled
        return self._random.random() < self.sample_ratio

    def start(self, name: str, kind: SpanKind, parent: SpanContext | Span | None,
              attributes: Mapping[str, Any] | None = None, start_time: int | None = None) -> Span:
        """A recorded span (only call for a sampled trace), child of ``parent`` (a remote context
        or a span of this process; None: a new trace)."""
        getrandbits = self._random.getrandbits
        if isinstance(parent, Span):
            parent = parent.context
        trace_id = parent.trace_id if parent is not None else getrandbits(128) or 1
        context = SpanContext(trace_id, getrandbits(64) or 1, True)
        return Span(self._exporter, name, kind, context, parent.span_id if parent is not None else 0, attributes,
                    start_time or time.time_ns())

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
        if self._exporter is not None:
            self._exporter.shutdown()
            self._exporter = None
            self.enabled = False


def _value(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, (list, tuple)):
        return {"arrayValue": {"values": [_value(x) for x in v]}}
    return {"stringValue": str(v)}


def _attributes(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _value(v)} for k, v in attrs.items() if v is not None]


def _otlp_headers(value: str) -> dict[str, str]:
    """``OTEL_EXPORTER_OTLP_HEADERS``: ``key=value`` pairs, comma-separated, values URL-encoded."""
    headers = {}
    for pair in value.split(","):
        key, sep, val = pair.partition("=")
        if sep and key.strip():
            headers[key.strip()] = unquote(val.strip())
    return headers


class _Exporter:
    """Sends ended spans to an OTLP/HTTP collector (``POST {endpoint}/v1/traces``, JSON) in batches
    of up to ``batch`` every ``delay_s`` (``OTEL_BSP_SCHEDULE_DELAY`` ms, default 1 s), from a
    daemon thread. At most ``max_queue`` spans wait; beyond that new ones are dropped and counted
    (a collector that is down must not grow the process).

    Credentials reach the collector as OpenTelemetry's exporters send them: user info in the
    endpoint (``https://user:password@collector``) as HTTP basic auth, and the standard
    ``OTEL_EXPORTER_OTLP_HEADERS`` (``key=value,...``) as headers. A keep-alive connection the
    collector closed while idle is opened again once for the same batch."""

    def __init__(self, endpoint: str, resource: Mapping[str, Any], *, batch: int = 512, max_queue: int = 4096,
                 timeout_s: float = 10.0) -> None:
        url = endpoint.rstrip("/")
        url = url if url.endswith("/v1/traces") else f"{url}/v1/traces"
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.netloc.rpartition("@")[2]  # never the credentials: it is logged
        self._path = parts.path or "/v1/traces"
        self._headers = {"Content-Type": "application/json", **_otlp_headers(os.environ.get(
            "OTEL_EXPORTER_OTLP_HEADERS", ""))}
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        self._timeout = timeout_s
        self._resource = {"attributes": _attributes(resource)}
        self._scope = {"name": "conduit", "version": "0.1.0"}
        self.batch = batch
        self.max_queue = max_queue
        self.delay_s = float(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "1000")) / 1000
        self.dropped = 0
        self.exported = 0
        self._queue: deque[Span] = deque()
        self._wake = threading.Event()
        self._closed = False
        self._conn: http.client.HTTPConnection | None = None
        self._encode = msgspec.json.Encoder().encode
        self._warned = 0.0
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    def add(self, span: Span) -> None:
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            return
        self._queue.append(span)
        if len(self._queue) >= self.batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        while self._queue:
            spans = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
            try:
                self._post(self._body(spans))
                self.exported += len(spans)
            except Exception as exc:  # noqa: BLE001 - the exporter thread outlives any batch (spans are dropped)
                self.dropped += len(spans)
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                if time.monotonic() - self._warned > 60:  # once a minute: a collector down is one problem
                    self._warned = time.monotonic()
                    log.warning("could not export %d spans to %s%s: %s", len(spans), self._host, self._path, exc)

    def _body(self, spans: list[Span]) -> bytes:
        out = []
        for s in spans:
            attrs = []
            for key, v in s.attributes.items():  # _attributes(), inlined: this loop is most of the cost
                t = type(v)
                if t is str:
                    attrs.append({"key": key, "value": {"stringValue": v}})
                elif t is int:
                    attrs.append({"key": key, "value": {"intValue": str(v)}})
                elif v is not None:
                    attrs.append({"key": key, "value": _value(v)})
            c = s.context
            span: dict[str, Any] = {
                "traceId": "%032x" % c.trace_id, "spanId": "%016x" % c.span_id, "name": s.name, "kind": int(s.kind),
                "startTimeUnixNano": str(s.start_ns), "endTimeUnixNano": str(s.end_ns), "attributes": attrs}
            if s.parent_id:
                span["parentSpanId"] = "%016x" % s.parent_id
            if s.status.code:
                span["status"] = {"code": int(s.status.code), **({"message": s.status.message}
                                                                 if s.status.message else {})}
            out.append(span)
        return self._encode({"resourceSpans": [{"resource": self._resource,
                                                "scopeSpans": [{"scope": self._scope, "spans": out}]}]})

    def _post(self, body: bytes) -> None:
        for fresh in (self._conn is None, True):
            if self._conn is None:
                cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                self._conn = cls(self._host, timeout=self._timeout)
            try:
                self._conn.request("POST", self._path, body, self._headers)
                resp = self._conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._conn.close()
                self._conn = None
                if fresh:
                    raise
                continue  # the collector closed an idle keep-alive connection: once more, on a new one
            resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"the collector answered {resp.status}")
            return

    def shutdown(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=self._timeout + 5)
        if self._conn is not None:
            self._conn.close()
