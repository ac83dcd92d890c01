"""A real Prometheus with the shipped scrape config and alert rules, pointed at a live stack (two
gateways, one with API keys; the vLLM engine; a diffusers engine): every target is up, and after
traffic every PromQL expression of every shipped dashboard and every metric an alert rule reads
returns data. A renamed metric fails here instead of leaving an empty panel or a silent alert."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MODEL, VllmStack
from tests.harness import ROOT, free_port
from tests.monitoring import Prometheus, alert_rules, dashboard_queries, scrape_config, selectors

#: Panels that only have data on an engine with a GPU (read through NVML): checked to parse and run.
GPU_ONLY = {"GPU memory used"}


@dataclass
class Monitored:
    prometheus: Prometheus
    keyed_url: str
    key: str
    limited_key: str


def make_key(stack: VllmStack, name: str, *limits: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--name", name, *limits,
                           "--redis-url", stack.redis_url, "--key-prefix", stack.prefix],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def monitored(vllm_stack: VllmStack, tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Monitored]:
    images_port = free_port()
    images = vllm_stack.diffusers("tiny-sd", "--metrics-port", str(images_port), path=tiny_sd_dir, timeout=120)
    open_url, open_port = vllm_stack.base_url, vllm_stack.port
    keyed = vllm_stack.gateway(auth=True)
    keyed_url, keyed_port = vllm_stack.base_url, vllm_stack.port
    vllm_stack.base_url, vllm_stack.port = open_url, open_port  # the other e2e tests keep the open gateway
    port = free_port()
    prometheus = Prometheus(scrape_config([open_port, keyed_port], [vllm_stack.metrics_port, images_port], port),
                            tmp_path_factory.mktemp("prometheus"), port)
    try:
        prometheus.wait_until_up(targets=5)
        m = Monitored(prometheus, keyed_url, make_key(vllm_stack, "monitoring"),
                      make_key(vllm_stack, "limited", "--rpm", "1"))
        traffic(m)
        time.sleep(4)  # a few scrapes after the last request (usage counters flush once a second)
        yield m
    finally:
        prometheus.stop()
        # The suite's stack is as it was: its last test stops the vLLM engine and expects no live engine.
        for proc in (keyed, images):
            proc.stop()
            vllm_stack.procs.remove(proc)


def traffic(m: Monitored) -> None:
    """What a day of use looks like, in small: every endpoint, streamed and not, refusals."""
    auth = {"Authorization": f"Bearer {m.key}"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    with httpx.Client(base_url=m.keyed_url, headers=auth, timeout=120) as c:
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        assert c.post("/v1/chat/completions", json={**chat, "stream": True}).status_code == 200
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 8}).status_code == 200
        image = c.post("/v1/images/generations", json={"model": "tiny-sd", "prompt": "a lighthouse", "size": "64x64",
                                                        "n": 2, "response_format": "b64_json"})
        assert image.status_code == 200, image.text
        assert c.post("/v1/chat/completions", json={**chat, "model": "no-such-model"}).status_code == 404
        assert c.get("/v1/models").status_code == 200
    assert httpx.post(f"{m.keyed_url}/v1/chat/completions", json=chat).status_code == 401
    limited = {"Authorization": f"Bearer {m.limited_key}"}
    statuses = [httpx.post(f"{m.keyed_url}/v1/chat/completions", json=chat, headers=limited, timeout=120).status_code
                for _ in range(2)]
    assert statuses == [200, 429]


def test_every_dashboard_and_alert_expression_returns_data(monitored: Monitored) -> None:
    prom = monitored.prometheus
    targets = httpx.get(f"{prom.url}/api/v1/targets").json()["data"]["activeTargets"]
    assert sorted(t["labels"]["job"] for t in targets) == ["conduit-engine", "conduit-engine", "conduit-gateway",
                                                           "conduit-gateway", "prometheus"]
    assert all(t["health"] == "up" for t in targets), targets

    empty, failed = [], []
    queries = dashboard_queries()
    assert len(queries) > 50
    for board, title, expr in queries:
        answer = prom.query(expr)
        if answer["status"] != "success":
            failed.append((board, title, expr, answer.get("error")))
        elif not answer["data"]["result"] and title not in GPU_ONLY:
            empty.append((board, title, expr))
    assert not failed, failed
    assert not empty, "dashboard queries without data:\n" + "\n".join(map(str, empty))

    # An alert's expression is empty on a healthy stack (that is the point), so what is checked is
    # what it reads: each metric exists on the job it names, with every label its matchers use.
    for rule in alert_rules():
        answer = prom.query(rule["expr"])
        assert answer["status"] == "success", (rule["alert"], answer)
        for name, job, labels in selectors(rule["expr"]):
            series = prom.query(f"{name}{{{job}}}")["data"]["result"]
            assert series, f"{rule['alert']}: no {name}{{{job}}}"
            missing = [label for label in labels if not any(label in s["metric"] for s in series)]
            assert not missing, f"{rule['alert']}: {name} has no label {missing}"

    # The alert rules were loaded and evaluated on this stack: none fires on a healthy one.
    rules = httpx.get(f"{prom.url}/api/v1/rules").json()["data"]["groups"][0]["rules"]
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert [r["name"] for r in rules if r["state"] == "firing"] == []


def test_panels_show_the_traffic_they_describe(monitored: Monitored) -> None:
    """Spot checks that the numbers mean what the panels say (after the fixture's traffic)."""
    prom = monitored.prometheus

    def scalar(expr: str) -> float:
        result = prom.query(expr)["data"]["result"]
        assert result, expr
        return sum(float(r["value"][1]) for r in result)

    assert scalar('sum(conduit_gateway_key_requests_total{conduit_key_name="monitoring"})') >= 4
    assert scalar('sum(conduit_gateway_key_images_total{conduit_key_name="monitoring"})') == 2
    assert scalar('sum(conduit_gateway_key_rate_limited_total{conduit_key_name="limited",limit="requests"})') == 1
    assert scalar('sum(conduit_gateway_rejections_total{error_type="invalid_api_key"})') >= 1
    assert scalar('sum(conduit_engine_images_total{gen_ai_request_model="tiny-sd"})') >= 2
    assert scalar(f'max(conduit_gateway_engines_live{{gen_ai_request_model="{MODEL}"}})') == 1
    assert scalar('sum(conduit_engine_vllm_tokens_total{gen_ai_token_type="output"})') > 0
