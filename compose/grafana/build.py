"""Builds Conduit's Grafana dashboards (``dashboards/*.json``) from the panel lists below.

    python compose/grafana/build.py           # write the JSON files
    python compose/grafana/build.py --check   # exit 1 if a JSON file differs from what this builds

Every panel's PromQL uses the metric names of ``telemetry/instruments.py`` and
``telemetry/engine_instruments.py``; the test suite runs
each expression against a real Prometheus scraping a live stack, so a renamed metric fails the
build instead of leaving an empty panel. Template variables: ``$model`` (gen_ai_request_model)
and ``$key`` (API key name), both multi-value with "All"; ``$__rate_interval`` is Grafana's.
The logs dashboard queries Loki (LogQL) on the labels and structured metadata Alloy sets
(``compose/alloy/config.alloy``); ``tests/integration/test_monitoring_files.py`` holds them to it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARDS = HERE / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
GW = 'job="conduit-gateway"'
EN = 'job="conduit-engine"'
M = 'gen_ai_request_model=~"$model"'
RATE = "[$__rate_interval]"


def q(expr: str, legend: str = "") -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, by: str, selector: str, legend: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99)
              ) -> list[dict[str, Any]]:
    return [q(f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}{RATE})))",
              f"p{round(p * 100)} {legend}") for p in qs]


def panel(title: str, targets: list[dict[str, Any]], *, unit: str = "short", kind: str = "timeseries",
          description: str = "", stack: bool = False, max_value: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if max_value is not None:
        defaults["max"] = max_value
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    return {"type": kind, "title": title, "description": description, "datasource": DATASOURCE,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else
            {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value",
             "graphMode": "area", "textMode": "auto"},
            "targets": [{**t, "datasource": DATASOURCE, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)]}


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


MODEL_VAR = variable("model", "Model", "label_values(conduit_gateway_engines_live, gen_ai_request_model)")
KEY_VAR = variable("key", "API key", "label_values(conduit_gateway_key_requests_total, conduit_key_name)")


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]],
              variables: list[dict[str, Any]]) -> dict[str, Any]:
    """Lay panels out two to a row of the grid (rows and stats take their own widths)."""
    laid: list[dict[str, Any]] = []
    x = y = 0
    for i, p in enumerate(panels, 1):
        if p["type"] == "row":
            if x:
                x, y = 0, y + 8
            laid.append({**p, "id": i, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            y += 1
            continue
        w, h = (6, 4) if p["type"] == "stat" else (12, 8)
        if x + w > 24:
            x, y = 0, y + 8
        laid.append({**p, "id": i, "gridPos": {"h": h, "w": w, "x": x, "y": y}})
        x += w
        if p["type"] == "stat" and x >= 24:
            x, y = 0, y + h
    return {"uid": uid, "title": title, "description": description, "tags": ["conduit"], "editable": False,
            "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "timezone": "browser", "graphTooltip": 1, "panels": laid,
            "templating": {"list": variables}, "annotations": {"list": []},
            "links": [{"type": "dashboards", "tags": ["conduit"], "asDropdown": True, "title": "Conduit"}]}


def overview() -> dict[str, Any]:
    http = f"http_server_request_duration_seconds_count{{{GW}}}"
    return dashboard("conduit-overview", "Conduit / Overview",
                     "Traffic, errors, latency and tokens at the gateways.", [
        panel("Requests/s", [q(f'sum(rate({http[:-1]},http_route!~"/health|/ready|/metrics"}}{RATE}))')],
              unit="reqps", kind="stat"),
        panel("5xx ratio", [q(f'(sum(rate({http[:-1]},http_response_status_code=~"5.."}}{RATE})) or vector(0)) / '
                              f"sum(rate({http}{RATE}))")], unit="percentunit", kind="stat"),
        panel("Requests in flight", [q(f"sum(conduit_gateway_requests_in_flight{{{GW}}})")], kind="stat"),
        panel("Output tokens/s", [q(f'sum(rate(gen_ai_client_token_usage_sum{{{GW},gen_ai_token_type="output",{M}}}'
                                    f"{RATE}))")], kind="stat"),
        row("Traffic"),
        panel("Requests/s by route", [q(f"sum by (http_route) (rate({http}{RATE}))", "{{http_route}}")],
              unit="reqps", stack=True),
        panel("Responses/s by status", [q(f"sum by (http_response_status_code) (rate({http}{RATE}))",
                                          "{{http_response_status_code}}")], unit="reqps", stack=True),
        panel("Errors/s by code", [q(f"sum by (error_type) (rate(conduit_gateway_rejections_total{{{GW}}}{RATE}))",
                                     "{{error_type}}")], unit="reqps",
              description="Every error answer by its OpenAI error code (401s, 429s, 404s, 5xx)."),
        panel("Tokens/s by model", [q(f"sum by (gen_ai_request_model, gen_ai_token_type) (rate("
                                      f"gen_ai_client_token_usage_sum{{{GW},{M}}}{RATE}))",
                                      "{{gen_ai_request_model}} {{gen_ai_token_type}}")], unit="short"),
        row("Latency"),
        panel("Request duration (generation)", quantiles("gen_ai_server_request_duration_seconds",
                                                         "gen_ai_request_model", f"{GW},{M}",
                                                         "{{gen_ai_request_model}}"), unit="s"),
        panel("Time to first token", quantiles("gen_ai_server_time_to_first_token_seconds", "gen_ai_request_model",
                                               f"{GW},{M}", "{{gen_ai_request_model}}"), unit="s"),
        panel("Time per output token", quantiles("gen_ai_server_time_per_output_token_seconds",
                                                 "gen_ai_request_model", f"{GW},{M}", "{{gen_ai_request_model}}"),
              unit="s"),
        panel("HTTP duration by route (p95)", [q(f"histogram_quantile(0.95, sum by (le, http_route) (rate("
                                                 f"http_server_request_duration_seconds_bucket{{{GW}}}{RATE})))",
                                                 "{{http_route}}")], unit="s"),
    ], [MODEL_VAR])


def queue() -> dict[str, Any]:
    return dashboard("conduit-queue", "Conduit / Queue",
                     "Backlog, queue wait, retries and dead letters of the Redis Streams queue.", [
        panel("Backlog", [q(f"sum(max by (gen_ai_request_model) (conduit_queue_backlog{{{GW},{M}}}))")], kind="stat",
              description="Jobs queued, running or waiting their key's turn (all models shown)."),
        panel("Live engines", [q(f"sum(max by (gen_ai_request_model) (conduit_gateway_engines_live{{{GW},{M}}}))")],
              kind="stat"),
        panel("Jobs reclaimed (1h)", [q(f"sum(increase(conduit_engine_jobs_reclaimed_total{{{EN},{M}}}[1h]))")],
              kind="stat"),
        panel("Dead letters (1h)", [q(f'sum(increase(conduit_engine_jobs_total{{{EN},{M},outcome="dead_letter"}}'
                                      f"[1h]))")], kind="stat"),
        row("Backlog"),
        panel("Backlog by model", [
            q(f"max by (gen_ai_request_model) (conduit_queue_backlog{{{GW},{M}}})", "{{gen_ai_request_model}} backlog"),
            q(f"max by (gen_ai_request_model) (conduit_gateway_engines_slots{{{GW},{M}}})",
              "{{gen_ai_request_model}} engine slots")],
            description="Queued + running + waiting jobs against the slots of the live engines: a backlog far "
                        "above the slots is waiting work."),
        panel("Waiting their key's turn", [q(f"max by (gen_ai_request_model) (conduit_queue_waiting{{{GW},{M}}})",
                                             "{{gen_ai_request_model}}")],
              description="Jobs in fair queueing's per-key lists: every engine slot is busy."),
        panel("Queue wait (created → started)", quantiles("conduit_engine_job_queue_wait_seconds",
                                                          "gen_ai_request_model", f"{EN},{M}",
                                                          "{{gen_ai_request_model}}", (0.5, 0.95)), unit="s"),
        panel("Live engines by model", [q(f"max by (gen_ai_request_model) (conduit_gateway_engines_live{{{GW},{M}}})",
                                          "{{gen_ai_request_model}}")]),
        panel("Waiting for a cold model",
              [q(f"sum by (gen_ai_request_model) (conduit_gateway_requests_cold{{{GW},{M}}})",
                 "{{gen_ai_request_model}}")],
              description="Requests waiting for a declared model no engine serves (scaled to zero, or its engines "
                          "gone) until one starts or their cold-start deadline passes, and for a model whose engines "
                          "announce it cold (a serverless upstream waking) until their first output: the demand KEDA "
                          "wakes it on."),
        row("Retries and failures"),
        panel("Job outcomes/s", [q(f"sum by (outcome) (rate(conduit_engine_jobs_total{{{EN},{M}}}{RATE}))",
                                   "{{outcome}}")], unit="ops", stack=True),
        panel("Reclaimed, dead-lettered, resubmitted", [
            q(f"sum by (gen_ai_request_model) (rate(conduit_engine_jobs_reclaimed_total{{{EN},{M}}}{RATE}))",
              "reclaimed {{gen_ai_request_model}}"),
            q(f'sum by (gen_ai_request_model) (rate(conduit_engine_jobs_total{{{EN},{M},outcome="dead_letter"}}{RATE}))',
              "dead-lettered {{gen_ai_request_model}}"),
            q(f"sum(rate(conduit_gateway_resubmissions_total{{{GW}}}{RATE}))", "resubmitted by gateways")],
            unit="ops"),
        panel("Cancelled (client gone)", [q(f"sum(rate(conduit_gateway_cancellations_total{{{GW}}}{RATE}))",
                                            "cancelled")], unit="ops"),
        panel("Reply events dropped", [q(f"sum by (reason) (rate(conduit_gateway_events_skipped_total{{{GW}}}{RATE}))",
                                         "{{reason}}")], unit="ops",
              description="Repeated, stale or unknown events the gateways dropped (exactly-once filter)."),
        panel("Background errors outlived", [
            q(f"sum by (task) (rate(conduit_gateway_background_errors_total{{{GW}}}{RATE}))", "gateway {{task}}"),
            q(f"sum by (task) (rate(conduit_engine_background_errors_total{{{EN}}}{RATE}))", "engine {{task}}")],
            unit="ops"),
    ], [MODEL_VAR])


def engines() -> dict[str, Any]:
    vllm = f"{EN},{M}"
    return dashboard("conduit-engines", "Conduit / Engines",
                     "What each engine process runs: jobs in flight, batches, vLLM's KV cache, images.", [
        row("Jobs"),
        panel("Jobs in flight by engine", [
            q(f"sum by (instance) (conduit_engine_jobs_in_flight{{{EN},{M}}})", "{{instance}}"),
            q(f"max by (instance) (conduit_engine_jobs_max{{{EN}}})", "{{instance}} max")]),
        panel("Job duration", quantiles("conduit_engine_job_duration_seconds", "gen_ai_request_model", f"{EN},{M}",
                                        "{{gen_ai_request_model}}", (0.5, 0.95)), unit="s"),
        row("vLLM"),
        panel("Batch size (requests per engine step)", [
            q(f"sum by (instance) (rate(conduit_engine_vllm_batch_size_sum{{{vllm}}}{RATE})) / "
              f"sum by (instance) (rate(conduit_engine_vllm_batch_size_count{{{vllm}}}{RATE}))", "{{instance}} mean"),
            *quantiles("conduit_engine_vllm_batch_size", "instance", vllm, "{{instance}}", (0.95,))]),
        panel("Running and waiting in vLLM", [
            q(f"sum by (instance) (conduit_engine_vllm_requests_running{{{vllm}}})", "{{instance}} running"),
            q(f"sum by (instance) (conduit_engine_vllm_requests_waiting{{{vllm}}})", "{{instance}} waiting")]),
        panel("KV-cache usage", [q(f"max by (instance) (conduit_engine_vllm_kv_cache_usage{{{vllm}}})",
                                   "{{instance}}")], unit="percentunit", max_value=1),
        panel("vLLM tokens/s", [q(f"sum by (instance, gen_ai_token_type) (rate(conduit_engine_vllm_tokens_total"
                                  f"{{{vllm}}}{RATE}))", "{{instance}} {{gen_ai_token_type}}")]),
        panel("vLLM time to first token and between tokens", [
            *quantiles("conduit_engine_vllm_time_to_first_token_seconds", "gen_ai_request_model", vllm,
                       "TTFT {{gen_ai_request_model}}", (0.5, 0.95)),
            *quantiles("conduit_engine_vllm_inter_token_latency_seconds", "gen_ai_request_model", vllm,
                       "ITL {{gen_ai_request_model}}", (0.5, 0.95))], unit="s"),
        panel("vLLM queue time and preemptions", [
            *quantiles("conduit_engine_vllm_request_queue_time_seconds", "gen_ai_request_model", vllm,
                       "queue {{gen_ai_request_model}}", (0.95,)),
            q(f"sum by (instance) (rate(conduit_engine_vllm_preemptions_total{{{vllm}}}{RATE}))",
              "preemptions/s {{instance}}")], unit="s"),
        row("Images"),
        panel("Images/s", [q(f"sum by (gen_ai_request_model, joined) (rate(conduit_engine_images_total{{{EN},{M}}}"
                             f"{RATE}))", "{{gen_ai_request_model}} joined={{joined}}")], unit="short", stack=True,
              description="joined=true: the image joined a denoising batch already running (continuous batching)."),
        panel("Denoising batch size (images per step)", [
            q(f"sum by (instance) (rate(conduit_engine_denoise_batch_size_sum{{{EN},{M}}}{RATE})) / "
              f"sum by (instance) (rate(conduit_engine_denoise_batch_size_count{{{EN},{M}}}{RATE}))",
              "{{instance}} mean"),
            q(f"sum by (instance) (rate(conduit_engine_denoise_steps_total{{{EN},{M}}}{RATE}))",
              "{{instance}} steps/s")]),
        row("GPU"),
        panel("GPU memory used", [q(f"max by (instance, hw_id) (hw_gpu_memory_usage_bytes{{{EN}}}) / "
                                    f"max by (instance, hw_id) (hw_gpu_memory_limit_bytes{{{EN}}})",
                                    "{{instance}} {{hw_id}}")], unit="percentunit", max_value=1,
              description="Engines on a GPU only (read through NVML)."),
    ], [MODEL_VAR])


def keys() -> dict[str, Any]:
    k = 'conduit_key_name=~"$key"'
    return dashboard("conduit-keys", "Conduit / API keys",
                     "Usage and refusals per API key (labelled by the key's name, never the key).", [
        panel("401s (1h)", [q(f'sum(increase(conduit_gateway_rejections_total{{{GW},error_type="invalid_api_key"}}'
                              f"[1h]))")], kind="stat"),
        panel("429s (1h)", [q(f'sum(increase(conduit_gateway_rejections_total{{{GW},error_type=~'
                              f'"rate_limit_exceeded|model_overloaded"}}[1h]))')], kind="stat"),
        panel("Keys in use", [q(f"count(count by (conduit_key_name) (conduit_gateway_key_requests_total{{{GW}}}))")],
              kind="stat", description="API keys that sent a request to a gateway process now running (a key's "
                                       "counter appears with its first request)."),
        panel("Tokens (24h)", [q(f"sum(increase(conduit_gateway_key_tokens_total{{{GW},{k}}}[24h]))")], kind="stat"),
        row("Usage"),
        panel("Requests/s by key", [q(f"sum by (conduit_key_name) (rate(conduit_gateway_key_requests_total"
                                      f"{{{GW},{k},{M}}}{RATE}))", "{{conduit_key_name}}")], unit="reqps",
              stack=True),
        panel("Tokens/s by key", [q(f"sum by (conduit_key_name, gen_ai_token_type) (rate("
                                    f"conduit_gateway_key_tokens_total{{{GW},{k},{M}}}{RATE}))",
                                    "{{conduit_key_name}} {{gen_ai_token_type}}")]),
        panel("Images/s by key", [q(f"sum by (conduit_key_name) (rate(conduit_gateway_key_images_total"
                                    f"{{{GW},{k},{M}}}{RATE}))", "{{conduit_key_name}}")]),
        panel("Tokens by key and model (24h)", [q(f"sum by (conduit_key_name, gen_ai_request_model) (increase("
                                                  f"conduit_gateway_key_tokens_total{{{GW},{k},{M}}}[24h]))",
                                                  "{{conduit_key_name}} {{gen_ai_request_model}}")],
              kind="bargauge"),
        row("Refusals"),
        panel("Rate-limited/s by key and limit", [q(f"sum by (conduit_key_name, limit) (rate("
                                                    f"conduit_gateway_key_rate_limited_total{{{GW},{k}}}{RATE}))",
                                                    "{{conduit_key_name}} {{limit}}")], unit="reqps"),
        panel("401s and 429s/s", [q(f'sum by (error_type) (rate(conduit_gateway_rejections_total{{{GW},error_type=~'
                                    f'"invalid_api_key|rate_limit_exceeded|model_overloaded"}}{RATE}))',
                                    "{{error_type}}")], unit="reqps"),
    ], [KEY_VAR, MODEL_VAR])


LOKI = {"type": "loki", "uid": "loki"}
#: Every Conduit container's lines (Alloy labels each with its compose service).
CONDUIT_LINES = '{service=~"gateway|vllm-engine.*|diffusers-engine.*"}'
#: The gateway's request log: one JSON line per finished request (telemetry/logs.py, RequestRecord).
REQUEST_LOG = '{service="gateway"} | json | logger="conduit.request"'


def logs_panel(title: str, expr: str, description: str = "") -> dict[str, Any]:
    return {"type": "logs", "title": title, "description": description, "datasource": LOKI,
            "options": {"showTime": True, "wrapLogMessage": True, "sortOrder": "Descending",
                        "enableLogDetails": True, "prettifyLogMessage": False, "dedupStrategy": "none"},
            "targets": [{"expr": expr, "queryType": "range", "refId": "A", "datasource": LOKI}]}


def text_variable(name: str, label: str, default: str = "") -> dict[str, Any]:
    return {"name": name, "label": label, "type": "textbox", "query": default,
            "current": {"text": default, "value": default}}


def logs() -> dict[str, Any]:
    """Slow requests from the gateway's request log, each linked to its logs and its trace."""
    here = "/d/conduit-logs/conduit-logs?${__url_time_range}"
    slow = {"type": "table", "title": "Slow requests", "datasource": LOKI,
            "description": "The gateway's request log lines slower than $slow_ms ms. Click a request id for every "
                           "line of that request (gateway and engines), a trace id for its trace.",
            "targets": [{"expr": f"{REQUEST_LOG} | duration_ms > $slow_ms", "queryType": "range", "refId": "A",
                         "datasource": LOKI}],
            # Loki returns each line's parsed fields as labels: one column each.
            "transformations": [{"id": "extractFields", "options": {"source": "labels", "replace": False}},
                                {"id": "organize", "options": {"includeByName": {
                                    f: True for f in ("Time", "request_id", "route", "model", "status",
                                                      "duration_ms", "ttft_ms", "key", "trace_id")}}}],
            "fieldConfig": {"defaults": {}, "overrides": [
                {"matcher": {"id": "byName", "options": "request_id"}, "properties": [{"id": "links", "value": [
                    {"title": "Logs of this request",
                     "url": f"{here}&var-request_id=${{__data.fields.request_id}}"}]}]},
                {"matcher": {"id": "byName", "options": "trace_id"}, "properties": [{"id": "links", "value": [
                    {"title": "Logs of this trace", "url": f"{here}&var-trace_id=${{__data.fields.trace_id}}"},
                    {"title": "Trace in Tempo", "url": "",
                     "internal": {"datasourceUid": "tempo", "datasourceName": "Tempo",
                                  "query": {"query": "${__data.fields.trace_id}", "queryType": "traceql"}}}]}]}]},
            "options": {"showHeader": True, "sortBy": [{"displayName": "duration_ms", "desc": True}]}}
    rate = {"type": "timeseries", "title": "Log lines/s by service and level", "datasource": LOKI,
            "fieldConfig": {"defaults": {"unit": "short"}, "overrides": []},
            "targets": [{"expr": 'sum by (service, level) (rate({service=~".+"}[$__auto]))', "legendFormat":
                         "{{service}} {{level}}", "queryType": "range", "refId": "A", "datasource": LOKI}]}
    return dashboard("conduit-logs", "Conduit / Logs",
                     "Every container's logs (Loki, gathered by Alloy): slow requests linked to their lines "
                     "and traces by request id and trace id.", [
        slow,
        rate,
        row("One request"),
        logs_panel("Lines of request $request_id", f'{{service=~".+"}} | request_id="$request_id"',
                   "The gateway's request line and each engine's job line carry the client's x-request-id."),
        logs_panel("Lines of trace $trace_id", f'{{service=~".+"}} | trace_id="$trace_id"'),
        row("Problems"),
        logs_panel("Warnings and errors", f'{CONDUIT_LINES[:-1]}, level=~"warning|error|critical"}}'),
        logs_panel("Failed requests (5xx)", f"{REQUEST_LOG} | status >= 500"),
    ], [text_variable("request_id", "Request id"), text_variable("trace_id", "Trace id"),
        text_variable("slow_ms", "Slower than (ms)", "2000")])


def build() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{d['uid']}.json": json.dumps(d, indent=2) + "\n"
            for d in (overview(), queue(), engines(), keys(), logs())}


def main(argv: list[str]) -> int:
    built = build()
    if "--check" in argv:
        stale = [name for name, text in built.items()
                 if not (DASHBOARDS / name).exists() or (DASHBOARDS / name).read_text() != text]
        extra = sorted({p.name for p in DASHBOARDS.glob("*.json")} - set(built))
        if stale or extra:
            print(f"dashboards out of date: {stale + extra}; run python compose/grafana/build.py", file=sys.stderr)
            return 1
        return 0
    DASHBOARDS.mkdir(exist_ok=True)
    for name, text in built.items():
        (DASHBOARDS / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
