"""A real Prometheus, with the shipped scrape config, scrapes the gateway's and the engine's /metrics.

The gateway's /metrics takes the metrics credential, as compose and Kubernetes deploy it:
Prometheus sends it from its credentials file (the shipped ``authorization``), never the admin one.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from gateway.tenancy.keys import HASHER
from tests.harness import Stack, free_port
from tests.monitoring import Prometheus, scrape_config

METRICS = "prometheus-metrics-credential-0123456789"


def test_prometheus_scrapes_gateway_and_engine(stack: Stack, tmp_path: Path) -> None:
    engine_metrics = free_port()
    stack.gateway(metrics_auth=True, metrics_key_hash=HASHER.hash(METRICS))
    stack.synthetic("synthetic", "--metrics-port", str(engine_metrics))
    client = stack.sdk()
    for _ in range(3):
        client.chat.completions.create(model="synthetic", messages=[{"role": "user", "content": "hi"}], max_tokens=2)

    credential = tmp_path / "metrics-credential"
    credential.write_text(METRICS + "\n")
    port = free_port()
    prom = Prometheus(scrape_config([stack.port], [engine_metrics], port, credential=credential), tmp_path, port)
    try:
        queries = {
            "gateway": 'sum(gen_ai_server_request_duration_seconds_count{job="conduit-gateway"})',
            "tokens": 'sum(gen_ai_client_token_usage_sum{gen_ai_token_type="output"})',
            "engine": 'sum(conduit_engine_jobs_total{job="conduit-engine",outcome="ok"})',
            "up": 'sum(up{job=~"conduit-.*"})',
        }
        expected = {"gateway": 3.0, "tokens": 6.0, "engine": 3.0, "up": 2.0}
        got: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and got != expected:
            time.sleep(0.5)
            try:
                for name, q in queries.items():
                    result = prom.query(q)["data"]["result"]
                    if result:
                        got[name] = float(result[0]["value"][1])
            except (httpx.HTTPError, KeyError, ValueError):  # Prometheus still starting
                continue
        assert got == expected, f"{got}\n{prom.proc.output()[-2000:]}"
    finally:
        prom.stop()
