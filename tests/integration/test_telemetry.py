"""Telemetry of a live stack: metrics land in the right buckets, gauges follow the queue and the
engines, nothing secret is exported, every request gets a JSON log line, and one trace spans
gateway → queue → engine (collected by an OTLP receiver)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ROOT, RedisServer, Stack, free_port
from tests.otlp import OtlpReceiver

MODEL = "synthetic"
#: A prompt of 20 words: the synthetic engine counts 20 prompt tokens.
PROMPT = " ".join(["word"] * 19 + ["zebra7f3a"])
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}

Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(samples: Samples, name: str, **labels: str) -> float | None:
    for n, lab, v in samples:
        if n == name and all(lab.get(k) == w for k, w in labels.items()):
            return v
    return None


def buckets(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """A histogram's cumulative (le, count) pairs, by ascending le."""
    out = [(float(lab["le"]), v) for n, lab, v in samples
           if n == f"{name}_bucket" and all(lab.get(k) == w for k, w in labels.items())]
    return sorted(out)


def landed(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """The buckets observations landed in: (lower bound, upper bound] for each, as many times as
    observations landed there."""
    out: list[tuple[float, float]] = []
    previous_le, previous = 0.0, 0.0
    for le, count in buckets(samples, name, **labels):
        out.extend([(previous_le, le)] * int(count - previous))
        previous_le, previous = le, count
    return out


def create_key(stack: Stack, name: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--name", name, "--redis-url",
                           stack.redis_url, "--key-prefix", stack.prefix], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def post(stack: Stack, body: dict[str, Any], key: str | None = None, **headers: str) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers={**h, **headers}, timeout=60)


def test_ttft_tokens_and_queue_wait_land_in_their_buckets(stack: Stack) -> None:
    """Two requests on a one-slot engine with fixed timing (first token after 0.4 s, then 4 tokens
    0.1 s apart): the first's time to first token is ~0.4 s, the second's ~1.2 s (it waited
    ~0.8 s for the slot); 4 output and 20 input tokens each; ~0.13 s per output token."""
    engine_port = free_port()
    stack.gateway()
    stack.synthetic(MODEL, "--first-token-delay", "0.4", "--tokens", "4", "--token-delay", "0.1",
                    "--max-concurrency", "1", "--metrics-port", str(engine_port))
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(post(stack, CHAT))) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
    assert all(r.json()["usage"] == {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}
               for r in results)

    time.sleep(0.2)  # the observer records once the last byte is out
    gw = scrape(f"{stack.base_url}/metrics")
    model = {"gen_ai_request_model": MODEL, "gen_ai_operation_name": "chat"}
    assert landed(gw, "gen_ai_server_time_to_first_token_seconds", **model) == [(0.25, 0.5), (1.0, 2.5)]
    assert landed(gw, "gen_ai_client_token_usage", gen_ai_token_type="output", **model) == [(1.0, 4.0)] * 2
    assert landed(gw, "gen_ai_client_token_usage", gen_ai_token_type="input", **model) == [(16.0, 64.0)] * 2
    assert landed(gw, "gen_ai_server_time_per_output_token_seconds", **model) == [(0.1, 0.15)] * 2
    assert landed(gw, "gen_ai_server_request_duration_seconds", http_response_status_code="200", **model) == [
        (0.5, 1.0), (1.0, 2.5)]
    assert value(gw, "http_server_request_duration_seconds_count", http_route="/v1/chat/completions",
                 http_request_method="POST", http_response_status_code="200") == 2

    engine = scrape(f"http://127.0.0.1:{engine_port}/metrics")
    waits = landed(engine, "conduit_engine_job_queue_wait_seconds", gen_ai_request_model=MODEL)
    assert len(waits) == 2 and waits[0][1] <= 0.25 and waits[1] == (0.5, 1.0), waits
    assert value(engine, "conduit_engine_jobs_total", gen_ai_request_model=MODEL, outcome="ok") == 2
    # Every outcome exists from the start, so a rate of dead letters is 0, not "no data".
    assert value(engine, "conduit_engine_jobs_total", gen_ai_request_model=MODEL, outcome="dead_letter") == 0
    assert value(engine, "conduit_engine_jobs_reclaimed_total", gen_ai_request_model=MODEL) == 0


def wait_for_metric(url: str, name: str, want: float, timeout: float = 20, **labels: str) -> Samples:
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        samples = scrape(url)
        got = value(samples, name, **labels)
        if got == want:
            return samples
        time.sleep(0.1)
    raise AssertionError(f"{name}{labels} is {got}, never {want}")


def test_backlog_in_flight_and_live_engine_gauges(stack: Stack) -> None:
    engine_port = free_port()
    stack.gateway()
    engine = stack.synthetic(MODEL, "--first-token-delay", "1.5", "--tokens", "1", "--max-concurrency", "1",
                             "--metrics-port", str(engine_port))
    gw_url = f"{stack.base_url}/metrics"
    m = {"gen_ai_request_model": MODEL}
    samples = wait_for_metric(gw_url, "conduit_gateway_engines_live", 1, **m)
    assert value(samples, "conduit_gateway_engines_slots", **m) == 1
    assert value(samples, "conduit_queue_backlog", **m) == 0

    threads = [threading.Thread(target=post, args=(stack, CHAT)) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        samples = wait_for_metric(gw_url, "conduit_queue_backlog", 3, **m)
        # One job holds the engine's only slot and the next waits in the stream (the one an engine
        # reads next); the third waits its key's turn in fair queueing's lists.
        assert value(samples, "conduit_queue_waiting", **m) == 1
        assert value(samples, "conduit_gateway_requests_in_flight") == 3
        wait_for_metric(f"http://127.0.0.1:{engine_port}/metrics", "conduit_engine_jobs_in_flight", 1, **m)
    finally:
        for t in threads:
            t.join()
    wait_for_metric(gw_url, "conduit_queue_backlog", 0, **m)
    engine.stop()
    samples = wait_for_metric(gw_url, "conduit_gateway_engines_live", 0, **m)
    assert value(samples, "conduit_gateway_engines_slots", **m) == 0


def test_refusals_are_counted_and_no_key_or_prompt_is_exported(stack: Stack) -> None:
    engine_port = free_port()
    stack.gateway(auth=True)
    key = create_key(stack, "team-metrics")
    stack.api_key = key
    stack.synthetic(MODEL, "--metrics-port", str(engine_port))
    assert post(stack, CHAT, key).status_code == 200
    assert post(stack, CHAT, None).status_code == 401
    assert post(stack, CHAT, key + "x").status_code == 401
    time.sleep(1.5)  # key usage is flushed once a second
    text = httpx.get(f"{stack.base_url}/metrics").text + httpx.get(f"http://127.0.0.1:{engine_port}/metrics").text
    samples = [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]
    assert value(samples, "conduit_gateway_rejections_total", error_type="invalid_api_key") == 2
    assert value(samples, "http_server_request_duration_seconds_count", http_route="/v1/chat/completions",
                 http_response_status_code="401") == 2
    assert value(samples, "conduit_gateway_key_requests_total", conduit_key_name="team-metrics",
                 gen_ai_request_model=MODEL) == 1
    assert key not in text and key.split("-", 2)[2] not in text
    assert "zebra7f3a" not in text


def test_every_request_gets_one_json_log_line_without_its_prompt(stack: Stack) -> None:
    gateway = stack.gateway(auth=True)
    key = create_key(stack, "team-logs")
    stack.api_key = key
    stack.synthetic(MODEL)
    ok = post(stack, CHAT, key, **{"x-request-id": "req-telemetry-1"})
    streamed = post(stack, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, key)
    refused = post(stack, CHAT, None)
    assert (ok.status_code, streamed.status_code, refused.status_code) == (200, 200, 401)
    time.sleep(0.5)
    lines = {line["request_id"]: line for line in gateway.request_lines()}
    first = lines["req-telemetry-1"]
    assert first["status"] == 200 and first["route"] == "/v1/chat/completions" and first["method"] == "POST"
    assert first["key"] == "team-logs" and first["model"] == MODEL and first["operation"] == "chat"
    assert first["id"] == ok.json()["id"] and first["stream"] is False
    assert first["prompt_tokens"] == 20 and first["completion_tokens"] == 16
    assert first["duration_ms"] > 0 and first["ttft_ms"] > 0 and first["service"] == "conduit-gateway"
    stream_line = lines[streamed.headers["x-request-id"]]
    assert stream_line["stream"] is True and stream_line["completion_tokens"] == 16
    refused_line = lines[refused.headers["x-request-id"]]
    assert refused_line["status"] == 401 and refused_line["error"] == "invalid_api_key"
    assert "key" not in refused_line and "model" not in refused_line
    log = gateway.output()
    assert "zebra7f3a" not in log and key not in log
    assert all("prompt" not in line for line in lines.values())


def test_prompts_are_logged_only_when_the_operator_turns_it_on(stack: Stack) -> None:
    gateway = stack.gateway(log_prompts="true", log_prompt_chars=60)
    stack.synthetic(MODEL)
    resp = post(stack, CHAT)
    assert resp.status_code == 200
    time.sleep(0.5)
    (line,) = [x for x in gateway.request_lines() if x["request_id"] == resp.headers["x-request-id"]]
    assert line["prompt"] == json.dumps(CHAT["messages"], separators=(",", ":"))[:60]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    # Export spans within 0.2 s (the SDK's default waits 5 s); the gateway and engine inherit it.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    yield r
    r.close()


def test_one_trace_spans_gateway_queue_and_engine(stack: Stack, receiver: OtlpReceiver) -> None:
    stack.gateway(otlp_endpoint=receiver.endpoint, trace_sample_ratio=0.0)
    stack.engine("--kind", "synthetic", "--served-name", MODEL, "--otlp-endpoint", receiver.endpoint, model=MODEL)
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    resp = post(stack, CHAT, traceparent=f"00-{trace_id}-{client_span}-01")
    assert resp.status_code == 200

    spans = receiver.wait_for(trace_id, 3)
    by_kind = {s.kind: s for s in spans}
    assert sorted(by_kind) == ["CONSUMER", "PRODUCER", "SERVER"], spans
    server, queue, job = by_kind["SERVER"], by_kind["PRODUCER"], by_kind["CONSUMER"]
    assert server.parent_span_id == client_span and server.service == "conduit-gateway"
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["gen_ai.request.model"] == MODEL
    assert server.attributes["gen_ai.usage.output_tokens"] == 16
    assert server.attributes["gen_ai.response.id"] == resp.json()["id"]
    assert server.attributes["conduit.request.id"] == resp.headers["x-request-id"]
    assert queue.parent_span_id == server.span_id and queue.service == "conduit-gateway"
    assert queue.name == f"queue {MODEL}" and queue.attributes["conduit.engine.id"]
    assert job.parent_span_id == queue.span_id and job.service == "conduit-engine"
    assert job.name == f"chat {MODEL}" and job.attributes["conduit.job.outcome"] == "ok"
    assert job.attributes["gen_ai.usage.output_tokens"] == 16
    assert job.attributes["messaging.message.id"] == resp.json()["id"]
    assert server.start_ns <= queue.start_ns <= job.start_ns <= job.end_ns <= server.end_ns
    assert "zebra7f3a" not in repr(spans)

    # Not sampled: the client's flag says no, or no traceparent and a ratio of 0: no span at all.
    unsampled = "0af7651916cd43dd8448eb211c80319c"
    assert post(stack, CHAT, traceparent=f"00-{unsampled}-b7ad6b7169203331-00").status_code == 200
    assert post(stack, CHAT).status_code == 200
    time.sleep(1.5)
    assert receiver.trace(unsampled) == []
    assert {s.trace_id for s in receiver.spans} == {trace_id}


def test_a_clients_sampled_flag_counts_only_for_an_authenticated_request(stack: Stack,
                                                                        receiver: OtlpReceiver) -> None:
    # Otherwise anyone, without a key, could make the gateway record and export a trace per request.
    stack.gateway(auth=True, otlp_endpoint=receiver.endpoint, trace_sample_ratio=0.0)
    key = create_key(stack, "team-traces")
    base = stack.base_url
    refused_ids = [f"0af7651916cd43dd8448eb211c80000{i}" for i in range(4)]
    sampled = [{"traceparent": f"00-{t}-b7ad6b7169203331-01"} for t in refused_ids]
    refused = [post(stack, CHAT, None, **sampled[0]), post(stack, CHAT, "cdt-000000000000-" + "0" * 43, **sampled[1]),
               httpx.get(f"{base}/v1/images/files/img_{'0' * 32}.png", headers=sampled[2]),  # public: no key
               httpx.get(f"{base}/nowhere", headers=sampled[3])]
    assert [r.status_code for r in refused] == [401, 401, 404, 404]
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    ok = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}",
                                                 "traceparent": f"00-{trace_id}-{client_span}-01"})
    assert ok.status_code == 200
    (server,) = receiver.wait_for(trace_id, 1)
    assert server.parent_span_id == client_span and server.name == "GET /v1/models"
    time.sleep(1.0)  # the refused requests came first: their spans would be here by now
    assert {s.trace_id for s in receiver.spans} == {trace_id}


def test_new_traces_are_sampled_at_the_configured_ratio(stack: Stack, receiver: OtlpReceiver) -> None:
    stack.gateway(otlp_endpoint=receiver.endpoint, trace_sample_ratio=1.0)
    stack.engine("--kind", "synthetic", "--served-name", MODEL, "--otlp-endpoint", receiver.endpoint, model=MODEL)
    for _ in range(3):
        assert post(stack, CHAT).status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (len({s.trace_id for s in receiver.spans if s.kind == "CONSUMER"}) < 3 or len(
            {s.trace_id for s in receiver.spans if s.name == "POST /v1/chat/completions"}) < 3):
        time.sleep(0.1)
    # Each request is a trace of its own (the readiness polls of /v1/models too).
    traces = {s.trace_id for s in receiver.spans if s.name == "POST /v1/chat/completions"}
    assert len(traces) == 3
    assert {s.name for s in receiver.spans if s.kind == "SERVER"} == {"POST /v1/chat/completions", "GET /v1/models"}
    for trace_id in traces:
        assert sorted(s.kind for s in receiver.trace(trace_id)) == ["CONSUMER", "PRODUCER", "SERVER"]
        (root,) = [s for s in receiver.trace(trace_id) if s.kind == "SERVER"]
        assert root.parent_span_id == ""


def test_logs_are_json_lines_when_asked(stack: Stack, tmp_path: Path) -> None:
    gateway = stack.gateway(log_format="json", log_level="info")
    engine = stack.engine("--kind", "synthetic", "--served-name", MODEL, "--log-format", "json", model=MODEL)
    assert post(stack, CHAT).status_code == 200
    for proc, service in ((gateway, "conduit-gateway"), (engine, "conduit-engine-synthetic")):
        lines = [line for line in proc.output().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert any(r.get("service") == service and r.get("level") == "info" for r in records), lines[:5]


async def test_request_log_lines_still_buffered_are_written_at_shutdown(redis_server: RedisServer) -> None:
    import io

    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from telemetry.logs import RequestLog, RequestRecord

    out = io.BytesIO()
    log = RequestLog(out, flush_s=60)  # nothing would reach the stream for a minute
    app = create_app(GatewaySettings.from_env({}, redis_url=redis_server.url, key_prefix="t-shutdown"), request_log=log)
    async with app.lifespan():
        log.write(RequestRecord(ts="t", level="info", logger="conduit.request", request_id="req-last", method="GET",
                                route="/v1/models", status=200, duration_ms=1.0))
        assert out.getvalue() == b""
    assert b'"request_id":"req-last"' in out.getvalue()
