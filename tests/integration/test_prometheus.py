"""A real Prometheus scrapes the gateway's and the engine's /metrics."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import Proc, Stack, free_port


def test_prometheus_scrapes_gateway_and_engine(stack: Stack, tmp_path: Path) -> None:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is not installed (.ci/install installs it with apt)")
    engine_metrics = free_port()
    stack.gateway()
    stack.synthetic("synthetic", "--metrics-port", str(engine_metrics))
    client = stack.sdk()
    for _ in range(3):
        client.chat.completions.create(model="synthetic", messages=[{"role": "user", "content": "hi"}], max_tokens=2)

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: conduit-gateway
    static_configs: [{{targets: ['127.0.0.1:{stack.port}']}}]
  - job_name: conduit-engine
    static_configs: [{{targets: ['127.0.0.1:{engine_metrics}']}}]
""")
    prom = Proc([exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prometheus.log")
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
                    r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}).json()
                    result = r["data"]["result"]
                    if result:
                        got[name] = float(result[0]["value"][1])
            except httpx.HTTPError:
                continue
        assert got == expected, f"{got}\n{prom.output()[-2000:]}"
    finally:
        prom.stop()
