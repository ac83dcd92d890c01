"""Conduit's instruments against OpenTelemetry's SDK, the exposition, traceparent, logs, GPU reading."""

from __future__ import annotations

import io
import json
import logging
import random
import re
import time
from typing import Any
from types import SimpleNamespace

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from engines.gpu import nvml_reader
from telemetry.aggregate import Meter
from telemetry.engine_instruments import EngineMetrics
from telemetry.instruments import DURATION_BUCKETS, REQUESTS_FOLD_AT, GatewayMetrics
from telemetry.logs import JsonFormatter, RequestLog, RequestRecord
from telemetry.setup import Telemetry
from telemetry.tracing import Tracing, format_traceparent, is_sampled, parse_traceparent

_SCOPE_LABELS = re.compile(r'otel_scope_[a-z_]+="[^"]*",?')


def _exposition(render: bytes) -> list[str]:
    """Sample lines without scope labels and target_info, sorted (the two sides' order differs)."""
    lines = []
    for line in render.decode().splitlines():
        if line.startswith("#") or line.startswith("target_info"):
            continue
        lines.append(_SCOPE_LABELS.sub("", line).replace(",}", "}").replace("{}", ""))
    return sorted(lines)


def _sample(line: str) -> tuple[str, float]:
    name, value = line.rsplit(" ", 1)
    return name, float(value)


def test_histograms_and_counters_expose_exactly_what_the_sdk_would() -> None:
    """The same records through OpenTelemetry's SDK and through Conduit's meter give the same
    Prometheus samples: names, units, bucket boundaries (values on a boundary included), sums."""
    rng = random.Random(7)
    values = [rng.choice([0.0005, 0.001, 0.25, 1.0, 300.0, 301.0]) if rng.random() < 0.3 else rng.uniform(0, 400)
              for _ in range(10000)]
    attrs = [{"gen_ai.request.model": m, "http.response.status_code": c} for m in ("a", "b") for c in (200, 429)]

    registry = CollectorRegistry()
    sdk = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)],
                        views=[View(instrument_name="d", aggregation=ExplicitBucketHistogramAggregation(
                            DURATION_BUCKETS))], resource=Resource.create({}))
    sdk_meter = sdk.get_meter("x")
    sdk_h = sdk_meter.create_histogram("d", unit="s", description="desc")
    sdk_c = sdk_meter.create_counter("c", unit="{request}", description="desc")

    telemetry = Telemetry("x", "i")
    h = telemetry.meter.histogram("d", unit="s", description="desc", bounds=DURATION_BUCKETS)
    c = telemetry.meter.counter("c", unit="{request}", description="desc")
    for i, v in enumerate(values):
        a = attrs[i % len(attrs)]
        sdk_h.record(v, a)
        h.record(v, a)
        sdk_c.add(i % 3, a)
        c.add(i % 3, a)
    ours, theirs = _exposition(telemetry.render()), _exposition(generate_latest(registry))
    assert [_sample(line)[0] for line in ours] == [_sample(line)[0] for line in theirs]
    for mine, sdk_line in zip(ours, theirs, strict=True):
        # Sums are added in another order (folded in batches): equal to the last bits.
        assert _sample(mine)[1] == pytest.approx(_sample(sdk_line)[1], rel=1e-12), (mine, sdk_line)
    sdk.shutdown()
    telemetry.shutdown()


def test_every_instrument_has_a_unique_name_unit_and_description() -> None:
    meter = Meter("x")
    gw = GatewayMetrics(meter)
    gw.watch_in_flight(lambda: 0)
    gw.watch_queue(lambda: [])
    gw.watch_engines(lambda: [])
    gw.watch_cold(lambda: [])
    EngineMetrics(meter).watch_jobs(lambda: [], 1)
    names = [i.name for i in meter.instruments]
    assert len(names) == len(set(names))
    assert all(i.unit and i.description for i in meter.instruments)
    with pytest.raises(ValueError, match="defined twice"):
        meter.counter("conduit.gateway.rejections", unit="1", description="again")


def test_series_beyond_the_limit_are_counted_in_one_overflow_series() -> None:
    meter = Meter("x", max_series=3)
    c = meter.counter("c", unit="1", description="d")
    for i in range(10):
        c.add(1, {"k": str(i)})
    points = {tuple(sorted(p.attributes.items())): p.value
              for p in meter.produce().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points}
    assert points == {(("k", "0"),): 1, (("k", "1"),): 1, (("k", "2"),): 1, (("otel.metric.overflow", True),): 7}


def test_a_failing_gauge_does_not_take_the_scrape_down(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = Telemetry("x", "i")

    def broken() -> list[tuple[float, None]]:
        raise RuntimeError("engine gone")

    telemetry.meter.gauge("broken", unit="1", description="d", callback=broken)
    telemetry.meter.counter("fine", unit="1", description="d").add(2)
    with caplog.at_level(logging.ERROR, "conduit.telemetry"):
        text = telemetry.render().decode()
    assert re.search(r"^fine_total\{[^}]*\} 2.0$", text, re.M) and "broken" not in text
    assert "reading broken failed" in caplog.text


def test_bound_zero_series_are_exported_before_anything_happens() -> None:
    telemetry = Telemetry("x", "i")
    EngineMetrics(telemetry.meter).serving(["m"])
    text = telemetry.render().decode()
    assert 'conduit_engine_jobs_total{gen_ai_request_model="m",otel_scope_name="x",otel_scope_schema_url="",' \
           'otel_scope_version="0.1.0",outcome="dead_letter"} 0.0' in text


def test_time_per_output_token_is_the_time_after_the_first_over_the_tokens_after_the_first() -> None:
    meter = Meter("x")
    gw = GatewayMetrics(meter)
    gw.request("/v1/chat/completions", "POST", 200, 2.0, "m", "chat", 0.5, 10, 16)
    gw.request("/v1/chat/completions", "POST", 200, 1.0, "m", "chat", 0.5, 10, 1)  # one token: no time per token
    gw.fold_requests()
    series = gw.generation("m", "chat").tpot
    assert series.count == 1 and series.sum == pytest.approx(1.5 / 15)


def test_requests_kept_for_folding_are_bounded_and_all_counted() -> None:
    meter = Meter("x")
    gw = GatewayMetrics(meter)
    n = REQUESTS_FOLD_AT * 2 + 5
    for i in range(n):
        gw.request("/v1/completions", "POST", 200 if i % 2 else 429, 0.001 * (i % 7), "m" if i % 2 else None,
                   "text_completion", 0.0005, 3, 2)
    assert len(gw._requests) == 5  # folded every REQUESTS_FOLD_AT requests, not kept
    data = {m.name: m.data.data_points for m in meter.produce().resource_metrics[0].scope_metrics[0].metrics}
    assert sum(p.count for p in data["http.server.request.duration"]) == n
    assert sum(p.count for p in data["gen_ai.server.request.duration"]) == n // 2
    assert sum(p.sum for p in data["gen_ai.client.token.usage"]) == (3 + 2) * (n // 2)


def test_traceparent_round_trip_and_invalid_headers() -> None:
    header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ctx = parse_traceparent(header)
    assert ctx is not None and ctx.is_remote and ctx.sampled
    assert format_traceparent(ctx) == header and is_sampled(header)
    assert not is_sampled(header[:-2] + "00")
    for bad in ("", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-"
                + "0" * 16 + "-01", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", header + "-extra"):
        assert parse_traceparent(bad) is None, bad
    # A future version may add fields after the flags.
    assert parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future") is not None


def test_sampling_follows_the_parent_else_the_ratio() -> None:
    class Nothing:
        def add(self, span: object) -> None: ...

        def shutdown(self) -> None: ...

    tracing = Tracing({}, exporter=Nothing(), sample_ratio=0.25)
    sampled = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    unsampled = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
    assert tracing.sample(sampled) and not tracing.sample(unsampled)
    share = sum(tracing.sample(None) for _ in range(20_000)) / 20_000
    assert 0.23 < share < 0.27
    off = Tracing({})
    assert not off.enabled and not off.sample(sampled) and off.continued(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "x", 1) is None  # type: ignore[arg-type]
    tracing.shutdown()


def test_json_log_lines_carry_the_fields_and_the_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("conduit-gateway", "gw-1"))
    logger = logging.getLogger("conduit.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("queued %d jobs", 3, extra={"model": "m"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "queued 3 jobs" and first["level"] == "warning" and first["model"] == "m"
    assert first["service"] == "conduit-gateway" and first["instance"] == "gw-1" and first["ts"].endswith("Z")
    assert "ValueError: boom" in second["exception"]


def test_request_log_writes_lines_in_batches_when_not_in_a_loop() -> None:
    out = io.BytesIO()
    log = RequestLog(out, service="s", instance="i")
    log.write(RequestRecord(ts="t", level="info", logger="conduit.request", request_id="r", method="GET",
                            route="/health", status=200, duration_ms=0.5, service=log.service, instance=log.instance))
    (line,) = out.getvalue().decode().splitlines()
    assert json.loads(line) == {"ts": "t", "level": "info", "logger": "conduit.request", "request_id": "r",
                                "method": "GET", "route": "/health", "status": 200, "duration_ms": 0.5,
                                "service": "s", "instance": "i"}


def test_no_gpu_means_no_reader_here() -> None:
    # This machine has no GPU (and no NVML library): nothing is read, no instrument is made.
    assert nvml_reader() is None


def test_nvml_devices_are_read_as_used_and_total_bytes() -> None:
    # A stand-in for the pynvml module (no GPU here): the reader's mapping of NVML's answers.
    handles = ["h0", "h1"]
    nvml = SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: handles[i],
        nvmlDeviceGetName=lambda h: b"NVIDIA H100" if h == "h0" else "NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=5 if h == "h0" else 7, total=80))
    read = nvml_reader(nvml)
    assert read is not None and read() == [("gpu0", "NVIDIA H100", 5, 80), ("gpu1", "NVIDIA H200", 7, 80)]


def test_log_timestamps_are_rfc3339_utc_with_milliseconds() -> None:
    from telemetry.logs import timestamp

    assert timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert timestamp(1_796_180_530_395) == "2026-12-02T03:02:10.395Z"
    assert timestamp(1_796_180_531_007) == "2026-12-02T03:02:11.007Z"


def test_a_batch_that_cannot_be_sent_does_not_stop_the_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    from telemetry.tracing import SpanKind
    from tests.otlp import OtlpReceiver

    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no text")

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    receiver = OtlpReceiver()
    tracing = Tracing({"service.name": "t"}, receiver.endpoint, 1.0)
    try:
        tracing.start("bad", SpanKind.INTERNAL, None, {"x": Unprintable()}).end()
        deadline = time.monotonic() + 5
        while tracing._exporter.dropped == 0 and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
        tracing.start("good", SpanKind.INTERNAL, None, {"x": 1}).end()
    finally:
        tracing.shutdown()
        receiver.close()
    assert [s.name for s in receiver.spans] == ["good"]


def test_a_failure_recording_a_request_never_fails_the_request(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from gateway.observe import RequestObserver

    class BrokenLog:
        service = instance = ""

        def write(self, record: object) -> None:
            raise OSError("disk full")

    async def app(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    observer = RequestObserver(app, metrics=None, tracing=Tracing({}), log=BrokenLog(),  # type: ignore[arg-type]
                               route_of=lambda path, method: path)
    scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": []}
    with caplog.at_level(logging.ERROR, "conduit.gateway"):
        asyncio.run(observer(scope, receive, send))  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert "recording a finished request failed" in caplog.text


def test_records_from_many_threads_while_scraped_are_all_counted() -> None:
    import threading

    telemetry = Telemetry("x", "i")
    series = telemetry.meter.histogram("h", unit="s", description="d", bounds=(1, 2)).bind()
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            telemetry.meter.produce()

    def record() -> None:
        for _ in range(20_000):
            series.record(1.5)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    workers = [threading.Thread(target=record) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    scraper.join()
    series.fold()
    assert series.count == 80_000 and series.counts == [0, 80_000, 0]


def test_the_exporter_sends_credentials_as_headers_and_never_logs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from telemetry.tracing import _Exporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=conduit, api-key=a%3Db")
    exporter = _Exporter("https://user:s3cret@collector.internal:4318", {})
    try:
        assert exporter._host == "collector.internal:4318"
        assert exporter._headers["x-tenant"] == "conduit" and exporter._headers["api-key"] == "a=b"
        assert exporter._headers["Authorization"] == "Basic dXNlcjpzM2NyZXQ="
    finally:
        exporter.shutdown()


def test_a_keep_alive_connection_the_collector_closed_is_reopened_for_the_same_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from telemetry.tracing import SpanKind

    names: list[str] = []

    class Collector(BaseHTTPRequestHandler):
        # Answers as HTTP/1.1 (the client keeps the connection) and then closes it, as a
        # collector or proxy does with connections idle too long.
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            names.extend(s["name"] for s in body["resourceSpans"][0]["scopeSpans"][0]["spans"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    tracing = Tracing({}, f"http://127.0.0.1:{server.server_address[1]}", 1.0)
    try:
        tracing.start("one", SpanKind.INTERNAL, None).end()
        deadline = time.monotonic() + 5
        while names != ["one"] and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # the collector has closed the connection the exporter keeps
        tracing.start("two", SpanKind.INTERNAL, None).end()
    finally:
        tracing.shutdown()
        server.shutdown()
        server.server_close()
    assert names == ["one", "two"]


class Ended:
    """An exporter keeping the spans that ended."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def add(self, span: Any) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        pass


def _observe(app: object, method: str = "POST", path: str = "/v1/chat/completions", tracing: Tracing | None = None,
             headers: list[tuple[bytes, bytes]] | None = None) -> tuple[GatewayMetrics, list[object]]:
    """Run one request through a RequestObserver (metrics on, a log that keeps its records)."""
    import asyncio

    from gateway.observe import RequestObserver

    class Keep:
        service = instance = ""
        records: list[object] = []

        def write(self, record: object) -> None:
            self.records.append(record)

    async def send(message: object) -> None:
        pass

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    metrics, log = GatewayMetrics(Meter("x")), Keep()
    observer = RequestObserver(app, metrics=metrics, tracing=tracing or Tracing({}), log=log,  # type: ignore[arg-type]
                               route_of=lambda p, m: p)
    scope = {"type": "http", "method": method, "path": path, "headers": headers or []}
    try:
        asyncio.run(observer(scope, receive, send))  # type: ignore[arg-type]
    except RuntimeError:
        pass
    metrics.fold_requests()
    return metrics, log.records


def _http_points(metrics: GatewayMetrics) -> dict[tuple[object, ...], int]:
    return {tuple(sorted(k)): s.count for k, s in metrics.http_duration._series.items()}


def test_every_refusal_is_counted_once_by_its_code() -> None:
    # A refusal written by a middleware (here: as the idempotency middleware does) is counted too.
    from gateway.context import context_of

    async def refuse(scope: dict[str, object], receive: object, send: object) -> None:
        context_of(scope).error = "idempotency_key_reused"
        await send({"type": "http.response.start", "status": 409, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]

    metrics, _ = _observe(refuse)
    assert metrics._rejections["idempotency_key_reused"].value == 1


def test_an_app_that_raises_before_answering_is_recorded_as_a_500() -> None:
    async def broken(scope: object, receive: object, send: object) -> None:
        raise RuntimeError("bug")

    metrics, records = _observe(broken)
    assert records[0].status == 500  # type: ignore[attr-defined]
    assert list(_http_points(metrics).values()) == [1]
    assert (("http.request.method", "POST"), ("http.response.status_code", 500),
            ("http.route", "/v1/chat/completions")) in _http_points(metrics)


def test_unknown_http_methods_share_one_label() -> None:
    async def ok(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 405, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    metrics, _ = _observe(ok, method="FROBNICATE")
    ((labels, count),) = _http_points(metrics).items()
    assert ("http.request.method", "_OTHER") in labels and count == 1


def test_a_stream_that_fails_after_its_200_is_an_error_in_its_count_log_line_and_span() -> None:
    from gateway.context import context_of
    from gateway.dispatch import Dispatcher, JobKind
    from gateway.errors import ConduitError
    from gateway.flow import failed_mid_stream
    from gateway.queue import ReplyRouter
    from gateway.settings import QueueSettings
    from tests.unit.test_dispatch import Live

    ended = Ended()
    tracing = Tracing({}, sample_ratio=1.0, exporter=ended)
    router = ReplyRouter(None, "replies:gw", None)  # type: ignore[arg-type]
    dispatcher = Dispatcher(QueueSettings(), Live(), None, router, GatewayMetrics.noop(),  # type: ignore[arg-type]
                            tracing=None)

    async def streamed(scope: dict[str, Any], receive: object, send: Any) -> None:
        run = dispatcher.job(JobKind("chat", "chatcmpl"), "m", b"{}", stream=True, ctx=context_of(scope))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        failed_mid_stream(run, ConduitError("The engine went away.", status=502, code="engine_lost"))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    metrics, records = _observe(streamed, tracing=tracing)
    assert metrics._rejections["engine_lost"].value == 1
    assert records[0].error == "engine_lost"  # type: ignore[attr-defined]
    (span,) = ended.spans
    assert span.attributes["error.type"] == "engine_lost"


def test_a_clients_sampled_flag_counts_only_for_an_authenticated_request() -> None:
    from gateway.context import context_of

    def guarded(authenticated: bool) -> Any:
        async def app(scope: dict[str, Any], receive: object, send: Any) -> None:
            context_of(scope).authenticated = authenticated  # as the guard says
            await send({"type": "http.response.start", "status": 200 if authenticated else 401, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        return app

    client = (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    # Unauthenticated, the flag is ignored and the ratio decides (in the client's trace, still).
    for authenticated, ratio, recorded in ((False, 0.0, False), (True, 0.0, True), (False, 1.0, True)):
        ended = Ended()
        _, records = _observe(guarded(authenticated), tracing=Tracing({}, sample_ratio=ratio, exporter=ended),
                              headers=[client])
        assert bool(ended.spans) is recorded, (authenticated, ratio)
        if recorded:
            (span,) = ended.spans
            assert (span.context.trace_id, span.parent_id) == (0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7)
        # Recorded or not, the log line joins the client's trace (its logs link to it).
        assert records[0].trace_id == f"{0x4bf92f3577b34da6a3ce929d0e0e4736:032x}"  # type: ignore[attr-defined]
